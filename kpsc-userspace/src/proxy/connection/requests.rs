//! Client -> broker: frames are checked (size, header, forbidden keys), registered as in
//! flight so their responses can be matched in order, and forwarded unchanged.

use std::time::Instant;

use bytes::BytesMut;
use kafka_protocol::messages::ApiKey;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};

use crate::{
    kafka::{
        frame::{FrameError, FrameReader, MoveError, SIZE_LEN, frame_size},
        names::api_name,
        request::{Acks, REQUEST_HEADER_FIXED_LEN, RequestHeader, produce_acks},
    },
    proxy::{
        bulk::transfer::Transfer, connection::error::ConnError, listeners::Route,
        rewrite::api_versions, state::ProxyState,
    },
};

/// A request whose response is still to come.
pub struct InFlight {
    pub header: RequestHeader,
    pub sent_at: Instant,
    /// False for Produce with acks=0: Kafka brokers send no response.
    pub expects_response: bool,
    /// kpsc answers this request itself (it was not forwarded); delivered in order.
    pub local_response: Option<BytesMut>,
    pub origin: Origin,
}

/// Where a request stands on the kernel path's expectation ring (`bulk::sockmap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Not on the kernel path.
    Userspace,
    /// Carried by the kernel: the ring position of its expectation.
    Carried(u64),
    /// Handled by kpscd in a stretch the request verdict passed: the stretch's marker.
    Passed(u64),
}

impl Origin {
    /// The ring position after this request's entry (or its stretch's marker).
    pub fn ring_after(self) -> Option<u64> {
        match self {
            Origin::Userspace => None,
            Origin::Carried(at) | Origin::Passed(at) => Some(at + 1),
        }
    }
}

/// One request frame handled by `forward_frame`.
pub struct Handled {
    /// Bytes of the client's stream it took, size prefix included.
    pub len: usize,
    /// False when kpsc answered it itself: none of its bytes went to the broker.
    pub forwarded: bool,
}

/// Forwards the client's requests until it stops sending (EOF or shutdown).
pub async fn forward_requests<R, W, M>(
    client_r: R,
    upstream_w: &mut W,
    mut mover: M,
    in_flight: mpsc::Sender<InFlight>,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    M: Transfer<R, W>,
{
    let mut reader = FrameReader::new(client_r, mover.read_buffer_size());
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
        forward_frame(
            &mut reader,
            upstream_w,
            &mut mover,
            (&in_flight, Origin::Userspace),
            route,
            state,
        )
        .await?;
    }
}

/// Handles the frame at the start of `reader`'s stream, whose size prefix is buffered:
/// checks it, registers it as in flight (from `origin`), and answers it here or forwards
/// it.
pub async fn forward_frame<R, W, M>(
    reader: &mut FrameReader<R>,
    upstream_w: &mut W,
    mover: &mut M,
    (in_flight, origin): (&mpsc::Sender<InFlight>, Origin),
    route: &Route,
    state: &ProxyState,
) -> Result<Handled, ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    M: Transfer<R, W>,
{
    let max_frame = state.config.max_frame_size;
    let forbidden = &state.config.forbidden_api_keys;
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
    let header = RequestHeader::parse(&reader.buffered()[SIZE_LEN..]).map_err(ConnError::Client)?;
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
        && !api_versions::api_versions_request_supported(header.api_version))
    .then(|| api_versions::unsupported_api_versions_response(header.correlation_id));
    // Blocks when too many requests are in flight: backpressure on the client.
    let answered_here = local_response.is_some();
    in_flight
        .send(InFlight {
            header,
            sent_at: Instant::now(),
            expects_response,
            local_response,
            origin,
        })
        .await
        .map_err(|_| ConnError::BrokerClosed(0))?;
    if answered_here {
        reader
            .copy_to(frame_len, &mut tokio::io::sink())
            .await
            .map_err(|e| match e {
                MoveError::Source(e) => ConnError::Client(e),
                MoveError::Sink(e) => ConnError::Client(FrameError::Io(e)),
                MoveError::Mover(e) => ConnError::Uring(e),
            })?;
        return Ok(Handled {
            len: frame_len,
            forwarded: false,
        });
    }
    state.metrics.request(header.api_key);
    mover
        .forward(reader, frame_len, upstream_w)
        .await
        .map_err(|e| match e {
            // Reading the client failed or it left mid-frame; or the broker would not
            // take the bytes.
            MoveError::Source(e) => ConnError::Client(e),
            MoveError::Sink(e) => ConnError::Broker(FrameError::Io(e)),
            MoveError::Mover(e) => ConnError::Uring(e),
        })?;
    route.counters.bytes_from_client.inc_by(frame_len as u64);
    Ok(Handled {
        len: frame_len,
        forwarded: true,
    })
}
