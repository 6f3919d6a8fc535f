//! PEM files: certificate chains, private keys and trusted CAs, with errors that name the
//! file and say what is wrong with it.

use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{RootCertStore, crypto::CryptoProvider, sign::CertifiedKey};

/// Every certificate in `path`, in file order (a chain: leaf first).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The first private key in `path` (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// CA certificates to trust, from `path`.
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(store)
}

/// Which of the two files of a key pair is wrong.
#[derive(Debug)]
pub enum KeyPairError {
    Cert(String),
    Key(String),
}

impl std::fmt::Display for KeyPairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cert(e) | Self::Key(e) => f.write_str(e),
        }
    }
}

/// A certificate chain and its key, checked to belong together: rustls itself would only
/// notice in a handshake.
pub fn key_pair(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, KeyPairError> {
    let certs = certs(cert_file).map_err(KeyPairError::Cert)?;
    let key = key(key_file).map_err(KeyPairError::Key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| KeyPairError::Key(format!("{}: {e}", key_file.display())))?;
    let pair = CertifiedKey::new(certs, signing_key);
    pair.keys_match().map_err(|e| {
        KeyPairError::Key(format!(
            "{} does not belong to the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        ))
    })?;
    Ok(Arc::new(pair))
}

/// The leaf's serial number in hex and its subject, for logs: what an operator compares
/// with `openssl x509 -serial -subject` after a rotation.
pub fn describe(pair: &CertifiedKey) -> String {
    let Some(leaf) = pair.cert.first() else {
        return "(empty chain)".to_owned();
    };
    match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => format!(
            "serial={} subject={}",
            cert.raw_serial_as_string(),
            cert.subject()
        ),
        Err(e) => format!("(unparsable certificate: {e})"),
    }
}
