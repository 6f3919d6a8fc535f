//! One client connection: one upstream connection to the mapped broker, requests copied
//! up, responses copied down in request order, address-bearing responses rewritten.
//!
//! Invariants:
//! - responses reach the client in the order of their requests: one upstream connection,
//!   one task writing to the client, processing responses strictly in arrival order and
//!   checking each correlation id against the oldest request still waiting;
//! - a response that may carry broker addresses is decoded and rewritten, or the
//!   connection is closed: it is never forwarded as it came;
//! - memory per connection is two fixed buffers (and, with splice, two pipes, made on
//!   first use) plus at most one rewritten response;
//!   `--kafka-max-open-requests` bounds requests in flight (then reading the client stops).
//!
//! `serve` sets a connection up; `requests` and `responses` are its two directions
//! (`kernel_requests` and `kernel_responses` replace them under `--bulk-transfer
//! sockmap`);
//! `error` says how a connection can end.
pub mod error;
pub mod kernel_requests;
pub mod kernel_responses;
pub mod requests;
pub mod responses;
pub mod serve;
