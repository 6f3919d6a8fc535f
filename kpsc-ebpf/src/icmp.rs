//! ICMP errors about translated flows, on TC ingress: without them Path MTU discovery
//! breaks across the node. A router between node and broker sends its "fragmentation
//! needed" / "packet too big" to the node's SNAT address, and a router between client and
//! node to the node's listen address; neither has a socket for the tuple, so the sender
//! would never learn and its large segments would vanish.
//!
//! An error is translated when its embedded packet (the one that failed, as the node sent
//! it) belongs to a tracked flow, established or half-open, looked up in the portmap's flow
//! tables by the tuple the reply to it would have: `FLOWS`/`EMBRYOS` for a packet the node
//! sent to a client (the error came from the client side), `REPLIES`/`EMBRYO_REPLIES` for
//! one it sent to a broker. The flow's translation `t` (its other side, as that side sees
//! it) gives everything:
//! - the embedded packet becomes `t` reversed: what the other side itself sent (client ->
//!   listen address, or broker -> SNAT address), its IPv4 header checksum kept right;
//! - the outer header goes from `t.src` to `t.dst`: to the client (or broker) whose packet
//!   it was, *from the node's address on that side* (listen or SNAT address). Linux
//!   conntrack NAT does the same (`nf_nat_icmp_reply_translation` rewrites the outer
//!   source in POSTROUTING), for the same reasons: the far side may have no route back to
//!   a router on the other side of the node, and the addresses behind the node (brokers,
//!   their routers) are never shown to clients;
//! - the ICMP checksum follows every change it covers (ICMPv6's includes the pseudo-header
//!   with the outer addresses); the embedded ports are rewritten, and so is the embedded
//!   TCP checksum when the error holds it (RFC 792 only promises 8 bytes of TCP, Linux
//!   quotes more): like conntrack, it is updated when present, left alone when truncated;
//!   no receiver checks it (the TCP payload after it is cut short anyway);
//! - the error is routed (`bpf_fib_lookup`) and redirected like the flow's TCP packets.
//!
//! Translated: ICMPv4 destination unreachable (every code; "fragmentation needed" is the
//! one that matters), time exceeded and parameter problem; ICMPv6 destination
//! unreachable, packet too big, time exceeded and parameter problem. Everything else
//! passes untouched, as before: other types, errors about untracked tuples (the node's own
//! connections), IP fragments, an outer IPv6 header with extension headers before ICMPv6,
//! an embedded IPv6 packet with extension headers before TCP, and an error whose outer
//! destination is not the embedded packet's source.
//!
//! Errors never change flow state: the tables are only read (a forged error closes
//! nothing here; what the receiving stack makes of it is its own check, against the
//! sequence number, which is not translated). Counters: PORTMAP_ICMP, per CPU (plain
//! increments, as for PORTMAP_STATS). This runs only under TC: XDP passes ICMP up
//! (`packet` parses only TCP), and PMTU errors are rare enough not to need the fast path.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use kpsc_common::{FlowKey, IcmpStats, Ip, ip_from_v4, ip_is_v4};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum,
    frame::{Frame, Route, addr_offset},
    portmap::{EMBRYO_REPLIES, EMBRYOS, FLOWS, REPLIES},
};

/// ICMP errors translated and dropped (entry 0), per CPU.
#[map(name = "PORTMAP_ICMP")]
static ICMP: PerCpuArray<IcmpStats> = PerCpuArray::pinned(1, 0);

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// The outer IPv4 header checksum.
const IP_CSUM_OFF: usize = EthHdr::LEN + 10;
/// ICMP header: type, code, checksum, 4 type-specific bytes; the embedded packet follows.
const ICMP_HDR_LEN: usize = 8;

/// An ICMP error about a TCP packet the node sent, and where its parts are in the frame.
struct IcmpError {
    /// The embedded packet's tuple, as the node sent it.
    inner: FlowKey,
    outer_src: Ip,
    outer_dst: Ip,
    /// Offsets of the ICMP header, the embedded IP header and the embedded TCP header.
    icmp: u16,
    inner_ip: u16,
    inner_l4: u16,
    ip_len: u16,
    v4: bool,
}

/// What to do with a packet the portmap left alone: translate it if it is an ICMP error
/// about a tracked flow, else leave it to whatever comes next (TC_ACT_UNSPEC).
pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: integers, arrays and a bool: all-zero is valid.
    let mut err: IcmpError = unsafe { core::mem::zeroed() };
    if !parse(ctx, &mut err) {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: as above.
    let mut t: FlowKey = unsafe { core::mem::zeroed() };
    match flow_of(&err.inner, &mut t) {
        Side::None => TC_ACT_UNSPEC,
        side => translate(ctx, &err, &t, side == Side::Client),
    }
}

/// Fills `err` from an ICMP error about a TCP packet; false for anything else.
#[inline(never)]
fn parse(ctx: &TcContext, err: &mut IcmpError) -> bool {
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return false;
    };
    match eth.ether_type() {
        Ok(EtherType::Ipv4) => parse_v4(ctx, err),
        Ok(EtherType::Ipv6) => parse_v6(ctx, err),
        _ => false,
    }
}

#[inline(never)]
fn parse_v4(ctx: &TcContext, err: &mut IcmpError) -> bool {
    let Ok(ip) = ctx.load::<Ipv4Hdr>(EthHdr::LEN) else {
        return false;
    };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.proto != PROTO_ICMP || u16::from_be_bytes(ip.frags) & 0x3fff != 0 || ihl < Ipv4Hdr::LEN {
        return false;
    }
    let icmp = EthHdr::LEN + ihl;
    // Destination unreachable, time exceeded, parameter problem.
    if !matches!(ctx.load::<u8>(icmp), Ok(3 | 11 | 12)) {
        return false;
    }
    let inner_ip = icmp + ICMP_HDR_LEN;
    let Ok(inner) = ctx.load::<Ipv4Hdr>(inner_ip) else {
        return false;
    };
    let inner_ihl = usize::from(inner.vihl & 0x0f) * 4;
    // The failed packet must be the start of a TCP segment (its ports are in it).
    if inner.vihl >> 4 != 4
        || inner.proto != u8::from(IpProto::Tcp)
        || u16::from_be_bytes(inner.frags) & 0x1fff != 0
        || inner_ihl < Ipv4Hdr::LEN
    {
        return false;
    }
    err.outer_src = ip_from_v4(ip.src_addr);
    err.outer_dst = ip_from_v4(ip.dst_addr);
    err.inner.src_ip = ip_from_v4(inner.src_addr);
    err.inner.dst_ip = ip_from_v4(inner.dst_addr);
    err.ip_len = u16::from_be_bytes(ip.tot_len);
    err.v4 = true;
    err.icmp = icmp as u16;
    err.inner_ip = inner_ip as u16;
    err.inner_l4 = (inner_ip + inner_ihl) as u16;
    finish(ctx, err)
}

/// IPv6 header fields read here: next header, payload length, addresses.
const V6_PAYLOAD_LEN: usize = 4;
const V6_NEXT_HDR: usize = 6;
const V6_SRC: usize = 8;
const V6_DST: usize = 24;

#[inline(never)]
fn parse_v6(ctx: &TcContext, err: &mut IcmpError) -> bool {
    // Fields are loaded one by one, addresses straight into `err` as `Ip`s (same bytes):
    // two whole IPv6 headers would not fit the stack frame next to the rest.
    let ip = EthHdr::LEN;
    if ctx.load::<u8>(ip + V6_NEXT_HDR) != Ok(PROTO_ICMPV6) {
        return false;
    }
    let icmp = ip + Ipv6Hdr::LEN;
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    if !matches!(ctx.load::<u8>(icmp), Ok(1..=4)) {
        return false;
    }
    let inner_ip = icmp + ICMP_HDR_LEN;
    if ctx.load::<u8>(inner_ip + V6_NEXT_HDR) != Ok(u8::from(IpProto::Tcp)) {
        return false;
    }
    let (Ok(payload_len), Ok(src), Ok(dst), Ok(inner_src), Ok(inner_dst)) = (
        ctx.load::<[u8; 2]>(ip + V6_PAYLOAD_LEN),
        ctx.load::<Ip>(ip + V6_SRC),
        ctx.load::<Ip>(ip + V6_DST),
        ctx.load::<Ip>(inner_ip + V6_SRC),
        ctx.load::<Ip>(inner_ip + V6_DST),
    ) else {
        return false;
    };
    // IPv4-mapped addresses in an IPv6 header would look like IPv4 flows in the tables.
    if ip_is_v4(&src) || ip_is_v4(&dst) || ip_is_v4(&inner_src) || ip_is_v4(&inner_dst) {
        return false;
    }
    let Some(ip_len) = u16::from_be_bytes(payload_len).checked_add(Ipv6Hdr::LEN as u16) else {
        return false;
    };
    err.outer_src = src;
    err.outer_dst = dst;
    err.inner.src_ip = inner_src;
    err.inner.dst_ip = inner_dst;
    err.ip_len = ip_len;
    err.v4 = false;
    err.icmp = icmp as u16;
    err.inner_ip = inner_ip as u16;
    err.inner_l4 = (inner_ip + Ipv6Hdr::LEN) as u16;
    finish(ctx, err)
}

/// The embedded ports; false when they are cut off or the error is not addressed to the
/// embedded packet's source.
#[inline(never)]
fn finish(ctx: &TcContext, err: &mut IcmpError) -> bool {
    let Ok(ports) = ctx.load::<[u16; 2]>(usize::from(err.inner_l4)) else {
        return false;
    };
    err.inner.src_port = ports[0];
    err.inner.dst_port = ports[1];
    err.outer_dst == err.inner.src_ip
}

/// Which side of a flow the error goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    None,
    Client,
    Broker,
}

/// The flow the embedded packet belongs to: its translation into `t` (the other side as
/// that side sees it), and the side that gets the error. Lookups only: no state changes.
#[inline(never)]
fn flow_of(inner: &FlowKey, t: &mut FlowKey) -> Side {
    let key = inner.reversed();
    // The embedded packet went to a client: the reply to it would be a client packet.
    // SAFETY: map values copied at once (portmap's module doc).
    if let Some(f) = unsafe { FLOWS.get(&key) } {
        *t = f.translated;
        return Side::Broker;
    }
    // SAFETY: as above.
    if let Some(f) = unsafe { REPLIES.get(&key) } {
        *t = f.translated;
        return Side::Client;
    }
    // SAFETY: as above.
    if let Some(e) = unsafe { EMBRYOS.get(&key) } {
        *t = e.translated;
        return Side::Broker;
    }
    // SAFETY: as above.
    if let Some(f) = unsafe { EMBRYO_REPLIES.get(&key) } {
        *t = f.translated;
        return Side::Client;
    }
    Side::None
}

/// Routes, rewrites, counts and sends the error to `t.dst`.
#[inline(never)]
fn translate(ctx: &TcContext, err: &IcmpError, t: &FlowKey, to_client: bool) -> i32 {
    // A flow never changes family; an error that would is not written into the wrong
    // header layout.
    if ip_is_v4(&t.dst_ip) != err.v4 {
        return drop_error();
    }
    let outer = FlowKey {
        src_ip: t.src_ip,
        dst_ip: t.dst_ip,
        src_port: 0,
        dst_port: 0,
    };
    let hop = match ctx.route(&outer, err.v4, err.ip_len) {
        Route::Send(hop) => hop,
        Route::Pass => return TC_ACT_UNSPEC,
        Route::NoRoute => return drop_error(),
    };
    if rewrite_outer(ctx, err, t).is_err() || rewrite_inner(ctx, err, t).is_err() {
        return drop_error();
    }
    let sent = ctx.send(&hop);
    match sent {
        Ok(action) => {
            count(if to_client {
                Count::ToClient
            } else {
                Count::ToBroker
            });
            action
        }
        Err(_) => drop_error(),
    }
}

enum Count {
    ToClient,
    ToBroker,
    Dropped,
}

#[inline(always)]
fn count(what: Count) {
    if let Some(p) = ICMP.get_ptr_mut(0) {
        // SAFETY: this CPU's copy of a per-CPU array value, written by no other program
        // run at the same time (TC runs with bottom halves off and cannot migrate).
        let s = unsafe { &mut *p };
        match what {
            Count::ToClient => s.to_client += 1,
            Count::ToBroker => s.to_broker += 1,
            Count::Dropped => s.dropped += 1,
        }
    }
}

/// Drops an error about a tracked flow that cannot be sent on (counted).
#[inline(always)]
fn drop_error() -> i32 {
    count(Count::Dropped);
    TC_ACT_SHOT as i32
}

/// Outer addresses: from the node's address on the far side to the flow's end there.
/// IPv4's header checksum covers them; ICMPv6's checksum does through its pseudo-header.
#[inline(never)]
fn rewrite_outer(ctx: &TcContext, err: &IcmpError, t: &FlowKey) -> Result<(), i64> {
    let v4 = err.v4;
    let icmp_csum = usize::from(err.icmp) + 2;
    let first = if v4 { 3 } else { 0 };
    for (src, from, to) in [
        (true, &err.outer_src, &t.src_ip),
        (false, &err.outer_dst, &t.dst_ip),
    ] {
        let base = addr_offset(v4, src);
        for i in first..4 {
            if from[i] != to[i] {
                let (o, n) = (u64::from(from[i]), u64::from(to[i]));
                if v4 {
                    ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4)?;
                } else {
                    ctx.l4_csum_replace(icmp_csum, o, n, u64::from(BPF_F_PSEUDO_HDR) | 4)?;
                }
                ctx.store(base + 4 * (i - first), &to[i], 0)?;
            }
        }
    }
    Ok(())
}

/// The embedded packet becomes what the flow's far end sent: `t` reversed.
#[inline(never)]
fn rewrite_inner(ctx: &TcContext, err: &IcmpError, t: &FlowKey) -> Result<(), i64> {
    let v4 = err.v4;
    let icmp_csum = usize::from(err.icmp) + 2;
    let inner_ip = usize::from(err.inner_ip);
    let inner_l4 = usize::from(err.inner_l4);
    let tcp_csum = inner_l4 + 16;
    // The embedded TCP checksum, if the error quotes that much of the header.
    let old_tcp = ctx.load::<u16>(tcp_csum).ok();
    let mut tcp = old_tcp.unwrap_or(0);
    let new = t.reversed();
    let old = &err.inner;
    let first = if v4 { 3 } else { 0 };
    let (src_off, dst_off) = if v4 { (12, 16) } else { (8, 24) };
    for (off, from, to) in [
        (src_off, &old.src_ip, &new.src_ip),
        (dst_off, &old.dst_ip, &new.dst_ip),
    ] {
        for i in first..4 {
            if from[i] != to[i] {
                let (o, n) = (u64::from(from[i]), u64::from(to[i]));
                if v4 {
                    // The embedded header's own checksum. A header with a right checksum
                    // sums to zero, so the ICMP checksum needs no change for these words.
                    ctx.l3_csum_replace(inner_ip + 10, o, n, 4)?;
                } else {
                    ctx.l4_csum_replace(icmp_csum, o, n, 4)?;
                }
                tcp = csum::replace4(tcp, from[i], to[i]);
                ctx.store(inner_ip + off + 4 * (i - first), &to[i], 0)?;
            }
        }
    }
    for (off, from, to) in [
        (0, old.src_port, new.src_port),
        (2, old.dst_port, new.dst_port),
    ] {
        if from != to {
            ctx.l4_csum_replace(icmp_csum, u64::from(from), u64::from(to), 2)?;
            tcp = csum::replace2(tcp, from, to);
            ctx.store(inner_l4 + off, &to, 0)?;
        }
    }
    if let Some(old_tcp) = old_tcp {
        ctx.l4_csum_replace(icmp_csum, u64::from(old_tcp), u64::from(tcp), 2)?;
        ctx.store(tcp_csum, &tcp, 0)?;
    }
    Ok(())
}
