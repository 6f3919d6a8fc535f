//! TLS on the proxy's listeners (kafka-proxy's `--proxy-listener-tls-enable`,
//! `--proxy-listener-cert-file`, `--proxy-listener-key-file`,
//! `--proxy-listener-ca-chain-cert-file`, `--proxy-listener-tls-required-client-subject`):
//! every file is read and checked at start, so a missing file, a file that holds no PEM
//! certificate or key, a key that does not belong to the certificate or a malformed
//! subject is a configuration error naming its flag, not a failure at the first client.

use std::path::Path;

use crate::{
    config::error::ConfigError,
    tls::{
        self,
        listener::{ClientAuth, ListenerCert, ListenerTls},
        pem::{self, KeyPairError},
        subject::RequiredSubject,
    },
};

pub const CERT_FLAG: &str = "--proxy-listener-cert-file";
pub const KEY_FLAG: &str = "--proxy-listener-key-file";
pub const CA_FLAG: &str = "--proxy-listener-ca-chain-cert-file";
pub const SUBJECT_FLAG: &str = "--proxy-listener-tls-required-client-subject";

/// Names the flag of the file that is wrong.
pub fn key_pair_error(e: KeyPairError, cert_flag: &str, key_flag: &str) -> ConfigError {
    match e {
        KeyPairError::Cert(e) => ConfigError::new(cert_flag, e),
        KeyPairError::Key(e) => ConfigError::new(key_flag, e),
    }
}

/// The listeners' TLS: certificate and key (reloadable), and client certificates when a
/// CA is given.
pub fn listener(
    cert_file: &Path,
    key_file: &Path,
    ca_file: Option<&Path>,
    subjects: &[String],
) -> Result<ListenerTls, ConfigError> {
    let provider = tls::provider();
    let cert = ListenerCert::load(cert_file, key_file, provider.clone())
        .map_err(|e| key_pair_error(e, CERT_FLAG, KEY_FLAG))?;
    let subjects = subjects
        .iter()
        .map(|s| RequiredSubject::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(SUBJECT_FLAG, e))?;
    let client_auth = match ca_file {
        Some(ca) => Some(ClientAuth {
            roots: pem::roots(ca).map_err(|e| ConfigError::new(CA_FLAG, e))?,
            subjects,
        }),
        None if !subjects.is_empty() => {
            return Err(ConfigError::new(
                SUBJECT_FLAG,
                format!("checks client certificates: set {CA_FLAG} to require them"),
            ));
        }
        None => None,
    };
    let required = client_auth.is_some();
    let config = tls::listener::server_config(cert.clone(), client_auth, provider)
        .map_err(|e| ConfigError::new(CA_FLAG, e))?;
    Ok(ListenerTls {
        config,
        cert,
        client_auth: required,
    })
}
