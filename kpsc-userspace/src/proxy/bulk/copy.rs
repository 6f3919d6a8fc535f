//! Bulk bytes copied through the reader's buffer: read(2) into it, write(2) out of it.
//! Works on any stream.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    kafka::frame::{FrameReader, MoveError},
    proxy::bulk::transfer::Transfer,
};

pub struct CopyMover;

impl<R, W> Transfer<R, W> for CopyMover
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    fn read_buffer_size(&self) -> usize {
        32 * 1024
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
