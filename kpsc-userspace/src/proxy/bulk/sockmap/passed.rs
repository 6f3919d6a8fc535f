//! Reading what a verdict passed up, with an end of stream that waits for it.
//!
//! A verdict's pass puts the skb on the socket's psock ingress queue at once only while
//! that socket's redirect backlog is empty. Otherwise it queues behind the backlog, and
//! the psock's worker moves it later. Once the peer's FIN is in, recvmsg does not wait
//! for that worker: with the ingress queue empty it reads the TCP queue and returns the
//! end of the stream. A peer that sends its last bytes and closes can therefore show
//! kpscd the end before those bytes.
//!
//! The verdict has counted every byte it passed by the time the FIN is visible: it runs
//! on each segment in the softirq that queues it, under the socket lock that recvmsg
//! takes. So an end of stream with fewer bytes read than the verdict passed is early:
//! this reader waits and reads again. Bytes kpscd reads that the verdict never saw (queued
//! before the socket entered the map) only make the count larger, so they never make it
//! wait.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    time::Sleep,
};

use crate::proxy::bulk::sockmap::slots::Slot;

/// How often an early end of stream is read again.
const RETRY: Duration = Duration::from_millis(1);
/// How long passed bytes may keep kpscd waiting after the end: the worker runs within
/// microseconds, unless the machine is starved.
const PATIENCE: Duration = Duration::from_secs(5);

/// Which of a connection's streams a socket reads.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// The client socket: requests.
    Requests,
    /// The broker socket: responses.
    Responses,
}

pub struct PassedReader<'a, R> {
    inner: R,
    slot: Slot<'a>,
    stream: Stream,
    /// Bytes read from `inner`.
    read: u64,
    /// When `inner` first returned an early end.
    early_since: Option<Instant>,
    retry: Option<Pin<Box<Sleep>>>,
}

impl<'a, R> PassedReader<'a, R> {
    pub fn new(inner: R, slot: Slot<'a>, stream: Stream) -> Self {
        Self {
            inner,
            slot,
            stream,
            read: 0,
            early_since: None,
            retry: None,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn passed_bytes(&self) -> u64 {
        match self.stream {
            Stream::Requests => self.slot.requests().passed_bytes(),
            Stream::Responses => self.slot.responses().passed_bytes(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for PassedReader<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(retry) = &mut this.retry {
                ready!(retry.as_mut().poll(cx));
                this.retry = None;
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let read = (buf.filled().len() - before) as u64;
            if read > 0 {
                this.read += read;
                this.early_since = None;
                return Poll::Ready(Ok(()));
            }
            let passed = this.passed_bytes();
            if this.read >= passed {
                return Poll::Ready(Ok(()));
            }
            if this.early_since.is_none() {
                tracing::debug!(
                    stream = ?this.stream,
                    read = this.read,
                    passed,
                    "end of stream before passed bytes; waiting for them"
                );
            }
            let since = *this.early_since.get_or_insert_with(Instant::now);
            if since.elapsed() > PATIENCE {
                return Poll::Ready(Err(io::Error::other(format!(
                    "the {:?} stream ended {} bytes before the end of what the verdict \
                     passed up ({passed} bytes), still missing after {PATIENCE:?}",
                    this.stream,
                    passed - this.read
                ))));
            }
            this.retry = Some(Box::pin(tokio::time::sleep(RETRY)));
        }
    }
}
