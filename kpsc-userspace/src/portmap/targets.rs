//! What the kernel program needs per port: the broker's address (of the listen
//! address's family) and the node's own source address towards it (the route's choice),
//! and the forwarding it relies on.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};

use anyhow::{Context as _, bail};
use kpsc_common::{PortTarget, PortmapConfig, ip_bits, portmap::SNAT_PORT_FIRST};

use crate::config::portmap::PortmapEntry;

/// Resolves each broker to an address of its listen address's family (portmap does not
/// translate between IPv4 and IPv6), and the node's source address towards it (the
/// route's own choice).
pub fn kernel_targets(entries: &[PortmapEntry]) -> anyhow::Result<Vec<(u16, PortTarget)>> {
    entries
        .iter()
        .map(|e| {
            let v4 = e.listen.is_ipv4();
            let family = if v4 { "IPv4" } else { "IPv6" };
            let broker = (e.broker.host.as_str(), e.broker.port)
                .to_socket_addrs()
                .with_context(|| format!("resolving broker {}", e.broker))?
                .find(|a| a.is_ipv4() == v4)
                .with_context(|| {
                    format!(
                        "broker {} has no {family} address, and its listen address {} is \
                         {family} (portmap does not translate between IPv4 and IPv6)",
                        e.broker, e.listen
                    )
                })?;
            let unspecified: SocketAddr = if v4 {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let probe = UdpSocket::bind(unspecified)?;
            probe
                .connect(broker)
                .with_context(|| format!("no route to broker {broker}"))?;
            let snat = probe.local_addr()?.ip();
            let listen = match e.listen.ip() {
                ip if ip.is_unspecified() => kpsc_common::IP_ANY,
                ip => ip_bits(ip),
            };
            Ok((
                e.listen.port(),
                PortTarget {
                    listen_ip: listen,
                    broker_ip: ip_bits(broker.ip()),
                    snat_ip: ip_bits(snat),
                    broker_port: e.broker.port.to_be(),
                    _pad: 0,
                },
            ))
        })
        .collect()
}

/// The program forwards with bpf_fib_lookup, which honours the interface's forwarding
/// flag of each family it translates.
pub fn check_forwarding(interfaces: &[String], entries: &[PortmapEntry]) -> anyhow::Result<()> {
    for (family, v4) in [("ipv4", true), ("ipv6", false)] {
        if !entries.iter().any(|e| e.listen.is_ipv4() == v4) {
            continue;
        }
        for iface in interfaces {
            let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
            let value = std::fs::read_to_string(&path)
                .with_context(|| format!("interface {iface:?} not found ({path} unreadable)"))?;
            if value.trim() != "1" {
                let all = if v4 {
                    "net.ipv4.ip_forward=1"
                } else {
                    "net.ipv6.conf.all.forwarding=1"
                };
                bail!(
                    "{} forwarding is off on {iface}: portmap forwards packets between client \
                     and brokers, enable it with `sysctl -w net.{family}.conf.{iface}.forwarding=1` \
                     (or {all})",
                    if v4 { "IPv4" } else { "IPv6" }
                );
            }
        }
    }
    Ok(())
}

/// The program's settings: the SYN budget, and the node's own ephemeral port range, which
/// translated source ports avoid so the node's own connections to a broker (the
/// advertised-listener probe among them) never share a tuple with a translated flow.
/// Translated ports come from SNAT_PORT_FIRST..=65535, so the range is clamped to that
/// (a range starting lower would otherwise exclude nothing); a range and port map that
/// leave no translated port at all are refused, as every SYN would be dropped.
pub fn program_config(syn_rate_per_source: u32, mapped: &[u16]) -> anyhow::Result<PortmapConfig> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(first)), Some(Ok(last))) = (ports.next(), ports.next()) else {
        bail!("{PATH}: expected two ports, got {text:?}");
    };
    let (excluded_first, excluded_last) = (first.max(SNAT_PORT_FIRST), last);
    let free = (SNAT_PORT_FIRST..=u16::MAX)
        .filter(|p| !(excluded_first..=excluded_last).contains(p) && !mapped.contains(p))
        .count();
    if free == 0 {
        bail!(
            "no source port left for translated flows: they use {SNAT_PORT_FIRST}-65535 minus \
             the node's ephemeral range ({PATH} = {first}-{last}) and the mapped ports; \
             narrow the range, e.g. `sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\"`"
        );
    }
    if free < 1024 {
        tracing::warn!(
            free,
            range = %format!("{first}-{last}"),
            "few source ports left for translated flows outside {PATH}: new connections may be dropped (counted as drop_no_port)"
        );
    }
    Ok(PortmapConfig {
        syn_rate_per_source,
        local_port_first: excluded_first,
        local_port_last: excluded_last,
    })
}
