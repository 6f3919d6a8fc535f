//! Who may connect to the proxy's listeners, and what they must send first: the PROXY
//! protocol header a cloud endpoint prepends (`--proxy-protocol`) and the allow-lists
//! checked against it (`--allow-source`, `--allow-endpoint-id`).

use std::{collections::BTreeSet, fmt, path::PathBuf, time::Duration};

use clap::Args;
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    config::{
        error::ConfigError,
        file::{pick, pick_list},
        tls,
        values::HumanDuration,
    },
    tls::listener::ListenerTls,
};

/// `--proxy-protocol`: whether client connections start with a PROXY protocol header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header is expected: every byte goes to the broker as it came.
    #[default]
    Off,
    /// A v1 or v2 header is read when the connection starts with one.
    Optional,
    /// Every connection must start with a v1 or v2 header; others are closed.
    Required,
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        })
    }
}

/// `--allow-source`, shared by proxy and portmap mode.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct AllowSourceArgs {
    /// Client addresses allowed to connect, e.g. `10.0.0.0/8` (proxy mode: the PROXY
    /// header's source when there is one, else the TCP peer; portmap mode: the SYN's
    /// source). Repeatable; none = everyone.
    #[arg(long = "allow-source", value_name = "CIDR")]
    pub allow_source: Vec<String>,
}

impl AllowSourceArgs {
    /// The flag's networks (the command line's if given, else the file's).
    pub fn resolve(flags: Self, file: Self) -> Result<Vec<IpNet>, ConfigError> {
        pick_list(flags.allow_source, file.allow_source)
            .iter()
            .map(|text| parse_cidr(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("--allow-source", e))
    }
}

#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct ListenerArgs {
    /// PROXY protocol (v1 or v2) from the load balancer or private endpoint in front:
    /// `off` (default), `optional` or `required`.
    #[arg(long = "proxy-protocol", value_name = "MODE")]
    pub proxy_protocol: Option<ProxyProtocol>,

    /// How long a client may take to send its PROXY protocol header, e.g. `5s`.
    #[arg(long = "proxy-protocol-timeout", value_name = "DURATION")]
    pub proxy_protocol_timeout: Option<HumanDuration>,

    #[command(flatten)]
    #[serde(flatten)]
    pub allow: AllowSourceArgs,

    /// Endpoint ids allowed to connect, matched against the PROXY v2 header's cloud TLV:
    /// a Google PSC connection id (decimal), an AWS VPC endpoint id (`vpce-...`) or an
    /// Azure Private Link LinkID (decimal). Repeatable; none = every endpoint.
    #[arg(long = "allow-endpoint-id", value_name = "ID")]
    pub allow_endpoint_id: Vec<String>,

    /// Serve TLS to clients on every listener (after the PROXY protocol header, if any).
    #[arg(long = "proxy-listener-tls-enable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub proxy_listener_tls_enable: Option<bool>,

    /// PEM certificate chain of the listeners, leaf first.
    #[arg(long = "proxy-listener-cert-file", value_name = "PATH")]
    pub proxy_listener_cert_file: Option<PathBuf>,

    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1). Certificate and key
    /// are read again on SIGHUP and when either file changes.
    #[arg(long = "proxy-listener-key-file", value_name = "PATH")]
    pub proxy_listener_key_file: Option<PathBuf>,

    /// PEM CA certificates: clients must present a certificate one of them signed.
    #[arg(long = "proxy-listener-ca-chain-cert-file", value_name = "PATH")]
    pub proxy_listener_ca_chain_cert_file: Option<PathBuf>,

    /// Subject the client certificate must have, kafka-proxy's form: `s:/CN=[name]/O=[org]`
    /// (exact values) or `r:/CN=[^kafka-.*$]` (patterns); fields CN, C, L, O, OU, S.
    /// Repeatable: one of them must match.
    #[arg(
        long = "proxy-listener-tls-required-client-subject",
        value_name = "SUBJECT"
    )]
    pub proxy_listener_tls_required_client_subject: Vec<String>,
}

/// The validated listener settings.
#[derive(Clone, Debug, Default)]
pub struct AccessConfig {
    pub proxy_protocol: ProxyProtocol,
    pub header_timeout: Duration,
    /// Empty: every source.
    pub allow_sources: Vec<IpNet>,
    /// Empty: every endpoint (and connections without one).
    pub allow_endpoint_ids: BTreeSet<String>,
    /// TLS towards clients (`--proxy-listener-tls-enable`).
    pub tls: Option<ListenerTls>,
}

const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// An allowed endpoint id in the form the PROXY header's id is printed in, so they
/// compare as strings: a decimal id (GCP PSC connection id, Azure LinkID) as the number
/// (`007` is `7`), an AWS VPC endpoint id as `vpce-` and lowercase letters and digits.
fn endpoint_id(text: &str) -> Result<String, String> {
    let text = text.trim();
    if let Ok(id) = text.parse::<u64>() {
        return Ok(id.to_string());
    }
    let aws = text.strip_prefix("vpce-").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if aws {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is neither a decimal id (GCP PSC connection id, Azure LinkID) nor an \
             AWS VPC endpoint id (vpce-...)"
        ))
    }
}

impl AccessConfig {
    pub fn resolve(flags: ListenerArgs, file: ListenerArgs) -> Result<Self, ConfigError> {
        let proxy_protocol = pick(flags.proxy_protocol, file.proxy_protocol).unwrap_or_default();
        let header_timeout = pick(flags.proxy_protocol_timeout, file.proxy_protocol_timeout)
            .map_or(DEFAULT_HEADER_TIMEOUT, |d| d.0);
        if header_timeout.is_zero() {
            return Err(ConfigError::new(
                "--proxy-protocol-timeout",
                "must be greater than zero",
            ));
        }
        let allow_sources = AllowSourceArgs::resolve(flags.allow, file.allow)?;
        let allow_endpoint_ids: BTreeSet<String> =
            pick_list(flags.allow_endpoint_id, file.allow_endpoint_id)
                .iter()
                .map(|id| endpoint_id(id))
                .collect::<Result<_, _>>()
                .map_err(|e| ConfigError::new("--allow-endpoint-id", e))?;
        if !allow_endpoint_ids.is_empty() && proxy_protocol == ProxyProtocol::Off {
            return Err(ConfigError::new(
                "--allow-endpoint-id",
                "endpoint ids arrive in the PROXY protocol header: set --proxy-protocol required",
            ));
        }
        let tls_enable = pick(
            flags.proxy_listener_tls_enable,
            file.proxy_listener_tls_enable,
        )
        .unwrap_or(false);
        let cert = pick(
            flags.proxy_listener_cert_file,
            file.proxy_listener_cert_file,
        );
        let key = pick(flags.proxy_listener_key_file, file.proxy_listener_key_file);
        let ca = pick(
            flags.proxy_listener_ca_chain_cert_file,
            file.proxy_listener_ca_chain_cert_file,
        );
        let subjects = pick_list(
            flags.proxy_listener_tls_required_client_subject,
            file.proxy_listener_tls_required_client_subject,
        );
        let tls = match (tls_enable, cert, key) {
            (false, None, None) if ca.is_none() && subjects.is_empty() => None,
            (false, _, _) => {
                return Err(ConfigError::new(
                    "--proxy-listener-tls-enable",
                    "a listener certificate, key, CA or client subject is given but TLS is \
                     not enabled",
                ));
            }
            (true, Some(cert), Some(key)) => {
                Some(tls::listener(&cert, &key, ca.as_deref(), &subjects)?)
            }
            (true, None, _) => {
                return Err(ConfigError::new(
                    tls::CERT_FLAG,
                    "required with --proxy-listener-tls-enable",
                ));
            }
            (true, _, None) => {
                return Err(ConfigError::new(
                    tls::KEY_FLAG,
                    "required with --proxy-listener-tls-enable",
                ));
            }
        };
        Ok(Self {
            proxy_protocol,
            header_timeout,
            allow_sources,
            allow_endpoint_ids,
            tls,
        })
    }
}

/// A CIDR, or a bare address meaning that one address.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| format!("{text:?} is not a CIDR like 10.0.0.0/8 or an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        protocol: Option<ProxyProtocol>,
        sources: &[&str],
        ids: &[&str],
    ) -> Result<AccessConfig, ConfigError> {
        AccessConfig::resolve(
            ListenerArgs {
                proxy_protocol: protocol,
                allow: AllowSourceArgs {
                    allow_source: sources.iter().map(|s| s.to_string()).collect(),
                },
                allow_endpoint_id: ids.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ListenerArgs::default(),
        )
    }

    #[test]
    fn cidrs_and_ids_resolve_and_bad_ones_name_the_flag() {
        let c = resolve(
            Some(ProxyProtocol::Required),
            &["198.18.3.7/24", "10.1.2.3", "fd00::/8"],
            &["vpce-0abc", "43686719580552292"],
        )
        .unwrap();
        assert_eq!(c.allow_sources[0].to_string(), "198.18.3.0/24");
        assert_eq!(c.allow_sources[1].to_string(), "10.1.2.3/32");
        assert_eq!(c.allow_endpoint_ids.len(), 2);
        assert_eq!(c.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(
            resolve(None, &["10.0.0.0/33"], &[]).unwrap_err().flag,
            "--allow-source"
        );
        assert_eq!(
            resolve(None, &["example.com"], &[]).unwrap_err().flag,
            "--allow-source"
        );
        // Without a header there is no endpoint id to match.
        assert_eq!(
            resolve(None, &[], &["vpce-0abc"]).unwrap_err().flag,
            "--allow-endpoint-id"
        );
        assert_eq!(
            resolve(Some(ProxyProtocol::Optional), &[], &[" "])
                .unwrap_err()
                .flag,
            "--allow-endpoint-id"
        );
    }

    /// Ids are checked at start and kept as the header's ids print, or they would never
    /// match: `0042` is `42`.
    #[test]
    fn endpoint_ids_are_validated_and_normalised() {
        let c = resolve(
            Some(ProxyProtocol::Required),
            &[],
            &["0042", " vpce-0abc123 ", "18446744073709551615"],
        )
        .unwrap();
        let ids: Vec<&str> = c.allow_endpoint_ids.iter().map(String::as_str).collect();
        assert_eq!(ids, ["18446744073709551615", "42", "vpce-0abc123"]);
        for bad in [
            "vpce-",
            "vpce-0ABC",
            "VPCE-0abc",
            "vpc-0abc",
            "-1",
            "4.2",
            "18446744073709551616",
            "psc:42",
        ] {
            let e = resolve(Some(ProxyProtocol::Required), &[], &[bad]).unwrap_err();
            assert_eq!(e.flag, "--allow-endpoint-id", "{bad}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }
}
