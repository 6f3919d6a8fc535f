//! Kafka framing on the hot path: every frame is `int32 size` + body. This module reads
//! size prefixes and moves frame bytes; it knows nothing of what the bodies mean (see
//! `request` for the request header).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes in the size prefix.
pub const SIZE_LEN: usize = 4;

/// One read from `inner`, with a TLS peer that closed without close_notify (rustls says
/// `UnexpectedEof`) taken as an EOF: callers then tell a close between frames (a client
/// leaving) from a truncated frame as they do for TCP.
async fn read_some<R: AsyncRead + Unpin>(inner: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    tls_eof_is_eof(inner.read(buf).await)
}

fn tls_eof_is_eof(read: io::Result<usize>) -> io::Result<usize> {
    match read {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

/// The reader buffer of every proxied direction, whatever moves its bulk bytes: frame
/// headers and small frames, so a Produce header kpscd reads (client id and transactional
/// id included) must fit. An idle connection holds one per direction and no more.
pub const HEADER_BUFFER: usize = 8 * 1024;

/// Most bytes one read takes while `FrameReader::copy_to` moves the unbuffered rest of a
/// frame larger than the reader's own buffer. That bulk buffer exists only during such a
/// frame, so idle connections and small frames hold none. 32 KiB: fits the L1 data cache
/// (48 KiB here) between the read that fills it and the write that empties it; 64 KiB
/// halved the syscalls per byte but did not move more, nor use less CPU per GB, beside it
/// in the same benchmark runs (docs/bench/lazy-copy). Either is below glibc's mmap
/// threshold, so a frame's buffer comes from the heap without a syscall.
pub const BULK_BUFFER: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame size {0} is negative")]
    NegativeSize(i32),
    #[error("frame size {size} exceeds the maximum {max} (--max-frame-size)")]
    TooLarge { size: u32, max: u32 },
    #[error("frame size {size} is too small for a {what} header")]
    TooSmall { size: u32, what: &'static str },
    #[error("malformed request header: {0}")]
    BadHeader(String),
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Moving a frame from one peer to the other failed, and on which side: what a proxy
/// needs to blame the right peer.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Reading the source failed, or it ended mid-frame.
    #[error(transparent)]
    Source(FrameError),
    /// Writing the destination failed.
    #[error("writing: {0}")]
    Sink(io::Error),
    /// The mover failed, not either side: the kernel's io_uring (`--bulk-transfer uring`).
    #[error("{0}")]
    Mover(io::Error),
}

/// Validates a size prefix.
pub fn frame_size(
    prefix: [u8; 4],
    max: u32,
    min: u32,
    what: &'static str,
) -> Result<u32, FrameError> {
    let size = i32::from_be_bytes(prefix);
    if size < 0 {
        return Err(FrameError::NegativeSize(size));
    }
    let size = size as u32;
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    if size < min {
        return Err(FrameError::TooSmall { size, what });
    }
    Ok(size)
}

/// A read buffer with a fixed capacity that can peek at the start of a frame and then
/// copy the rest to a writer without holding the whole frame: memory per connection stays
/// at `capacity` whatever the frame size (plus, while `copy_to` moves a larger frame, a
/// bulk buffer of at most `BULK_BUFFER`), and the buffer is reused for every frame.
pub struct FrameReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, capacity: usize) -> Self {
        Self {
            inner,
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Buffered bytes not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
    }

    /// Takes up to `n` buffered bytes, consuming them: what a bulk mover must send before
    /// it moves the rest of a frame straight from the source.
    pub fn take_buffered(&mut self, n: usize) -> &[u8] {
        let taken = n.min(self.end - self.start);
        let bytes = &self.buf[self.start..self.start + taken];
        self.start += taken;
        bytes
    }

    /// The source being read (for movers that read it without this buffer).
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads until at least `n` bytes are buffered (`n <= capacity`). Returns false on a
    /// clean EOF with nothing buffered (the peer closed between frames).
    pub async fn fill_to(&mut self, n: usize) -> Result<bool, FrameError> {
        debug_assert!(n <= self.buf.len());
        if self.end - self.start >= n {
            return Ok(true);
        }
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < n {
            let read = read_some(&mut self.inner, &mut self.buf[self.end..]).await?;
            if read == 0 {
                return if self.end == self.start {
                    Ok(false)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.end += read;
        }
        Ok(true)
    }

    /// Copies exactly `n` bytes (buffered first) to `out`, and flushes it: a TLS stream
    /// may keep the tail of what it accepted queued until flushed, and the peer would wait
    /// for it forever. More unbuffered bytes than this reader's capacity go through a bulk
    /// buffer held only for this call (`copy_bulk`); the last ones through this reader's
    /// buffer, which may read ahead into the next frame and keep those bytes for it.
    pub async fn copy_to<W: AsyncWrite + Unpin>(
        &mut self,
        mut n: usize,
        out: &mut W,
    ) -> Result<(), MoveError> {
        let buffered = n.min(self.end - self.start);
        if buffered > 0 {
            out.write_all(&self.buf[self.start..self.start + buffered])
                .await
                .map_err(MoveError::Sink)?;
            self.start += buffered;
            n -= buffered;
        }
        if n > self.buf.len() {
            n = self.copy_bulk(n, out).await?;
        }
        while n > 0 {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let read = read_some(&mut self.inner, &mut self.buf)
                    .await
                    .map_err(|e| MoveError::Source(e.into()))?;
                if read == 0 {
                    return Err(MoveError::Source(FrameError::Truncated));
                }
                self.end = read;
            }
            let chunk = n.min(self.end - self.start);
            out.write_all(&self.buf[self.start..self.start + chunk])
                .await
                .map_err(MoveError::Sink)?;
            self.start += chunk;
            n -= chunk;
        }
        out.flush().await.map_err(MoveError::Sink)
    }

    /// Copies unbuffered bytes (this reader's buffer is empty) to `out` through a bulk
    /// buffer allocated here and freed on return, until at most `capacity` of the `n` are
    /// left; returns how many are. Each read stops at the frame's end, so the bulk buffer
    /// never holds bytes of the next frame and nothing has to outlive it. Allocating per
    /// frame costs one malloc/free without zeroing (reads fill uninitialised capacity),
    /// next to at least two syscalls per 32 KiB moved.
    async fn copy_bulk<W: AsyncWrite + Unpin>(
        &mut self,
        mut n: usize,
        out: &mut W,
    ) -> Result<usize, MoveError> {
        debug_assert_eq!(self.start, self.end);
        let mut bulk = Vec::with_capacity(n.min(BULK_BUFFER));
        while n > self.buf.len() {
            let want = n.min(bulk.capacity());
            bulk.clear();
            let read = (&mut self.inner)
                .take(want as u64)
                .read_buf(&mut bulk)
                .await;
            let read = tls_eof_is_eof(read).map_err(|e| MoveError::Source(e.into()))?;
            if read == 0 {
                return Err(MoveError::Source(FrameError::Truncated));
            }
            out.write_all(&bulk[..read])
                .await
                .map_err(MoveError::Sink)?;
            n -= read;
        }
        Ok(n)
    }

    /// Appends exactly `n` bytes (buffered first) to `out`.
    pub async fn read_into(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
        out.reserve(n);
        while n > 0 {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let read = read_some(&mut self.inner, &mut self.buf).await?;
                if read == 0 {
                    return Err(FrameError::Truncated);
                }
                self.end = read;
            }
            let chunk = n.min(self.end - self.start);
            out.extend_from_slice(&self.buf[self.start..self.start + chunk]);
            self.start += chunk;
            n -= chunk;
        }
        Ok(())
    }

    /// Reads one whole frame body (after the size prefix) into `out`, e.g. for the
    /// metadata client.
    pub async fn read_frame(&mut self, max: u32, out: &mut Vec<u8>) -> Result<bool, FrameError> {
        if !self.fill_to(SIZE_LEN).await? {
            return Ok(false);
        }
        let size = frame_size(
            self.buffered()[..4].try_into().expect("4 bytes"),
            max,
            4,
            "response",
        )?;
        self.consume(SIZE_LEN);
        out.clear();
        self.read_into(size as usize, out).await?;
        Ok(true)
    }
}

/// Writes `size` + `body` in one vectored write (with TCP_NODELAY, two writes would be two
/// segments), then flushes (see `FrameReader::copy_to`; free on a TCP socket).
pub async fn write_frame<W: AsyncWrite + Unpin>(out: &mut W, body: &[u8]) -> io::Result<()> {
    let size = i32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?
        .to_be_bytes();
    let mut bufs = [io::IoSlice::new(&size), io::IoSlice::new(body)];
    let mut slices = &mut bufs[..];
    while !slices.is_empty() {
        let n = out.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_size_limits() {
        assert!(matches!(
            frame_size((-1i32).to_be_bytes(), 100, 0, "x"),
            Err(FrameError::NegativeSize(-1))
        ));
        assert!(matches!(
            frame_size(101i32.to_be_bytes(), 100, 0, "x"),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            frame_size(3i32.to_be_bytes(), 100, 8, "x"),
            Err(FrameError::TooSmall { .. })
        ));
        assert_eq!(frame_size(8i32.to_be_bytes(), 100, 8, "x").unwrap(), 8);
    }

    #[tokio::test]
    async fn frame_reader_copies_frames_larger_than_its_buffer() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut input = Vec::new();
        input.extend_from_slice(&(payload.len() as i32).to_be_bytes());
        input.extend_from_slice(&payload);
        input.extend_from_slice(&[0, 0, 0, 4, 42, 43, 44, 45]);
        let mut r = FrameReader::new(&input[..], 64);
        assert!(r.fill_to(4).await.unwrap());
        let size = frame_size(r.buffered()[..4].try_into().unwrap(), 1 << 20, 0, "x").unwrap();
        r.consume(4);
        let mut out = Vec::new();
        r.copy_to(size as usize, &mut out).await.unwrap();
        assert_eq!(out, payload);
        let mut body = Vec::new();
        assert!(r.read_frame(10, &mut body).await.unwrap());
        assert_eq!(body, vec![42, 43, 44, 45]);
        assert!(!r.fill_to(4).await.unwrap());
        // Truncated frame: EOF inside the body is an error, not a clean close.
        let mut r = FrameReader::new(&[0u8, 0, 0, 9, 1, 2][..], 64);
        let mut body = Vec::new();
        assert!(matches!(
            r.read_frame(100, &mut body).await,
            Err(FrameError::Truncated)
        ));
    }

    /// A source that hands out `data` in pieces of the sizes in `pieces` (cycled), and
    /// records the largest read it was offered and how many bytes it has given.
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        pieces: Vec<usize>,
        next: usize,
        largest_offer: usize,
    }

    impl Pieces {
        fn new(data: Vec<u8>, pieces: &[usize]) -> Self {
            Self {
                data,
                at: 0,
                pieces: pieces.to_vec(),
                next: 0,
                largest_offer: 0,
            }
        }
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let me = &mut *self;
            me.largest_offer = me.largest_offer.max(buf.remaining());
            let piece = me.pieces[me.next % me.pieces.len()];
            me.next += 1;
            let n = piece.min(buf.remaining()).min(me.data.len() - me.at);
            buf.put_slice(&me.data[me.at..me.at + n]);
            me.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
            .collect()
    }

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for body in frames {
            out.extend_from_slice(&(body.len() as i32).to_be_bytes());
            out.extend_from_slice(body);
        }
        out
    }

    async fn copy_frame(r: &mut FrameReader<Pieces>) -> Vec<u8> {
        assert!(r.fill_to(SIZE_LEN).await.unwrap());
        let size = frame_size(r.buffered()[..4].try_into().unwrap(), 64 << 20, 0, "x").unwrap();
        r.consume(SIZE_LEN);
        let mut out = Vec::new();
        r.copy_to(size as usize, &mut out).await.unwrap();
        out
    }

    /// Frames far larger than the 8 KiB buffer, arriving in pieces of every size (one
    /// byte, odd sizes, more than the bulk buffer), come out whole and in order, and so
    /// do the frames after them (whose start the buffer may have read ahead).
    #[tokio::test]
    async fn copy_to_moves_large_frames_through_a_bulk_buffer_in_any_pieces() {
        let big = pattern(3 << 20, 1);
        let small = pattern(100, 2);
        let just_over = pattern(8 * 1024 + 1, 3);
        let medium = pattern(70_000, 4);
        let input = framed(&[&big, &small, &just_over, &medium, &small]);
        for pieces in [
            &[1, 7, 4093, 65_537, 200_000][..],
            &[usize::MAX],
            &[8192, 3],
        ] {
            let mut r = FrameReader::new(Pieces::new(input.clone(), pieces), 8 * 1024);
            assert_eq!(copy_frame(&mut r).await, big);
            // The bulk buffer's reads stop at the frame's end: at most the last 8 KiB
            // read (the buffer's) went past it.
            assert!(r.inner.at <= SIZE_LEN + big.len() + 8 * 1024, "{pieces:?}");
            let mut body = Vec::new();
            assert!(r.read_frame(1 << 20, &mut body).await.unwrap());
            assert_eq!(body, small);
            assert_eq!(copy_frame(&mut r).await, just_over);
            assert_eq!(copy_frame(&mut r).await, medium);
            assert_eq!(copy_frame(&mut r).await, small);
            assert!(!r.fill_to(SIZE_LEN).await.unwrap());
            // Reads larger than the reader's own buffer happened: the bulk buffer's.
            assert!(r.inner.largest_offer >= BULK_BUFFER, "{pieces:?}");
            assert!(r.inner.largest_offer <= BULK_BUFFER, "{pieces:?}");
        }
    }

    /// The source ending, or failing, while the bulk buffer moves a frame is the source's
    /// fault; the destination failing is the sink's.
    #[tokio::test]
    async fn errors_in_the_bulk_phase_name_their_side() {
        let input = framed(&[&pattern(1 << 20, 5)]);
        let cut = input[..500_000].to_vec();
        let mut r = FrameReader::new(Pieces::new(cut.clone(), &[30_000]), 8 * 1024);
        assert!(r.fill_to(SIZE_LEN).await.unwrap());
        r.consume(SIZE_LEN);
        assert!(matches!(
            r.copy_to(1 << 20, &mut tokio::io::sink()).await,
            Err(MoveError::Source(FrameError::Truncated))
        ));
        // A TLS peer gone without close_notify mid-frame truncated it too.
        let mut r = FrameReader::new((&cut[..]).chain(NoCloseNotify), 8 * 1024);
        assert!(r.fill_to(SIZE_LEN).await.unwrap());
        r.consume(SIZE_LEN);
        assert!(matches!(
            r.copy_to(1 << 20, &mut tokio::io::sink()).await,
            Err(MoveError::Source(FrameError::Truncated))
        ));
        // A destination that takes 100 KB and then fails.
        let mut r = FrameReader::new(Pieces::new(input, &[usize::MAX]), 8 * 1024);
        assert!(r.fill_to(SIZE_LEN).await.unwrap());
        r.consume(SIZE_LEN);
        let mut out = FailAfter(100_000);
        assert!(matches!(
            r.copy_to(1 << 20, &mut out).await,
            Err(MoveError::Sink(_))
        ));
    }

    /// A destination that accepts this many bytes, then fails as a reset peer would.
    struct FailAfter(usize);

    impl AsyncWrite for FailAfter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// What rustls reports when a TLS peer closes without close_notify.
    struct NoCloseNotify;

    impl AsyncRead for NoCloseNotify {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
        }
    }

    /// A TLS client that leaves without close_notify between frames has left (a clean
    /// EOF, not an I/O fault); inside a frame it truncated the frame.
    #[tokio::test]
    async fn a_tls_close_without_close_notify_is_an_eof() {
        let frame = [0u8, 0, 0, 4, 7, 7, 7, 7];
        let mut r = FrameReader::new((&frame[..]).chain(NoCloseNotify), 64);
        let mut body = Vec::new();
        assert!(r.read_frame(100, &mut body).await.unwrap());
        assert!(!r.fill_to(4).await.unwrap());
        let mut r = FrameReader::new((&frame[..3]).chain(NoCloseNotify), 64);
        assert!(matches!(r.fill_to(4).await, Err(FrameError::Truncated)));
        let mut r = FrameReader::new((&frame[..5]).chain(NoCloseNotify), 2);
        assert!(r.fill_to(2).await.unwrap());
        assert!(matches!(
            r.copy_to(8, &mut tokio::io::sink()).await,
            Err(MoveError::Source(FrameError::Truncated))
        ));
    }
}
