//! Flags both modes take (kafka-proxy's names) and the settings they resolve to.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use serde::Deserialize;

use crate::{
    config::{
        error::ConfigError,
        file::{pick, pick_list},
        sasl::{DiscoverySaslArgs, SaslCredentials},
        values::{HumanDuration, LogFormat, LogLevel},
    },
    mapping::addr::StaticMapping,
};

/// Flags shared by every mode that maps ports to brokers.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct CommonArgs {
    /// TOML file with the same settings (keys use underscores); flags override it.
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Known broker: `broker_host:port,listen_host:port[,advertised_host:port]`. Repeatable.
    #[arg(long = "bootstrap-server-mapping", value_name = "MAPPING")]
    pub bootstrap_server_mapping: Vec<String>,

    /// How often to ask the brokers for cluster metadata, e.g. `30s`.
    #[arg(long = "metadata-refresh-interval", value_name = "DURATION")]
    pub metadata_refresh_interval: Option<HumanDuration>,

    /// Timeout for connecting to a broker, e.g. `15s`.
    #[arg(long = "kafka-dial-timeout", value_name = "DURATION")]
    pub kafka_dial_timeout: Option<HumanDuration>,

    /// Admin/metrics HTTP address.
    #[arg(long = "http-listen-address", value_name = "ADDR")]
    pub http_listen_address: Option<String>,

    /// Do not serve the admin/metrics HTTP endpoint.
    #[arg(long = "http-disable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub http_disable: Option<bool>,

    /// Path of the Prometheus endpoint.
    #[arg(long = "http-metrics-path", value_name = "PATH")]
    pub http_metrics_path: Option<String>,

    /// Serve `/maps` (the port map with the real broker addresses) on this address only,
    /// e.g. `127.0.0.1:9079`, instead of beside `/metrics` and `/ready`: whoever reaches
    /// the main admin port then cannot read the brokers' addresses.
    #[arg(long = "http-maps-listen-address", value_name = "ADDR")]
    pub http_maps_listen_address: Option<String>,

    /// Do not serve `/maps` at all (`kpscctl maps` then works only for portmap, from the
    /// pinned kernel maps).
    #[arg(long = "http-maps-disable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub http_maps_disable: Option<bool>,

    /// Path of the liveness endpoint.
    #[arg(long = "http-health-path", value_name = "PATH")]
    pub http_health_path: Option<String>,

    /// Log format.
    #[arg(long = "log-format", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log level (kafka-proxy's warning, fatal and panic are accepted).
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    /// After SIGTERM/SIGINT, how long `/ready` answers 503 while kpscd keeps serving (and
    /// accepting), so a load balancer's health check takes the instance out before it
    /// stops, e.g. `5s` (the default); `0s` stops at once.
    #[arg(long = "shutdown-grace", value_name = "DURATION")]
    pub shutdown_grace: Option<HumanDuration>,

    #[command(flatten)]
    #[serde(flatten)]
    pub discovery_sasl: DiscoverySaslArgs,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: LogLevel,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// None when `--http-disable` is set.
    pub listen: Option<String>,
    pub metrics_path: String,
    pub health_path: String,
    pub maps: MapsEndpoint,
}

/// Where `/maps` is served: it names the real brokers, which an operator may not want
/// readable by everyone who reaches the health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapsEndpoint {
    /// Beside `/metrics` and `/ready` (the default, as before).
    Admin,
    /// On its own listener (`--http-maps-listen-address`).
    Separate(String),
    /// Nowhere (`--http-maps-disable`).
    Disabled,
}

/// The common settings, validated.
#[derive(Clone, Debug)]
pub struct CommonSettings {
    pub static_mappings: Vec<StaticMapping>,
    pub metadata_refresh_interval: Duration,
    pub dial_timeout: Duration,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub shutdown_grace: Duration,
    /// What kpscd's own connections (discovery, refresh, probes) authenticate with.
    pub discovery_sasl: Option<SaslCredentials>,
}

/// Long enough for a health check every 1-2 s with a failure threshold of 2 to notice.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl CommonSettings {
    /// Validates the common flags merged with the file's.
    pub fn resolve(flags: CommonArgs, file: CommonArgs) -> Result<Self, ConfigError> {
        let mappings = pick_list(
            flags.bootstrap_server_mapping,
            file.bootstrap_server_mapping,
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

        let metadata_refresh_interval = pick(
            flags.metadata_refresh_interval,
            file.metadata_refresh_interval,
        )
        .map_or(Duration::from_secs(30), |d| d.0);
        if metadata_refresh_interval.is_zero() {
            return Err(ConfigError::new(
                "--metadata-refresh-interval",
                "must be greater than zero",
            ));
        }
        let dial_timeout = pick(flags.kafka_dial_timeout, file.kafka_dial_timeout)
            .map_or(Duration::from_secs(15), |d| d.0);

        let http_disable = pick(flags.http_disable, file.http_disable).unwrap_or(false);
        let http_listen = pick(flags.http_listen_address, file.http_listen_address)
            .unwrap_or_else(|| "0.0.0.0:9080".to_owned());
        let metrics_path = pick(flags.http_metrics_path, file.http_metrics_path)
            .unwrap_or_else(|| "/metrics".to_owned());
        let health_path = pick(flags.http_health_path, file.http_health_path)
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
        let maps_disable = pick(flags.http_maps_disable, file.http_maps_disable).unwrap_or(false);
        let maps_listen = pick(
            flags.http_maps_listen_address,
            file.http_maps_listen_address,
        );
        let maps = match (maps_disable, maps_listen) {
            (true, Some(_)) => {
                return Err(ConfigError::new(
                    "--http-maps-listen-address",
                    "/maps cannot be served on its own address and disabled (--http-maps-disable): drop one of the two",
                ));
            }
            (true, None) => MapsEndpoint::Disabled,
            (false, Some(addr)) if addr == http_listen && !http_disable => {
                return Err(ConfigError::new(
                    "--http-maps-listen-address",
                    format!(
                        "{addr} is the admin endpoint's own address (--http-listen-address); pick another one"
                    ),
                ));
            }
            (false, Some(addr)) => MapsEndpoint::Separate(addr),
            (false, None) => MapsEndpoint::Admin,
        };
        let discovery_sasl =
            DiscoverySaslArgs::resolve(flags.discovery_sasl, file.discovery_sasl, &|name| {
                std::env::var(name).ok()
            })?;
        Ok(Self {
            discovery_sasl,
            static_mappings,
            metadata_refresh_interval,
            dial_timeout,
            http: HttpConfig {
                listen: (!http_disable).then_some(http_listen),
                metrics_path,
                health_path,
                maps: if http_disable && maps == MapsEndpoint::Admin {
                    MapsEndpoint::Disabled
                } else {
                    maps
                },
            },
            log: LogConfig {
                format: pick(flags.log_format, file.log_format).unwrap_or_default(),
                level: pick(flags.log_level, file.log_level).unwrap_or_default(),
            },
            shutdown_grace: pick(flags.shutdown_grace, file.shutdown_grace)
                .map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
        })
    }
}
