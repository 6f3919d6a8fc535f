//! The listeners' side: a certificate that can be replaced while kpscd runs, optional
//! client certificates checked against a CA and required subjects, and what a failed
//! handshake is called in metrics.
//!
//! Reload: rustls asks `ListenerCert` for the certificate in every new handshake, so
//! swapping the pair it holds changes what new connections get; established connections
//! keep the session they negotiated. A pair that fails to load leaves the old one in place.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
};

use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls::{
    self, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::tls::{
    pem::{self, KeyPairError},
    subject::RequiredSubject,
};

/// The listeners' certificate and key, re-read on demand.
#[derive(Debug)]
pub struct ListenerCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ListenerCert {
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<Self>, KeyPairError> {
        let pair = pem::key_pair(cert_file, key_file, &provider)?;
        Ok(Arc::new(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            current: RwLock::new(pair),
        }))
    }

    /// Reads both files again; on success new handshakes use them. On failure nothing
    /// changes. Returns the new certificate's description.
    pub fn reload(&self) -> Result<String, KeyPairError> {
        let pair = pem::key_pair(&self.cert_file, &self.key_file, &self.provider)?;
        let described = pem::describe(&pair);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = pair;
        Ok(described)
    }

    /// The certificate in use, described for logs.
    pub fn describe(&self) -> String {
        pem::describe(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn files(&self) -> [&Path; 2] {
        [&self.cert_file, &self.key_file]
    }
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// Client certificates: signed by one of `roots`, and when `subjects` is not empty, with
/// a subject one of them accepts.
pub struct ClientAuth {
    pub roots: RootCertStore,
    pub subjects: Vec<RequiredSubject>,
}

/// The server configuration every listener's acceptor shares.
pub fn server_config(
    cert: Arc<ListenerCert>,
    client_auth: Option<ClientAuth>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, String> {
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(auth.roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(Arc::new(SubjectVerifier {
                inner,
                subjects: auth.subjects,
            }))
        }
    };
    Ok(Arc::new(builder.with_cert_resolver(cert)))
}

/// The CA check first (WebPKI), then the subject.
#[derive(Debug)]
struct SubjectVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    subjects: Vec<RequiredSubject>,
}

/// A valid client certificate whose subject no `--proxy-listener-tls-required-client-subject`
/// accepts.
#[derive(Debug, thiserror::Error)]
#[error(
    "client certificate subject {subject:?} matches no --proxy-listener-tls-required-client-subject"
)]
pub struct SubjectRefused {
    subject: String,
}

impl ClientCertVerifier for SubjectVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.subjects.is_empty() {
            return Ok(verified);
        }
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.subjects.iter().any(|s| s.matches(cert.subject())) {
            return Ok(verified);
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(SubjectRefused {
                subject: cert.subject().to_string(),
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `kpsc_connections_rejected_total` label of a failed client handshake.
pub fn refusal_reason(error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::TimedOut {
        return "tls_handshake_timeout";
    }
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::NoCertificatesPresented) => "tls_client_cert_missing",
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other)))
            if other.0.downcast_ref::<SubjectRefused>().is_some() =>
        {
            "tls_client_subject"
        }
        Some(rustls::Error::InvalidCertificate(_)) => "tls_client_cert_invalid",
        _ => "tls_handshake",
    }
}

/// The listeners' TLS as configured: the acceptor's configuration and the certificate it
/// serves, kept to reload it.
#[derive(Clone, Debug)]
pub struct ListenerTls {
    pub config: Arc<ServerConfig>,
    pub cert: Arc<ListenerCert>,
    /// Clients must present a certificate (`--proxy-listener-ca-chain-cert-file`).
    pub client_auth: bool,
}
