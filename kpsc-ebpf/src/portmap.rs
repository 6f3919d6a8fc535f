//! `kpsc_portmap`: per-port DNAT/SNAT to the brokers, in the kernel (TC ingress).
//!
//! A TCP packet to `<node>:<mapped port>` is rewritten to `<snat ip>:<port'> ->
//! <broker>:<broker port>` and redirected towards the broker; the broker's replies, which
//! come back to the node because of the SNAT, are rewritten to `<node>:<mapped port> ->
//! <client>` and redirected towards the client. Everything else passes untouched.
//!
//! Invariants:
//! - a flow keeps the translation it got on its SYN for its whole life (PORTMAP_FLOWS),
//!   whatever happens to PORTMAP_TARGETS later: a map reload never breaks a connection;
//! - no two flows share a translated tuple: the reply entry is inserted with BPF_NOEXIST
//!   and a flow whose client port is taken gets another source port, or is dropped;
//! - checksums are updated incrementally with the kernel's helpers (they also handle
//!   CHECKSUM_PARTIAL packets from a local stack);
//! - packets go out with `bpf_fib_lookup` + `bpf_redirect` (or `bpf_redirect_neigh` when
//!   the neighbour is not resolved yet), bypassing the input path, which would drop a
//!   forwarded packet whose new source is the node's own address.
//!
//! Memory and concurrency (what the `SAFETY` comments below rely on):
//! - No pointer into packet data is ever held. Headers are copied out with
//!   `bpf_skb_load_bytes` (`TcContext::load`) and every write is a helper
//!   (`bpf_skb_store_bytes`, `bpf_l3/l4_csum_replace`) that checks its offset at run time.
//!   Those helpers may unclone or reallocate the packet, which would invalidate direct
//!   packet pointers; with none held, the verifier needs no `data_end` checks. The offsets
//!   stay valid across them: nothing here changes the packet's length or header layout.
//!   The copied `ip`/`tcp` headers describe the packet as it arrived.
//! - PORTMAP_TARGETS, PORTMAP_FLOWS and PORTMAP_REPLIES are shared by every CPU and by
//!   userspace, and preallocated (hash maps without `BPF_F_NO_PREALLOC`; LRU maps always),
//!   so an element that is deleted (userspace cleanup, reload), replaced (userspace
//!   re-inserting a target) or evicted (LRU) can be reused for another key at once, while a
//!   pointer from an earlier lookup is still held. Hence values are copied right after the
//!   lookup, and the only in-place write is the `flags` OR in `mark_closing`. A copy that
//!   races such a reuse can mix two values; the window is a few instructions.
//! - PORTMAP_STATS is per-CPU: a lookup returns this CPU's copy. TC programs run with
//!   bottom halves disabled and cannot migrate, so no other run of the program writes that
//!   copy while this one does; the increments are plain, not atomic. Userspace reads every
//!   CPU's copy, each `u64` whole, and is assumed not to delete or overwrite an entry while
//!   the program is attached (it only creates missing ones).

use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
    },
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuHashMap},
    programs::TcContext,
};
use kpsc_common::{
    FLOW_FIN_FROM_BROKER, FLOW_FIN_FROM_CLIENT, FLOW_RST, FlowKey, FlowNat, MAX_MAPPED_PORTS,
    PortTarget, PortmapStats,
    portmap::{EPHEMERAL_COUNT, EPHEMERAL_FIRST, MAX_FLOWS, PORT_ATTEMPTS},
};
use network_types::{eth::EthHdr, tcp::TcpHdr};

/// listen port (host order) -> where it goes. Filled by userspace.
#[map(name = "PORTMAP_TARGETS")]
static TARGETS: HashMap<u32, PortTarget> = HashMap::pinned(MAX_MAPPED_PORTS, 0);

/// client->node tuple -> client->node as sent to the broker.
#[map(name = "PORTMAP_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(MAX_FLOWS, 0);

/// broker->node tuple (as replies arrive) -> node->client as the client must see it.
#[map(name = "PORTMAP_REPLIES")]
static REPLIES: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(MAX_FLOWS, 0);

/// listen port (host order) -> counters. Userspace creates the entries.
#[map(name = "PORTMAP_STATS")]
static STATS: PerCpuHashMap<u32, PortmapStats> = PerCpuHashMap::pinned(MAX_MAPPED_PORTS, 0);

const AF_INET: u8 = 2;
const IP_CSUM_OFF: usize = EthHdr::LEN + 10;
const IP_SRC_OFF: usize = EthHdr::LEN + 12;
const IP_DST_OFF: usize = EthHdr::LEN + 16;

/// Why a packet was dropped: picks the `PortmapStats` counter.
enum DropReason {
    NoFlow,
    NoPort,
    NoRoute,
    Rewrite,
}

/// This CPU's counters for `port`, if userspace created the entry.
///
/// The `'static` is not real: callers use the reference at once and drop it before the
/// next `stats()` call, so no two `&mut` to the same counters are ever alive together.
#[inline(always)]
fn stats(port: u16) -> Option<&'static mut PortmapStats> {
    // SAFETY: a non-null pointer to this CPU's copy of a per-CPU map value, which no other
    // program run writes concurrently (module doc); aligned and sized for PortmapStats.
    STATS
        .get_ptr_mut(u32::from(port))
        .map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn count_drop(port: u16, why: DropReason) -> i32 {
    if let Some(s) = stats(port) {
        match why {
            DropReason::NoFlow => s.drop_no_flow += 1,
            DropReason::NoPort => s.drop_no_port += 1,
            DropReason::NoRoute => s.drop_no_route += 1,
            DropReason::Rewrite => s.drop_rewrite += 1,
        }
    }
    TC_ACT_SHOT as i32
}

pub fn run(ctx: &TcContext) -> i32 {
    match classify(ctx) {
        Some(action) => action,
        None => TC_ACT_OK as i32,
    }
}

/// None: not ours, pass. Some(action): translated (redirect) or dropped.
#[inline(always)]
fn classify(ctx: &TcContext) -> Option<i32> {
    let crate::packet::Ipv4Tcp { ip, tcp, l4 } = crate::packet::ipv4_tcp(ctx)?;
    let seen = FlowKey {
        src_ip: u32::from_ne_bytes(ip.src_addr),
        dst_ip: u32::from_ne_bytes(ip.dst_addr),
        src_port: u16::from_ne_bytes(tcp.source),
        dst_port: u16::from_ne_bytes(tcp.dest),
    };
    let ip_len = u64::from(u16::from_be_bytes(ip.tot_len));
    let listen_port = u16::from_be(seen.dst_port);
    // SAFETY: the reference is dropped as soon as the value is copied, before anything else
    // runs; a userspace reload racing the copy may mix two targets (module doc).
    if let Some(target) = unsafe { TARGETS.get(u32::from(listen_port)) }.copied()
        && (target.listen_ip == 0 || target.listen_ip == seen.dst_ip)
    {
        return Some(to_broker(
            ctx,
            l4,
            &seen,
            &target,
            &tcp,
            listen_port,
            ip_len,
        ));
    }
    // SAFETY: copied at once, as above. REPLIES values are written whole on insertion and
    // only their `flags` in place afterwards; a copy racing the deletion or eviction of this
    // entry and its reuse can see another flow's translation (module doc).
    let reply = unsafe { REPLIES.get(seen) }.copied()?;
    mark_closing(&REPLIES, &seen, &tcp, FLOW_FIN_FROM_BROKER);
    Some(to_client(ctx, l4, &seen, &reply.translated, ip_len))
}

#[inline(always)]
fn to_broker(
    ctx: &TcContext,
    l4: usize,
    seen: &FlowKey,
    target: &PortTarget,
    tcp: &TcpHdr,
    listen_port: u16,
    ip_len: u64,
) -> i32 {
    // SAFETY: copied at once; same sharing as REPLIES in `classify`.
    let translated = match unsafe { FLOWS.get(seen) }.copied() {
        Some(flow) => {
            mark_closing(&FLOWS, seen, tcp, FLOW_FIN_FROM_CLIENT);
            flow.translated
        }
        None => {
            // Only a SYN opens a flow; anything else for an unknown flow is dropped rather
            // than handed to a stack that has no such connection.
            if tcp.syn() == 0 || tcp.ack() != 0 {
                return count_drop(listen_port, DropReason::NoFlow);
            }
            match open_flow(seen, target) {
                Some(t) => {
                    if let Some(s) = stats(listen_port) {
                        s.new_flows += 1;
                    }
                    t
                }
                None => return count_drop(listen_port, DropReason::NoPort),
            }
        }
    };
    if rewrite(ctx, l4, seen, &translated).is_err() {
        return count_drop(listen_port, DropReason::Rewrite);
    }
    if let Some(s) = stats(listen_port) {
        s.packets_in += 1;
        s.bytes_in += ip_len;
    }
    forward(ctx, &translated, listen_port)
}

/// Records FIN/RST so userspace can show closing flows and remove closed ones.
#[inline(always)]
fn mark_closing(map: &LruHashMap<FlowKey, FlowNat>, key: &FlowKey, tcp: &TcpHdr, fin_bit: u32) {
    let bits = if tcp.rst() != 0 { FLOW_RST } else { 0 } | if tcp.fin() != 0 { fin_bit } else { 0 };
    if bits != 0
        && let Some(flow) = map.get_ptr_mut(key)
    {
        // SAFETY: a non-null, aligned pointer to a shared map value; only `flags` is written.
        // The OR is a plain load and store, not atomic: another CPU marking the same flow at
        // the same moment (FIN one way, RST the other) can lose one update, and if the
        // element was deleted or evicted and reused since the lookup, the bits land on the
        // flow that now owns it. Userspace only reads `flags`.
        unsafe { (*flow).flags |= bits };
    }
}

/// Allocates the translated tuple of a new flow and records both directions.
#[inline(always)]
fn open_flow(seen: &FlowKey, target: &PortTarget) -> Option<FlowKey> {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let back = FlowNat {
        translated: seen.reversed(),
        flags: 0,
        created_ns: now,
    };
    let mut attempt = 0;
    while attempt < PORT_ATTEMPTS {
        let src_port = if attempt == 0 {
            seen.src_port
        } else {
            // SAFETY: helper without preconditions.
            let r = unsafe { bpf_get_prandom_u32() } % u32::from(EPHEMERAL_COUNT);
            (EPHEMERAL_FIRST + r as u16).to_be()
        };
        let translated = FlowKey {
            src_ip: target.snat_ip,
            dst_ip: target.broker_ip,
            src_port,
            dst_port: target.broker_port,
        };
        // NOEXIST: the reply tuple is the uniqueness check; only one flow can own it. The
        // kernel checks and inserts under the bucket lock, so two CPUs cannot both win.
        if REPLIES
            .insert(translated.reversed(), back, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            let flow = FlowNat {
                translated,
                flags: 0,
                created_ns: now,
            };
            if FLOWS.insert(seen, flow, 0).is_err() {
                let _ = REPLIES.remove(translated.reversed());
                return None;
            }
            return Some(translated);
        }
        attempt += 1;
    }
    None
}

#[inline(always)]
fn to_client(ctx: &TcContext, l4: usize, seen: &FlowKey, translated: &FlowKey, ip_len: u64) -> i32 {
    let listen_port = u16::from_be(translated.src_port);
    if rewrite(ctx, l4, seen, translated).is_err() {
        return count_drop(listen_port, DropReason::Rewrite);
    }
    if let Some(s) = stats(listen_port) {
        s.packets_out += 1;
        s.bytes_out += ip_len;
    }
    forward(ctx, translated, listen_port)
}

/// Rewrites addresses and ports from `old` to `new`, keeping IP and TCP checksums right.
///
/// Only helpers touch the packet (module doc), so `l4` and the `IP_*_OFF` offsets, checked
/// when the headers were loaded, stay valid after each of them. Each checksum update takes
/// the old and new values explicitly, so it does not matter that the field is stored after.
#[inline(always)]
fn rewrite(ctx: &TcContext, l4: usize, old: &FlowKey, new: &FlowKey) -> Result<(), i64> {
    let tcp_csum = l4 + 16;
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    if old.src_ip != new.src_ip {
        ctx.l4_csum_replace(
            tcp_csum,
            u64::from(old.src_ip),
            u64::from(new.src_ip),
            pseudo | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old.src_ip), u64::from(new.src_ip), 4)?;
        ctx.store(IP_SRC_OFF, &new.src_ip, 0)?;
    }
    if old.dst_ip != new.dst_ip {
        ctx.l4_csum_replace(
            tcp_csum,
            u64::from(old.dst_ip),
            u64::from(new.dst_ip),
            pseudo | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old.dst_ip), u64::from(new.dst_ip), 4)?;
        ctx.store(IP_DST_OFF, &new.dst_ip, 0)?;
    }
    if old.src_port != new.src_port {
        ctx.l4_csum_replace(
            tcp_csum,
            u64::from(old.src_port),
            u64::from(new.src_port),
            2,
        )?;
        ctx.store(l4, &new.src_port, 0)?;
    }
    if old.dst_port != new.dst_port {
        ctx.l4_csum_replace(
            tcp_csum,
            u64::from(old.dst_port),
            u64::from(new.dst_port),
            2,
        )?;
        ctx.store(l4 + 2, &new.dst_port, 0)?;
    }
    Ok(())
}

/// Sends the rewritten packet out of the interface the route to its new destination uses.
#[inline(always)]
fn forward(ctx: &TcContext, to: &FlowKey, listen_port: u16) -> i32 {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = 6;
    params.sport = to.src_port;
    params.dport = to.dst_port;
    // tot_len 0: the kernel checks the skb against the egress MTU itself, which handles
    // GSO packets (a non-zero tot_len of a GSO packet fails with FRAG_NEEDED).
    params.__bindgen_anon_1.tot_len = 0;
    // SAFETY: `ctx.skb.skb` is the program's context pointer, valid for the whole run; the
    // verifier turns this constant-offset field load into a read of the real sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = to.src_ip;
    params.__bindgen_anon_4.ipv4_dst = to.dst_ip;
    // SAFETY: `params` is a fully initialised bpf_fib_lookup on our stack and its size is
    // passed; the helper writes its result back into it. The first argument is the
    // unmodified context pointer, as the verifier requires.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        if ctx.store(0, &params.dmac, 0).is_err() || ctx.store(6, &params.smac, 0).is_err() {
            return count_drop(listen_port, DropReason::Rewrite);
        }
        // SAFETY: helper without memory arguments; the redirect happens after we return.
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // The kernel resolves the neighbour and sends the packet when it can.
        // SAFETY: null params with length 0 are allowed: the helper then looks up the next
        // hop from the packet's own IP header.
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count_drop(listen_port, DropReason::NoRoute)
}
