//! The one interface of a bulk mover: forward the rest of a frame that passes through
//! unchanged. The connection forwarder is generic over it, so it runs over real sockets
//! with splice(2) and over in-memory streams in tests alike.

use std::future::Future;

use crate::kafka::frame::{FrameReader, MoveError};

pub trait Transfer<R, W>: Send {
    /// Capacity of the read buffer of the reader that feeds this mover: it must hold a
    /// request header (and a Produce request's `acks`).
    fn read_buffer_size(&self) -> usize;

    /// Forwards exactly `n` bytes of `reader`'s stream (what it buffered first) to `out`,
    /// flushed: nothing of the frame may stay queued in `out` (a TLS stream's buffer).
    /// The error says which side failed: the source (EOF first is `Truncated`) or `out`.
    fn forward(
        &mut self,
        reader: &mut FrameReader<R>,
        n: usize,
        out: &mut W,
    ) -> impl Future<Output = Result<(), MoveError>> + Send;
}
