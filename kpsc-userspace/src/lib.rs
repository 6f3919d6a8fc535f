//! kpsc userspace. The data flow reads from the module list:
//! config -> portmap -> listener -> codec -> rewrite -> forward, with discovery (metadata),
//! admin (HTTP), metrics and the embedded eBPF object beside it.
pub mod admin;
pub mod codec;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod ebpf;
pub mod forward;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod portmap;
pub mod portmap_mode;
pub mod proxy;
pub mod rewrite;
pub mod splice;
