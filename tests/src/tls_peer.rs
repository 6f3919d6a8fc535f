//! Real TLS peers for the TLS tests: stunnel terminating TLS in front of a broker
//! (OpenSSL, not rustls: an independent implementation on the other end of kpscd's
//! broker connections), and a rustls client that reports the certificate it was served
//! and speaks one Kafka request.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest};
use kpsc_testkit::{Process, eventually, request_body};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

use crate::pki::Pki;

/// stunnel terminating TLS on `listen_host:port` and forwarding each connection to
/// `target` (a broker) in plaintext. With `client_ca`, clients must present a
/// certificate from that CA. (socat's `openssl-listen` cannot stand in: with client
/// verification on it leaves OpenSSL's session id context unset, so every resumed
/// session fails with an internal error.)
pub struct TlsFront {
    _stunnel: Process,
    pub port: u16,
}

impl TlsFront {
    pub fn start(
        listen_host: &str,
        target: &str,
        pki: &Pki,
        server: &str,
        client_ca: Option<&str>,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind((listen_host, 0))?
            .local_addr()?
            .port();
        let verify = match client_ca {
            Some(ca) => format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                pki.path(ca)
            ),
            None => String::new(),
        };
        let config = format!(
            "foreground = yes\npid =\ndebug = warning\n[broker]\naccept = {listen_host}:{port}\n\
             connect = {target}\ncert = {}\nkey = {}\n{verify}",
            pki.path(&format!("{server}.pem")),
            pki.path(&format!("{server}.key")),
        );
        let path = pki.path(&format!("stunnel-{listen_host}-{port}.conf"));
        std::fs::write(&path, config)?;
        let stunnel = Process::spawn(
            Command::new("stunnel4").arg(&path).stdin(Stdio::null()),
            Duration::ZERO,
        )
        .context("stunnel4 (cargo xtask setup installs it)")?;
        // Connecting costs stunnel one failed handshake: harmless.
        eventually(Duration::from_secs(5), || {
            TcpStream::connect((listen_host, port))
                .with_context(|| format!("stunnel on {listen_host}:{port}"))
        })?;
        Ok(Self {
            _stunnel: stunnel,
            port,
        })
    }
}

/// A rustls client connection trusting `ca`, presenting `client` (`NAME` for NAME.pem and
/// NAME.key) when given.
pub struct TlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    pub fn connect(
        addr: &str,
        server_name: &str,
        pki: &Pki,
        client: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(pki.path("ca.pem"))?)?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config =
            match client {
                Some(name) => builder.with_client_auth_cert(
                    CertificateDer::pem_file_iter(pki.path(&format!("{name}.pem")))?
                        .collect::<Result<Vec<_>, _>>()?,
                    PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key")))?,
                )?,
                None => builder.with_no_client_auth(),
            };
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(server_name.to_owned())?,
        )?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .context("TLS handshake")?;
        }
        Ok(Self { tls })
    }

    /// The leaf certificate the server presented (DER).
    pub fn server_cert(&self) -> Vec<u8> {
        self.tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// Sends ApiVersions v0 and reads the answer's frame: fails when the server refused
    /// the connection (with TLS 1.3 a refused client certificate shows here, after the
    /// client's side of the handshake finished).
    pub fn api_versions(&mut self, correlation_id: i32) -> anyhow::Result<()> {
        let body = request_body(
            ApiKey::ApiVersions,
            0,
            correlation_id,
            "kpsc-tls-test",
            &ApiVersionsRequest::default(),
        )?;
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.tls.write_all(&frame)?;
        self.tls.flush()?;
        let mut size = [0u8; 4];
        self.tls
            .read_exact(&mut size)
            .context("reading the answer")?;
        let mut answer = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
        self.tls.read_exact(&mut answer)?;
        if answer.get(..4) != Some(&correlation_id.to_be_bytes()[..]) {
            bail!("answer with another correlation id");
        }
        Ok(())
    }
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(path: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(path)
        .map(|c| c.to_vec())
        .unwrap_or_default()
}
