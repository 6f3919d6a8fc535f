//! kpsc userspace. The two modes are folders; what they share sits beside them:
//! - `proxy/`: kafka-proxy's job, addresses rewritten in responses (listeners ->
//!   connection -> bulk movers | rewrite/<api>);
//! - `portmap/`: the eBPF TC data plane (datapath, probe, flows, kernel metrics);
//! - `config/`: flags and the TOML file, one schema per mode;
//! - `mapping/`: the broker/port map both modes serve;
//! - `kafka/`: the wire protocol (framing, request header, guarded decoding, discovery);
//! - `admin`, `metrics`, `logging`, `man`: the operator's view;
//! - `shutdown`: the stop signals and the grace period both modes honour;
//! - `tls`: rustls on the listeners and towards brokers; `upstream`: how kpscd connects
//!   to a broker (dial mapping, TLS), for client traffic and its own metadata requests.
//! - `bench_probe`: a BPF object kpscd never loads, built here for kpsc-bench.
pub mod admin;
pub mod bench_probe;
pub mod config;
pub mod kafka;
pub mod logging;
pub mod man;
pub mod mapping;
pub mod metrics;
pub mod portmap;
pub mod privilege;
pub mod proxy;
pub mod shutdown;
pub mod tls;
pub mod upstream;
