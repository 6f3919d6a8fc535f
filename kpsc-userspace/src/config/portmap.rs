//! `kpscd portmap` flags and their validation. Portmap maps only static entries: the brokers
//! advertise the endpoint's names, so metadata cannot reveal addresses to map dynamically,
//! and the flags for dynamic listeners are not offered at all.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::Args;
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    config::{
        common::{CommonArgs, CommonSettings},
        error::ConfigError,
        file::{self, pick, pick_list},
        listener::AllowSourceArgs,
    },
    mapping::{
        addr::BrokerAddr,
        map::{DynamicPorts, PortMapConfig},
    },
};

/// bpffs directory the maps are pinned under by default.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/kpsc";

/// `--attach`: which kernel hook translates packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// The choice the measurements in the README support for this node (logged at start).
    #[default]
    Auto,
    /// TC ingress only: handles every packet, GSO and locally generated ones included.
    Tc,
    /// Native (driver) XDP in front of TC: XDP translates and redirects what it can, TC
    /// the rest. Refused when an interface's driver has no native XDP.
    Xdp,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tc => "tc",
            Self::Xdp => "xdp",
        })
    }
}

/// Portmap-mode flags: the port map (static mappings only) plus where to attach.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct PortmapArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,

    /// Interface(s) to attach the TC program to (client- and broker-facing; repeatable
    /// or comma-separated).
    #[arg(long = "interface", value_delimiter = ',', value_name = "IFACE")]
    pub interface: Vec<String>,

    /// Instance name: maps are pinned under <pin-root>/<instance>/, locked while kpscd
    /// runs (two kpscd portmap on one host need different names).
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,

    /// bpffs directory for the pins.
    #[arg(long = "pin-root", value_name = "DIR")]
    pub pin_root: Option<PathBuf>,

    /// New connections (SYNs that get a half-open flow) one client address may open per
    /// second; 0 = no limit. A cloud endpoint's NAT puts many clients behind few addresses:
    /// keep this well above their combined connection rate. [default: 1000]
    #[arg(long = "syn-rate-per-source", value_name = "N")]
    pub syn_rate_per_source: Option<u32>,

    #[command(flatten)]
    #[serde(flatten)]
    pub allow: AllowSourceArgs,

    /// Kernel hook: `tc`, `xdp` (native XDP in front of TC) or `auto`. [default: auto]
    #[arg(long = "attach", value_name = "MODE")]
    pub attach: Option<AttachMode>,

    /// Node address to use as the translated source towards the brokers of its family
    /// (repeatable or comma-separated; each address gives every broker about 36,000 more
    /// source ports). Replaces the route's own choice for that family, so list that address
    /// too to keep using it. The brokers must route every address back to this node.
    /// [default: the source address of the route to each broker]
    #[arg(long = "snat-address", value_delimiter = ',', value_name = "IP")]
    pub snat_address: Vec<String>,
}

/// One validated mapping: listen port -> broker, and what the broker should advertise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortmapEntry {
    pub listen: SocketAddr,
    pub broker: BrokerAddr,
    pub advertised: BrokerAddr,
}

#[derive(Clone, Debug)]
pub struct PortmapConfig {
    /// The flags as given, re-resolved (with the file re-read) on SIGHUP.
    pub args: PortmapArgs,
    pub common: CommonSettings,
    pub entries: Vec<PortmapEntry>,
    pub interfaces: Vec<String>,
    pub instance: String,
    pub pin_root: PathBuf,
    pub syn_rate_per_source: u32,
    /// SYNs from elsewhere are dropped in the kernel. Empty: every source.
    pub allow_sources: Vec<IpNet>,
    pub attach: AttachMode,
    /// `--snat-address`, in the order given, without repeats. Empty: the route's choice.
    pub snat_addresses: Vec<IpAddr>,
}

impl PortmapConfig {
    pub fn resolve(flags: PortmapArgs) -> Result<Self, ConfigError> {
        let original = flags.clone();
        let file: PortmapArgs = file::load(flags.common.config.as_deref())?;
        let interfaces = pick_list(flags.interface, file.interface);
        if interfaces.is_empty() {
            return Err(ConfigError::new(
                "--interface",
                "portmap needs the interface(s) to attach to, e.g. --interface eth0",
            ));
        }
        let instance = pick(flags.instance, file.instance).unwrap_or_else(|| "default".to_owned());
        if instance.is_empty() || instance.contains('/') || instance.starts_with('.') {
            return Err(ConfigError::new(
                "--instance",
                format!("{instance:?} is not a valid name"),
            ));
        }
        let pin_root =
            pick(flags.pin_root, file.pin_root).unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT));
        let raw_mappings = pick_list(
            flags.common.bootstrap_server_mapping.clone(),
            file.common.bootstrap_server_mapping.clone(),
        );
        if let Some(m) = raw_mappings.iter().find(|m| m.split(',').count() != 3) {
            return Err(ConfigError::new(
                "--bootstrap-server-mapping",
                format!(
                    "{m:?}: portmap needs broker_host:port,listen_ip:port,advertised_host:port \
                     (the advertised address is what the broker must announce)"
                ),
            ));
        }
        let common = CommonSettings::resolve(flags.common, file.common)?;
        // Conflicts (two brokers on one port, a broker mapped twice) are found by the same
        // map the proxy uses.
        PortMapConfig {
            static_mappings: common.static_mappings.clone(),
            external: Vec::new(),
            dynamic: DynamicPorts::Disabled,
            listen_ip: [0, 0, 0, 0].into(),
            advertised: None,
            max_dynamic: 0,
        }
        .validate()
        .map_err(|e| ConfigError::new("--bootstrap-server-mapping", e.to_string()))?;
        let entries = common
            .static_mappings
            .iter()
            .map(|m| PortmapEntry {
                listen: m.listen,
                broker: m.broker.clone(),
                advertised: m.advertised.clone(),
            })
            .collect::<Vec<_>>();
        // NAT64/NAT46 is not portmap's job: a broker given as an address must be of its
        // listen address's family (a name is resolved to that family at start).
        if let Some((e, broker)) = entries.iter().find_map(|e| {
            let broker: std::net::IpAddr = e.broker.host.parse().ok()?;
            (broker.is_ipv4() != e.listen.is_ipv4()).then_some((e, broker))
        }) {
            return Err(ConfigError::new(
                "--bootstrap-server-mapping",
                format!(
                    "listen address {} and broker {broker} are of different IP families: \
                     portmap does not translate between IPv4 and IPv6 (listen on an address \
                     of the broker's family)",
                    e.listen
                ),
            ));
        }
        let syn_rate_per_source = pick(flags.syn_rate_per_source, file.syn_rate_per_source)
            .unwrap_or(kpsc_common::portmap::DEFAULT_SYN_RATE_PER_SOURCE);
        let allow_sources = AllowSourceArgs::resolve(flags.allow, file.allow)?;
        let max = kpsc_common::portmap::MAX_ALLOW_SOURCES as usize;
        if allow_sources.len() > max {
            return Err(ConfigError::new(
                "--allow-source",
                format!(
                    "{} networks given; portmap holds at most {max}",
                    allow_sources.len()
                ),
            ));
        }
        let attach = pick(flags.attach, file.attach).unwrap_or_default();
        let snat_addresses = snat_addresses(&pick_list(flags.snat_address, file.snat_address))?;
        Ok(Self {
            args: original,
            common,
            entries,
            interfaces,
            instance,
            pin_root,
            syn_rate_per_source,
            allow_sources,
            attach,
            snat_addresses,
        })
    }
}

/// Parses `--snat-address` and checks that each is an address of this node (else the
/// brokers' replies to it would never reach the program).
fn snat_addresses(given: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    let flag = |message: String| ConfigError::new("--snat-address", message);
    let mut addresses: Vec<IpAddr> = Vec::new();
    for text in given {
        let ip: IpAddr = text
            .trim()
            .parse()
            .map_err(|_| flag(format!("{text:?} is not an IP address")))?;
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(flag(format!(
                "{ip} cannot be a source towards the brokers: give a unicast address of this node"
            )));
        }
        if let Err(e) = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)) {
            return Err(flag(format!(
                "{ip} is not usable as an address of this node ({e}): add it to an interface \
                 first (`ip addr add`; an IPv6 address must have finished duplicate address \
                 detection)"
            )));
        }
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    let max = kpsc_common::portmap::MAX_SNAT_ADDRESSES as usize;
    // Each family keeps its first address in the port map itself; the rest go in the
    // program's SNAT table.
    let extra = addresses.len()
        - [true, false]
            .iter()
            .filter(|v4| addresses.iter().any(|a| a.is_ipv4() == **v4))
            .count();
    if extra > max {
        return Err(flag(format!(
            "{} addresses given; portmap holds the first of each family and at most {} more",
            addresses.len(),
            max
        )));
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        portmap: PortmapArgs,
    }

    #[test]
    fn help_offers_only_what_portmap_accepts() {
        let help = Cli::command().render_long_help().to_string();
        for flag in ["--bootstrap-server-mapping", "--interface", "--pin-root"] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
        }
        for flag in [
            "--dynamic-sequential-min-port",
            "--dynamic-advertised-listener",
            "--external-server-mapping",
            "--bulk-policy",
        ] {
            assert!(!help.contains(flag), "{flag} offered by portmap:\n{help}");
        }
        let err = Cli::try_parse_from(["kpscd", "--dynamic-sequential-min-port", "9000"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--dynamic-sequential-min-port"), "{err}");
    }

    #[test]
    fn file_keys_of_proxy_mode_are_refused() {
        let dir = std::env::temp_dir().join(format!("kpsc-portmap-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kpsc.toml");
        std::fs::write(
            &path,
            "bootstrap_server_mapping = [\"b:1,0.0.0.0:2,a:2\"]\ninterface = [\"lo\"]\nbulk_policy = \"cap\"\n",
        )
        .unwrap();
        let args = Cli::try_parse_from(["kpscd", "--config", path.to_str().unwrap()])
            .unwrap()
            .portmap;
        let err = PortmapConfig::resolve(args).unwrap_err();
        assert_eq!(err.flag, "--config");
        assert!(err.message.contains("bulk_policy"), "{err}");
        std::fs::write(
            &path,
            "bootstrap_server_mapping = [\"b:1,0.0.0.0:2,a:2\"]\ninterface = [\"lo\"]\n",
        )
        .unwrap();
        let args = Cli::try_parse_from(["kpscd", "--config", path.to_str().unwrap()])
            .unwrap()
            .portmap;
        let c = PortmapConfig::resolve(args).unwrap();
        assert_eq!(c.interfaces, ["lo"]);
        assert_eq!(c.entries.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn snat_addresses_must_be_unicast_addresses_of_this_node() {
        let resolve = |addresses: &str| {
            let args = Cli::try_parse_from([
                "kpscd",
                "--interface",
                "lo",
                "--bootstrap-server-mapping",
                "b:1,0.0.0.0:2,a:2",
                "--snat-address",
                addresses,
            ])
            .unwrap()
            .portmap;
            PortmapConfig::resolve(args)
        };
        for (given, says) in [
            ("nope", "not an IP address"),
            ("0.0.0.0", "unicast"),
            ("127.0.0.1", "unicast"),
            ("224.0.0.1", "unicast"),
            // TEST-NET-2: no host of a test run holds it.
            ("198.51.100.7", "not usable as an address of this node"),
        ] {
            let err = resolve(given).unwrap_err();
            assert_eq!(err.flag, "--snat-address", "{given}");
            assert!(err.message.contains(says), "{given}: {err}");
        }
    }
}
