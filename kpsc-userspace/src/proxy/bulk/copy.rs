//! Bulk bytes copied through kpscd's memory: read(2) into a buffer, write(2) out of it.
//! Works on any stream (TLS too). The reader's own buffer holds headers and small frames;
//! the rest of a larger frame goes through a bulk buffer that exists only while that frame
//! moves (`FrameReader::copy_to`), so an idle connection holds what splice's does.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    kafka::frame::{FrameReader, HEADER_BUFFER, MoveError},
    proxy::bulk::transfer::Transfer,
};

pub struct CopyMover;

impl<R, W> Transfer<R, W> for CopyMover
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Headers and small frames, as splice's: a large frame's bulk buffer comes and goes
    /// with it.
    fn read_buffer_size(&self) -> usize {
        HEADER_BUFFER
    }

    async fn forward(
        &mut self,
        reader: &mut FrameReader<R>,
        n: usize,
        out: &mut W,
    ) -> Result<(), MoveError> {
        reader.copy_to(n, out).await
    }
}
