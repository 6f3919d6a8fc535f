//! What kpsc's integration tests and its benchmark (kpsc-bench) share:
//! - [`Kpscd`]: the real `kpscd` binary as an operator runs it, with its admin endpoint
//!   (readiness, `/metrics`, `/maps`), stopped on drop;
//! - [`Process`]: any other child process (brokers, proxies), stopped on drop;
//! - [`RawClient`]: one raw Kafka request/response client;
//! - [`http_get`], [`wait_listening`], [`eventually`], [`free_port_base`]: readiness and
//!   ports;
//! - [`netns`]: client -> node -> broker topologies in network namespaces;
//! - [`cleanup`]: what a run started, removed at Ctrl-C as at a normal end;
//! - [`datapath`]: kpscd's pinned portmap maps;
//! - [`syn_flood`]: SYNs from spoofed 198.18.0.0/15 sources (raw socket), for the flood
//!   test and the benchmark's flood workload.
pub mod cleanup;
pub mod datapath;
mod http;
mod kafka;
mod kpscd;
pub mod netns;
mod process;
pub mod syn_flood;
mod wait;

pub use http::{http_get, http_get_within};
pub use kafka::{RAW_CLIENT_ID, RawClient, contains_bytes, read_frame, request_body};
pub use kpscd::Kpscd;
pub use process::{Process, kpsc_bench_bin, kpscctl_bin, kpscd_bin};
pub use wait::{eventually, expect_closed, free_port_base, wait_listening};
