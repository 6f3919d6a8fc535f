//! kpscd's connections to brokers, for client traffic and for its own metadata requests
//! alike: dial (through `--dial-address-mapping`), then TLS when `--tls-enable` is set.
//! `Upstream::connect` returns a stream ready for Kafka frames; authenticating that stream
//! to the broker (SASL) belongs here too, after the TLS handshake, so every caller gets
//! it without knowing.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::{TlsConnector, client::TlsStream, rustls::ClientConfig};

use crate::mapping::{addr::BrokerAddr, dial::DialMap};

/// How kpscd reaches brokers.
#[derive(Clone)]
pub struct Upstream {
    dial: DialMap,
    tls: Option<TlsConnector>,
    /// For the TCP connect and the TLS handshake together.
    timeout: Duration,
}

/// A connection to a broker, ready for Kafka frames.
pub enum BrokerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    // Fields are not named `source`: the message already says it, and anyhow's `{:#}`
    // would print it a second time.
    #[error("cannot connect to broker {broker}: {error}")]
    Connect { broker: String, error: io::Error },
    #[error("timed out connecting to broker {0}")]
    Timeout(String),
    #[error("TLS handshake with broker {broker} failed (--tls-enable): {error}")]
    Tls { broker: String, error: io::Error },
    #[error("broker {0}: its host is not a valid TLS server name")]
    ServerName(String),
}

impl UpstreamError {
    /// `kpsc_connection_errors_total` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } | Self::Timeout(_) => "broker_unreachable",
            Self::Tls { .. } | Self::ServerName(_) => "broker_tls_handshake",
        }
    }
}

impl Upstream {
    pub fn new(dial: DialMap, tls: Option<Arc<ClientConfig>>, timeout: Duration) -> Self {
        Self {
            dial,
            tls: tls.map(TlsConnector::from),
            timeout,
        }
    }

    /// Plain TCP to the addresses brokers advertise (portmap's probes).
    pub fn plain(timeout: Duration) -> Self {
        Self::new(DialMap::default(), None, timeout)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `broker`. With TLS, the certificate must name the broker's own address
    /// (the advertised host or IP, also under `--dial-address-mapping`: only the network
    /// path changes there, not whom kpscd expects to talk to).
    pub async fn connect(&self, broker: &BrokerAddr) -> Result<BrokerStream, UpstreamError> {
        let dial = self.dial.dial_address(broker);
        let name = if dial == broker {
            broker.to_string()
        } else {
            format!("{broker} (dialled at {dial})")
        };
        timeout(self.timeout, self.establish(broker, dial, &name))
            .await
            .map_err(|_| UpstreamError::Timeout(name.clone()))?
    }

    async fn establish(
        &self,
        broker: &BrokerAddr,
        dial: &BrokerAddr,
        name: &str,
    ) -> Result<BrokerStream, UpstreamError> {
        let stream = TcpStream::connect((dial.host.as_str(), dial.port))
            .await
            .map_err(|error| UpstreamError::Connect {
                broker: name.to_owned(),
                error,
            })?;
        stream.set_nodelay(true).ok();
        let Some(tls) = &self.tls else {
            return Ok(BrokerStream::Plain(stream));
        };
        let server_name = ServerName::try_from(broker.host.clone())
            .map_err(|_| UpstreamError::ServerName(name.to_owned()))?;
        let stream =
            tls.connect(server_name, stream)
                .await
                .map_err(|error| UpstreamError::Tls {
                    broker: name.to_owned(),
                    error,
                })?;
        Ok(BrokerStream::Tls(Box::new(stream)))
    }
}

impl AsyncRead for BrokerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BrokerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
