//! A TCP socket for `--bulk-transfer uring`: blocking at the file level, so the io_uring
//! splices on it wait in the kernel's workers, while kpscd's own reads and writes (frame
//! headers, small and rewritten frames) stay nonblocking per call (MSG_DONTWAIT) and are
//! driven by tokio's reactor as any socket's.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf, unix::AsyncFd},
    net::TcpStream,
};

/// How long a splice in a kernel worker waits for the peer (SO_RCVTIMEO, SO_SNDTIMEO)
/// before its span comes back stalled. Long enough that bytes of a frame on their way
/// (microseconds to a few milliseconds apart under load) are waited for in the kernel;
/// short enough that a peer stopping mid-frame soon holds no worker. kpscd's own reads
/// and writes are MSG_DONTWAIT and never wait.
pub const KERNEL_WAIT: Duration = Duration::from_millis(10);

/// What both halves share. Dropped when the connection is done with the socket: the
/// shutdown ends any splice still waiting on it (a connection that ended mid-span), so
/// the ring lets go of the descriptor and the kernel closes it.
struct Shared {
    fd: AsyncFd<Arc<OwnedFd>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: shutdown on a descriptor this socket still holds open.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

pub struct UringRead(Arc<Shared>);
pub struct UringWrite(Arc<Shared>);

/// Takes `stream` off the nonblocking file mode tokio gave it and splits it.
pub fn split(stream: TcpStream) -> io::Result<(UringRead, UringWrite)> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(KERNEL_WAIT))?;
    stream.set_write_timeout(Some(KERNEL_WAIT))?;
    let fd = Arc::new(OwnedFd::from(stream));
    // SAFETY: the Arc keeps the descriptor open, and it names the same socket, for as long
    // as the AsyncFd holds it.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
    let shared = Arc::new(Shared { fd });
    Ok((UringRead(Arc::clone(&shared)), UringWrite(shared)))
}

impl Shared {
    /// Waits until poll(2) says the socket is ready for `interest` now. A readiness tokio
    /// recorded before a span drained the socket is stale: the check clears it, through
    /// `try_io`, so the wait goes on to the next event, and readiness that arrived after
    /// is seen by the check itself.
    async fn ready(&self, interest: Interest) -> io::Result<()> {
        let events = if interest.is_readable() {
            libc::POLLIN
        } else {
            libc::POLLOUT
        };
        loop {
            let mut guard = self.fd.ready(interest).await?;
            if let Ok(ready) = guard.try_io(|fd| ready_now(fd.as_raw_fd(), events)) {
                return ready;
            }
        }
    }
}

/// Ready for `events` (or closed, or in error, which the next splice reports), or
/// WouldBlock.
fn ready_now(fd: RawFd, events: libc::c_short) -> io::Result<()> {
    let mut poll = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll on one live descriptor, no waiting.
    match unsafe { libc::poll(&mut poll, 1, 0) } {
        0 => Err(io::ErrorKind::WouldBlock.into()),
        n if n > 0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

impl UringRead {
    /// The descriptor, for a span to hold while it moves.
    pub fn fd(&self) -> Arc<OwnedFd> {
        Arc::clone(self.0.fd.get_ref())
    }

    /// Waits until there is something to read (or the stream ended).
    pub async fn readable(&self) -> io::Result<()> {
        self.0.ready(Interest::READABLE).await
    }
}

impl UringWrite {
    pub fn fd(&self) -> Arc<OwnedFd> {
        Arc::clone(self.0.fd.get_ref())
    }

    /// Waits until the socket takes more bytes (or is closed).
    pub async fn writable(&self) -> io::Result<()> {
        self.0.ready(Interest::WRITABLE).await
    }
}

fn result(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for UringRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let read = ready.try_io(|fd| {
                // SAFETY: recv into the initialized, unfilled part of `buf`; MSG_DONTWAIT
                // keeps the call from blocking on this blocking socket.
                result(unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                        libc::MSG_DONTWAIT,
                    )
                })
            });
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Readiness was stale: wait for the next.
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for UringWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.0.fd.poll_write_ready(cx))?;
            let sent = ready.try_io(|fd| {
                // SAFETY: send from `buf`; MSG_DONTWAIT as for recv, MSG_NOSIGNAL: a
                // closed peer is an EPIPE error, not a signal.
                result(unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                })
            });
            match sent {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    /// send(2) queues in the kernel: nothing is held here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown on the descriptor this half holds open.
        let done = unsafe { libc::shutdown(self.0.fd.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(result(done as isize).map(drop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// The file is blocking (what lets io-wq wait in a splice), and yet reads and writes
    /// through the halves never block a tokio thread: a read with nothing to read waits
    /// in the reactor while the runtime's single thread goes on to write the bytes.
    #[tokio::test(flavor = "current_thread")]
    async fn halves_do_not_block_the_runtime_on_a_blocking_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut r, mut w) = split(a.unwrap()).unwrap();
        // SAFETY: fcntl F_GETFL on a live descriptor.
        let flags = unsafe { libc::fcntl(r.fd().as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "the file must be blocking");
        let mut peer = b.unwrap().0;
        let reader = async {
            let mut got = [0u8; 5];
            r.read_exact(&mut got).await.unwrap();
            got
        };
        let writer = async {
            tokio::task::yield_now().await;
            peer.write_all(b"hello").await.unwrap();
        };
        let (got, ()) = tokio::join!(reader, writer);
        assert_eq!(&got, b"hello");
        // A write larger than the socket buffers completes as the peer reads.
        let big = vec![7u8; 8 << 20];
        let (written, read) = tokio::join!(w.write_all(&big), async {
            let mut got = vec![0u8; big.len()];
            peer.read_exact(&mut got).await.map(|_| got)
        });
        written.unwrap();
        assert_eq!(read.unwrap(), big);
        w.shutdown().await.unwrap();
        assert_eq!(
            peer.read(&mut [0u8; 1]).await.unwrap(),
            0,
            "FIN after shutdown"
        );
    }
}
