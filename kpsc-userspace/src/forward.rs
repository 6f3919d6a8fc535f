//! One client connection: one upstream connection to the mapped broker, requests copied
//! up, responses copied down in request order, address-bearing responses rewritten.
//!
//! Invariants:
//! - responses reach the client in the order of their requests: one upstream connection,
//!   one task writing to the client, processing responses strictly in arrival order and
//!   checking each correlation id against the oldest request still waiting;
//! - a response that may carry broker addresses is decoded and rewritten, or the
//!   connection is closed: it is never forwarded as it came;
//! - memory per connection is two fixed buffers (and, with splice, two pipes, made on
//!   first use) plus at most one rewritten response;
//!   `--kafka-max-open-requests` bounds requests in flight (then reading the client stops).

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use tokio::{
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
    time::timeout,
};
use tracing::{debug, warn};

use crate::{
    codec::{
        Acks, FrameError, FrameReader, REQUEST_HEADER_FIXED_LEN, RequestHeader, SIZE_LEN,
        frame_size, produce_acks, write_frame,
    },
    listener::{ProxyState, Route},
    portmap::BrokerAddr,
    rewrite::{self, AddressResponse, Advertised, Endpoint, RewriteError, api_name},
    splice::BulkMover,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to broker {broker}: {source}")]
    Connect {
        broker: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to broker {0}")]
    ConnectTimeout(String),
    #[error("client: {0}")]
    Client(FrameError),
    #[error("broker: {0}")]
    Broker(FrameError),
    #[error("request for forbidden api {api} ({key}) refused (--forbidden-api-keys)")]
    Forbidden { api: &'static str, key: i16 },
    #[error("broker closed the connection with {0} request(s) in flight")]
    BrokerClosed(usize),
    #[error("broker sent a response nobody asked for")]
    Unsolicited,
    #[error("response correlation id {got} does not match the oldest request's {expected}")]
    CorrelationMismatch { expected: i32, got: i32 },
    #[error("{0}")]
    Rewrite(#[from] RewriteError),
    #[error("cannot map broker(s) in the response: {0}")]
    Unmappable(String),
    #[error("writing to the client: {0}")]
    ClientWrite(std::io::Error),
}

impl ConnError {
    /// Metric label.
    fn reason(&self) -> &'static str {
        match self {
            ConnError::Connect { .. } | ConnError::ConnectTimeout(_) => "broker_unreachable",
            ConnError::Client(FrameError::TooLarge { .. }) => "client_frame_too_large",
            ConnError::Client(FrameError::NegativeSize(_) | FrameError::TooSmall { .. }) => {
                "client_bad_size"
            }
            ConnError::Client(FrameError::BadHeader(_)) => "client_bad_header",
            ConnError::Client(FrameError::Truncated) => "client_truncated",
            ConnError::Client(FrameError::Io(_)) | ConnError::ClientWrite(_) => "client_io",
            ConnError::Broker(FrameError::Io(_)) => "broker_io",
            ConnError::Broker(_) => "broker_bad_frame",
            ConnError::Forbidden { .. } => "forbidden_api",
            ConnError::BrokerClosed(_) => "broker_closed",
            ConnError::Unsolicited | ConnError::CorrelationMismatch { .. } => "broker_protocol",
            ConnError::Rewrite(RewriteError::Unmapped { .. }) | ConnError::Unmappable(_) => {
                "unmapped_broker"
            }
            ConnError::Rewrite(_) => "rewrite_failed",
        }
    }
}

/// A request whose response is still to come.
struct InFlight {
    header: RequestHeader,
    sent_at: Instant,
    /// False for Produce with acks=0: Kafka brokers send no response.
    expects_response: bool,
    /// kpsc answers this request itself (it was not forwarded); delivered in order.
    local_response: Option<BytesMut>,
}

/// How many unanswered acks=0 correlation ids to remember (see `forward_responses`).
const ACKS0_MEMORY: usize = 1024;

/// Serves one accepted client connection to completion, logging and counting how it ended.
pub async fn serve(client: TcpStream, peer: SocketAddr, route: Route, state: Arc<ProxyState>) {
    route.counters.connections_total.inc();
    route.counters.connections_open.inc();
    let result = run(client, &route, &state).await;
    route.counters.connections_open.dec();
    match result {
        Ok(()) => {
            debug!(%peer, listen_port = route.listen_port, broker = %route.broker, "connection closed")
        }
        Err(e) => {
            state.metrics.connection_error(e.reason());
            warn!(%peer, listen_port = route.listen_port, broker = %route.broker, error = %e, "connection closed on error");
        }
    }
}

async fn connect(broker: &BrokerAddr, state: &ProxyState) -> Result<TcpStream, ConnError> {
    let stream = timeout(
        state.config.map.dial_timeout,
        TcpStream::connect((broker.host.as_str(), broker.port)),
    )
    .await
    .map_err(|_| ConnError::ConnectTimeout(broker.to_string()))?
    .map_err(|source| ConnError::Connect {
        broker: broker.to_string(),
        source,
    })?;
    stream.set_nodelay(true).ok();
    Ok(stream)
}

async fn run(client: TcpStream, route: &Route, state: &Arc<ProxyState>) -> Result<(), ConnError> {
    client.set_nodelay(true).ok();
    let upstream = connect(&route.broker, state).await?;
    let (client_r, client_w) = client.into_split();
    // The upstream write half outlives both loops: dropping it sends FIN, and brokers drop
    // the responses still owed on a connection whose client side has closed.
    let (upstream_r, mut upstream_w) = upstream.into_split();
    let (in_flight_tx, in_flight_rx) = mpsc::channel(state.config.max_in_flight);

    let requests = forward_requests(client_r, &mut upstream_w, in_flight_tx, route, state);
    let responses = forward_responses(upstream_r, client_w, in_flight_rx, route, state);
    tokio::pin!(requests, responses);
    tokio::select! {
        // The client stopped sending (EOF or shutdown): deliver what is still in flight.
        r = &mut requests => {
            r?;
            responses.await
        }
        // The broker side ended or failed: nothing more can be answered.
        r = &mut responses => r,
    }
}

async fn forward_requests(
    client_r: OwnedReadHalf,
    upstream_w: &mut OwnedWriteHalf,
    in_flight: mpsc::Sender<InFlight>,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError> {
    let max_frame = state.config.max_frame_size;
    let forbidden = &state.config.forbidden_api_keys;
    let transfer = state.config.bulk_transfer;
    let mut reader = FrameReader::new(client_r, BulkMover::read_buffer_size(transfer));
    let mut bulk = BulkMover::new(transfer, state.metrics.spliced_bytes.clone());
    loop {
        let more = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => false,
            more = reader.fill_to(SIZE_LEN) => more.map_err(ConnError::Client)?,
        };
        if !more {
            // Dropping `in_flight` lets the response loop end once it has delivered what
            // is still owed.
            return Ok(());
        }
        let prefix: [u8; 4] = reader.buffered()[..SIZE_LEN].try_into().expect("4 bytes");
        let size = frame_size(
            prefix,
            max_frame,
            REQUEST_HEADER_FIXED_LEN as u32,
            "request",
        )
        .map_err(ConnError::Client)?;
        let frame_len = SIZE_LEN + size as usize;
        reader
            .fill_to(SIZE_LEN + REQUEST_HEADER_FIXED_LEN)
            .await
            .map_err(ConnError::Client)?;
        let header =
            RequestHeader::parse(&reader.buffered()[SIZE_LEN..]).map_err(ConnError::Client)?;
        if forbidden.contains(&header.api_key) {
            state.metrics.forbidden(header.api_key);
            return Err(ConnError::Forbidden {
                api: api_name(header.api_key),
                key: header.api_key,
            });
        }
        let expects_response = if header.api_key == ApiKey::Produce as i16 {
            let peek = frame_len.min(reader.capacity());
            reader.fill_to(peek).await.map_err(ConnError::Client)?;
            match produce_acks(&reader.buffered()[SIZE_LEN..peek], header.api_version)
                .map_err(ConnError::Client)?
            {
                Acks::Value(acks) => acks != 0,
                Acks::NeedMore => {
                    return Err(ConnError::Client(FrameError::BadHeader(format!(
                        "produce request header does not fit in {peek} bytes"
                    ))));
                }
            }
        } else {
            true
        };
        // An ApiVersions request newer than kpsc can decode the answer of: answer it here
        // as a broker would (UNSUPPORTED_VERSION, v0), through the response queue so it
        // cannot overtake earlier responses.
        let local_response = (header.api_key == ApiKey::ApiVersions as i16
            && !rewrite::api_versions_request_supported(header.api_version))
        .then(|| rewrite::unsupported_api_versions_response(header.correlation_id));
        // Blocks when too many requests are in flight: backpressure on the client.
        let answered_here = local_response.is_some();
        in_flight
            .send(InFlight {
                header,
                sent_at: Instant::now(),
                expects_response,
                local_response,
            })
            .await
            .map_err(|_| ConnError::BrokerClosed(0))?;
        if answered_here {
            reader
                .copy_to(frame_len, &mut tokio::io::sink())
                .await
                .map_err(ConnError::Client)?;
            continue;
        }
        state.metrics.request(header.api_key);
        bulk.forward(&mut reader, frame_len, upstream_w)
            .await
            .map_err(|e| match e {
                FrameError::Truncated => ConnError::Client(e),
                other => ConnError::Broker(other),
            })?;
        route.counters.bytes_from_client.inc_by(frame_len as u64);
    }
}

async fn forward_responses(
    upstream_r: OwnedReadHalf,
    mut client_w: OwnedWriteHalf,
    mut in_flight: mpsc::Receiver<InFlight>,
    route: &Route,
    state: &Arc<ProxyState>,
) -> Result<(), ConnError> {
    let max_frame = state.config.max_frame_size;
    let transfer = state.config.bulk_transfer;
    let mut reader = FrameReader::new(upstream_r, BulkMover::read_buffer_size(transfer));
    let mut bulk = BulkMover::new(transfer, state.metrics.spliced_bytes.clone());
    let mut body = Vec::new();
    let mut out = BytesMut::new();
    // Correlation ids of acks=0 produce requests since the last answered request. Kafka
    // never answers them; some brokers (librdkafka's mock) do, and such an answer must be
    // dropped, not forwarded to a client that expects none nor taken as out of order.
    let mut unanswered_acks0: VecDeque<i32> = VecDeque::new();
    let mut pending: Option<InFlight> = None;
    loop {
        if pending.is_none() {
            pending = tokio::select! {
                // Requests are registered before they are written upstream, so when a
                // response arrives its request is already queued: poll the queue first.
                biased;
                request = in_flight.recv() => match request {
                    Some(r) => Some(r),
                    None => return Ok(()),
                },
                // Nothing in flight: only a close or an answer to acks=0 may come.
                data = reader.fill_to(1) => {
                    if !data.map_err(ConnError::Broker)? {
                        return Ok(());
                    }
                    None
                }
            };
            if let Some(request) = pending.take_if(|r| r.local_response.is_some()) {
                let body = request.local_response.expect("checked");
                write_frame(&mut client_w, &body)
                    .await
                    .map_err(ConnError::ClientWrite)?;
                route
                    .counters
                    .bytes_to_client
                    .inc_by((SIZE_LEN + body.len()) as u64);
                state.metrics.version_cap(request.header.api_key);
                continue;
            }
            if let Some(request) = pending.take_if(|r| !r.expects_response) {
                if unanswered_acks0.len() == ACKS0_MEMORY {
                    unanswered_acks0.pop_front();
                }
                unanswered_acks0.push_back(request.header.correlation_id);
                continue;
            }
        }
        let waiting = in_flight.len() + usize::from(pending.is_some());
        match reader.fill_to(SIZE_LEN + 4).await {
            Ok(true) => {}
            Ok(false) if waiting == 0 => return Ok(()),
            Ok(false) | Err(FrameError::Truncated) => return Err(ConnError::BrokerClosed(waiting)),
            Err(e) => return Err(ConnError::Broker(e)),
        }
        let buffered = reader.buffered();
        let size = frame_size(
            buffered[..4].try_into().expect("4 bytes"),
            max_frame,
            4,
            "response",
        )
        .map_err(ConnError::Broker)?;
        let correlation_id = i32::from_be_bytes(buffered[4..8].try_into().expect("4 bytes"));
        if let Some(pos) = unanswered_acks0.iter().position(|&id| id == correlation_id) {
            unanswered_acks0.drain(..=pos);
            reader
                .copy_to(SIZE_LEN + size as usize, &mut tokio::io::sink())
                .await
                .map_err(ConnError::Broker)?;
            debug!(
                correlation_id,
                "dropped the broker's answer to an acks=0 produce"
            );
            continue;
        }
        let Some(request) = pending.take() else {
            return Err(ConnError::Unsolicited);
        };
        let RequestHeader {
            api_key,
            api_version,
            correlation_id: expected,
        } = request.header;
        if correlation_id != expected {
            return Err(ConnError::CorrelationMismatch {
                expected,
                got: correlation_id,
            });
        }
        // Responses come in request order: earlier acks=0 requests will not be answered.
        unanswered_acks0.clear();
        let is_api_versions = api_key == ApiKey::ApiVersions as i16;
        let written = if is_api_versions || rewrite::response_needs_rewrite(api_key, api_version) {
            reader.consume(SIZE_LEN);
            body.clear();
            reader
                .read_into(size as usize, &mut body)
                .await
                .map_err(ConnError::Broker)?;
            let frame = Bytes::from(std::mem::take(&mut body));
            out.clear();
            if is_api_versions {
                rewrite_api_versions(api_version, frame, state, &mut out)?;
            } else {
                rewrite_addresses(api_key, api_version, frame, state, &mut out)?;
            }
            write_frame(&mut client_w, &out)
                .await
                .map_err(ConnError::ClientWrite)?;
            SIZE_LEN + out.len()
        } else {
            let frame_len = SIZE_LEN + size as usize;
            bulk.forward(&mut reader, frame_len, &mut client_w)
                .await
                .map_err(|e| match e {
                    FrameError::Truncated => ConnError::BrokerClosed(waiting),
                    FrameError::Io(io) => ConnError::ClientWrite(io),
                    other => ConnError::Broker(other),
                })?;
            frame_len
        };
        route.counters.bytes_to_client.inc_by(written as u64);
        state
            .metrics
            .latency(api_key, request.sent_at.elapsed().as_secs_f64());
    }
}

fn rewrite_api_versions(
    api_version: i16,
    frame: Bytes,
    state: &ProxyState,
    out: &mut BytesMut,
) -> Result<(), ConnError> {
    let key = ApiKey::ApiVersions as i16;
    let changes = rewrite::rewrite_api_versions(
        api_version,
        frame,
        state.config.bulk_policy,
        &state.config.forbidden_api_keys,
        out,
    )
    .inspect_err(|_| state.metrics.decode_failure(key))?;
    for (api, _, _) in &changes.capped {
        state.metrics.version_cap(*api);
    }
    for api in &changes.removed {
        state.metrics.version_cap(*api);
    }
    state.metrics.rewrite(key);
    Ok(())
}

/// Placeholder endpoints ("no coordinator": node -1, empty host) name no broker and are
/// left as they are. Anything with a host must be mapped, whatever its port says.
fn is_placeholder(e: &Endpoint) -> bool {
    e.host.is_empty()
}

fn rewrite_addresses(
    api_key: i16,
    api_version: i16,
    frame: Bytes,
    state: &Arc<ProxyState>,
    out: &mut BytesMut,
) -> Result<(), ConnError> {
    let mut response = AddressResponse::decode(api_key, api_version, frame)
        .inspect_err(|_| state.metrics.decode_failure(api_key))?;
    let brokers: Vec<(i32, BrokerAddr)> = response
        .endpoints()
        .into_iter()
        .filter(|e| !is_placeholder(e))
        .filter_map(|e| {
            Some((
                e.node_id,
                BrokerAddr::new(e.host, u16::try_from(e.port).ok()?),
            ))
        })
        .collect();
    // Brokers seen for the first time get their listener before the client hears of them.
    let problems = state.learn(&brokers);
    if !problems.is_empty() {
        let text = problems
            .iter()
            .map(|p| format!("{p:#}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ConnError::Unmappable(text));
    }
    let rewritten = {
        let map = state.map.read().expect("map lock");
        response.rewrite(|e| {
            if is_placeholder(e) {
                return Some(Advertised {
                    host: e.host.clone(),
                    port: e.port,
                });
            }
            map.advertised_for(&e.host, e.port).map(|a| Advertised {
                host: a.host.clone(),
                port: i32::from(a.port),
            })
        })?
    };
    response.encode(out)?;
    if rewritten > 0 {
        state.metrics.rewrite(api_key);
    }
    Ok(())
}
