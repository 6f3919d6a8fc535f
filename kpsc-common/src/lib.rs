//! Types shared by the kernel programs (`kpsc-ebpf`) and userspace (`kpsc-userspace`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is laid out identically on
//! both sides: a BPF map key or value is just these bytes. The `const` assertions after each
//! type check that at compile time, for the BPF target and the host alike.
#![no_std]

/// Maximum number of listen ports one instance maps (map capacity).
pub const MAX_MAPPED_PORTS: u32 = 4096;

/// Names of the portmap program and its maps (pinned under `/sys/fs/bpf/kpsc/<instance>/`).
pub mod portmap {
    pub const PROGRAM: &str = "kpsc_portmap";
    pub const TARGETS_MAP: &str = "PORTMAP_TARGETS";
    pub const FLOWS_MAP: &str = "PORTMAP_FLOWS";
    pub const REPLIES_MAP: &str = "PORTMAP_REPLIES";
    pub const STATS_MAP: &str = "PORTMAP_STATS";
    /// Capacity of the connection-tracking maps (LRU: the oldest idle flows go first).
    pub const MAX_FLOWS: u32 = 65_536;
    /// Source ports tried before a new flow is dropped for lack of a free translated tuple.
    pub const PORT_ATTEMPTS: u32 = 8;
    /// Where replacement source ports come from when the client's own is taken.
    pub const EPHEMERAL_FIRST: u16 = 32_768;
    pub const EPHEMERAL_COUNT: u16 = 28_232;
}

/// Where a mapped listen port goes. Addresses and ports in network byte order, as in the
/// packet, so the program copies them without swapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTarget {
    /// Only packets to this node address are translated; 0 = any address of the node.
    pub listen_ip: u32,
    pub broker_ip: u32,
    /// The node's own address towards the broker (the translated source).
    pub snat_ip: u32,
    pub broker_port: u16,
    pub _pad: u16,
}

// Map value written by userspace, read by the kernel: both must agree byte for byte.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<PortTarget>() == 16);
    assert!(align_of::<PortTarget>() == align_of::<u32>());
    assert!(offset_of!(PortTarget, listen_ip) == 0);
    assert!(offset_of!(PortTarget, broker_ip) == 4);
    assert!(offset_of!(PortTarget, snat_ip) == 8);
    assert!(offset_of!(PortTarget, broker_port) == 12);
    assert!(offset_of!(PortTarget, _pad) == 14);
};

/// One direction of a TCP flow as it appears on the wire (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

// Map key (hashed as raw bytes): implicit padding would hold uninitialised bytes and make
// lookups miss, and userspace must build the same 12 bytes as the kernel.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<FlowKey>() == 12);
    assert!(align_of::<FlowKey>() == align_of::<u32>());
    assert!(offset_of!(FlowKey, src_ip) == 0);
    assert!(offset_of!(FlowKey, dst_ip) == 4);
    assert!(offset_of!(FlowKey, src_port) == 8);
    assert!(offset_of!(FlowKey, dst_port) == 10);
};

impl FlowKey {
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// A translated flow: `FLOWS[client->node] = {client->node as sent to the broker}`, and
/// `REPLIES[broker->node] = {node->client as the client must see it}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowNat {
    /// The rewritten tuple.
    pub translated: FlowKey,
    /// `FLOW_*` bits seen in this direction (FIN, RST), for `kpscctl` and the cleanup of
    /// closed flows.
    pub flags: u32,
    /// CLOCK_MONOTONIC nanoseconds when the flow was created.
    pub created_ns: u64,
}

// Map value shared by the kernel and userspace; `flags` sits right after the 12-byte key
// so `created_ns` is 8-aligned without a hole.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<FlowNat>() == 24);
    assert!(align_of::<FlowNat>() == align_of::<u64>());
    assert!(offset_of!(FlowNat, translated) == 0);
    assert!(offset_of!(FlowNat, flags) == 12);
    assert!(offset_of!(FlowNat, created_ns) == 16);
};

/// A FIN went from the client to the broker (set in PORTMAP_FLOWS).
pub const FLOW_FIN_FROM_CLIENT: u32 = 1;
/// A FIN went from the broker to the client (set in PORTMAP_REPLIES).
pub const FLOW_FIN_FROM_BROKER: u32 = 2;
/// A RST went either way.
pub const FLOW_RST: u32 = 4;

/// Per listen port, per CPU traffic through the portmap program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortmapStats {
    /// Client -> broker packets and bytes (IP length).
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Broker -> client.
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    /// A non-SYN packet for a flow the program does not know (e.g. evicted).
    pub drop_no_flow: u64,
    /// No free translated source port after `PORT_ATTEMPTS` tries.
    pub drop_no_port: u64,
    /// The route lookup failed (no route, forwarding disabled, fragmentation needed).
    pub drop_no_route: u64,
    /// Rewriting the packet failed.
    pub drop_rewrite: u64,
}

// Per-CPU map value read by userspace: nine u64 counters, no holes, same order both sides.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<PortmapStats>() == 9 * 8);
    assert!(align_of::<PortmapStats>() == align_of::<u64>());
    assert!(offset_of!(PortmapStats, packets_in) == 0);
    assert!(offset_of!(PortmapStats, bytes_in) == 8);
    assert!(offset_of!(PortmapStats, packets_out) == 16);
    assert!(offset_of!(PortmapStats, bytes_out) == 24);
    assert!(offset_of!(PortmapStats, new_flows) == 32);
    assert!(offset_of!(PortmapStats, drop_no_flow) == 40);
    assert!(offset_of!(PortmapStats, drop_no_port) == 48);
    assert!(offset_of!(PortmapStats, drop_no_route) == 56);
    assert!(offset_of!(PortmapStats, drop_rewrite) == 64);
};

impl PortmapStats {
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a PortmapStats>) -> PortmapStats {
        per_cpu
            .into_iter()
            .fold(PortmapStats::default(), |a, c| PortmapStats {
                packets_in: a.packets_in + c.packets_in,
                bytes_in: a.bytes_in + c.bytes_in,
                packets_out: a.packets_out + c.packets_out,
                bytes_out: a.bytes_out + c.bytes_out,
                new_flows: a.new_flows + c.new_flows,
                drop_no_flow: a.drop_no_flow + c.drop_no_flow,
                drop_no_port: a.drop_no_port + c.drop_no_port,
                drop_no_route: a.drop_no_route + c.drop_no_route,
                drop_rewrite: a.drop_rewrite + c.drop_rewrite,
            })
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all repr(C) with integer fields only and no implicit padding (asserted at
    // each type), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::PortTarget {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowNat {}
    unsafe impl aya::Pod for super::PortmapStats {}
}
