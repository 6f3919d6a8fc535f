//! TLS on the proxy's listeners (kafka-proxy's `--proxy-listener-tls-enable`,
//! `--proxy-listener-cert-file`, `--proxy-listener-key-file`): the certificate chain and
//! key are read and checked at start, so a missing file, a file that holds no PEM
//! certificate or key, or a key that does not belong to the certificate is a
//! configuration error naming its flag, not a failure at the first client.

use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::error::ConfigError;

pub const CERT_FLAG: &str = "--proxy-listener-cert-file";
pub const KEY_FLAG: &str = "--proxy-listener-key-file";

/// The server configuration every listener's TLS acceptor shares.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::new(CERT_FLAG, format!("{}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            CERT_FLAG,
            format!("{}: no PEM certificate in it", cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| ConfigError::new(KEY_FLAG, format!("{}: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| ConfigError::new(KEY_FLAG, format!("{}: {e}", key_file.display())))?;
    // Refuse a key from another certificate now: rustls would only notice in handshakes.
    rustls::sign::CertifiedKey::new(certs.clone(), signing_key)
        .keys_match()
        .map_err(|e| {
            ConfigError::new(
                KEY_FLAG,
                format!(
                    "{} does not belong to the certificate in {}: {e}",
                    key_file.display(),
                    cert_file.display()
                ),
            )
        })?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| ConfigError::new(CERT_FLAG, format!("{}: {e}", cert_file.display())))?;
    Ok(Arc::new(config))
}
