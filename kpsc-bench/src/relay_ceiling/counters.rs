//! What a relay counts: bytes it delivered, and the reads (splices or recvs from a
//! socket) that brought them, whose ratio is the relay's average chunk.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counters {
    relayed: AtomicU64,
    chunks: AtomicU64,
}

impl Counters {
    /// Bytes written to the far socket.
    pub fn relayed(&self, bytes: u64) {
        self.relayed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// One read from a socket that brought bytes.
    pub fn chunk(&self) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    /// `relayed_bytes=N chunks=M`.
    pub fn line(&self) -> String {
        format!(
            "relayed_bytes={} chunks={}",
            self.relayed.load(Ordering::Relaxed),
            self.chunks.load(Ordering::Relaxed)
        )
    }
}
