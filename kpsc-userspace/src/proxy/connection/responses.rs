//! Broker -> client: each response is matched with the oldest request in flight, then
//! forwarded unchanged, or decoded, rewritten and re-encoded when it may carry addresses.

use std::{collections::VecDeque, time::Duration};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tracing::debug;

use crate::{
    kafka::{
        frame::{FrameError, FrameReader, MoveError, SIZE_LEN, frame_size, write_frame},
        request::RequestHeader,
    },
    mapping::addr::BrokerAddr,
    proxy::{
        budget::{Reservation, release_after_large_rewrite},
        bulk::transfer::Transfer,
        connection::{
            error::ConnError,
            requests::{InFlight, Origin},
        },
        listeners::Route,
        rewrite::{api_versions, apis, declaration::Advertised, policy},
        state::ProxyState,
    },
};

/// How many unanswered acks=0 correlation ids to remember (see `forward_responses`).
const ACKS0_MEMORY: usize = 1024;
/// How long a rewrite waits for room in the memory budget before its connection closes.
const REWRITE_BUDGET_WAIT: Duration = Duration::from_secs(30);
/// Rewrites at least this large give their memory back to the system when done.
const LARGE_REWRITE: u32 = 4 << 20;
/// The rewrite output buffer is kept between responses up to this capacity.
const KEPT_OUTPUT_CAPACITY: usize = 1 << 20;

/// Forwards responses until the request side is done and everything owed was delivered,
/// or the broker side ends.
pub async fn forward_responses<R, W, M>(
    upstream_r: R,
    client_w: &mut W,
    mut mover: M,
    mut in_flight: mpsc::Receiver<InFlight>,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    M: Transfer<R, W>,
{
    let mut reader = FrameReader::new(upstream_r, mover.read_buffer_size());
    let mut responses = Responses::default();
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
            if responses
                .settle_unanswered(&mut pending, client_w, route, state)
                .await?
                .is_some()
            {
                continue;
            }
        }
        let waiting = in_flight.len() + usize::from(pending.is_some());
        match reader.fill_to(RESPONSE_HEAD).await {
            Ok(true) => {}
            Ok(false) if waiting == 0 => return Ok(()),
            Ok(false) | Err(FrameError::Truncated) => return Err(ConnError::BrokerClosed(waiting)),
            Err(e) => return Err(ConnError::Broker(e)),
        }
        responses
            .forward_one(
                &mut reader,
                client_w,
                &mut mover,
                &mut pending,
                waiting,
                route,
                state,
            )
            .await?;
    }
}

/// Size prefix and correlation id: what `Responses::forward_one` needs buffered.
pub const RESPONSE_HEAD: usize = SIZE_LEN + 4;

/// One response frame handled by `Responses::forward_one`.
pub struct Forwarded {
    /// The origin of the request it answered; None for a dropped answer to acks=0.
    pub answered: Option<Origin>,
    /// Bytes of the broker's stream it took.
    pub consumed: usize,
    /// Bytes written to the client.
    pub written: usize,
}

/// A connection's response direction: what outlives one response.
#[derive(Default)]
pub struct Responses {
    body: Vec<u8>,
    out: BytesMut,
    /// Correlation ids of acks=0 produce requests since the last answered request. Kafka
    /// never answers them; some brokers (librdkafka's mock) do, and such an answer must
    /// be dropped, not forwarded to a client that expects none nor taken as out of order.
    unanswered_acks0: VecDeque<i32>,
}

impl Responses {
    /// Settles `pending` if the broker will not answer it: writes kpsc's own answer, or
    /// remembers an acks=0 id. Returns the request's origin and the bytes written to the
    /// client when it was settled.
    pub async fn settle_unanswered<W>(
        &mut self,
        pending: &mut Option<InFlight>,
        client_w: &mut W,
        route: &Route,
        state: &ProxyState,
    ) -> Result<Option<(Origin, usize)>, ConnError>
    where
        W: AsyncWrite + Unpin + Send,
    {
        if let Some(request) = pending.take_if(|r| r.local_response.is_some()) {
            let body = request.local_response.expect("checked");
            write_frame(client_w, &body)
                .await
                .map_err(ConnError::ClientWrite)?;
            route
                .counters
                .bytes_to_client
                .inc_by((SIZE_LEN + body.len()) as u64);
            state.metrics.version_cap(request.header.api_key);
            return Ok(Some((request.origin, SIZE_LEN + body.len())));
        }
        if let Some(request) = pending.take_if(|r| !r.expects_response) {
            self.remember_acks0(request.header.correlation_id);
            return Ok(Some((request.origin, 0)));
        }
        Ok(None)
    }

    /// An acks=0 request settled without kpscd seeing its place in the stream (the
    /// kernel path): an answer with its id is dropped.
    pub fn remember_acks0(&mut self, correlation_id: i32) {
        if self.unanswered_acks0.len() == ACKS0_MEMORY {
            self.unanswered_acks0.pop_front();
        }
        self.unanswered_acks0.push_back(correlation_id);
    }

    /// The response whose head is `head` (RESPONSE_HEAD bytes) answers an acks=0 request
    /// settled earlier: `forward_one` drops it.
    pub fn answers_acks0(&self, head: &[u8]) -> bool {
        head.get(4..8)
            .map(|id| i32::from_be_bytes(id.try_into().expect("4 bytes")))
            .is_some_and(|id| self.unanswered_acks0.contains(&id))
    }

    /// Accounts a response the kernel delivered: acks=0 ids before it will not be
    /// answered. (Its latency is unknown: kpscd learns of it later, in batches.)
    pub fn delivered_elsewhere(&mut self) {
        self.unanswered_acks0.clear();
    }

    /// Handles the response frame at the head of `reader` (RESPONSE_HEAD bytes
    /// buffered): drops a broker's answer to acks=0, or delivers it, rewritten if it may
    /// carry addresses, as the response to `pending` (which it takes). `waiting`: requests
    /// owed a response, for the error if the broker leaves mid-frame.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward_one<R, W, M>(
        &mut self,
        reader: &mut FrameReader<R>,
        client_w: &mut W,
        mover: &mut M,
        pending: &mut Option<InFlight>,
        waiting: usize,
        route: &Route,
        state: &ProxyState,
    ) -> Result<Forwarded, ConnError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
        M: Transfer<R, W>,
    {
        let buffered = reader.buffered();
        let size = frame_size(
            buffered[..4].try_into().expect("4 bytes"),
            state.config.max_frame_size,
            4,
            "response",
        )
        .map_err(ConnError::Broker)?;
        let correlation_id = i32::from_be_bytes(buffered[4..8].try_into().expect("4 bytes"));
        // A response whose id is both an unanswered acks=0 id and the waiting request's
        // (a client may reuse ids) answers the waiting request: Kafka never answers acks=0.
        let for_pending = pending
            .as_ref()
            .is_some_and(|p| p.header.correlation_id == correlation_id);
        if let Some(pos) = self
            .unanswered_acks0
            .iter()
            .position(|&id| id == correlation_id)
            && !for_pending
        {
            self.unanswered_acks0.drain(..=pos);
            reader
                .copy_to(SIZE_LEN + size as usize, &mut tokio::io::sink())
                .await
                .map_err(|e| match e {
                    MoveError::Source(FrameError::Truncated) => ConnError::BrokerClosed(waiting),
                    MoveError::Source(e) => ConnError::Broker(e),
                    MoveError::Sink(e) => ConnError::Broker(FrameError::Io(e)),
                    MoveError::Mover(e) => ConnError::Uring(e),
                })?;
            debug!(
                correlation_id,
                "dropped the broker's answer to an acks=0 produce"
            );
            return Ok(Forwarded {
                answered: None,
                consumed: SIZE_LEN + size as usize,
                written: 0,
            });
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
        self.unanswered_acks0.clear();
        let is_api_versions = api_key == ApiKey::ApiVersions as i16;
        let written = if is_api_versions || policy::response_needs_rewrite(api_key, api_version) {
            self.rewrite(reader, client_w, &request, size, waiting, state)
                .await?
        } else {
            let frame_len = SIZE_LEN + size as usize;
            mover
                .forward(reader, frame_len, client_w)
                .await
                .map_err(|e| match e {
                    MoveError::Source(FrameError::Truncated) => ConnError::BrokerClosed(waiting),
                    MoveError::Source(e) => ConnError::Broker(e),
                    MoveError::Sink(e) => ConnError::ClientWrite(e),
                    MoveError::Mover(e) => ConnError::Uring(e),
                })?;
            frame_len
        };
        route.counters.bytes_to_client.inc_by(written as u64);
        state
            .metrics
            .latency(api_key, request.sent_at.elapsed().as_secs_f64());
        Ok(Forwarded {
            answered: Some(request.origin),
            consumed: SIZE_LEN + size as usize,
            written,
        })
    }

    /// Reads the response frame of `size` bytes at the head of `reader`, rewrites it and
    /// writes it to the client. Returns the bytes written.
    async fn rewrite<R, W>(
        &mut self,
        reader: &mut FrameReader<R>,
        client_w: &mut W,
        request: &InFlight,
        size: u32,
        waiting: usize,
        state: &ProxyState,
    ) -> Result<usize, ConnError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let RequestHeader {
            api_key,
            api_version,
            ..
        } = request.header;
        let mut waited = false;
        let mut reservation = state
            .rewrite_budget
            .reserve(size, REWRITE_BUDGET_WAIT, &mut waited)
            .await?;
        if waited {
            state.metrics.rewrite_budget_waits.inc();
        }
        reader.consume(SIZE_LEN);
        self.body.clear();
        reader
            .read_into(size as usize, &mut self.body)
            .await
            .map_err(|e| match e {
                FrameError::Truncated => ConnError::BrokerClosed(waiting),
                e => ConnError::Broker(e),
            })?;
        let frame = Bytes::from(std::mem::take(&mut self.body));
        self.out.clear();
        if api_key == ApiKey::ApiVersions as i16 {
            rewrite_api_versions(api_version, frame, state, &mut self.out)?;
        } else {
            rewrite_addresses(
                api_key,
                api_version,
                frame,
                state,
                &mut reservation,
                &mut self.out,
            )
            .await?;
        }
        // The client may read slowly: only the output stays reserved meanwhile.
        reservation.shrink_to(self.out.len());
        write_frame(client_w, &self.out)
            .await
            .map_err(ConnError::ClientWrite)?;
        let written = SIZE_LEN + self.out.len();
        if self.out.capacity() > KEPT_OUTPUT_CAPACITY {
            self.out = BytesMut::new();
        }
        if size >= LARGE_REWRITE {
            release_after_large_rewrite();
        }
        drop(reservation);
        Ok(written)
    }
}

fn rewrite_api_versions(
    api_version: i16,
    frame: Bytes,
    state: &ProxyState,
    out: &mut BytesMut,
) -> Result<(), ConnError> {
    let key = ApiKey::ApiVersions as i16;
    let changes = api_versions::rewrite_api_versions(
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

/// Endpoints with an empty host ("no coordinator": node -1, host "") are not listed by
/// the decode and stay as they are; anything with a host must be mapped, whatever its
/// port says.
async fn rewrite_addresses<'s>(
    api_key: i16,
    api_version: i16,
    frame: Bytes,
    state: &'s ProxyState,
    reservation: &mut Reservation<'s>,
    out: &mut BytesMut,
) -> Result<(), ConnError> {
    let frame_len = frame.len();
    let mut response = apis::decode(api_key, api_version, frame)
        .inspect_err(|_| state.metrics.decode_failure(api_key))?;
    if response.stripped_hidden() {
        state.metrics.hidden_stripped(api_key);
        debug!(
            api_key,
            api_version, "dropped a tagged field that would carry addresses outside the schema"
        );
    }
    let brokers: Vec<(i32, BrokerAddr)> = response
        .endpoints()
        .iter()
        .filter_map(|e| {
            Some((
                e.node_id,
                BrokerAddr::new(e.host.clone(), u16::try_from(e.port).ok()?),
            ))
        })
        .collect();
    // Brokers seen for the first time get their listener before the client hears of them.
    let problems = state.learn(&brokers).await;
    if !problems.is_empty() {
        let text = problems
            .iter()
            .map(|p| format!("{p:#}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ConnError::Unmappable(text));
    }
    let snapshot = state.listeners.snapshot();
    let rewritten = response.rewrite(|e| {
        snapshot
            .map
            .advertised_for(&e.host, e.port)
            .map(|a| Advertised {
                host: a.host.clone(),
                port: i32::from(a.port),
            })
    })?;
    // Advertised hosts longer than the real ones make the output longer than the frame.
    let needed = (frame_len + response.encoded_len()) as u64;
    let mut waited = false;
    state
        .rewrite_budget
        .grow(
            reservation,
            frame_len as u32,
            needed,
            REWRITE_BUDGET_WAIT,
            &mut waited,
        )
        .await?;
    if waited {
        state.metrics.rewrite_budget_waits.inc();
    }
    response.encode(out)?;
    if rewritten > 0 {
        state.metrics.rewrite(api_key);
    }
    Ok(())
}
