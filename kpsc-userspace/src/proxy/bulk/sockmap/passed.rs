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
//!
//! How long: the backlog ahead of the passed bytes holds the kernel's redirects *to* this
//! socket, which leave only as fast as its peer reads them. A client that half-closes and
//! reads its responses late keeps its last request waiting that long. So the wait goes on
//! while the socket still sends (bytes queued, or acknowledged since the last look), as a
//! blocked write would, and gives up only after PATIENCE without either.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    net::TcpStream,
    time::Sleep,
};

use crate::proxy::bulk::sockmap::{slots::Slot, socket};

/// How often an early end of stream is read again: at first (the backlog's worker
/// usually runs within microseconds), and once the wait has gone on (a peer slow to read).
const RETRY: Duration = Duration::from_millis(1);
const SLOW_RETRY: Duration = Duration::from_millis(20);
const FAST_RETRIES: u32 = 100;
/// How long passed bytes may keep kpscd waiting after the end while the socket sends
/// nothing.
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
    /// Since when `inner` has returned an early end with the socket sending nothing.
    early_since: Option<Instant>,
    /// Early ends read again so far.
    retries: u32,
    /// The socket's stream when last looked at, while waiting (see `stream_progress`).
    sent: u64,
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
            retries: 0,
            sent: 0,
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

impl<R: AsyncRead + AsRef<TcpStream> + Unpin> AsyncRead for PassedReader<'_, R> {
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
                this.retries = 0;
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
            let now = Instant::now();
            let since = *this.early_since.get_or_insert(now);
            // The peer is still taking bytes: what waits ahead of ours is moving.
            let progress = socket::stream_progress(this.inner.as_ref())?;
            if progress.open && (progress.queued > 0 || progress.written > this.sent) {
                this.sent = progress.written;
                this.early_since = Some(now);
            } else if since.elapsed() > PATIENCE {
                return Poll::Ready(Err(io::Error::other(format!(
                    "the {:?} stream ended {} bytes before the end of what the verdict \
                     passed up ({passed} bytes), still missing after {PATIENCE:?} \
                     in which the socket sent nothing",
                    this.stream,
                    passed - this.read
                ))));
            }
            this.retries = this.retries.saturating_add(1);
            let pause = match this.retries < FAST_RETRIES {
                true => RETRY,
                false => SLOW_RETRY,
            };
            this.retry = Some(Box::pin(tokio::time::sleep(pause)));
        }
    }
}
