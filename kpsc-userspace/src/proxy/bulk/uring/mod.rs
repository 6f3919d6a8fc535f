//! Bulk bytes moved by io_uring (`--bulk-transfer uring`): the span of a frame that
//! passes unchanged goes socket -> pipe -> socket in linked IORING_OP_SPLICE rounds that
//! the kernel's io-wq workers run back to back (`ring`), so kpscd wakes once per frame,
//! not once per chunk as with splice(2) from tokio. kpscd still reads every frame header
//! itself, through nonblocking calls on the same sockets (`socket`).
//!
//! Invariants, as splice's: a span never reads past its frame (the next header stays for
//! kpscd), and the pipe is empty between spans. A span that failed may leave bytes in its
//! pipe: the mover drops that pipe, and the connection ends on the error anyway. The
//! buffered head of a frame is written before its span starts and the span ends before
//! the next write, so a direction's bytes leave in stream order.

pub mod ring;
pub mod socket;

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;

use crate::{
    kafka::frame::{FrameReader, HEADER_BUFFER, MoveError},
    proxy::bulk::{
        copy::CopyMover,
        splice::{LazyPipe, SPLICE_MIN},
        transfer::Transfer,
        uring::{
            ring::{Pipe, Ring, move_span},
            socket::{UringRead, UringWrite},
        },
    },
};

/// Moves one direction's frames through the ring, small ones by copy.
pub struct UringMover {
    ring: Arc<Ring>,
    spliced_bytes: Counter,
    pipe: LazyPipe,
}

impl UringMover {
    pub fn new(ring: Arc<Ring>, spliced_bytes: Counter) -> Self {
        Self {
            ring,
            spliced_bytes,
            pipe: LazyPipe::new(Pipe::blocking),
        }
    }
}

impl Transfer<UringRead, UringWrite> for UringMover {
    /// Headers and small frames only, as splice's.
    fn read_buffer_size(&self) -> usize {
        HEADER_BUFFER
    }

    async fn forward(
        &mut self,
        reader: &mut FrameReader<UringRead>,
        n: usize,
        out: &mut UringWrite,
    ) -> Result<(), MoveError> {
        let unbuffered = n.saturating_sub(reader.buffered().len());
        if unbuffered >= SPLICE_MIN
            && let Some(pipe) = self.pipe.get()
        {
            out.write_all(reader.take_buffered(n))
                .await
                .map_err(MoveError::Sink)?;
            let end = move_span(&self.ring, reader.get_ref(), out, &pipe, unbuffered as u64).await;
            if end.is_err() {
                self.pipe.discard();
            }
            end?;
            self.spliced_bytes.inc_by(unbuffered as u64);
            return Ok(());
        }
        CopyMover.forward(reader, n, out).await
    }
}
