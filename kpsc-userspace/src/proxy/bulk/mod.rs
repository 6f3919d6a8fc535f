//! Bulk movers: how the bytes of frames that pass through unchanged (record batches) get
//! from one socket to the other. `transfer` is the interface; `copy` and `splice` the two
//! ways; `tcp` picks one per `--bulk-transfer`.
pub mod copy;
pub mod splice;
pub mod tcp;
pub mod transfer;
