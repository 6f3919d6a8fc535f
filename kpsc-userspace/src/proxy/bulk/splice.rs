//! Bulk bytes moved socket -> pipe -> socket with splice(2): the kernel passes page
//! references along, so the record batches of Produce requests and Fetch responses never
//! enter kpscd's memory. kpscd still reads every frame header itself and still wakes up
//! per chunk; only the copies go away. Needs real sockets, so it moves TCP halves only.
//!
//! Invariants:
//! - a pipe is empty between calls, so it never mixes bytes of two frames;
//! - bytes are only spliced into an empty pipe: then "would block" can only mean the
//!   socket has nothing to read (a full pipe would block too, and clearing the socket's
//!   readiness for that would stall the connection).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tracing::warn;

use crate::{
    kafka::frame::{FrameError, FrameReader, HEADER_BUFFER, MoveError},
    proxy::bulk::{copy::CopyMover, transfer::Transfer},
};

/// Below this many unbuffered bytes a frame is copied: two syscalls either way, and a
/// copy of a page or less costs less than pipe bookkeeping.
pub const SPLICE_MIN: usize = 4096;

/// Moves one direction's frames with splice(2), small ones by copy.
pub struct SpliceMover {
    spliced_bytes: Counter,
    pipe: LazyPipe,
}

impl SpliceMover {
    pub fn new(spliced_bytes: Counter) -> Self {
        Self {
            spliced_bytes,
            pipe: LazyPipe::new(Pipe::new),
        }
    }
}

/// A direction's pipe, made on its first large frame (idle connections hold none); if it
/// cannot be made (out of descriptors), the direction copies.
pub struct LazyPipe {
    pipe: Option<Arc<Pipe>>,
    failed: bool,
    make: fn() -> io::Result<Pipe>,
}

impl LazyPipe {
    pub fn new(make: fn() -> io::Result<Pipe>) -> Self {
        Self {
            pipe: None,
            failed: false,
            make,
        }
    }

    pub fn get(&mut self) -> Option<Arc<Pipe>> {
        if self.pipe.is_none() && !self.failed {
            match (self.make)() {
                Ok(pipe) => self.pipe = Some(Arc::new(pipe)),
                Err(error) => {
                    warn!(%error, "cannot create a pipe for splice; this connection copies instead");
                    self.failed = true;
                }
            }
        }
        self.pipe.clone()
    }

    /// Drops the pipe: it may hold bytes of a move that failed.
    pub fn discard(&mut self) {
        self.pipe = None;
    }
}

impl Transfer<OwnedReadHalf, OwnedWriteHalf> for SpliceMover {
    /// Headers and small frames only: what it reads ahead of a large frame is copied.
    fn read_buffer_size(&self) -> usize {
        HEADER_BUFFER
    }

    async fn forward(
        &mut self,
        reader: &mut FrameReader<OwnedReadHalf>,
        n: usize,
        out: &mut OwnedWriteHalf,
    ) -> Result<(), MoveError> {
        let unbuffered = n.saturating_sub(reader.buffered().len());
        if unbuffered >= SPLICE_MIN {
            let spliced_bytes = self.spliced_bytes.clone();
            if let Some(pipe) = self.pipe.get() {
                out.write_all(reader.take_buffered(n))
                    .await
                    .map_err(MoveError::Sink)?;
                splice_exact(reader.get_ref().as_ref(), out.as_ref(), &pipe, unbuffered).await?;
                spliced_bytes.inc_by(unbuffered as u64);
                return Ok(());
            }
        }
        CopyMover.forward(reader, n, out).await
    }
}

/// Pipe size asked for: fewer round trips per large frame. The kernel may give less
/// (unprivileged users over `fs.pipe-user-pages-soft`), which only costs round trips.
const PIPE_SIZE: libc::c_int = 256 << 10;

/// One direction's pipe, made on first use.
pub struct Pipe {
    pub(crate) read: OwnedFd,
    pub(crate) write: OwnedFd,
    pub(crate) capacity: usize,
}

impl Pipe {
    /// Nonblocking ends, for splice(2) driven by tokio's reactor.
    pub fn new() -> io::Result<Self> {
        Self::with_flags(libc::O_NONBLOCK)
    }

    /// Blocking ends, for splices the kernel's io_uring workers run (they may wait).
    pub fn blocking() -> io::Result<Self> {
        Self::with_flags(0)
    }

    fn with_flags(flags: libc::c_int) -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; failure leaves the default size.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            read,
            write,
            capacity: capacity as usize,
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let flags =
        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK | if more { libc::SPLICE_F_MORE } else { 0 };
    // SAFETY: no offsets (both ends are a socket or a pipe); the descriptors are live.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

/// Moves exactly `n` bytes from `from` to `to` through `pipe`. EOF on `from` first is
/// `Source(Truncated)`; an error reading `from` is `Source`, writing `to` is `Sink`.
pub async fn splice_exact(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    mut n: usize,
) -> Result<(), MoveError> {
    let source = |e: io::Error| MoveError::Source(FrameError::Io(e));
    while n > 0 {
        let chunk = n.min(pipe.capacity);
        let filled = loop {
            from.readable().await.map_err(source)?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), chunk, false)
            }) {
                Ok(0) => return Err(MoveError::Source(FrameError::Truncated)),
                Ok(k) => break k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(source(e)),
            }
        };
        n -= filled;
        let mut in_pipe = filled;
        while in_pipe > 0 {
            to.writable().await.map_err(MoveError::Sink)?;
            // "More" while the frame goes on, so the last segment is not held back.
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe, n > 0)
            }) {
                Ok(0) => return Err(MoveError::Sink(io::ErrorKind::WriteZero.into())),
                Ok(k) => in_pipe -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(MoveError::Sink(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A connected pair of loopback TCP sockets (the other bulk movers' tests use it too).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Bytes written slowly and in odd pieces arrive whole and in order, and the bytes
    /// after the spliced span stay in the source socket for the next frame.
    #[tokio::test]
    async fn moves_exactly_n_bytes_between_real_sockets() {
        let (mut writer, from) = pair().await;
        let (to, mut reader) = pair().await;
        let payload: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 % 251) as u8).collect();
        let n = payload.len() - 17;
        let sent = payload.clone();
        let feeder = tokio::spawn(async move {
            for piece in sent.chunks(65_521) {
                writer.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            writer
        });
        let pipe = Pipe::new().unwrap();
        let collect = tokio::spawn(async move {
            let mut got = vec![0; n];
            reader.read_exact(&mut got).await.unwrap();
            got
        });
        splice_exact(&from, &to, &pipe, n).await.unwrap();
        assert_eq!(collect.await.unwrap(), payload[..n]);
        let _writer = feeder.await.unwrap();
        let mut rest = [0u8; 17];
        let mut from = from;
        from.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, payload[n..]);
    }

    #[tokio::test]
    async fn eof_inside_the_span_is_truncated() {
        let (mut writer, from) = pair().await;
        let (to, _reader) = pair().await;
        writer.write_all(&[1; 1000]).await.unwrap();
        drop(writer);
        let pipe = Pipe::new().unwrap();
        assert!(matches!(
            splice_exact(&from, &to, &pipe, 5000).await,
            Err(MoveError::Source(FrameError::Truncated))
        ));
    }

    #[tokio::test]
    async fn a_closed_destination_is_a_sink_error() {
        let (mut writer, from) = pair().await;
        let (to, reader) = pair().await;
        drop(reader);
        let data = vec![9u8; 4 << 20];
        let feeder = tokio::spawn(async move {
            let _ = writer.write_all(&data).await;
            writer
        });
        let pipe = Pipe::new().unwrap();
        assert!(matches!(
            splice_exact(&from, &to, &pipe, 4 << 20).await,
            Err(MoveError::Sink(_))
        ));
        drop(from);
        let _ = feeder.await;
    }
}
