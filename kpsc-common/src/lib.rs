//! Types shared by the kernel programs (`kpsc-ebpf`) and userspace (`kpsc-userspace`).
//!
//! Every type here is `#[repr(C)]`, has no padding holes the verifier could trip on, and is
//! laid out identically on both sides: a BPF map key or value is just these bytes.
#![no_std]

/// Name of the per-port traffic counter map in the TC program.
pub const PORT_COUNTERS_MAP: &str = "PORT_COUNTERS";
/// Name of the TC classifier that counts traffic to mapped ports.
pub const TC_PORT_COUNTER_PROG: &str = "kpsc_tc_port_counter";
/// Maximum number of listen ports one instance maps (map capacity).
pub const MAX_MAPPED_PORTS: u32 = 4096;

/// Per-port, per-CPU traffic counters kept by the TC program.
///
/// Key: the listen port in host byte order (`u16`, widened to `u32` to avoid padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// IPv4 TCP packets seen for this port.
    pub packets: u64,
    /// Bytes of those packets, from the IP header on.
    pub bytes: u64,
}

impl PortCounters {
    /// Sums per-CPU values into one total.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a PortCounters>) -> PortCounters {
        per_cpu
            .into_iter()
            .fold(PortCounters::default(), |acc, c| PortCounters {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields, no padding; any bit pattern is valid.
unsafe impl aya::Pod for PortCounters {}
