//! Types shared by the kernel programs (`kpsc-ebpf`) and userspace (`kpsc-userspace`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is laid out identically on
//! both sides: a BPF map key or value is just these bytes. The `const` assertions after each
//! type check that at compile time, for the BPF target and the host alike.
#![no_std]

/// Maximum number of listen ports one instance maps (map capacity).
pub const MAX_MAPPED_PORTS: u32 = 4096;

/// `kpscd proxy --bulk-transfer sockmap`: the request verdict's maps and records.
pub mod proxy_kernel;

/// Names and sizes of the sockmap ceiling probe (kpsc-ebpf's `kpsc-sockmap-ceiling`
/// object), which kpsc-bench runs to measure the most a sockmap proxy could reach.
pub mod sockmap_ceiling {
    pub const VERDICT: &str = "kpsc_sockmap_ceiling";
    pub const SOCKETS_MAP: &str = "CEILING_SOCKETS";
    pub const PEERS_MAP: &str = "CEILING_PEERS";
    pub const COUNTERS_MAP: &str = "CEILING_COUNTERS";
    pub const DELIVERED_MAP: &str = "CEILING_DELIVERED";
    /// Sockets forwarded at once (two per proxied connection).
    pub const MAX_SOCKETS: u32 = 16_384;
    /// Indexes in COUNTERS_MAP (per-CPU byte counts).
    pub const COUNTER_REDIRECTED: u32 = 0;
    pub const COUNTER_PASSED: u32 = 1;
    pub const COUNTERS: u32 = 2;
}

/// Names of the portmap program and its maps (pinned under `/sys/fs/bpf/kpsc/<instance>/`),
/// and the capacities that bound its state.
pub mod portmap {
    /// The TC program (always attached).
    pub const PROGRAM: &str = "kpsc_portmap";
    /// The XDP program (`--attach xdp`), in front of the TC one.
    pub const XDP_PROGRAM: &str = "kpsc_portmap_xdp";
    /// Interfaces XDP may redirect to (DEVMAP_HASH, not pinned: rebuilt at each start).
    pub const DEVICES_MAP: &str = "PORTMAP_DEVICES";
    pub const MAX_DEVICES: u32 = 64;
    pub const TARGETS_MAP: &str = "PORTMAP_TARGETS";
    pub const FLOWS_MAP: &str = "PORTMAP_FLOWS";
    pub const REPLIES_MAP: &str = "PORTMAP_REPLIES";
    pub const EMBRYOS_MAP: &str = "PORTMAP_EMBRYOS";
    pub const EMBRYO_REPLIES_MAP: &str = "PORTMAP_EMBRYO_REPLIES";
    pub const SOURCES_MAP: &str = "PORTMAP_SOURCES";
    pub const CONFIG_MAP: &str = "PORTMAP_CONFIG";
    pub const STATS_MAP: &str = "PORTMAP_STATS";
    pub const ALLOW_MAP: &str = "PORTMAP_ALLOW";
    /// `--snat-address`: the node's extra source addresses towards the brokers (Array of
    /// `Ip`; a port's `PortTarget::snat_first`/`snat_extra` say which entries are its own).
    pub const SNAT_MAP: &str = "PORTMAP_SNAT";
    /// Extra SNAT addresses, both families together (PORTMAP_SNAT capacity).
    pub const MAX_SNAT_ADDRESSES: u32 = 64;
    /// ICMP errors about tracked flows (`IcmpStats`, a one-entry per-CPU array). Newer
    /// than the other maps: a pin set without it is still compatible.
    pub const ICMP_MAP: &str = "PORTMAP_ICMP";
    /// Networks `--allow-source` may list (LPM trie capacity).
    pub const MAX_ALLOW_SOURCES: u32 = 1_024;
    /// Established flows (plain hash, never evicted): at capacity new connections are
    /// refused, open ones keep working.
    pub const MAX_FLOWS: u32 = 65_536;
    /// Half-open flows (LRU): a SYN flood only ever rotates this table.
    pub const MAX_EMBRYOS: u32 = 8_192;
    /// Source addresses whose SYN budget is tracked (LRU).
    pub const MAX_SOURCES: u32 = 16_384;
    /// A half-open flow older than this is not completed any more (its client's ACK is
    /// dropped; a retransmitted SYN gets a fresh one).
    pub const EMBRYO_TTL_NS: u64 = 10_000_000_000;
    /// New half-open flows one source address may open per second, unless configured.
    pub const DEFAULT_SYN_RATE_PER_SOURCE: u32 = 1_000;
    /// Random source ports tried before a new flow is dropped for lack of a free tuple.
    pub const PORT_ATTEMPTS: u32 = 8;
    /// Translated source ports are drawn from SNAT_PORT_FIRST..=65535, minus the node's
    /// own ephemeral range (PortmapConfig) and the mapped ports.
    pub const SNAT_PORT_FIRST: u16 = 1024;
}

/// Settings userspace gives the program (PORTMAP_CONFIG, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortmapConfig {
    /// New half-open flows per source address per second; 0 = no limit.
    pub syn_rate_per_source: u32,
    /// The node's own ephemeral port range (`ip_local_port_range`), never used as a
    /// translated source port so the node's own connections (probes, anything else) to a
    /// broker cannot collide with a translated flow. 0/0 = nothing excluded.
    pub local_port_first: u16,
    pub local_port_last: u16,
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<PortmapConfig>() == 8);
    assert!(align_of::<PortmapConfig>() == align_of::<u32>());
    assert!(offset_of!(PortmapConfig, syn_rate_per_source) == 0);
    assert!(offset_of!(PortmapConfig, local_port_first) == 4);
    assert!(offset_of!(PortmapConfig, local_port_last) == 6);
};

/// An IP address as the portmap program keys and rewrites it: 16 bytes in network byte
/// order (as in the packet, so the program copies them without swapping), IPv6 as is and
/// IPv4 as an IPv4-mapped address (`::ffff:a.b.c.d`). One flow table and one body of flow
/// logic thus serve both families; the program never accepts an IPv4-mapped address in an
/// IPv6 header, so the family of a key is never ambiguous.
pub type Ip = [u32; 4];

/// Word 2 of an IPv4-mapped address (`0000:ffff` in network byte order).
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `v4` (network byte order, as in the packet) as an IPv4-mapped `Ip`.
pub const fn ip_from_v4(v4: [u8; 4]) -> Ip {
    [0, 0, MAPPED_WORD, u32::from_ne_bytes(v4)]
}

/// Whether `ip` is IPv4 (IPv4-mapped).
pub const fn ip_is_v4(ip: &Ip) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_WORD
}

/// The unspecified address: a `PortTarget::listen_ip` that matches any node address.
pub const IP_ANY: Ip = [0; 4];

/// `ip` as the program keys it.
pub fn ip_bits(ip: core::net::IpAddr) -> Ip {
    match ip {
        core::net::IpAddr::V4(v4) => ip_from_v4(v4.octets()),
        core::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut words = [0u32; 4];
            for (w, chunk) in words.iter_mut().zip(o.chunks_exact(4)) {
                *w = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            words
        }
    }
}

/// The address the program's `ip` stands for (IPv4-mapped ones as IPv4).
pub fn ip_addr(ip: &Ip) -> core::net::IpAddr {
    let mut o = [0u8; 16];
    for (chunk, w) in o.chunks_exact_mut(4).zip(ip) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = core::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// Where a mapped listen port goes. Addresses (`Ip`) and port in network byte order, as
/// in the packet. Listen address and broker are of one family (kpscd refuses mappings
/// that would translate between IPv4 and IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTarget {
    /// Only packets to this node address are translated; IP_ANY = any address of the
    /// node of the broker's family.
    pub listen_ip: Ip,
    pub broker_ip: Ip,
    /// The node's own address towards the broker (the route's choice): a translated
    /// source, and the only one when `snat_extra` is 0.
    pub snat_ip: Ip,
    pub broker_port: u16,
    /// `--snat-address`: PORTMAP_SNAT[snat_first .. snat_first + snat_extra] are further
    /// translated sources for this port, each with its own source ports.
    pub snat_first: u8,
    pub snat_extra: u8,
}

// Map value written by userspace, read by the kernel: both must agree byte for byte.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<PortTarget>() == 52);
    assert!(align_of::<PortTarget>() == align_of::<u32>());
    assert!(offset_of!(PortTarget, listen_ip) == 0);
    assert!(offset_of!(PortTarget, broker_ip) == 16);
    assert!(offset_of!(PortTarget, snat_ip) == 32);
    assert!(offset_of!(PortTarget, broker_port) == 48);
    assert!(offset_of!(PortTarget, snat_first) == 50);
    assert!(offset_of!(PortTarget, snat_extra) == 51);
};

/// One direction of a TCP flow as it appears on the wire (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_ip: Ip,
    pub dst_ip: Ip,
    pub src_port: u16,
    pub dst_port: u16,
}

// Map key (hashed as raw bytes): implicit padding would hold uninitialised bytes and make
// lookups miss, and userspace must build the same 36 bytes as the kernel.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<FlowKey>() == 36);
    assert!(align_of::<FlowKey>() == align_of::<u32>());
    assert!(offset_of!(FlowKey, src_ip) == 0);
    assert!(offset_of!(FlowKey, dst_ip) == 16);
    assert!(offset_of!(FlowKey, src_port) == 32);
    assert!(offset_of!(FlowKey, dst_port) == 34);
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

/// An established flow: `FLOWS[client->node] = {client->node as sent to the broker}`, and
/// `REPLIES[broker->node] = {node->client as the client must see it}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowNat {
    /// The rewritten tuple.
    pub translated: FlowKey,
    /// 1 once a FIN went this way (client -> broker in PORTMAP_FLOWS, broker -> client in
    /// PORTMAP_REPLIES), for `kpscctl` and the cleanup of closed flows.
    pub fin: u8,
    /// 1 once a RST went this way.
    pub rst: u8,
    pub _pad: [u8; 2],
    /// CLOCK_MONOTONIC nanoseconds when the flow was created.
    pub created_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last packet in this direction, to the second
    /// (written at most once a second), for the removal of idle flows; written at once by
    /// the first packet after `closed_ns`, so a packet after a FIN/RST always shows.
    pub last_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last FIN or RST either way (written into both
    /// directions' entries), 0 if none.
    pub closed_ns: u64,
}

impl FlowNat {
    /// Whether a flow is over, from its two entries. Both sides sent FIN (a normal close),
    /// or a FIN/RST was the last packet either way: a FIN or RST followed by more traffic
    /// was forged or out of window (the stacks ignored it), and must not end the flow.
    pub fn closed(&self, reply: &FlowNat) -> bool {
        let closed_ns = if self.closed_ns > reply.closed_ns {
            self.closed_ns
        } else {
            reply.closed_ns
        };
        let last_ns = if self.last_ns > reply.last_ns {
            self.last_ns
        } else {
            reply.last_ns
        };
        self.fin & reply.fin != 0 || (closed_ns != 0 && last_ns <= closed_ns)
    }
}

// Map value shared by the kernel and userspace. `fin` and `rst` are separate bytes, each
// only ever set to 1 by a plain store, so two CPUs marking one flow (FIN one way, RST the
// other) cannot lose each other's update: BPF has no atomic OR for Rust code here.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<FlowNat>() == 64);
    assert!(align_of::<FlowNat>() == align_of::<u64>());
    assert!(offset_of!(FlowNat, translated) == 0);
    assert!(offset_of!(FlowNat, fin) == 36);
    assert!(offset_of!(FlowNat, rst) == 37);
    assert!(offset_of!(FlowNat, _pad) == 38);
    assert!(offset_of!(FlowNat, created_ns) == 40);
    assert!(offset_of!(FlowNat, last_ns) == 48);
    assert!(offset_of!(FlowNat, closed_ns) == 56);
};

/// A half-open flow, `EMBRYOS[client->node]`: the tuple its SYN was given, and what the
/// client's handshake ACK must acknowledge. Its reply side is
/// `EMBRYO_REPLIES[broker->node] = FlowNat { node->client, .. }`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Embryo {
    pub translated: FlowKey,
    /// The broker's SYN-ACK sequence number + 1 (host order), valid once `synack` is 1.
    pub expect_ack: u32,
    pub created_ns: u64,
    /// 1 once the broker's SYN-ACK went through.
    pub synack: u32,
    /// The client's initial sequence number (host order): only a SYN-ACK that
    /// acknowledges it is the broker's.
    pub client_isn: u32,
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<Embryo>() == 56);
    assert!(align_of::<Embryo>() == align_of::<u64>());
    assert!(offset_of!(Embryo, translated) == 0);
    assert!(offset_of!(Embryo, expect_ack) == 36);
    assert!(offset_of!(Embryo, created_ns) == 40);
    assert!(offset_of!(Embryo, synack) == 48);
    assert!(offset_of!(Embryo, client_isn) == 52);
};

/// One source's SYN budget, `SOURCES[src ip]` (an IPv6 source counts by its /64, which
/// one host usually holds whole): half-open flows opened in the one-second window that
/// started at `window_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBudget {
    pub window_ns: u64,
    pub opened: u64,
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<SourceBudget>() == 16);
    assert!(align_of::<SourceBudget>() == align_of::<u64>());
    assert!(offset_of!(SourceBudget, window_ns) == 0);
    assert!(offset_of!(SourceBudget, opened) == 8);
};

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
    /// Flows that completed their handshake (entered the established table).
    pub new_flows: u64,
    /// Non-SYN packets to a mapped port that belong to no flow the program knows: passed
    /// on, not dropped (another portmap instance's flow whose translated port is this
    /// port, or a flow removed as idle, which the node's stack then resets). Counted by TC
    /// only, so a packet XDP passes up counts once.
    pub unknown_flow: u64,
    /// No free translated source port after `PORT_ATTEMPTS` tries.
    pub drop_no_port: u64,
    /// The route lookup failed (no route, forwarding disabled, fragmentation needed).
    pub drop_no_route: u64,
    /// Rewriting the packet failed.
    pub drop_rewrite: u64,
    /// Half-open flows opened (SYNs that got a translated tuple).
    pub embryos: u64,
    /// SYNs over their source address's budget (`syn_rate_per_source`).
    pub drop_source_limit: u64,
    /// Handshakes completed while the established table was full.
    pub drop_table_full: u64,
    /// Client ACKs that do not complete a known handshake: no SYN-ACK yet, wrong
    /// acknowledgement number, or the half-open flow expired.
    pub drop_handshake: u64,
    /// Lost an insert race with another CPU and found no usable entry on re-lookup.
    pub drop_race: u64,
    /// SYNs from a source outside every `--allow-source` network.
    pub drop_source_denied: u64,
}

/// Number of u64 counters in PortmapStats.
const STATS_FIELDS: usize = 15;

// Per-CPU map value read by userspace: u64 counters, no holes, same order both sides.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<PortmapStats>() == STATS_FIELDS * 8);
    assert!(align_of::<PortmapStats>() == align_of::<u64>());
    assert!(offset_of!(PortmapStats, packets_in) == 0);
    assert!(offset_of!(PortmapStats, new_flows) == 32);
    assert!(offset_of!(PortmapStats, drop_rewrite) == 64);
    assert!(offset_of!(PortmapStats, embryos) == 72);
    assert!(offset_of!(PortmapStats, drop_race) == 104);
    assert!(offset_of!(PortmapStats, drop_source_denied) == 112);
};

impl PortmapStats {
    fn fields(&self) -> [u64; STATS_FIELDS] {
        [
            self.packets_in,
            self.bytes_in,
            self.packets_out,
            self.bytes_out,
            self.new_flows,
            self.unknown_flow,
            self.drop_no_port,
            self.drop_no_route,
            self.drop_rewrite,
            self.embryos,
            self.drop_source_limit,
            self.drop_table_full,
            self.drop_handshake,
            self.drop_race,
            self.drop_source_denied,
        ]
    }

    fn from_fields(f: [u64; STATS_FIELDS]) -> Self {
        let [
            packets_in,
            bytes_in,
            packets_out,
            bytes_out,
            new_flows,
            unknown_flow,
            drop_no_port,
            drop_no_route,
            drop_rewrite,
            embryos,
            drop_source_limit,
            drop_table_full,
            drop_handshake,
            drop_race,
            drop_source_denied,
        ] = f;
        Self {
            packets_in,
            bytes_in,
            packets_out,
            bytes_out,
            new_flows,
            unknown_flow,
            drop_no_port,
            drop_no_route,
            drop_rewrite,
            embryos,
            drop_source_limit,
            drop_table_full,
            drop_handshake,
            drop_race,
            drop_source_denied,
        }
    }

    /// All drops, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.drops().iter().map(|(_, n)| n).sum()
    }

    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a PortmapStats>) -> PortmapStats {
        let mut total = [0u64; STATS_FIELDS];
        for cpu in per_cpu {
            for (t, v) in total.iter_mut().zip(cpu.fields()) {
                *t += v;
            }
        }
        Self::from_fields(total)
    }

    /// Every drop counter with its reason's name, as metrics and `kpscctl` show them.
    pub fn drops(&self) -> [(&'static str, u64); 8] {
        [
            ("no_port", self.drop_no_port),
            ("no_route", self.drop_no_route),
            ("rewrite", self.drop_rewrite),
            ("source_limit", self.drop_source_limit),
            ("table_full", self.drop_table_full),
            ("handshake", self.drop_handshake),
            ("race", self.drop_race),
            ("source_denied", self.drop_source_denied),
        ]
    }
}

/// Per CPU, ICMP errors about tracked flows (PORTMAP_ICMP entry 0), all ports together:
/// a map of its own so that the per-port `PortmapStats` (and with it the pins of a
/// running version) keep their size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpStats {
    /// Errors from the broker side (about a packet the node sent to a broker) translated
    /// and sent to the client.
    pub to_client: u64,
    /// Errors from the client side (about a packet the node sent to a client) translated
    /// and sent to the broker.
    pub to_broker: u64,
    /// Errors about a tracked flow dropped: no route for the translated error, or the
    /// rewrite failed.
    pub dropped: u64,
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<IcmpStats>() == 24);
    assert!(align_of::<IcmpStats>() == align_of::<u64>());
    assert!(offset_of!(IcmpStats, to_client) == 0);
    assert!(offset_of!(IcmpStats, to_broker) == 8);
    assert!(offset_of!(IcmpStats, dropped) == 16);
};

impl IcmpStats {
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a IcmpStats>) -> IcmpStats {
        per_cpu
            .into_iter()
            .fold(IcmpStats::default(), |t, c| IcmpStats {
                to_client: t.to_client + c.to_client,
                to_broker: t.to_broker + c.to_broker,
                dropped: t.dropped + c.dropped,
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
    unsafe impl aya::Pod for super::Embryo {}
    unsafe impl aya::Pod for super::SourceBudget {}
    unsafe impl aya::Pod for super::PortmapConfig {}
    unsafe impl aya::Pod for super::IcmpStats {}
}
