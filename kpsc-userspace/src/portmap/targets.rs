//! What the kernel program needs per port: the broker's IPv4 address and the node's own
//! source address towards it (the route's choice), and the forwarding it relies on.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs, UdpSocket};

use anyhow::{Context as _, bail};
use kpsc_common::{PortTarget, PortmapConfig, portmap::SNAT_PORT_FIRST};

use crate::config::portmap::PortmapEntry;

fn ipv4_bits(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Resolves each broker and the node's source address towards it (the route's own choice).
pub fn kernel_targets(entries: &[PortmapEntry]) -> anyhow::Result<Vec<(u16, PortTarget)>> {
    entries
        .iter()
        .map(|e| {
            let broker = (e.broker.host.as_str(), e.broker.port)
                .to_socket_addrs()
                .with_context(|| format!("resolving broker {}", e.broker))?
                .find(|a| a.is_ipv4())
                .with_context(|| format!("broker {} has no IPv4 address", e.broker))?;
            let probe = UdpSocket::bind("0.0.0.0:0")?;
            probe
                .connect(broker)
                .with_context(|| format!("no route to broker {broker}"))?;
            let (IpAddr::V4(snat), IpAddr::V4(broker_ip), IpAddr::V4(listen)) =
                (probe.local_addr()?.ip(), broker.ip(), e.listen.ip())
            else {
                bail!("portmap handles IPv4 only");
            };
            Ok((
                e.listen.port(),
                PortTarget {
                    listen_ip: ipv4_bits(listen),
                    broker_ip: ipv4_bits(broker_ip),
                    snat_ip: ipv4_bits(snat),
                    broker_port: e.broker.port.to_be(),
                    _pad: 0,
                },
            ))
        })
        .collect()
}

/// The program forwards with bpf_fib_lookup, which honours the interface's forwarding flag.
pub fn check_forwarding(interfaces: &[String]) -> anyhow::Result<()> {
    for iface in interfaces {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
        let value = std::fs::read_to_string(&path)
            .with_context(|| format!("interface {iface:?} not found ({path} unreadable)"))?;
        if value.trim() != "1" {
            bail!(
                "IPv4 forwarding is off on {iface}: portmap forwards packets between client and \
                 brokers, enable it with `sysctl -w net.ipv4.conf.{iface}.forwarding=1` \
                 (or net.ipv4.ip_forward=1)"
            );
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
