//! TLS towards the brokers (kafka-proxy's `--tls-*` flags): for client traffic and for
//! kpscd's own metadata requests alike. Files are read at start; a wrong one exits 2
//! naming its flag.

use std::{path::PathBuf, sync::Arc};

use clap::Args;
use serde::Deserialize;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::{
    config::{error::ConfigError, file::pick, tls::key_pair_error},
    tls::{
        self, pem,
        upstream::{Trust, client_config},
    },
};

#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct UpstreamTlsArgs {
    /// Connect to the brokers with TLS.
    #[arg(long = "tls-enable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub tls_enable: Option<bool>,

    /// PEM CA certificates the brokers' certificates must chain to. Without it (or with
    /// --tls-system-cert-pool) the operating system's trust store is used.
    #[arg(long = "tls-ca-chain-cert-file", value_name = "PATH")]
    pub tls_ca_chain_cert_file: Option<PathBuf>,

    /// Trust the operating system's CA store too (in addition to --tls-ca-chain-cert-file).
    #[arg(long = "tls-system-cert-pool", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub tls_system_cert_pool: Option<bool>,

    /// PEM client certificate chain kpscd presents to brokers that require one.
    #[arg(long = "tls-client-cert-file", value_name = "PATH")]
    pub tls_client_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-client-cert-file (unencrypted).
    #[arg(long = "tls-client-key-file", value_name = "PATH")]
    pub tls_client_key_file: Option<PathBuf>,

    /// Accept any broker certificate (no CA or name check). For tests only: anyone on the
    /// path can read and change the traffic.
    #[arg(long = "tls-insecure-skip-verify", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub tls_insecure_skip_verify: Option<bool>,
}

/// The resolved broker-side TLS.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// `--tls-insecure-skip-verify`: warned about at start.
    pub insecure: bool,
    /// Where trust comes from, for the start-up log.
    pub trust: String,
}

impl UpstreamTls {
    pub fn resolve(
        flags: UpstreamTlsArgs,
        file: UpstreamTlsArgs,
    ) -> Result<Option<Self>, ConfigError> {
        let enable = pick(flags.tls_enable, file.tls_enable).unwrap_or(false);
        let ca = pick(flags.tls_ca_chain_cert_file, file.tls_ca_chain_cert_file);
        let system = pick(flags.tls_system_cert_pool, file.tls_system_cert_pool);
        let cert = pick(flags.tls_client_cert_file, file.tls_client_cert_file);
        let key = pick(flags.tls_client_key_file, file.tls_client_key_file);
        let insecure = pick(
            flags.tls_insecure_skip_verify,
            file.tls_insecure_skip_verify,
        );
        if !enable {
            let given = [
                ("--tls-ca-chain-cert-file", ca.is_some()),
                ("--tls-system-cert-pool", system == Some(true)),
                ("--tls-client-cert-file", cert.is_some()),
                ("--tls-client-key-file", key.is_some()),
                ("--tls-insecure-skip-verify", insecure == Some(true)),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(
                    "--tls-enable",
                    format!("{flag} is set but TLS to the brokers is not enabled"),
                ));
            }
            return Ok(None);
        }
        let provider = tls::provider();
        let client_cert = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let certs =
                    pem::certs(&cert).map_err(|e| ConfigError::new("--tls-client-cert-file", e))?;
                // Checked as a pair (the key belongs to the certificate) before use.
                pem::key_pair(&cert, &key, &provider).map_err(|e| {
                    key_pair_error(e, "--tls-client-cert-file", "--tls-client-key-file")
                })?;
                let key =
                    pem::key(&key).map_err(|e| ConfigError::new("--tls-client-key-file", e))?;
                Some((certs, key))
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "--tls-client-key-file",
                    "required with --tls-client-cert-file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "--tls-client-cert-file",
                    "required with --tls-client-key-file",
                ));
            }
        };
        let insecure = insecure.unwrap_or(false);
        let (trust, described) = if insecure {
            (
                Trust::Anyone,
                "none (--tls-insecure-skip-verify)".to_owned(),
            )
        } else {
            let mut roots = RootCertStore::empty();
            let mut from = Vec::new();
            if let Some(ca) = &ca {
                roots =
                    pem::roots(ca).map_err(|e| ConfigError::new("--tls-ca-chain-cert-file", e))?;
                from.push(ca.display().to_string());
            }
            // kafka-proxy's rule: without a CA file the system pool is the trust.
            let mut system_problem = String::new();
            if system.unwrap_or(ca.is_none()) {
                let (added, why) = system_roots(&mut roots);
                system_problem = format!(" (the system trust store gave none: {why})");
                from.push(format!("the system trust store ({added} CAs)"));
            }
            if roots.is_empty() {
                return Err(ConfigError::new(
                    "--tls-ca-chain-cert-file",
                    format!("no CA to trust the brokers' certificates with{system_problem}"),
                ));
            }
            (Trust::Roots(roots), from.join(" and "))
        };
        let config = client_config(trust, client_cert, provider)
            .map_err(|e| ConfigError::new("--tls-client-cert-file", e))?;
        Ok(Some(Self {
            config,
            insecure,
            trust: described,
        }))
    }
}

/// Adds the operating system's CAs; returns how many, and what went wrong if none.
fn system_roots(roots: &mut RootCertStore) -> (usize, String) {
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    let why = found
        .errors
        .first()
        .map_or_else(|| "it is empty".to_owned(), ToString::to_string);
    (added, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: UpstreamTlsArgs) -> Result<Option<UpstreamTls>, ConfigError> {
        UpstreamTls::resolve(args, UpstreamTlsArgs::default())
    }

    #[test]
    fn flags_without_tls_enable_or_half_a_pair_name_the_flag() {
        assert!(resolve(UpstreamTlsArgs::default()).unwrap().is_none());
        let err = resolve(UpstreamTlsArgs {
            tls_insecure_skip_verify: Some(true),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.flag, "--tls-enable");
        assert!(err.message.contains("--tls-insecure-skip-verify"), "{err}");
        let err = resolve(UpstreamTlsArgs {
            tls_enable: Some(true),
            tls_client_cert_file: Some("/nonexistent/cert.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.flag, "--tls-client-key-file");
        let err = resolve(UpstreamTlsArgs {
            tls_enable: Some(true),
            tls_ca_chain_cert_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.flag, "--tls-ca-chain-cert-file");
        assert!(err.message.contains("/nonexistent/ca.pem"), "{err}");
        let insecure = resolve(UpstreamTlsArgs {
            tls_enable: Some(true),
            tls_insecure_skip_verify: Some(true),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(insecure.insecure);
    }
}
