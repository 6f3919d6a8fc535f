//! Configuration: kafka-proxy-compatible flags, an optional TOML file, and validation.
//!
//! Flags override the file; the file overrides defaults. Every validation error names the
//! flag (or file key) at fault so `kpscd` can exit with code 2 and a message that says
//! exactly what to change.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::Args;
use serde::Deserialize;

use crate::portmap::{AdvertisedTemplate, BrokerAddr, DynamicPorts, PortMapConfig, StaticMapping};
use crate::{rewrite::BulkPolicy, splice::BulkTransfer};

/// A configuration error: which flag, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag}: {message}")]
pub struct ConfigError {
    pub flag: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(flag: &str, message: impl Into<String>) -> Self {
        Self {
            flag: flag.to_owned(),
            message: message.into(),
        }
    }
}

/// kafka-proxy `server` flags that kpsc does not implement (yet). They are rejected with a
/// clear message instead of being silently ignored.
pub const UNSUPPORTED_KAFKA_PROXY_FLAGS: &[(&str, &str)] = &[
    ("dial-address-mapping", "not implemented yet"),
    ("proxy-request-buffer-size", "kpsc sizes its buffers itself"),
    (
        "proxy-response-buffer-size",
        "kpsc sizes its buffers itself",
    ),
    ("proxy-listener-read-buffer-size", "not implemented yet"),
    ("proxy-listener-write-buffer-size", "not implemented yet"),
    ("proxy-listener-keep-alive", "not implemented yet"),
    ("proxy-listener-tls-enable", "TLS is not implemented yet"),
    ("proxy-listener-cert-file", "TLS is not implemented yet"),
    ("proxy-listener-key-file", "TLS is not implemented yet"),
    ("proxy-listener-key-password", "TLS is not implemented yet"),
    (
        "proxy-listener-ca-chain-cert-file",
        "TLS is not implemented yet",
    ),
    ("proxy-listener-cipher-suites", "TLS is not implemented yet"),
    (
        "proxy-listener-curve-preferences",
        "TLS is not implemented yet",
    ),
    (
        "auth-local-enable",
        "authentication plugins are not implemented",
    ),
    (
        "auth-gateway-client-enable",
        "authentication plugins are not implemented",
    ),
    (
        "auth-gateway-server-enable",
        "authentication plugins are not implemented",
    ),
    ("authz-enable", "authorization plugins are not implemented"),
    (
        "kafka-client-id",
        "kpsc forwards the client's own client id",
    ),
    ("kafka-write-timeout", "not implemented yet"),
    ("kafka-read-timeout", "not implemented yet"),
    ("kafka-keep-alive", "not implemented yet"),
    ("kafka-connection-read-buffer-size", "not implemented yet"),
    ("kafka-connection-write-buffer-size", "not implemented yet"),
    (
        "producer-acks-0-disabled",
        "kpsc detects acks=0 produce requests itself; drop the flag",
    ),
    ("tls-enable", "TLS to brokers is not implemented yet"),
    (
        "tls-insecure-skip-verify",
        "TLS to brokers is not implemented yet",
    ),
    (
        "tls-client-cert-file",
        "TLS to brokers is not implemented yet",
    ),
    (
        "tls-client-key-file",
        "TLS to brokers is not implemented yet",
    ),
    (
        "tls-client-key-password",
        "TLS to brokers is not implemented yet",
    ),
    (
        "tls-ca-chain-cert-file",
        "TLS to brokers is not implemented yet",
    ),
    (
        "tls-same-client-cert-enable",
        "TLS to brokers is not implemented yet",
    ),
    ("sasl-enable", "SASL by proxy is not implemented yet"),
    ("sasl-username", "SASL by proxy is not implemented yet"),
    ("sasl-password", "SASL by proxy is not implemented yet"),
    (
        "sasl-jaas-config-file",
        "SASL by proxy is not implemented yet",
    ),
    ("sasl-method", "SASL by proxy is not implemented yet"),
    ("sasl-plugin-enable", "SASL plugins are not implemented"),
    (
        "debug-enable",
        "no pprof-style debug endpoint; use --log-level debug",
    ),
    ("debug-listen-address", "no pprof-style debug endpoint"),
    ("log-level-fieldname", "JSON field names are fixed"),
    ("log-time-fieldname", "JSON field names are fixed"),
    ("log-msg-fieldname", "JSON field names are fixed"),
    ("forward-proxy", "not implemented yet"),
];

/// Returns an error for the first kafka-proxy flag in `args` that kpsc does not support.
pub fn reject_unsupported_flags<S: AsRef<str>>(args: &[S]) -> Result<(), ConfigError> {
    for arg in args {
        let arg = arg.as_ref();
        let Some(name) = arg.strip_prefix("--") else {
            continue;
        };
        let name = name.split('=').next().unwrap_or(name);
        if let Some((flag, why)) = UNSUPPORTED_KAFKA_PROXY_FLAGS
            .iter()
            .find(|(flag, _)| *flag == name)
        {
            return Err(ConfigError::new(
                &format!("--{flag}"),
                format!("kafka-proxy flag not supported by kpsc: {why}"),
            ));
        }
    }
    Ok(())
}

/// Flags shared by every mode that maps ports to brokers (kafka-proxy's names).
#[derive(Args, Debug, Default, Clone)]
pub struct PortMapArgs {
    /// TOML file with the same settings (keys use underscores); flags override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Known broker: `broker_host:port,listen_host:port[,advertised_host:port]`. Repeatable.
    #[arg(long = "bootstrap-server-mapping", value_name = "MAPPING")]
    pub bootstrap_server_mapping: Vec<String>,

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

    /// Advertised host for dynamic listeners, with `{{.brokerId}}` or `<broker_id>`
    /// replaced by the broker id; an optional `:port` fixes the advertised port.
    #[arg(long = "dynamic-advertised-listener", value_name = "HOST[:PORT]")]
    pub dynamic_advertised_listener: Option<String>,

    /// IP the dynamic listeners bind to (and advertise when no advertised listener is set).
    #[arg(long = "default-listener-ip", value_name = "IP")]
    pub default_listener_ip: Option<String>,

    /// How often to refresh cluster metadata to find new brokers, e.g. `30s`.
    #[arg(long = "metadata-refresh-interval", value_name = "DURATION")]
    pub metadata_refresh_interval: Option<String>,

    /// Timeout for connecting to a broker, e.g. `15s`.
    #[arg(long = "kafka-dial-timeout", value_name = "DURATION")]
    pub kafka_dial_timeout: Option<String>,

    /// Admin/metrics HTTP address.
    #[arg(long = "http-listen-address", value_name = "ADDR")]
    pub http_listen_address: Option<String>,

    /// Do not serve the admin/metrics HTTP endpoint.
    #[arg(long = "http-disable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub http_disable: Option<bool>,

    /// Path of the Prometheus endpoint.
    #[arg(long = "http-metrics-path", value_name = "PATH")]
    pub http_metrics_path: Option<String>,

    /// Path of the liveness endpoint.
    #[arg(long = "http-health-path", value_name = "PATH")]
    pub http_health_path: Option<String>,

    /// Log format: text or json.
    #[arg(long = "log-format", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Log level: trace, debug, info, warning, error (kafka-proxy's fatal/panic mean error).
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// Proxy-mode flags.
#[derive(Args, Debug, Default, Clone)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub map: PortMapArgs,

    /// Request api keys to refuse (the connection is closed), e.g. `20` (DeleteTopics).
    /// Comma-separated or repeated.
    #[arg(
        long = "forbidden-api-keys",
        value_delimiter = ',',
        value_name = "KEYS"
    )]
    pub forbidden_api_keys: Vec<i16>,

    /// Produce/Fetch responses: `cap` (advertise Produce<=v9, Fetch<=v15 so bulk responses
    /// never carry addresses and pass opaquely) or `rewrite` (decode and rewrite KIP-951
    /// node_endpoints in Produce v10+/Fetch v16+).
    #[arg(long = "bulk-policy", value_name = "cap|rewrite")]
    pub bulk_policy: Option<String>,

    /// Largest Kafka frame accepted in either direction, in bytes.
    #[arg(long = "max-frame-size", value_name = "BYTES")]
    pub max_frame_size: Option<u32>,

    /// How frames that pass through unchanged are moved: `splice` (socket -> pipe ->
    /// socket in the kernel, default) or `copy` (read and write through a buffer).
    #[arg(long = "bulk-transfer", value_name = "splice|copy")]
    pub bulk_transfer: Option<String>,

    /// Requests in flight per connection before kpsc stops reading from the client.
    #[arg(long = "kafka-max-open-requests", value_name = "N")]
    pub kafka_max_open_requests: Option<usize>,

    /// How long in-flight requests may take to finish after SIGTERM/SIGINT, e.g. `10s`.
    #[arg(long = "shutdown-timeout", value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
}

/// The same settings as a TOML file (`--config`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub bootstrap_server_mapping: Vec<String>,
    #[serde(default)]
    pub external_server_mapping: Vec<String>,
    pub dynamic_listeners_disable: Option<bool>,
    pub dynamic_sequential_min_port: Option<u16>,
    pub dynamic_sequential_max_ports: Option<u16>,
    pub deterministic_listeners: Option<bool>,
    pub dynamic_advertised_listener: Option<String>,
    pub default_listener_ip: Option<String>,
    pub metadata_refresh_interval: Option<String>,
    pub kafka_dial_timeout: Option<String>,
    pub http_listen_address: Option<String>,
    pub http_disable: Option<bool>,
    pub http_metrics_path: Option<String>,
    pub http_health_path: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    #[serde(default)]
    pub forbidden_api_keys: Vec<i16>,
    pub bulk_policy: Option<String>,
    pub max_frame_size: Option<u32>,
    pub bulk_transfer: Option<String>,
    pub kafka_max_open_requests: Option<usize>,
    pub shutdown_timeout: Option<String>,
    #[serde(default)]
    pub interface: Vec<String>,
    pub instance: Option<String>,
    pub pin_root: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info`.
    pub level: String,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// None when `--http-disable` is set.
    pub listen: Option<String>,
    pub metrics_path: String,
    pub health_path: String,
}

/// Everything the port map and its listeners need, validated.
#[derive(Clone, Debug)]
pub struct MapSettings {
    pub port_map: PortMapConfig,
    pub metadata_refresh_interval: Duration,
    pub dial_timeout: Duration,
    pub http: HttpConfig,
    pub log: LogConfig,
}

/// Validated proxy-mode configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub map: MapSettings,
    pub forbidden_api_keys: Vec<i16>,
    pub bulk_policy: BulkPolicy,
    pub max_frame_size: u32,
    pub bulk_transfer: BulkTransfer,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
}

/// Kafka's own default for `socket.request.max.bytes`.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 100 * 1024 * 1024;
/// kafka-proxy's `--kafka-max-open-requests` default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

pub(crate) fn load_file(path: &Option<PathBuf>) -> Result<FileConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    toml::from_str(&text)
        .map_err(|e| ConfigError::new("--config", format!("{}: {e}", path.display())))
}

fn parse_duration(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        ConfigError::new(
            flag,
            format!("{value:?} is not a duration like 15s or 1m: {e}"),
        )
    })
}

fn parse_log(format: Option<String>, level: Option<String>) -> Result<LogConfig, ConfigError> {
    let format = match format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::new(
                "--log-format",
                format!("{other:?}: expected text or json"),
            ));
        }
    };
    let level = match level.as_deref().unwrap_or("info") {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        other => {
            return Err(ConfigError::new(
                "--log-level",
                format!("{other:?}: expected trace, debug, info, warning or error"),
            ));
        }
    };
    Ok(LogConfig {
        format,
        level: level.to_owned(),
    })
}

/// Flags win over the file, the file over the default.
pub(crate) fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

pub(crate) fn pick_list<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flag.is_empty() { file } else { flag }
}

impl MapSettings {
    /// Validates the port-map flags merged with `file`.
    pub fn resolve(args: PortMapArgs, file: &mut FileConfig) -> Result<Self, ConfigError> {
        let mappings = pick_list(
            args.bootstrap_server_mapping,
            std::mem::take(&mut file.bootstrap_server_mapping),
        );
        if mappings.is_empty() {
            return Err(ConfigError::new(
                "--bootstrap-server-mapping",
                "at least one is required (broker_host:port,listen_host:port[,advertised_host:port])",
            ));
        }
        let static_mappings = mappings
            .iter()
            .map(|m| StaticMapping::parse(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("--bootstrap-server-mapping", e))?;
        let external = pick_list(
            args.external_server_mapping,
            std::mem::take(&mut file.external_server_mapping),
        )
        .iter()
        .map(|m| parse_external(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new("--external-server-mapping", e))?;

        let listen_ip_text = pick(args.default_listener_ip, file.default_listener_ip.take())
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let listen_ip: IpAddr = listen_ip_text.parse().map_err(|_| {
            ConfigError::new(
                "--default-listener-ip",
                format!("{listen_ip_text:?} is not an IP address"),
            )
        })?;

        let disabled = pick(
            args.dynamic_listeners_disable,
            file.dynamic_listeners_disable,
        )
        .unwrap_or(false);
        let min_port = pick(
            args.dynamic_sequential_min_port,
            file.dynamic_sequential_min_port,
        )
        .unwrap_or(0);
        let max_ports = pick(
            args.dynamic_sequential_max_ports,
            file.dynamic_sequential_max_ports,
        )
        .unwrap_or(0);
        let deterministic =
            pick(args.deterministic_listeners, file.deterministic_listeners).unwrap_or(true);
        let dynamic = if disabled {
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
            }
        } else {
            DynamicPorts::Sequential {
                min_port,
                max_ports,
            }
        };
        let advertised = pick(
            args.dynamic_advertised_listener,
            file.dynamic_advertised_listener.take(),
        )
        .map(|t| AdvertisedTemplate::parse(&t))
        .transpose()
        .map_err(|e| ConfigError::new("--dynamic-advertised-listener", e))?;

        let metadata_refresh_interval = parse_duration(
            "--metadata-refresh-interval",
            &pick(
                args.metadata_refresh_interval,
                file.metadata_refresh_interval.take(),
            )
            .unwrap_or_else(|| "30s".to_owned()),
        )?;
        if metadata_refresh_interval.is_zero() {
            return Err(ConfigError::new(
                "--metadata-refresh-interval",
                "must be greater than zero",
            ));
        }
        let dial_timeout = parse_duration(
            "--kafka-dial-timeout",
            &pick(args.kafka_dial_timeout, file.kafka_dial_timeout.take())
                .unwrap_or_else(|| "15s".to_owned()),
        )?;

        let http_disable = pick(args.http_disable, file.http_disable).unwrap_or(false);
        let http_listen = pick(args.http_listen_address, file.http_listen_address.take())
            .unwrap_or_else(|| "0.0.0.0:9080".to_owned());
        let metrics_path = pick(args.http_metrics_path, file.http_metrics_path.take())
            .unwrap_or_else(|| "/metrics".to_owned());
        let health_path = pick(args.http_health_path, file.http_health_path.take())
            .unwrap_or_else(|| "/health".to_owned());
        for (flag, path) in [
            ("--http-metrics-path", &metrics_path),
            ("--http-health-path", &health_path),
        ] {
            if !path.starts_with('/') {
                return Err(ConfigError::new(
                    flag,
                    format!("{path:?} must start with /"),
                ));
            }
        }

        let port_map = PortMapConfig {
            static_mappings,
            external,
            dynamic,
            listen_ip,
            advertised,
        };
        port_map
            .validate()
            .map_err(|e| ConfigError::new("--bootstrap-server-mapping", e.to_string()))?;

        Ok(Self {
            port_map,
            metadata_refresh_interval,
            dial_timeout,
            http: HttpConfig {
                listen: (!http_disable).then_some(http_listen),
                metrics_path,
                health_path,
            },
            log: parse_log(
                pick(args.log_format, file.log_format.take()),
                pick(args.log_level, file.log_level.take()),
            )?,
        })
    }
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

impl ProxyConfig {
    pub fn resolve(args: ProxyArgs) -> Result<Self, ConfigError> {
        let mut file = load_file(&args.map.config)?;
        let map = MapSettings::resolve(args.map, &mut file)?;
        let bulk_policy = match pick(args.bulk_policy, file.bulk_policy.take()) {
            None => BulkPolicy::default(),
            Some(text) => text
                .parse()
                .map_err(|e: String| ConfigError::new("--bulk-policy", e))?,
        };
        let max_frame_size =
            pick(args.max_frame_size, file.max_frame_size).unwrap_or(DEFAULT_MAX_FRAME_SIZE);
        if max_frame_size < 1024 {
            return Err(ConfigError::new(
                "--max-frame-size",
                format!("{max_frame_size} is too small (at least 1024 bytes)"),
            ));
        }
        let bulk_transfer = match pick(args.bulk_transfer, file.bulk_transfer.take()) {
            None => BulkTransfer::default(),
            Some(text) => text
                .parse()
                .map_err(|e: String| ConfigError::new("--bulk-transfer", e))?,
        };
        let max_in_flight = pick(args.kafka_max_open_requests, file.kafka_max_open_requests)
            .unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if max_in_flight == 0 {
            return Err(ConfigError::new(
                "--kafka-max-open-requests",
                "must be at least 1",
            ));
        }
        let shutdown_timeout = parse_duration(
            "--shutdown-timeout",
            &pick(args.shutdown_timeout, file.shutdown_timeout.take())
                .unwrap_or_else(|| "10s".to_owned()),
        )?;
        Ok(Self {
            map,
            forbidden_api_keys: pick_list(args.forbidden_api_keys, file.forbidden_api_keys),
            bulk_policy,
            max_frame_size,
            bulk_transfer,
            max_in_flight,
            shutdown_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mappings: &[&str]) -> ProxyArgs {
        ProxyArgs {
            map: PortMapArgs {
                bootstrap_server_mapping: mappings.iter().map(|s| s.to_string()).collect(),
                dynamic_sequential_min_port: Some(9095),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn tidb_guide_flags_resolve() {
        let mut a = args(&[
            "b1:9092,0.0.0.0:9092,b1.abc.example.com:9092",
            "b2:9092,0.0.0.0:9093,b2.abc.example.com:9093",
        ]);
        a.map.dynamic_advertised_listener = Some("brokers.abc.example.com".into());
        let c = ProxyConfig::resolve(a).unwrap();
        assert_eq!(c.map.port_map.static_mappings.len(), 2);
        assert_eq!(c.bulk_policy, BulkPolicy::Cap);
        assert_eq!(c.bulk_transfer, BulkTransfer::Splice);
        assert_eq!(c.map.http.listen.as_deref(), Some("0.0.0.0:9080"));
        assert!(matches!(
            c.map.port_map.dynamic,
            DynamicPorts::Deterministic {
                min_port: 9095,
                max_ports: 0
            }
        ));
    }

    #[test]
    fn errors_name_the_flag() {
        let err = ProxyConfig::resolve(args(&[])).unwrap_err();
        assert_eq!(err.flag, "--bootstrap-server-mapping");
        let err = ProxyConfig::resolve(args(&["b1:9092"])).unwrap_err();
        assert_eq!(err.flag, "--bootstrap-server-mapping");
        let mut a = args(&["b1:9092,0.0.0.0:9092"]);
        a.bulk_policy = Some("fast".into());
        assert_eq!(ProxyConfig::resolve(a).unwrap_err().flag, "--bulk-policy");
        let mut a = args(&["b1:9092,0.0.0.0:9092"]);
        a.bulk_transfer = Some("sendfile".into());
        assert_eq!(ProxyConfig::resolve(a).unwrap_err().flag, "--bulk-transfer");
        let mut a = args(&["b1:9092,0.0.0.0:9092"]);
        a.map.dynamic_sequential_min_port = None;
        assert_eq!(
            ProxyConfig::resolve(a).unwrap_err().flag,
            "--dynamic-sequential-min-port"
        );
        let mut a = args(&["b1:9092,0.0.0.0:9092"]);
        a.map.log_level = Some("loud".into());
        assert_eq!(ProxyConfig::resolve(a).unwrap_err().flag, "--log-level");
    }

    #[test]
    fn unsupported_kafka_proxy_flags_are_rejected() {
        let err = reject_unsupported_flags(&["server", "--tls-enable"]).unwrap_err();
        assert_eq!(err.flag, "--tls-enable");
        let err = reject_unsupported_flags(&["--sasl-username=x"]).unwrap_err();
        assert_eq!(err.flag, "--sasl-username");
        reject_unsupported_flags(&["--bootstrap-server-mapping", "a:1,b:2"]).unwrap();
    }

    #[test]
    fn file_is_overridden_by_flags() {
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
"#,
        )
        .unwrap();
        let mut a = ProxyArgs::default();
        a.map.config = Some(path.clone());
        a.map.dynamic_sequential_min_port = Some(21000);
        let c = ProxyConfig::resolve(a).unwrap();
        assert_eq!(c.bulk_policy, BulkPolicy::Rewrite);
        assert_eq!(c.bulk_transfer, BulkTransfer::Copy);
        assert_eq!(c.map.log.format, LogFormat::Json);
        assert!(matches!(
            c.map.port_map.dynamic,
            DynamicPorts::Deterministic {
                min_port: 21000,
                ..
            }
        ));
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let mut a = ProxyArgs::default();
        a.map.config = Some(path);
        assert_eq!(ProxyConfig::resolve(a).unwrap_err().flag, "--config");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
