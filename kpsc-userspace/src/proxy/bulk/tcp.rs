//! The mover `--bulk-transfer` selects for a proxied TCP connection.

use prometheus_client::metrics::counter::Counter;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::{
    config::proxy::BulkTransfer,
    kafka::frame::{FrameReader, MoveError},
    proxy::bulk::{copy::CopyMover, splice::SpliceMover, transfer::Transfer},
};

pub enum TcpMover {
    Copy(CopyMover),
    Splice(SpliceMover),
}

impl TcpMover {
    pub fn new(transfer: BulkTransfer, spliced_bytes: Counter) -> Self {
        match transfer.resolve().0 {
            BulkTransfer::Auto | BulkTransfer::Copy => Self::Copy(CopyMover),
            // Sockmap: a connection the kernel path does not take (its first request came
            // with the PROXY header) splices; what the verdicts pass up is copied (see
            // `kernel_requests`, `kernel_responses`). Uring connections take their own
            // mover (`uring::UringMover`); none comes here.
            BulkTransfer::Splice | BulkTransfer::Sockmap | BulkTransfer::Uring => {
                Self::Splice(SpliceMover::new(spliced_bytes))
            }
        }
    }
}

impl Transfer<OwnedReadHalf, OwnedWriteHalf> for TcpMover {
    fn read_buffer_size(&self) -> usize {
        match self {
            Self::Copy(m) => Transfer::<OwnedReadHalf, OwnedWriteHalf>::read_buffer_size(m),
            Self::Splice(m) => m.read_buffer_size(),
        }
    }

    async fn forward(
        &mut self,
        reader: &mut FrameReader<OwnedReadHalf>,
        n: usize,
        out: &mut OwnedWriteHalf,
    ) -> Result<(), MoveError> {
        match self {
            Self::Copy(m) => m.forward(reader, n, out).await,
            Self::Splice(m) => m.forward(reader, n, out).await,
        }
    }
}
