//! Admission: before kpscd dials a broker for a new client connection, it reads the PROXY
//! protocol header (`--proxy-protocol`) and checks the client against `--allow-source` and
//! `--allow-endpoint-id`. A refused connection is closed with no byte sent to a broker,
//! counted by reason, and logged once per source per minute (a scanner or a
//! misconfigured endpoint retrying in a loop must not flood the log).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, time::timeout};
use tracing::{debug, warn};

use crate::{
    config::listener::{AccessConfig, ProxyProtocol},
    metrics::Metrics,
    proxy::proxy_header::{self, EndpointId, HeaderError, ProxyHeader},
};

/// Who a connection is from, once admitted.
#[derive(Clone, Debug)]
pub struct Client {
    /// The TCP peer (the load balancer or endpoint's NAT address behind a cloud endpoint).
    pub peer: SocketAddr,
    /// The real client: the header's source when it names one, else the peer.
    pub addr: SocketAddr,
    pub endpoint: Option<EndpointId>,
    /// PROXY protocol version of the header read, if any.
    pub header_version: Option<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no PROXY protocol header (--proxy-protocol required)")]
    HeaderMissing,
    #[error("{0}")]
    Header(HeaderError),
    #[error("no complete PROXY protocol header within {0:?} (--proxy-protocol-timeout)")]
    HeaderTimeout(Duration),
    #[error("source {0} is not in --allow-source")]
    Source(IpAddr),
    #[error("endpoint id {} is not in --allow-endpoint-id", .1.as_ref().map_or_else(|| "(none)".to_owned(), |id| format!("{id} ({})", id.cloud())))]
    Endpoint(IpAddr, Option<EndpointId>),
    /// The client closed before sending a byte (e.g. a TCP health check): not a refusal.
    #[error("client closed before sending anything")]
    Closed,
}

impl Refusal {
    /// `kpsc_connections_rejected_total` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::HeaderMissing => "proxy_header_missing",
            Self::Header(HeaderError::Malformed(_)) => "proxy_header_malformed",
            Self::Header(HeaderError::Truncated | HeaderError::Io(_)) => "proxy_header_truncated",
            Self::HeaderTimeout(_) => "proxy_header_timeout",
            Self::Source(_) => "source_not_allowed",
            Self::Endpoint(..) => "endpoint_id_not_allowed",
            Self::Closed => "closed",
        }
    }
}

/// The admission check shared by every listener.
pub struct Gate {
    config: AccessConfig,
    log: RefusalLog,
}

impl Gate {
    pub fn new(config: AccessConfig) -> Self {
        Self {
            config,
            log: RefusalLog::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_SOURCES),
        }
    }

    /// Reads the header (when configured) and checks the allow-lists. On refusal the
    /// connection is counted and (rate limited) logged here; the caller only drops it.
    pub async fn admit(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        listen_port: u16,
        metrics: &Metrics,
    ) -> Option<Client> {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: logged and matched
        // as the IPv4 addresses they are.
        let peer = canonical(peer);
        let result = match self.config.proxy_protocol {
            ProxyProtocol::Off => Ok(None),
            mode => match timeout(self.config.header_timeout, header(stream, mode)).await {
                Ok(result) => result,
                Err(_) => Err(Refusal::HeaderTimeout(self.config.header_timeout)),
            },
        };
        let checked = result.and_then(|header| self.check(peer, header));
        match checked {
            Ok(client) => {
                metrics.endpoint_connection(
                    client.endpoint.as_ref().map(ToString::to_string).as_deref(),
                    !self.config.allow_endpoint_ids.is_empty(),
                );
                Some(client)
            }
            Err(Refusal::Closed) => {
                debug!(%peer, listen_port, "client closed before sending anything");
                None
            }
            Err(refusal) => {
                // The real client when the header named one, else the TCP peer.
                let source = match &refusal {
                    Refusal::Source(ip) | Refusal::Endpoint(ip, _) => *ip,
                    _ => peer.ip(),
                };
                self.refuse(
                    source,
                    peer,
                    listen_port,
                    refusal.reason(),
                    &refusal,
                    metrics,
                );
                None
            }
        }
    }

    /// Counts a refused connection and logs it, at most once per source per window: a
    /// scanner, an L4 health check or a misconfigured client retrying in a loop must not
    /// flood the log. Also for refusals made after admission (the client's TLS handshake).
    pub fn refuse(
        &self,
        source: IpAddr,
        peer: SocketAddr,
        listen_port: u16,
        reason: &'static str,
        error: &dyn std::fmt::Display,
        metrics: &Metrics,
    ) {
        metrics.connection_rejected(reason);
        if let Some(suppressed) = self.log.should_log(source, Instant::now()) {
            warn!(
                client = %source,
                %peer,
                listen_port,
                reason,
                suppressed,
                error = %error,
                "connection refused before reaching a broker; further refusals of this \
                 source are logged at most once a minute"
            );
        }
    }

    fn check(&self, peer: SocketAddr, header: Option<ProxyHeader>) -> Result<Client, Refusal> {
        let (addr, endpoint, header_version) = match header {
            Some(h) => (h.source.unwrap_or(peer), h.endpoint, Some(h.version)),
            None => (peer, None, None),
        };
        // ipnet never matches an IPv4 net against an IPv4-mapped IPv6 address.
        let (peer, addr) = (canonical(peer), canonical(addr));
        let sources = &self.config.allow_sources;
        if !sources.is_empty() && !sources.iter().any(|net| net.contains(&addr.ip())) {
            return Err(Refusal::Source(addr.ip()));
        }
        let ids = &self.config.allow_endpoint_ids;
        if !ids.is_empty()
            && !endpoint
                .as_ref()
                .is_some_and(|id| ids.contains(&id.to_string()))
        {
            return Err(Refusal::Endpoint(addr.ip(), endpoint));
        }
        Ok(Client {
            peer,
            addr,
            endpoint,
            header_version,
        })
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Looks at the first byte without taking it: only a header is consumed, so without one
/// (optional mode) the Kafka bytes are all still there for the broker.
async fn header(
    stream: &mut TcpStream,
    mode: ProxyProtocol,
) -> Result<Option<ProxyHeader>, Refusal> {
    let mut first = [0u8; 1];
    let n = stream
        .peek(&mut first)
        .await
        .map_err(|e| Refusal::Header(HeaderError::Io(e)))?;
    if n == 0 {
        return Err(Refusal::Closed);
    }
    if !proxy_header::starts_header(first[0]) {
        return match mode {
            ProxyProtocol::Required => Err(Refusal::HeaderMissing),
            _ => Ok(None),
        };
    }
    proxy_header::read_header(stream)
        .await
        .map(Some)
        .map_err(Refusal::Header)
}

const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);
/// Sources remembered at once; past that, refusals of new sources share one budget.
const REFUSAL_LOG_SOURCES: usize = 4096;

/// One log line per source per window; the next line says how many were left out.
struct RefusalLog {
    window: Duration,
    capacity: usize,
    /// source -> (when it was last logged, refusals not logged since)
    sources: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl RefusalLog {
    fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            sources: Mutex::default(),
        }
    }

    /// Some(refusals suppressed since the last line) when this one should be logged.
    fn should_log(&self, source: IpAddr, now: Instant) -> Option<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((logged, suppressed)) = sources.get_mut(&source) {
            if now.duration_since(*logged) < self.window {
                *suppressed += 1;
                return None;
            }
            let left_out = *suppressed;
            *logged = now;
            *suppressed = 0;
            return Some(left_out);
        }
        if sources.len() >= self.capacity {
            sources.retain(|_, (logged, _)| now.duration_since(*logged) < self.window);
        }
        // Many sources at once (a scan, spoofed headers): they share one slot so the log
        // still gets at most one line per window for all of them.
        let key = if sources.len() >= self.capacity {
            IpAddr::from([0, 0, 0, 0])
        } else {
            source
        };
        match sources.get_mut(&key) {
            Some((logged, suppressed)) if now.duration_since(*logged) < self.window => {
                *suppressed += 1;
                None
            }
            _ => {
                sources.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_source_per_window_and_a_bounded_table() {
        let log = RefusalLog::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let a = IpAddr::from([198, 18, 0, 1]);
        assert_eq!(log.should_log(a, t0), Some(0));
        assert_eq!(log.should_log(a, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.should_log(a, t0 + Duration::from_secs(2)), None);
        assert_eq!(log.should_log(a, t0 + Duration::from_secs(61)), Some(2));
        // A flood of distinct sources: the table stays at its capacity (+1 shared slot)
        // and the flood gets one line per window.
        let mut logged = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::from((0xC612_0000u32 + i).to_be_bytes());
            if log.should_log(ip, t0 + Duration::from_secs(62)).is_some() {
                logged += 1;
            }
        }
        assert!(logged <= 3, "{logged}");
        assert!(log.sources.lock().unwrap().len() <= 4);
    }

    fn gate(sources: &[&str], ids: &[&str]) -> Gate {
        Gate::new(AccessConfig {
            proxy_protocol: ProxyProtocol::Required,
            header_timeout: Duration::from_secs(1),
            allow_sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
            allow_endpoint_ids: ids.iter().map(|s| s.to_string()).collect(),
            tls: None,
        })
    }

    #[test]
    fn the_real_client_address_and_endpoint_id_are_checked() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let header = |src: &str, id: Option<EndpointId>| {
            Some(ProxyHeader {
                version: 2,
                source: Some(src.parse().unwrap()),
                endpoint: id,
            })
        };
        let g = gate(&["198.18.3.0/24"], &["vpce-1", "42"]);
        let ok = g
            .check(
                peer,
                header("198.18.3.9:1", Some(EndpointId::GooglePsc(42))),
            )
            .unwrap();
        assert_eq!(ok.addr.to_string(), "198.18.3.9:1");
        assert!(matches!(
            g.check(
                peer,
                header("198.18.4.9:1", Some(EndpointId::GooglePsc(42)))
            ),
            Err(Refusal::Source(_))
        ));
        assert!(matches!(
            g.check(
                peer,
                header("198.18.3.9:1", Some(EndpointId::AzureLinkId(43)))
            ),
            Err(Refusal::Endpoint(_, Some(_)))
        ));
        assert!(matches!(
            g.check(peer, header("198.18.3.9:1", None)),
            Err(Refusal::Endpoint(_, None))
        ));
        // No header: the peer is the client.
        assert!(matches!(g.check(peer, None), Err(Refusal::Source(_))));
        assert!(gate(&["127.0.0.0/8"], &[]).check(peer, None).is_ok());
    }

    /// IPv4 clients of a dual-stack listener, or in a PROXY v2 header's IPv6 family, come
    /// as ::ffff:a.b.c.d: they match IPv4 entries and are reported as IPv4.
    #[test]
    fn ipv4_mapped_addresses_match_ipv4_entries() {
        let g = gate(&["198.18.3.0/24"], &[]);
        let mapped: SocketAddr = "[::ffff:198.18.3.9]:1".parse().unwrap();
        let client = g.check(mapped, None).unwrap();
        assert_eq!(client.addr.to_string(), "198.18.3.9:1");
        assert_eq!(client.peer.to_string(), "198.18.3.9:1");
        let header = ProxyHeader {
            version: 2,
            source: Some("[::ffff:198.18.3.10]:2".parse().unwrap()),
            endpoint: None,
        };
        let client = g
            .check("[::1]:5000".parse().unwrap(), Some(header))
            .unwrap();
        assert_eq!(client.addr.to_string(), "198.18.3.10:2");
        match g.check("[::ffff:198.18.4.9]:1".parse().unwrap(), None) {
            Err(Refusal::Source(ip)) => assert_eq!(ip.to_string(), "198.18.4.9"),
            other => panic!("{other:?}"),
        }
        // Real IPv6 addresses are left as they are.
        assert!(matches!(
            g.check("[2001:db8::1]:1".parse().unwrap(), None),
            Err(Refusal::Source(_))
        ));
    }
}
