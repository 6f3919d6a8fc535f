//! `kpscd proxy` flags (kafka-proxy's names where it has them) and their validation.

use std::{fmt, net::IpAddr, time::Duration};

use clap::Args;
use serde::Deserialize;

use crate::{
    config::{
        common::{CommonArgs, CommonSettings},
        error::ConfigError,
        file::{self, pick, pick_list},
        listener::{AccessConfig, ListenerArgs},
        run_as::{RunAs, RunAsArgs},
        sasl::{ProxySasl, ProxySaslArgs},
        upstream_tls::{UpstreamTls, UpstreamTlsArgs},
        values::{ByteSize, HumanDuration},
    },
    mapping::{
        addr::{AdvertisedTemplate, BrokerAddr},
        dial::DialMap,
        map::{DynamicPorts, PortMapConfig},
    },
};

/// How Produce/Fetch (bulk) responses are treated (`--bulk-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkPolicy {
    /// Advertise Produce <= 9 and Fetch <= 15: bulk responses then never carry addresses and
    /// are forwarded without being decoded.
    #[default]
    Cap,
    /// Advertise everything kpsc can rewrite; decode and rewrite `node_endpoints` in Produce
    /// v10+ and Fetch v16+ responses.
    Rewrite,
}

/// How the bytes of frames that pass through unchanged are moved (`--bulk-transfer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkTransfer {
    /// The path measured best on this kernel that the privileges allow: copy (see
    /// `BulkTransfer::resolve`).
    #[default]
    Auto,
    /// splice(2) through a pipe per direction, for what is not already buffered.
    Splice,
    /// read(2) into a buffer, write(2) out of it.
    Copy,
    /// Requests, and the responses that need no rewrite, go socket to socket in the
    /// kernel (sockmap verdicts frame them); kpscd handles the rest. Lowest small-request
    /// latency, more CPU per GB. Needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN at start.
    Sockmap,
    /// splice through a pipe per direction as `splice`, run by io_uring: linked splices
    /// in the kernel's workers move a frame's span back to back, and kpscd wakes once per
    /// frame. Needs io_uring (Linux 5.7+, not disabled by `kernel.io_uring_disabled` or a
    /// seccomp filter); no privilege.
    Uring,
}

/// The value as written on the command line (for logs).
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

impl fmt::Display for BulkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&value_name(*self))
    }
}

impl BulkTransfer {
    /// The path `auto` stands for, and why. Copy: in kpsc-bench's namespace runs on Linux
    /// 6.18 on a quiet machine it moved the most on every produce and fetch workload, 64
    /// KiB and 1 MiB batches (above splice; sockmap, both directions in the kernel, lowest
    /// of the three), with as little memory per idle connection as splice since its large
    /// buffer exists only while a frame moves. Splice spends less CPU per GB on 1 MiB
    /// batches; sockmap has the lowest small-request latency when kpscd has its own CPU.
    /// The README has the numbers. Needs no privilege. When this changes, `cargo xtask
    /// test` must rerun the proxy suite under the path `auto` no longer covers.
    pub fn resolve(self) -> (Self, &'static str) {
        match self {
            Self::Auto => (
                Self::Copy,
                "copy measured the most throughput on this kernel at the same idle memory \
                 as splice (splice: less CPU per GB on large batches; sockmap: lower \
                 small-request latency; choose either with --bulk-transfer)",
            ),
            chosen => (chosen, "chosen with --bulk-transfer"),
        }
    }
}

impl fmt::Display for BulkTransfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&value_name(*self))
    }
}

/// Brokers found in metadata: which get a listener here, and what clients are told.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct DynamicArgs {
    /// Broker served by another proxy instance: `broker_host:port,advertised_host:port`.
    /// Rewritten in responses; no listener is started for it. Repeatable.
    #[arg(long = "external-server-mapping", value_name = "MAPPING")]
    pub external_server_mapping: Vec<String>,

    /// Do not start listeners for brokers discovered in metadata.
    #[arg(long = "dynamic-listeners-disable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dynamic_listeners_disable: Option<bool>,

    /// First port for dynamic listeners.
    #[arg(long = "dynamic-sequential-min-port", value_name = "PORT")]
    pub dynamic_sequential_min_port: Option<u16>,

    /// How many ports from the min port dynamic listeners may use (0 = up to 65535).
    #[arg(long = "dynamic-sequential-max-ports", value_name = "N")]
    pub dynamic_sequential_max_ports: Option<u16>,

    /// Dynamic listener port = min port + broker id (kpsc's default: every instance with the
    /// same configuration computes the same map). `--deterministic-listeners=false` assigns
    /// ports in discovery order instead.
    #[arg(long = "deterministic-listeners", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub deterministic_listeners: Option<bool>,

    /// Subtracted from broker ids for deterministic ports (port = min port + id - offset),
    /// e.g. `1001` for auto-generated ids 1001, 1002, ...: the port range stays tight and
    /// identical on every instance.
    #[arg(long = "dynamic-broker-id-offset", value_name = "ID")]
    pub dynamic_broker_id_offset: Option<i32>,

    /// Advertised host for dynamic listeners, with `{{.brokerId}}` or `<broker_id>`
    /// replaced by the broker id; an optional `:port` fixes the advertised port.
    #[arg(long = "dynamic-advertised-listener", value_name = "HOST[:PORT]")]
    pub dynamic_advertised_listener: Option<String>,

    /// IP the dynamic listeners bind to (and advertise when no advertised listener is set).
    #[arg(long = "default-listener-ip", value_name = "IP")]
    pub default_listener_ip: Option<IpAddr>,

    /// Most dynamic listeners metadata may create (default 128), whatever the port range:
    /// a response naming hundreds of unknown brokers is refused instead of bound.
    #[arg(long = "max-dynamic-listeners", value_name = "N")]
    pub max_dynamic_listeners: Option<usize>,
}

/// Proxy-mode flags.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct ProxyArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    #[serde(flatten)]
    pub dynamic: DynamicArgs,

    #[command(flatten)]
    #[serde(flatten)]
    pub listener: ListenerArgs,

    #[command(flatten)]
    #[serde(flatten)]
    pub run_as: RunAsArgs,

    #[command(flatten)]
    #[serde(flatten)]
    pub upstream_tls: UpstreamTlsArgs,

    #[command(flatten)]
    #[serde(flatten)]
    pub sasl: ProxySaslArgs,

    /// Broker reached under another address: `broker_host:port,dial_host:port` (what
    /// the broker advertises, where kpscd connects). Repeatable.
    #[arg(long = "dial-address-mapping", value_name = "MAPPING")]
    pub dial_address_mapping: Vec<String>,

    /// Request api keys to refuse (the connection is closed), e.g. `20` (DeleteTopics).
    /// Comma-separated or repeated.
    #[arg(
        long = "forbidden-api-keys",
        value_delimiter = ',',
        value_name = "KEYS"
    )]
    pub forbidden_api_keys: Vec<i16>,

    /// Produce/Fetch responses: `cap` advertises Produce<=v9, Fetch<=v15 so bulk responses
    /// never carry addresses and pass opaquely; `rewrite` decodes and rewrites KIP-951
    /// node_endpoints in Produce v10+/Fetch v16+.
    #[arg(long = "bulk-policy", value_name = "POLICY")]
    pub bulk_policy: Option<BulkPolicy>,

    /// Largest Kafka frame accepted in either direction, in bytes.
    #[arg(long = "max-frame-size", value_name = "BYTES")]
    pub max_frame_size: Option<u32>,

    /// How frames that pass through unchanged are moved.
    #[arg(long = "bulk-transfer", value_name = "HOW")]
    pub bulk_transfer: Option<BulkTransfer>,

    /// Requests in flight per connection before kpsc stops reading from the client.
    #[arg(long = "kafka-max-open-requests", value_name = "N")]
    pub kafka_max_open_requests: Option<usize>,

    /// Memory all connections together may use to rewrite responses, e.g. `1GiB` (default:
    /// enough for two --max-frame-size responses at once; a rewrite holds twice the
    /// response). Larger rewrites wait for others to finish; one that could never fit
    /// closes its connection.
    #[arg(long = "rewrite-memory-budget", value_name = "BYTES")]
    pub rewrite_memory_budget: Option<ByteSize>,

    /// How long in-flight requests may take to finish after SIGTERM/SIGINT, e.g. `10s`.
    #[arg(long = "shutdown-timeout", value_name = "DURATION")]
    pub shutdown_timeout: Option<HumanDuration>,
}

/// Validated proxy-mode configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub common: CommonSettings,
    pub port_map: PortMapConfig,
    pub access: AccessConfig,
    pub dial: DialMap,
    /// TLS towards the brokers (`--tls-enable`).
    pub upstream_tls: Option<UpstreamTls>,
    /// `--sasl-enable`: every upstream connection authenticates (so do kpscd's own, through
    /// `common.discovery_sasl`).
    pub upstream_sasl: ProxySasl,
    pub forbidden_api_keys: Vec<i16>,
    pub bulk_policy: BulkPolicy,
    pub max_frame_size: u32,
    pub bulk_transfer: BulkTransfer,
    pub max_in_flight: usize,
    pub rewrite_memory_budget: u64,
    pub shutdown_timeout: Duration,
    /// Who to become once the listeners are bound (`--user`/`--group`).
    pub run_as: Option<RunAs>,
}

/// Memory rewriting one response takes, per byte of the response: the frame as received
/// and the rewritten frame (the layout walk copies every byte but hosts and ports, and
/// keeps nothing per partition). Output longer than the frame is reserved on top once it
/// is known.
pub const REWRITE_MEMORY_PER_FRAME_BYTE: u64 = 2;
/// The default budget lets this many rewrites of `--max-frame-size` responses run at once.
const DEFAULT_MAX_FRAME_REWRITES: u64 = 2;
const MIN_REWRITE_MEMORY_BUDGET: u64 = 1 << 20;
/// Kafka's own default for `socket.request.max.bytes`.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 100 * 1024 * 1024;
/// Enough for large clusters; far below what a hostile response could ask for.
pub const DEFAULT_MAX_DYNAMIC_LISTENERS: usize = 128;
/// kafka-proxy's `--kafka-max-open-requests` default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

impl ProxyConfig {
    pub fn resolve(flags: ProxyArgs) -> Result<Self, ConfigError> {
        let file: ProxyArgs = file::load(flags.common.config.as_deref())?;
        let mut common = CommonSettings::resolve(flags.common, file.common)?;
        let upstream_sasl =
            ProxySaslArgs::resolve(flags.sasl, file.sasl, &|name| std::env::var(name).ok())?;
        if let Some(creds) = &upstream_sasl.credentials {
            // One identity towards the brokers: kafka-proxy's meaning of --sasl-enable.
            if common.discovery_sasl.is_some() {
                return Err(ConfigError::new(
                    "--discovery-sasl-mechanism",
                    "--sasl-enable already authenticates kpscd's own connections with the \
                     same credentials: drop the --discovery-sasl-* flags",
                ));
            }
            common.discovery_sasl = Some(creds.clone());
        }
        let port_map = resolve_port_map(&common, flags.dynamic, file.dynamic)?;
        let access = AccessConfig::resolve(flags.listener, file.listener)?;
        let run_as = RunAs::resolve(flags.run_as, file.run_as)?;
        if let (Some(run_as), Some(min_port)) = (&run_as, port_map.dynamic.min_port())
            && min_port < 1024
        {
            return Err(ConfigError::new(
                "--dynamic-sequential-min-port",
                format!(
                    "{min_port}: dynamic listeners are bound after kpscd became --user {}, \
                     which cannot bind ports below 1024; start them at 1024 or above",
                    run_as.user
                ),
            ));
        }
        let upstream_tls = UpstreamTls::resolve(flags.upstream_tls, file.upstream_tls)?;
        let dial = DialMap::parse(&pick_list(
            flags.dial_address_mapping,
            file.dial_address_mapping,
        ))
        .map_err(|e| ConfigError::new("--dial-address-mapping", e))?;
        let max_frame_size =
            pick(flags.max_frame_size, file.max_frame_size).unwrap_or(DEFAULT_MAX_FRAME_SIZE);
        if max_frame_size < 1024 {
            return Err(ConfigError::new(
                "--max-frame-size",
                format!("{max_frame_size} is too small (at least 1024 bytes)"),
            ));
        }
        let max_in_flight = pick(flags.kafka_max_open_requests, file.kafka_max_open_requests)
            .unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if max_in_flight == 0 {
            return Err(ConfigError::new(
                "--kafka-max-open-requests",
                "must be at least 1",
            ));
        }
        let rewrite_memory_budget =
            match pick(flags.rewrite_memory_budget, file.rewrite_memory_budget) {
                Some(budget) if budget.0 < MIN_REWRITE_MEMORY_BUDGET => {
                    return Err(ConfigError::new(
                        "--rewrite-memory-budget",
                        "must be at least 1MiB: every Metadata response is rewritten",
                    ));
                }
                Some(budget) => budget.0,
                None => (u64::from(max_frame_size)
                    * REWRITE_MEMORY_PER_FRAME_BYTE
                    * DEFAULT_MAX_FRAME_REWRITES)
                    .max(MIN_REWRITE_MEMORY_BUDGET),
            };
        Ok(Self {
            common,
            port_map,
            access,
            dial,
            upstream_tls,
            upstream_sasl,
            rewrite_memory_budget,
            forbidden_api_keys: pick_list(flags.forbidden_api_keys, file.forbidden_api_keys),
            bulk_policy: pick(flags.bulk_policy, file.bulk_policy).unwrap_or_default(),
            max_frame_size,
            bulk_transfer: pick(flags.bulk_transfer, file.bulk_transfer).unwrap_or_default(),
            max_in_flight,
            shutdown_timeout: pick(flags.shutdown_timeout, file.shutdown_timeout)
                .map_or(Duration::from_secs(10), |d| d.0),
            run_as,
        })
    }
}

fn resolve_port_map(
    common: &CommonSettings,
    flags: DynamicArgs,
    file: DynamicArgs,
) -> Result<PortMapConfig, ConfigError> {
    let external = pick_list(flags.external_server_mapping, file.external_server_mapping)
        .iter()
        .map(|m| parse_external(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new("--external-server-mapping", e))?;
    let listen_ip = pick(flags.default_listener_ip, file.default_listener_ip)
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let disabled = pick(
        flags.dynamic_listeners_disable,
        file.dynamic_listeners_disable,
    )
    .unwrap_or(false);
    let min_port = pick(
        flags.dynamic_sequential_min_port,
        file.dynamic_sequential_min_port,
    )
    .unwrap_or(0);
    let max_ports = pick(
        flags.dynamic_sequential_max_ports,
        file.dynamic_sequential_max_ports,
    )
    .unwrap_or(0);
    let deterministic_flag = pick(flags.deterministic_listeners, file.deterministic_listeners);
    let deterministic = deterministic_flag.unwrap_or(true);
    let id_offset = pick(
        flags.dynamic_broker_id_offset,
        file.dynamic_broker_id_offset,
    );
    // Without a first port, a command line that asks for nothing dynamic is kafka-proxy's
    // "every broker mapped statically": it runs without dynamic listeners, and a broker
    // that appears unmapped is refused. One that does ask for them needs the first port.
    let asks_for_dynamic = [
        flags.dynamic_advertised_listener.is_some() || file.dynamic_advertised_listener.is_some(),
        max_ports != 0,
        deterministic_flag.is_some(),
        id_offset.is_some(),
        flags.max_dynamic_listeners.is_some() || file.max_dynamic_listeners.is_some(),
    ]
    .contains(&true);
    // The offset only places dynamic listeners: with none, accepting it would hide a
    // mistake in the command line.
    if disabled && id_offset.is_some() {
        return Err(ConfigError::new(
            "--dynamic-broker-id-offset",
            "places dynamic listeners, and --dynamic-listeners-disable turns them off: \
             drop one of the two",
        ));
    }
    let dynamic = if disabled || (min_port == 0 && !asks_for_dynamic) {
        DynamicPorts::Disabled
    } else if min_port == 0 {
        return Err(ConfigError::new(
            "--dynamic-sequential-min-port",
            "dynamic listeners need a first port (kpsc does not use random ports: they would \
             differ between instances); set it, or pass --dynamic-listeners-disable",
        ));
    } else if deterministic {
        DynamicPorts::Deterministic {
            min_port,
            max_ports,
            id_offset: id_offset.unwrap_or(0),
        }
    } else if id_offset.is_some() {
        return Err(ConfigError::new(
            "--dynamic-broker-id-offset",
            "applies to deterministic listeners only (not with --deterministic-listeners=false)",
        ));
    } else {
        DynamicPorts::Sequential {
            min_port,
            max_ports,
        }
    };
    let advertised = pick(
        flags.dynamic_advertised_listener,
        file.dynamic_advertised_listener,
    )
    .map(|t| AdvertisedTemplate::parse(&t))
    .transpose()
    .map_err(|e| ConfigError::new("--dynamic-advertised-listener", e))?;
    let port_map = PortMapConfig {
        static_mappings: common.static_mappings.clone(),
        external,
        dynamic,
        listen_ip,
        advertised,
        max_dynamic: pick(flags.max_dynamic_listeners, file.max_dynamic_listeners)
            .unwrap_or(DEFAULT_MAX_DYNAMIC_LISTENERS),
    };
    port_map
        .validate()
        .map_err(|e| ConfigError::new("--bootstrap-server-mapping", e.to_string()))?;
    Ok(port_map)
}

fn parse_external(text: &str) -> Result<(BrokerAddr, BrokerAddr), String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [broker, advertised] => Ok((BrokerAddr::parse(broker)?, BrokerAddr::parse(advertised)?)),
        _ => Err(format!(
            "{text:?}: expected broker_host:port,advertised_host:port"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::values::LogFormat;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn parse(args: &[&str]) -> Result<ProxyArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("kpscd").chain(args.iter().copied())).map(|c| c.proxy)
    }

    fn resolve(args: &[&str]) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::resolve(parse(args).unwrap())
    }

    #[test]
    fn tidb_guide_flags_resolve() {
        let c = resolve(&[
            "--bootstrap-server-mapping",
            "b1:9092,0.0.0.0:9092,b1.abc.example.com:9092",
            "--bootstrap-server-mapping",
            "b2:9092,0.0.0.0:9093,b2.abc.example.com:9093",
            "--dynamic-sequential-min-port",
            "9095",
            "--dynamic-advertised-listener",
            "brokers.abc.example.com",
        ])
        .unwrap();
        assert_eq!(c.port_map.static_mappings.len(), 2);
        assert_eq!(c.bulk_policy, BulkPolicy::Cap);
        assert_eq!(c.bulk_transfer, BulkTransfer::Auto);
        // xtask's proxy suite reruns cover the paths `auto` does not stand for.
        assert_eq!(c.bulk_transfer.resolve().0, BulkTransfer::Copy);
        assert_eq!(c.common.http.listen.as_deref(), Some("0.0.0.0:9080"));
        assert!(matches!(
            c.port_map.dynamic,
            DynamicPorts::Deterministic {
                min_port: 9095,
                max_ports: 0,
                id_offset: 0,
            }
        ));
    }

    #[test]
    fn errors_name_the_flag() {
        let flag = |args: &[&str]| resolve(args).unwrap_err().flag;
        assert_eq!(
            flag(&["--dynamic-sequential-min-port", "9095"]),
            "--bootstrap-server-mapping"
        );
        assert_eq!(
            flag(&["--bootstrap-server-mapping", "b1:9092"]),
            "--bootstrap-server-mapping"
        );
        assert_eq!(
            flag(&[
                "--bootstrap-server-mapping",
                "b1:9092,0.0.0.0:9092",
                "--dynamic-advertised-listener",
                "b<broker_id>.example.com"
            ]),
            "--dynamic-sequential-min-port"
        );
        assert_eq!(
            flag(&[
                "--bootstrap-server-mapping",
                "b1:9092,0.0.0.0:9092",
                "--dynamic-sequential-min-port",
                "9095",
                "--deterministic-listeners=false",
                "--dynamic-broker-id-offset",
                "1000"
            ]),
            "--dynamic-broker-id-offset"
        );
        assert_eq!(
            flag(&[
                "--bootstrap-server-mapping",
                "b1:9092,0.0.0.0:9092",
                "--dynamic-listeners-disable",
                "--dynamic-broker-id-offset",
                "1000"
            ]),
            "--dynamic-broker-id-offset"
        );
        assert_eq!(
            flag(&[
                "--bootstrap-server-mapping",
                "b1:9092,0.0.0.0:9092",
                "--dial-address-mapping",
                "b1:9092"
            ]),
            "--dial-address-mapping"
        );
        // Typed values are refused by clap, naming the flag.
        for (args, name) in [
            (&["--bulk-policy", "fast"][..], "--bulk-policy"),
            (&["--bulk-transfer", "sendfile"][..], "--bulk-transfer"),
            (&["--log-level", "loud"][..], "--log-level"),
            (&["--shutdown-timeout", "soon"][..], "--shutdown-timeout"),
            (&["--shutdown-grace", "later"][..], "--shutdown-grace"),
        ] {
            let err = parse(args).err().unwrap().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    /// kafka-proxy's all-static command line (no dynamic-listener flag) runs without
    /// dynamic listeners instead of exiting.
    #[test]
    fn every_broker_mapped_statically_needs_no_dynamic_flag() {
        let c = resolve(&[
            "--bootstrap-server-mapping",
            "b1:9092,0.0.0.0:9092",
            "--bootstrap-server-mapping",
            "b2:9092,0.0.0.0:9093",
            "--dial-address-mapping",
            "b1:9092,10.0.0.1:9092",
        ])
        .unwrap();
        assert_eq!(c.port_map.dynamic, DynamicPorts::Disabled);
        assert_eq!(
            c.dial
                .dial_address(&BrokerAddr::new("b1", 9092))
                .to_string(),
            "10.0.0.1:9092"
        );
        let c = resolve(&[
            "--bootstrap-server-mapping",
            "b1:9092,0.0.0.0:9092",
            "--dynamic-sequential-min-port",
            "9095",
            "--dynamic-broker-id-offset",
            "1001",
        ])
        .unwrap();
        assert!(matches!(
            c.port_map.dynamic,
            DynamicPorts::Deterministic {
                id_offset: 1001,
                ..
            }
        ));
    }

    #[test]
    fn a_small_max_frame_size_keeps_a_usable_default_budget() {
        let c = resolve(&[
            "--bootstrap-server-mapping",
            "b1:9092,0.0.0.0:9092",
            "--dynamic-listeners-disable",
            "--max-frame-size",
            "65536",
        ])
        .unwrap();
        assert_eq!(c.rewrite_memory_budget, 1 << 20);
        let err = resolve(&[
            "--bootstrap-server-mapping",
            "b1:9092,0.0.0.0:9092",
            "--dynamic-listeners-disable",
            "--rewrite-memory-budget",
            "64KiB",
        ])
        .unwrap_err();
        assert_eq!(err.flag, "--rewrite-memory-budget");
    }

    #[test]
    fn typed_values_print_as_written() {
        assert_eq!(BulkPolicy::Rewrite.to_string(), "rewrite");
        assert_eq!(BulkTransfer::Splice.to_string(), "splice");
    }

    #[test]
    fn file_is_overridden_by_flags_and_refuses_other_modes_keys() {
        let dir = std::env::temp_dir().join(format!("kpsc-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kpsc.toml");
        std::fs::write(
            &path,
            r#"
bootstrap_server_mapping = ["b1:9092,127.0.0.1:19092"]
dynamic_sequential_min_port = 20000
bulk_policy = "rewrite"
bulk_transfer = "copy"
log_format = "json"
shutdown_timeout = "3s"
shutdown_grace = "1s"
tls_enable = true
tls_insecure_skip_verify = true
"#,
        )
        .unwrap();
        let path_text = path.to_str().unwrap();
        let c = resolve(&[
            "--config",
            path_text,
            "--dynamic-sequential-min-port",
            "21000",
        ])
        .unwrap();
        assert_eq!(c.bulk_policy, BulkPolicy::Rewrite);
        assert_eq!(c.bulk_transfer, BulkTransfer::Copy);
        assert_eq!(c.common.log.format, LogFormat::Json);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
        assert_eq!(c.common.shutdown_grace, Duration::from_secs(1));
        assert!(c.upstream_tls.as_ref().is_some_and(|t| t.insecure));
        assert!(matches!(
            c.port_map.dynamic,
            DynamicPorts::Deterministic {
                min_port: 21000,
                ..
            }
        ));
        for (text, key) in [
            ("no_such_key = 1\n", "no_such_key"),
            // portmap's key, not proxy's
            ("interface = [\"eth0\"]\n", "interface"),
            ("bulk_policy = \"fast\"\n", "bulk_policy"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = resolve(&["--config", path_text]).unwrap_err();
            assert_eq!(err.flag, "--config");
            assert!(
                err.message.contains(key) || err.message.contains("fast"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
