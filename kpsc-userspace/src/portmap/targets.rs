//! What the kernel program needs per port: the broker's address (of the listen
//! address's family) and the node's own source addresses towards it (`--snat-address`, or
//! the route's choice), and the forwarding it relies on.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use anyhow::{Context as _, bail};
use kpsc_common::{Ip, PortTarget, PortmapConfig, ip_bits, portmap::SNAT_PORT_FIRST};

use crate::config::portmap::PortmapEntry;

/// The port map and the program's `--snat-address` table its targets point into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTargets {
    pub ports: Vec<(u16, PortTarget)>,
    /// PORTMAP_SNAT: each family's addresses after its first (which a target holds in
    /// `snat_ip`), IPv4 ones first.
    pub snat_table: Vec<Ip>,
}

impl KernelTargets {
    pub fn mapped_ports(&self) -> Vec<u16> {
        self.ports.iter().map(|(port, _)| *port).collect()
    }
}

/// Resolves each broker to an address of its listen address's family (portmap does not
/// translate between IPv4 and IPv6), and gives it the node's source addresses towards it:
/// the `snat_addresses` of that family, else the route's own choice.
pub fn kernel_targets(
    entries: &[PortmapEntry],
    snat_addresses: &[IpAddr],
) -> anyhow::Result<KernelTargets> {
    let family_addresses = |v4: bool| -> Vec<IpAddr> {
        snat_addresses
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == v4)
            .collect()
    };
    let (snat_v4, snat_v6) = (family_addresses(true), family_addresses(false));
    let snat_table: Vec<Ip> = snat_v4
        .iter()
        .skip(1)
        .chain(snat_v6.iter().skip(1))
        .map(|a| ip_bits(*a))
        .collect();
    let v6_first = snat_v4.len().saturating_sub(1);
    let ports = entries
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
            let (addresses, first) = if v4 {
                (&snat_v4, 0)
            } else {
                (&snat_v6, v6_first)
            };
            let snat = match addresses.first() {
                None => route_source(broker, None)?,
                Some(_) => {
                    for a in addresses {
                        route_source(broker, Some(*a))?;
                    }
                    addresses[0]
                }
            };
            let listen = match e.listen.ip() {
                ip if ip.is_unspecified() => kpsc_common::IP_ANY,
                ip => ip_bits(ip),
            };
            let extra = addresses.len().saturating_sub(1);
            Ok((
                e.listen.port(),
                PortTarget {
                    listen_ip: listen,
                    broker_ip: ip_bits(broker.ip()),
                    snat_ip: ip_bits(snat),
                    broker_port: e.broker.port.to_be(),
                    snat_first: u8::try_from(if extra == 0 { 0 } else { first })
                        .context("too many --snat-address entries")?,
                    snat_extra: u8::try_from(extra).context("too many --snat-address entries")?,
                },
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(KernelTargets { ports, snat_table })
}

/// The node's source address towards `broker`: `from`, once the node has a route from it
/// to the broker, else the route's own choice.
fn route_source(broker: SocketAddr, from: Option<IpAddr>) -> anyhow::Result<IpAddr> {
    let local = match from {
        Some(ip) => SocketAddr::new(ip, 0),
        None if broker.is_ipv4() => "0.0.0.0:0".parse()?,
        None => "[::]:0".parse()?,
    };
    let probe = UdpSocket::bind(local).with_context(|| format!("binding to {local}"))?;
    probe.connect(broker).with_context(|| match from {
        Some(ip) => format!("no route to broker {broker} from --snat-address {ip}"),
        None => format!("no route to broker {broker}"),
    })?;
    Ok(probe.local_addr()?.ip())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::addr::BrokerAddr;

    fn entry(broker: &str, listen: &str) -> PortmapEntry {
        let broker = BrokerAddr::parse(broker).unwrap();
        PortmapEntry {
            listen: listen.parse().unwrap(),
            advertised: broker.clone(),
            broker,
        }
    }

    /// Each family's first address goes into its targets; the rest into the table, IPv4
    /// first, and each target points at its own family's part. Loopback addresses are local
    /// on every host (the flag's own check refuses them; this is the layout only).
    #[test]
    fn snat_table_holds_each_familys_further_addresses() {
        let v4: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut given = v4.clone();
        given.push("::1".parse().unwrap());
        let t = kernel_targets(
            &[
                entry("127.0.0.9:9092", "0.0.0.0:9093"),
                entry("[::1]:9092", "[::]:9094"),
            ],
            &given,
        )
        .unwrap();
        assert_eq!(t.snat_table, vec![ip_bits(v4[1]), ip_bits(v4[2])]);
        let (port, four) = t.ports[0];
        assert_eq!(port, 9093);
        assert_eq!(
            (four.snat_ip, four.snat_first, four.snat_extra),
            (ip_bits(v4[0]), 0, 2)
        );
        let (_, six) = t.ports[1];
        assert_eq!(six.snat_ip, ip_bits("::1".parse().unwrap()));
        assert_eq!(six.snat_extra, 0);
        // Without the flag: the route's choice, nothing in the table.
        let t = kernel_targets(&[entry("127.0.0.9:9092", "0.0.0.0:9093")], &[]).unwrap();
        assert!(t.snat_table.is_empty());
        assert_eq!(t.ports[0].1.snat_ip, ip_bits("127.0.0.1".parse().unwrap()));
        assert_eq!(t.ports[0].1.snat_extra, 0);
    }
}
