//! Bulk movers: how the bytes of frames that pass through unchanged (record batches) get
//! from one socket to the other. `transfer` is the interface; `copy`, `splice` and `uring`
//! the ways; `tcp` picks one per `--bulk-transfer`. `sockmap` carries requests in the kernel
//! (the connection's request loop is `connection::kernel_requests`).
pub mod copy;
pub mod sockmap;
pub mod splice;
pub mod tcp;
pub mod transfer;
pub mod uring;
