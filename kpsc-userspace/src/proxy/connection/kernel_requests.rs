//! Client -> broker on the kernel path (`--bulk-transfer sockmap`): the verdict carries
//! the requests and reports their heads; kpscd queues those as in flight, and handles
//! itself the stretches the verdict passes up (see `bulk::sockmap` for why the two never
//! reorder the broker's stream).

use std::time::{Duration, Instant};

use tokio::{
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
    sync::mpsc,
};

use crate::{
    kafka::{
        frame::{FrameError, FrameReader, HEADER_BUFFER, MoveError, SIZE_LEN},
        request::RequestHeader,
    },
    proxy::{
        bulk::{
            copy::CopyMover,
            sockmap::{
                KernelConn,
                passed::{PassedReader, Stream},
            },
            transfer::Transfer,
        },
        connection::{
            error::ConnError,
            requests::{InFlight, Origin, forward_frame},
        },
        listeners::Route,
        state::ProxyState,
    },
};

/// How long shutting down waits for the rest of a frame the kernel is carrying.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// How often the bytes of a frame still arriving are counted.
const ACCOUNTING_INTERVAL: Duration = Duration::from_millis(500);

/// Counts what the kernel carried; returns the request bytes counted.
fn account(conn: &KernelConn, route: &Route) -> u64 {
    let carried = conn.slot().requests().redirected_bytes();
    conn.account(&route.counters);
    carried
}

/// Queues the frames of one report as in flight, in order.
async fn take_batch(
    batch: &kpsc_common::proxy_kernel::RequestBatch,
    in_flight: &mpsc::Sender<InFlight>,
    state: &ProxyState,
) -> Result<u64, ConnError> {
    let count = (batch.count as usize).min(batch.frames.len());
    for (i, head) in batch.frames[..count].iter().enumerate() {
        state.metrics.request(head.api_key);
        // Blocks when too many requests are in flight; the kernel keeps carrying requests
        // meanwhile, their reports wait in the connection's queue.
        in_flight
            .send(InFlight {
                header: RequestHeader {
                    api_key: head.api_key,
                    api_version: head.api_version,
                    correlation_id: head.correlation_id,
                },
                sent_at: Instant::now(),
                expects_response: head.expects_response != 0,
                local_response: None,
                origin: Origin::Carried(batch.first_expectation + i as u64),
            })
            .await
            .map_err(|_| ConnError::BrokerClosed(0))?;
    }
    Ok(count as u64)
}

type Batches = mpsc::UnboundedReceiver<Box<kpsc_common::proxy_kernel::RequestBatch>>;

fn lost_reports() -> ConnError {
    ConnError::KernelPath(std::io::Error::other(
        "the verdict's request reports stopped",
    ))
}

/// Takes the verdict's reports, in order, until `frames` of its frames are in flight.
async fn take_reports_until(
    frames: u64,
    frames_taken: &mut u64,
    batches: &mut Batches,
    in_flight: &mpsc::Sender<InFlight>,
    state: &ProxyState,
) -> Result<(), ConnError> {
    while *frames_taken < frames {
        let batch = batches.recv().await.ok_or_else(lost_reports)?;
        *frames_taken += take_batch(&batch, in_flight, state).await?;
    }
    Ok(())
}

/// Forwards the client's requests until it stops sending (EOF or shutdown).
pub async fn forward_requests_kernel(
    client_r: OwnedReadHalf,
    upstream_w: &mut OwnedWriteHalf,
    in_flight: mpsc::Sender<InFlight>,
    conn: &KernelConn,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError> {
    let mut batches = conn.take_batches().ok_or_else(lost_reports)?;
    // Copied, never spliced: the bytes the verdict passes up are queued on the socket's
    // psock, which only recvmsg reads; splice(2) reads the TCP receive queue, which the
    // verdict has emptied, and would wait forever for a large frame's rest.
    let mut mover = CopyMover;
    // An end of stream read before bytes the verdict passed is not the end (see `passed`).
    let client_r = PassedReader::new(client_r, conn.slot(), Stream::Requests);
    let mut reader = FrameReader::new(client_r, HEADER_BUFFER);
    let mut counted_bytes = 0u64;
    // Reported frames queued as in flight.
    let mut frames_taken = 0u64;
    // The stretch passed up that kpscd is in (0: none yet), and the stream offset of the
    // first byte it has not handled.
    let mut epoch = 0u32;
    let mut offset = 0u64;
    let mut marker = 0u64;
    // Bytes kpscd wrote to the broker itself.
    let mut written = 0u64;
    loop {
        // The rest of a large frame brings no report: while one is under way, its bytes
        // are counted on a timer, so the counters do not wait for the next request.
        let frame_under_way = {
            let slot = conn.slot();
            let requests = slot.requests();
            requests.frame_left() > 0 || requests.redirected_bytes() != counted_bytes
        };
        // The verdict has the stream: take its reports until it passes bytes up.
        let more = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => {
                // Shutting down takes no new requests, as on the userspace path: stop the
                // verdict (it finishes a frame under way), then queue what it carried so
                // its responses are delivered.
                conn.stop_carrying(reader.get_ref().get_ref().as_ref(), STOP_WAIT)
                    .await
                    .map_err(ConnError::KernelPath)?;
                let carried = conn.slot().requests().redirected_frames();
                take_reports_until(carried, &mut frames_taken, &mut batches, &in_flight, state)
                    .await?;
                false
            }
            batch = batches.recv() => {
                let batch = batch.ok_or_else(lost_reports)?;
                frames_taken += take_batch(&batch, &in_flight, state).await?;
                counted_bytes = account(conn, route);
                if conn
                    .hold_if_backlogged(Stream::Requests, upstream_w.as_ref(), written)
                    .map_err(ConnError::KernelPath)?
                {
                    route.counters.kernel_from_client.backlog_holds.inc();
                }
                continue;
            }
            more = reader.fill_to(1) => more.map_err(ConnError::Client)?,
            _ = tokio::time::sleep(ACCOUNTING_INTERVAL), if frame_under_way => {
                counted_bytes = account(conn, route);
                continue;
            }
        };
        if !more {
            tracing::debug!(
                passed = conn.slot().requests().passed_bytes(),
                carried = conn.slot().requests().redirected_frames(),
                "client stream ended"
            );
            // The stream ended inside a frame the verdict was carrying: its rest never
            // comes, so neither does an answer. The end is read only after the verdict
            // has seen every byte before it, so `frame_left` is final. (kpscd's own frame
            // reader reports the same on the userspace path.)
            if conn.slot().requests().frame_left() > 0 {
                return Err(ConnError::Client(FrameError::Truncated));
            }
            // Every request the verdict carried must be in flight before this loop ends
            // (its report may still be on the way from the ring), or the response loop
            // would stop short of its response.
            let carried = conn.slot().requests().redirected_frames();
            take_reports_until(carried, &mut frames_taken, &mut batches, &in_flight, state).await?;
            // The FIN must not overtake requests still on the redirect backlog.
            conn.drain_requests(upstream_w.as_ref(), written)
                .await
                .map_err(ConnError::KernelPath)?;
            account(conn, route);
            return Ok(());
        }
        let pass = conn.slot().requests().pass();
        let mut tail = 0;
        if pass.epoch != epoch {
            // A new stretch: it starts at `pass.from`, with the end of a frame whose start
            // the kernel redirected. What was reported before it goes in flight first.
            // Its requests' responses follow the marker the verdict pushed for it.
            epoch = pass.epoch;
            offset = pass.from;
            tail = pass.tail as usize;
            marker = conn.slot().pass_marker();
            take_reports_until(
                pass.frames_before,
                &mut frames_taken,
                &mut batches,
                &in_flight,
                state,
            )
            .await?;
            counted_bytes = account(conn, route);
        }
        conn.drain_requests(upstream_w.as_ref(), written)
            .await
            .map_err(ConnError::KernelPath)?;
        if tail > 0 {
            mover
                .forward(&mut reader, tail, upstream_w)
                .await
                .map_err(|e| match e {
                    MoveError::Source(e) => ConnError::Client(e),
                    MoveError::Sink(e) => ConnError::Broker(FrameError::Io(e)),
                    MoveError::Mover(e) => ConnError::Uring(e),
                })?;
            route.counters.bytes_from_client.inc_by(tail as u64);
            offset += tail as u64;
            written += tail as u64;
        }
        // Whole frames, until nothing read is left over.
        while !reader.buffered().is_empty() {
            if !reader.fill_to(SIZE_LEN).await.map_err(ConnError::Client)? {
                return Err(ConnError::Client(FrameError::Truncated));
            }
            let handled = forward_frame(
                &mut reader,
                upstream_w,
                &mut mover,
                (&in_flight, Origin::Passed(marker)),
                route,
                state,
            )
            .await?;
            route.counters.kernel_from_client.passed_frames.inc();
            offset += handled.len as u64;
            if handled.forwarded {
                written += handled.len as u64;
            }
        }
        conn.slot().requests().resume_at(offset);
    }
}
