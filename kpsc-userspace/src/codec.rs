//! Kafka framing on the hot path: size prefixes and request headers only.
//!
//! Every frame is `int32 size` + body. Requests start with `api_key int16, api_version
//! int16, correlation_id int32, client_id nullable string` (+ tagged fields in header v2);
//! responses start with `correlation_id int32`. Nothing else is parsed here, except the
//! `acks` of a Produce request, because `acks=0` means the broker sends no response and
//! the proxy must not wait for one.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

use crate::splice::{Pipe, splice_exact};

/// Bytes in the size prefix.
pub const SIZE_LEN: usize = 4;
/// api_key + api_version + correlation_id.
pub const REQUEST_HEADER_FIXED_LEN: usize = 8;

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

/// The part of a request header the proxy needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

impl RequestHeader {
    /// Parses the first 8 bytes of a request body.
    pub fn parse(body: &[u8]) -> Result<Self, FrameError> {
        if body.len() < REQUEST_HEADER_FIXED_LEN {
            return Err(FrameError::BadHeader("shorter than 8 bytes".into()));
        }
        let api_key = i16::from_be_bytes([body[0], body[1]]);
        let api_version = i16::from_be_bytes([body[2], body[3]]);
        let correlation_id = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
        if kafka_protocol::messages::ApiKey::try_from(api_key).is_err() {
            return Err(FrameError::BadHeader(format!("unknown api key {api_key}")));
        }
        if api_version < 0 {
            return Err(FrameError::BadHeader(format!(
                "negative api version {api_version}"
            )));
        }
        Ok(Self {
            api_key,
            api_version,
            correlation_id,
        })
    }
}

/// Result of looking for `acks` in a Produce request prefix.
#[derive(Debug, PartialEq, Eq)]
pub enum Acks {
    Value(i16),
    /// The prefix is too short; look again with more bytes.
    NeedMore,
}

/// Finds `acks` in a Produce request body prefix (header + start of the message).
pub fn produce_acks(body: &[u8], api_version: i16) -> Result<Acks, FrameError> {
    use kafka_protocol::messages::ApiKey;
    let mut cur = Cursor {
        buf: body,
        pos: REQUEST_HEADER_FIXED_LEN,
    };
    let parse = |cur: &mut Cursor| -> Option<Result<i16, FrameError>> {
        // client_id: int16-length nullable string, never compact (even in header v2).
        let len = cur.i16()?;
        if len > 0 {
            cur.skip(len as usize)?;
        }
        if ApiKey::Produce.request_header_version(api_version) >= 2
            && let Err(e) = cur.skip_tagged_fields()?
        {
            return Some(Err(e));
        }
        if api_version >= 3 {
            // transactional_id: nullable string, compact from v9 (flexible).
            if api_version >= 9 {
                let len = cur.uvarint()?;
                if len > 1 {
                    cur.skip(len as usize - 1)?;
                }
            } else {
                let len = cur.i16()?;
                if len > 0 {
                    cur.skip(len as usize)?;
                }
            }
        }
        Some(Ok(cur.i16()?))
    };
    match parse(&mut cur) {
        None => Ok(Acks::NeedMore),
        Some(Ok(acks)) => Ok(Acks::Value(acks)),
        Some(Err(e)) => Err(e),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn uvarint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..35).step_by(7) {
            let b = *self.take(1)?.first()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        // Longer than 5 bytes: not a valid u32 varint. Treat as a huge length so the
        // caller reports NeedMore and the frame limit rejects it.
        Some(u64::MAX >> 1)
    }
    fn skip_tagged_fields(&mut self) -> Option<Result<(), FrameError>> {
        let count = self.uvarint()?;
        if count > 64 {
            return Some(Err(FrameError::BadHeader(format!(
                "{count} tagged fields in a request header"
            ))));
        }
        for _ in 0..count {
            self.uvarint()?; // tag
            let len = self.uvarint()?;
            self.skip(usize::try_from(len).ok()?)?;
        }
        Some(Ok(()))
    }
}

/// A read buffer with a fixed capacity that can peek at the start of a frame and then
/// copy the rest to a writer without holding the whole frame: memory per connection stays
/// at `capacity` whatever the frame size, and the buffer is reused for every frame.
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
            let read = self.inner.read(&mut self.buf[self.end..]).await?;
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

    /// Copies exactly `n` bytes (buffered first) to `out`.
    pub async fn copy_to<W: AsyncWrite + Unpin>(
        &mut self,
        mut n: usize,
        out: &mut W,
    ) -> Result<(), FrameError> {
        while n > 0 {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let read = self.inner.read(&mut self.buf).await?;
                if read == 0 {
                    return Err(FrameError::Truncated);
                }
                self.end = read;
            }
            let chunk = n.min(self.end - self.start);
            out.write_all(&self.buf[self.start..self.start + chunk])
                .await?;
            self.start += chunk;
            n -= chunk;
        }
        Ok(())
    }

    /// Appends exactly `n` bytes (buffered first) to `out`.
    pub async fn read_into(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
        out.reserve(n);
        while n > 0 {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let read = self.inner.read(&mut self.buf).await?;
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
/// segments).
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
    Ok(())
}

impl FrameReader<OwnedReadHalf> {
    /// Like `copy_to`, with what is not buffered yet moved by splice(2) through `pipe`.
    pub async fn splice_to(
        &mut self,
        n: usize,
        out: &mut OwnedWriteHalf,
        pipe: &mut Pipe,
    ) -> Result<(), FrameError> {
        let buffered = n.min(self.end - self.start);
        out.write_all(&self.buf[self.start..self.start + buffered])
            .await?;
        self.start += buffered;
        if n > buffered {
            splice_exact(self.inner.as_ref(), out.as_ref(), pipe, n - buffered).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce_prefix(version: i16, client_id: &str, txn: Option<&str>, acks: i16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&version.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
        b.extend_from_slice(client_id.as_bytes());
        if version >= 9 {
            b.push(0); // no header tagged fields
            match txn {
                None => b.push(0),
                Some(t) => {
                    b.push(t.len() as u8 + 1);
                    b.extend_from_slice(t.as_bytes());
                }
            }
        } else if version >= 3 {
            match txn {
                None => b.extend_from_slice(&(-1i16).to_be_bytes()),
                Some(t) => {
                    b.extend_from_slice(&(t.len() as i16).to_be_bytes());
                    b.extend_from_slice(t.as_bytes());
                }
            }
        }
        b.extend_from_slice(&acks.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0x75, 0x30]); // timeout
        b
    }

    #[test]
    fn finds_acks_in_every_produce_version() {
        for version in 0..=13 {
            for txn in [None, Some("txn-1")] {
                for acks in [-1, 0, 1] {
                    let b = produce_prefix(version, "rdkafka", txn, acks);
                    assert_eq!(
                        produce_acks(&b, version).unwrap(),
                        Acks::Value(acks),
                        "v{version} txn {txn:?}"
                    );
                    assert_eq!(
                        produce_acks(&b[..b.len() - 5], version).unwrap(),
                        Acks::NeedMore
                    );
                }
            }
        }
    }

    #[test]
    fn header_rejects_garbage() {
        assert!(RequestHeader::parse(&[0, 3, 0, 12, 0, 0, 0, 1]).is_ok());
        assert!(RequestHeader::parse(&[0x7f, 0x7f, 0, 1, 0, 0, 0, 1]).is_err());
        assert!(RequestHeader::parse(&[0, 3, 0xff, 0xff, 0, 0, 0, 1]).is_err());
        assert!(RequestHeader::parse(&[0, 3]).is_err());
    }

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
}
