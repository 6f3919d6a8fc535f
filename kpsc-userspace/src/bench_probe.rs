//! The sockmap ceiling probe (kpsc-ebpf's `kpsc-sockmap-ceiling` object): built with
//! kpscd's programs, since this crate's build script is the one that builds BPF, and
//! exported for kpsc-bench's `sockmap-ceiling` target. kpscd never loads it.

pub static SOCKMAP_CEILING_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpsc-sockmap-ceiling"));
