//! The portmap logic: per-port DNAT/SNAT to the brokers, in the kernel. It runs on TC
//! ingress (`kpsc_portmap`, module `tc`) and, with `--attach xdp`, first in XDP
//! (`kpsc_portmap_xdp`, module `xdp`), which passes up to TC whatever it cannot send
//! itself; both run this same code through the `Frame` trait, on the same maps.
//!
//! A TCP packet to `<node>:<mapped port>` is rewritten to `<snat ip>:<port'> ->
//! <broker>:<broker port>` and redirected towards the broker; the broker's replies, which
//! come back to the node because of the SNAT, are rewritten to `<node>:<mapped port> ->
//! <client>` and redirected towards the client. Everything else passes untouched.
//!
//! IPv4 and IPv6 run the same code on the same maps: addresses are 128-bit `Ip`s (IPv4 as
//! IPv4-mapped), so a key's family is in its address and a flow never changes family; a
//! mapped port serves only its broker's family (no translation between the two).
//!
//! Flow life:
//! - a client's SYN opens a *half-open* flow in PORTMAP_EMBRYOS (client tuple) and
//!   PORTMAP_EMBRYO_REPLIES (the translated tuple as replies arrive), two bounded LRU maps:
//!   a SYN flood only rotates them and never touches an established flow. Each source
//!   address may open `syn_rate_per_source` of them per second (PORTMAP_SOURCES);
//! - the broker's SYN-ACK (the first one that acknowledges the client's ISN, stored at SYN
//!   time) records the acknowledgement number the client must send; the
//!   client's ACK that carries it (which a spoofed source cannot see) moves the flow into
//!   PORTMAP_FLOWS/PORTMAP_REPLIES, plain hash maps that nothing evicts: at capacity new
//!   handshakes are dropped (counted), open flows keep working. Userspace removes closed
//!   and idle flows. Closed (`FlowNat::closed`) means FIN both ways, or a FIN/RST that no
//!   packet followed either way: a forged FIN/RST (no sequence check here) that the stacks
//!   ignored is followed by traffic and ends nothing;
//! - a flow keeps the translation it got on its SYN for its whole life, whatever happens to
//!   PORTMAP_TARGETS later: a map reload never breaks a connection.
//!
//! Direction is decided by the flow tables before the port map: a packet that belongs to a
//! known flow (either direction) is translated as that flow, and only a packet that belongs
//! to none is looked up as a client packet to a mapped port. Translated source ports are
//! never mapped ports nor in the node's own ephemeral range, so a broker's reply cannot look
//! like a client packet to a mapped port, whatever source port the client chose.
//!
//! Uniqueness of translated tuples: a half-open flow claims its reply tuple with a
//! BPF_NOEXIST insert into PORTMAP_EMBRYO_REPLIES and then checks PORTMAP_REPLIES (an
//! established flow that was promoted meanwhile wins, and the claim is given back); a
//! promotion inserts into PORTMAP_REPLIES with BPF_NOEXIST. Two SYNs of one flow on two CPUs:
//! both claim a tuple, one wins the BPF_NOEXIST insert into PORTMAP_EMBRYOS, the other gives
//! its tuple back and uses the winner's (re-lookup). The kernel checks and inserts under the
//! bucket lock, so two CPUs cannot both win an insert.
//!
//! A packet XDP passes up after changing flow state (it changes state, then finds it
//! cannot send) meets that state in TC: a SYN finds its half-open flow, an ACK its
//! established one, and is translated the same way; counters are bumped only when a packet
//! is sent, so nothing counts twice.
//!
//! Memory and concurrency (what the `SAFETY` comments below rely on):
//! - Packet access is the program type's (`tc`, `xdp`); the copied `ip`/`tcp` headers
//!   describe the packet as it arrived.
//! - The maps are shared by every CPU and by userspace, and preallocated (hash maps without
//!   `BPF_F_NO_PREALLOC`; LRU maps always), so an element that is deleted (userspace
//!   cleanup, promotion, reload) or evicted (LRU) can be reused for another key at once,
//!   while a pointer from an earlier lookup is still held. Hence values are copied right
//!   after the lookup, and in-place writes are limited to: FIN/RST bytes (set to 1, never cleared),
//!   `last_ns` and `closed_ns` (one aligned u64 store each), a half-open flow's SYN-ACK fields (checked against
//!   the flow's tuple first) and a source's budget (approximate by design). A write that
//!   races a reuse lands on the new owner: at worst a wrong bit or timestamp on an entry
//!   that was being deleted anyway (userspace deletes only flows closed for a minute or
//!   idle for long; promotion deletes half-open entries it owns).
//! - PORTMAP_STATS is per-CPU: a lookup returns this CPU's copy. TC and XDP programs run with
//!   bottom halves disabled and cannot migrate, so no other run of the program writes that
//!   copy while this one does; the increments are plain, not atomic. Userspace reads every
//!   CPU's copy, each `u64` whole, and is assumed not to delete or overwrite an entry while
//!   the program is attached (it only creates missing ones).

use crate::{
    frame::{Frame, Route},
    verdict::{Action, DropReason, Verdict},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, lpm_trie::Key},
};
use kpsc_common::{
    Embryo, FlowKey, FlowNat, IP_ANY, Ip, MAX_MAPPED_PORTS, PortTarget, PortmapConfig,
    PortmapStats, SourceBudget, ip_is_v4,
    portmap::{
        EMBRYO_TTL_NS, MAX_ALLOW_SOURCES, MAX_EMBRYOS, MAX_FLOWS, MAX_SNAT_ADDRESSES, MAX_SOURCES,
        PORT_ATTEMPTS, SNAT_PORT_FIRST,
    },
};
use network_types::tcp::TcpHdr;

/// listen port (host order) -> where it goes. Filled by userspace.
#[map(name = "PORTMAP_TARGETS")]
static TARGETS: HashMap<u32, PortTarget> = HashMap::pinned(MAX_MAPPED_PORTS, 0);

/// Established flows: client->node tuple -> client->node as sent to the broker.
#[map(name = "PORTMAP_FLOWS")]
pub(crate) static FLOWS: HashMap<FlowKey, FlowNat> = HashMap::pinned(MAX_FLOWS, 0);

/// Established flows: broker->node tuple (as replies arrive) -> node->client as the client
/// must see it.
#[map(name = "PORTMAP_REPLIES")]
pub(crate) static REPLIES: HashMap<FlowKey, FlowNat> = HashMap::pinned(MAX_FLOWS, 0);

/// Half-open flows by client->node tuple.
#[map(name = "PORTMAP_EMBRYOS")]
pub(crate) static EMBRYOS: LruHashMap<FlowKey, Embryo> = LruHashMap::pinned(MAX_EMBRYOS, 0);

/// Half-open flows by broker->node tuple -> node->client.
#[map(name = "PORTMAP_EMBRYO_REPLIES")]
pub(crate) static EMBRYO_REPLIES: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(MAX_EMBRYOS, 0);

/// Source address (an IPv6 source's /64) -> its SYN budget this second.
#[map(name = "PORTMAP_SOURCES")]
static SOURCES: LruHashMap<Ip, SourceBudget> = LruHashMap::pinned(MAX_SOURCES, 0);

/// `--allow-source` networks (`Ip`, IPv4 ones as ::ffff:0:0/96 + their prefix) -> 1.
/// Userspace puts ::/0 here when the list is empty, so an empty trie allows nobody.
#[map(name = "PORTMAP_ALLOW")]
static ALLOW: LpmTrie<Ip, u8> = LpmTrie::pinned(MAX_ALLOW_SOURCES, 0);

/// `--snat-address`: extra translated source addresses, filled by userspace; each port's
/// `PortTarget::snat_first`/`snat_extra` select its entries.
#[map(name = "PORTMAP_SNAT")]
static SNAT: Array<Ip> = Array::pinned(MAX_SNAT_ADDRESSES, 0);

/// Settings from userspace (entry 0).
#[map(name = "PORTMAP_CONFIG")]
static CONFIG: Array<PortmapConfig> = Array::pinned(1, 0);

/// listen port (host order) -> counters. Userspace creates the entries.
#[map(name = "PORTMAP_STATS")]
static STATS: PerCpuHashMap<u32, PortmapStats> = PerCpuHashMap::pinned(MAX_MAPPED_PORTS, 0);

const EEXIST: i32 = 17;
const SECOND_NS: u64 = 1_000_000_000;

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
fn count_drop<C: Frame>(port: u16, why: DropReason) -> i32 {
    if let Some(s) = stats(port) {
        match why {
            DropReason::NoPort => s.drop_no_port += 1,
            DropReason::NoRoute => s.drop_no_route += 1,
            DropReason::Rewrite => s.drop_rewrite += 1,
            DropReason::SourceLimit => s.drop_source_limit += 1,
            DropReason::TableFull => s.drop_table_full += 1,
            DropReason::Handshake => s.drop_handshake += 1,
            DropReason::Race => s.drop_race += 1,
            DropReason::SourceDenied => s.drop_source_denied += 1,
        }
    }
    C::DROP
}

/// Parses, decides, then sends or drops. The stages are separate BPF functions
/// (`inline(never)`), each with its own stack frame, that write their decision into one
/// `Verdict` here rather than send or return it: with 128-bit addresses, one inlined body
/// (or a call chain with a result slot per call) holds more flow keys and values at once
/// than BPF's 512-byte stack allows.
pub fn run<C: Frame>(ctx: &C) -> i32 {
    // SAFETY: Packet is integers, byte arrays and a bool: all-zero is valid.
    let mut pkt: Packet = unsafe { core::mem::zeroed() };
    if !parse(ctx, &mut pkt) {
        return C::PASS;
    }
    let mut verdict = Verdict::PASS;
    known_flow(&pkt, &mut verdict);
    if verdict.undecided() {
        half_open_flow(&pkt, &mut verdict);
    }
    if verdict.undecided() {
        new_flow(&pkt, &mut verdict);
    }
    match verdict.action {
        Action::Send => deliver(
            ctx,
            &pkt,
            &verdict.translated,
            verdict.listen_port,
            verdict.inbound,
        ),
        Action::Drop => count_drop::<C>(verdict.listen_port, verdict.why),
        Action::PassUnknownFlow => {
            if C::LAST_HOOK {
                if let Some(s) = stats(verdict.listen_port) {
                    s.unknown_flow += 1;
                }
            }
            C::PASS
        }
        Action::Pass => C::PASS,
    }
}

/// What the handlers need to know about the packet.
struct Packet {
    seen: FlowKey,
    tcp: TcpHdr,
    /// Offset of the TCP header (at most `packet::MAX_L4`); u16 like `ip_len`, to keep
    /// this struct, which lives in the bottom stack frame, small.
    l4: u16,
    ip_len: u16,
    now: u64,
    /// IPv4 (else IPv6): how the headers are laid out and routed.
    v4: bool,
}

impl Packet {
    /// A SYN without ACK: the first packet of a connection.
    #[inline(always)]
    fn syn_only(&self) -> bool {
        self.tcp.syn() != 0 && self.tcp.ack() == 0
    }

    /// The mapped port of a client packet.
    #[inline(always)]
    fn listen_port(&self) -> u16 {
        u16::from_be(self.seen.dst_port)
    }
}

/// Fills `pkt` from the headers; false: not a TCP packet the program handles.
#[inline(never)]
fn parse<C: Frame>(ctx: &C, pkt: &mut Packet) -> bool {
    let Some(h) = ctx.headers() else {
        return false;
    };
    pkt.seen = FlowKey {
        src_ip: h.src,
        dst_ip: h.dst,
        src_port: u16::from_ne_bytes(h.tcp.source),
        dst_port: u16::from_ne_bytes(h.tcp.dest),
    };
    pkt.tcp = h.tcp;
    pkt.l4 = h.l4 as u16;
    pkt.ip_len = h.ip_len;
    // SAFETY: helper without preconditions.
    pkt.now = unsafe { bpf_ktime_get_ns() };
    pkt.v4 = h.v4;
    true
}

/// A packet of an established flow, either direction.
#[inline(never)]
fn known_flow(pkt: &Packet, out: &mut Verdict) {
    let seen = &pkt.seen;
    // Known flows first, whatever their ports: direction comes from the tables.
    if let Some(p) = FLOWS.get_ptr_mut(seen) {
        // SAFETY: a non-null, aligned pointer to a shared map value, copied at once
        // (module doc).
        let flow = unsafe { *p };
        // A SYN on a finished flow's tuple is a new connection (a client or its NAT reusing
        // the source port): the old translation goes. On an open flow it is passed on for
        // the broker's stack to judge (a challenge ACK), as a spoofed SYN must not end it.
        if !(pkt.syn_only() && finished(&flow)) {
            let other = if closing(&pkt.tcp) {
                REPLIES.get_ptr_mut(flow.translated.reversed())
            } else {
                None
            };
            // SAFETY: as above; only `last_ns`, `closed_ns` and the FIN/RST bytes are
            // written, as the doc says.
            unsafe { touch(p, other, pkt.now, &pkt.tcp) };
            *out = Verdict::to_broker(pkt.listen_port(), &flow.translated);
            return;
        }
        let _ = FLOWS.remove(seen);
        let _ = REPLIES.remove(flow.translated.reversed());
    }
    if let Some(p) = REPLIES.get_ptr_mut(seen) {
        // SAFETY: as for FLOWS.
        let back = unsafe { *p };
        let other = if closing(&pkt.tcp) {
            FLOWS.get_ptr_mut(back.translated.reversed())
        } else {
            None
        };
        // SAFETY: as for FLOWS.
        unsafe { touch(p, other, pkt.now, &pkt.tcp) };
        *out = Verdict::to_client(&back.translated);
    }
}

/// A packet of a half-open flow, either direction.
#[inline(never)]
fn half_open_flow(pkt: &Packet, out: &mut Verdict) {
    let seen = &pkt.seen;
    // SAFETY: copied at once (module doc).
    if let Some(embryo) = unsafe { EMBRYOS.get(seen) }.copied() {
        embryo_from_client(pkt, &embryo, out);
        if !out.undecided() {
            return;
        }
    }
    // SAFETY: copied at once (module doc).
    if let Some(back) = unsafe { EMBRYO_REPLIES.get(seen) }.copied() {
        embryo_from_broker(pkt, &back, out);
    }
}

/// A packet of no known flow: a client's SYN to a mapped port opens one; anything else
/// to a mapped port is dropped, and the rest is not ours.
#[inline(never)]
fn new_flow(pkt: &Packet, out: &mut Verdict) {
    let seen = &pkt.seen;
    let listen_port = pkt.listen_port();
    // SAFETY: copied at once; a userspace reload racing the copy may mix two targets.
    let Some(target) = (unsafe { TARGETS.get(u32::from(listen_port)) }).copied() else {
        return;
    };
    // A port serves one family, its broker's: no translation between IPv4 and IPv6.
    if ip_is_v4(&target.broker_ip) != pkt.v4
        || (target.listen_ip != IP_ANY && target.listen_ip != seen.dst_ip)
    {
        return;
    }
    // Only a SYN opens a flow. Anything else of an unknown flow goes on to the next
    // program and the stack: it may be a reply of another portmap instance on this node
    // whose translated source port is one of our mapped ports (instances do not know
    // each other's ports), and for a flow we no longer know the stack's RST ends the
    // client's connection at once instead of leaving it to time out.
    if !pkt.syn_only() {
        *out = Verdict {
            action: Action::PassUnknownFlow,
            listen_port,
            ..Verdict::PASS
        };
        return;
    }
    // `--allow-source`: checked before any state exists for the SYN. Known flows (above)
    // are not checked again, so a reload that narrows the list ends no open connection.
    if ALLOW.get(Key::new(128, seen.src_ip)).is_none() {
        *out = Verdict::drop(listen_port, DropReason::SourceDenied);
        return;
    }
    open_embryo(pkt, &target, out);
}

/// The flow is over (`FlowNat::closed`: FIN both ways, or a FIN/RST that no packet
/// followed), or its reply side is gone.
#[inline(never)]
fn finished(flow: &FlowNat) -> bool {
    // SAFETY: copied at once (module doc).
    let reply = unsafe { REPLIES.get(flow.translated.reversed()) }.copied();
    reply.is_none_or(|r| flow.closed(&r))
}

#[inline(always)]
fn closing(tcp: &TcpHdr) -> bool {
    tcp.fin() != 0 || tcp.rst() != 0
}

/// Records activity and FIN/RST on one direction of an established flow. `last_ns` is
/// stored at most once a second, except for the first packet after a FIN/RST, which must
/// show at once: it is what tells a forged or ignored FIN/RST from a real close. A FIN/RST
/// stamps `closed_ns` into both directions' entries (`other`, looked up for those packets
/// only), so that first packet either way sees it.
///
/// # Safety
/// `p` and `other` are pointers returned by lookups in FLOWS or REPLIES during this run.
#[inline(always)]
unsafe fn touch(p: *mut FlowNat, other: Option<*mut FlowNat>, now: u64, tcp: &TcpHdr) {
    // SAFETY: the caller's pointers are valid, aligned map memory (preallocated, never
    // freed while the program runs). Each store is a single aligned u64 or u8, and
    // `fin`/`rst` are only ever set to 1, so concurrent marks from other CPUs are never
    // lost; a lost `closed_ns`/`last_ns` race between CPUs errs on whichever packet came
    // last, and the next packet corrects it.
    unsafe {
        if closing(tcp) {
            if tcp.fin() != 0 {
                (*p).fin = 1;
            }
            if tcp.rst() != 0 {
                (*p).rst = 1;
            }
            (*p).closed_ns = now;
            (*p).last_ns = now;
            if let Some(o) = other {
                (*o).closed_ns = now;
            }
        } else if now.wrapping_sub((*p).last_ns) >= SECOND_NS || (*p).last_ns <= (*p).closed_ns {
            (*p).last_ns = now;
        }
    }
}

/// A client packet of a half-open flow. None: the flow is stale and was forgotten (the
/// caller opens a fresh one for this SYN).
#[inline(never)]
fn embryo_from_client(pkt: &Packet, embryo: &Embryo, out: &mut Verdict) {
    let listen_port = pkt.listen_port();
    let reply_key = embryo.translated.reversed();
    let fresh = pkt.now.wrapping_sub(embryo.created_ns) <= EMBRYO_TTL_NS;
    // Whether this half-open flow still owns its reply side: the LRU may have evicted it,
    // and another flow taken the tuple, whose entry must then be left alone.
    // SAFETY: copied at once (module doc).
    let owned = unsafe { EMBRYO_REPLIES.get(reply_key) }
        .is_some_and(|b| b.translated == pkt.seen.reversed());
    if pkt.syn_only() {
        // A retransmitted SYN keeps the tuple while the flow is fresh and still owns it.
        if fresh && owned {
            *out = Verdict::to_broker(pkt.listen_port(), &embryo.translated);
            return;
        }
        let _ = EMBRYOS.remove(pkt.seen);
        if owned {
            let _ = EMBRYO_REPLIES.remove(reply_key);
        }
        return;
    }
    if pkt.tcp.rst() != 0 {
        let _ = EMBRYOS.remove(pkt.seen);
        if owned {
            let _ = EMBRYO_REPLIES.remove(reply_key);
        }
        *out = Verdict::to_broker(pkt.listen_port(), &embryo.translated);
        return;
    }
    if !owned {
        // Its tuple went to another flow: completing this one would take that flow's
        // reply side. The client retries with a new SYN.
        let _ = EMBRYOS.remove(pkt.seen);
        *out = Verdict::drop(listen_port, DropReason::Race);
        return;
    }
    // Only the ACK of the broker's SYN-ACK completes the handshake: a spoofed source never
    // saw that SYN-ACK, so it cannot fill the established table.
    if pkt.tcp.ack() == 0
        || embryo.synack == 0
        || !fresh
        || u32::from_be_bytes(pkt.tcp.ack_seq) != embryo.expect_ack
    {
        *out = Verdict::drop(listen_port, DropReason::Handshake);
        return;
    }
    *out = Verdict::to_broker(pkt.listen_port(), &embryo.translated);
    promote(&pkt.seen, embryo, pkt, out);
}

#[inline(always)]
fn forget_embryo(client: &FlowKey, reply_key: &FlowKey) {
    let _ = EMBRYOS.remove(client);
    let _ = EMBRYO_REPLIES.remove(reply_key);
}

/// A broker packet of a half-open flow: the SYN-ACK (recorded for the client's ACK) or a
/// RST (the broker refused: forgotten).
#[inline(never)]
fn embryo_from_broker(pkt: &Packet, back: &FlowNat, out: &mut Verdict) {
    let client = back.translated.reversed();
    if let Some(p) = EMBRYOS.get_ptr_mut(client) {
        // SAFETY: a non-null, aligned pointer to an LRU value; the tuple is checked first so
        // a half-open flow that moved to another tuple (or a reused element) is left alone;
        // the stores are single u32s.
        unsafe {
            if (*p).translated == pkt.seen.reversed() {
                // Only the first SYN-ACK that acknowledges the client's SYN is recorded:
                // a forged one (a guessed or later SYN-ACK) could otherwise set the ACK a
                // spoofed client then sends, or break the real client's.
                if pkt.tcp.syn() != 0
                    && pkt.tcp.ack() != 0
                    && (*p).synack == 0
                    && u32::from_be_bytes(pkt.tcp.ack_seq) == (*p).client_isn.wrapping_add(1)
                {
                    (*p).expect_ack = u32::from_be_bytes(pkt.tcp.seq).wrapping_add(1);
                    (*p).synack = 1;
                } else if pkt.tcp.rst() != 0 {
                    forget_embryo(&client, &pkt.seen);
                }
            }
        }
    }
    *out = Verdict::to_client(&back.translated);
}

/// Moves a half-open flow whose handshake completed into the established tables, with
/// the FIN the completing segment may carry (else that flow would look open until idle).
/// `out` holds the packet's translation; a failure replaces it with a drop.
#[inline(never)]
fn promote(client: &FlowKey, embryo: &Embryo, pkt: &Packet, out: &mut Verdict) {
    let port = u16::from_be(client.dst_port);
    let reply_key = embryo.translated.reversed();
    let fin = u8::from(pkt.tcp.fin() != 0);
    let mut entry = FlowNat {
        translated: client.reversed(),
        fin: 0,
        rst: 0,
        _pad: [0; 2],
        created_ns: embryo.created_ns,
        last_ns: pkt.now,
        closed_ns: if fin != 0 { pkt.now } else { 0 },
    };
    if let Err(e) = REPLIES.insert(&reply_key, &entry, u64::from(BPF_NOEXIST)) {
        if e != -EEXIST {
            *out = Verdict::drop(port, DropReason::TableFull);
            return;
        }
        // Another CPU promoted this very flow a moment ago: carry on with its entries.
        let same = match REPLIES.get_ptr(&reply_key) {
            // SAFETY: a non-null, aligned pointer to a map value; only its tuple is read.
            Some(r) => (unsafe { (*r).translated }) == entry.translated,
            None => false,
        };
        if !same {
            *out = Verdict::drop(port, DropReason::Race);
        }
        return;
    }
    // The same value serves the client side (one FlowNat on the stack, not two).
    entry.translated = embryo.translated;
    entry.fin = fin;
    if let Err(e) = FLOWS.insert(client, &entry, u64::from(BPF_NOEXIST)) {
        let _ = REPLIES.remove(reply_key);
        let why = if e == -EEXIST {
            DropReason::Race
        } else {
            DropReason::TableFull
        };
        *out = Verdict::drop(port, why);
        return;
    }
    forget_embryo(client, &reply_key);
    if let Some(s) = stats(port) {
        s.new_flows += 1;
    }
}

/// A client's SYN for a mapped port: a half-open flow with a tuple of its own, within the
/// source's budget.
#[inline(never)]
fn open_embryo(pkt: &Packet, target: &PortTarget, out: &mut Verdict) {
    let listen_port = pkt.listen_port();
    let config = CONFIG.get(0).copied().unwrap_or_default();
    if !within_budget(&budget_key(pkt), pkt.now, config.syn_rate_per_source) {
        *out = Verdict::drop(listen_port, DropReason::SourceLimit);
        return;
    }
    // SAFETY: FlowKey is integers and arrays: all-zero is valid.
    let mut translated: FlowKey = unsafe { core::mem::zeroed() };
    if !claim_tuple(pkt, target, &config, &mut translated) {
        *out = Verdict::drop(listen_port, DropReason::NoPort);
        return;
    }
    *out = if insert_embryo(pkt, &mut translated) {
        Verdict::to_broker(pkt.listen_port(), &translated)
    } else {
        Verdict::drop(listen_port, DropReason::Race)
    };
}

/// Records the half-open flow of `pkt` with the tuple `translated` claimed for it. When the
/// same SYN on another CPU opened this flow first, our tuple is given back and
/// `translated` becomes the winner's; false when that one vanished meanwhile.
#[inline(never)]
fn insert_embryo(pkt: &Packet, translated: &mut FlowKey) -> bool {
    let embryo = Embryo {
        translated: *translated,
        expect_ack: 0,
        created_ns: pkt.now,
        synack: 0,
        client_isn: u32::from_be_bytes(pkt.tcp.seq),
    };
    if EMBRYOS
        .insert(&pkt.seen, &embryo, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        if let Some(s) = stats(pkt.listen_port()) {
            s.embryos += 1;
        }
        return true;
    }
    let _ = EMBRYO_REPLIES.remove(translated.reversed());
    match EMBRYOS.get_ptr(&pkt.seen) {
        Some(winner) => {
            // SAFETY: a non-null, aligned pointer to an LRU value, its tuple copied at once.
            *translated = unsafe { (*winner).translated };
            true
        }
        None => false,
    }
}

/// Whose SYN budget a packet counts against: its source address, or for IPv6 the source's
/// /64 (one host usually has a whole /64 to spoof from).
#[inline(always)]
fn budget_key(pkt: &Packet) -> Ip {
    let src = &pkt.seen.src_ip;
    if pkt.v4 { *src } else { [src[0], src[1], 0, 0] }
}

/// Counts a new half-open flow against its source's budget for this second. The count is a
/// plain read-modify-write (BPF gives Rust code no atomic add here): two CPUs counting the
/// same source at once may lose an increment, so a source may get a few more than its
/// budget. The budget bounds a flood's share; it is not an exact quota.
#[inline(never)]
fn within_budget(src_ip: &Ip, now: u64, rate: u32) -> bool {
    if rate == 0 {
        return true;
    }
    let Some(p) = SOURCES.get_ptr_mut(src_ip) else {
        let fresh = SourceBudget {
            window_ns: now,
            opened: 1,
        };
        // A concurrent first SYN of the same source may win this insert: one SYN uncounted.
        let _ = SOURCES.insert(src_ip, fresh, u64::from(BPF_NOEXIST));
        return true;
    };
    // SAFETY: a non-null, aligned pointer to an LRU value; aligned single loads and
    // stores (approximate under concurrency, see above).
    unsafe {
        if now.wrapping_sub((*p).window_ns) >= SECOND_NS {
            (*p).window_ns = now;
            (*p).opened = 1;
            return true;
        }
        if (*p).opened >= u64::from(rate) {
            return false;
        }
        (*p).opened += 1;
    }
    true
}

/// Claims a free translated tuple towards `target` into `out`: a random source address
/// (the route's choice or one of the port's `--snat-address` entries) and a random source
/// port from SNAT_PORT_FIRST..=65535 outside the node's own ephemeral range and the mapped
/// ports, held by no half-open (BPF_NOEXIST) and no established flow. Each try draws both
/// afresh, so with N addresses a try fails only when that address's ports are busy too:
/// the chance that all tries fail falls with the share of busy tuples over all addresses.
#[inline(never)]
fn claim_tuple(
    pkt: &Packet,
    target: &PortTarget,
    config: &PortmapConfig,
    out: &mut FlowKey,
) -> bool {
    let (first, last) = (
        u32::from(config.local_port_first),
        u32::from(config.local_port_last),
    );
    let skip = if first >= u32::from(SNAT_PORT_FIRST) && last >= first {
        last - first + 1
    } else {
        0
    };
    let Some(count) = (65_536 - u32::from(SNAT_PORT_FIRST)).checked_sub(skip) else {
        return false;
    };
    if count == 0 {
        return false;
    }
    let back = FlowNat {
        translated: pkt.seen.reversed(),
        fin: 0,
        rst: 0,
        _pad: [0; 2],
        created_ns: pkt.now,
        last_ns: pkt.now,
        closed_ns: 0,
    };
    let mut attempt = 0;
    while attempt < PORT_ATTEMPTS {
        attempt += 1;
        // SAFETY: helper without preconditions.
        let mut port = u32::from(SNAT_PORT_FIRST) + unsafe { bpf_get_prandom_u32() } % count;
        if skip != 0 && port >= first {
            port += skip;
        }
        // SAFETY: only tested for presence.
        if unsafe { TARGETS.get(port) }.is_some() {
            continue;
        }
        *out = FlowKey {
            src_ip: snat_address(target),
            dst_ip: target.broker_ip,
            src_port: (port as u16).to_be(),
            dst_port: target.broker_port,
        };
        let reply_key = out.reversed();
        if EMBRYO_REPLIES
            .insert(&reply_key, &back, u64::from(BPF_NOEXIST))
            .is_err()
        {
            continue;
        }
        // Checked after claiming: a flow promoted with this tuple before our claim is seen
        // here (it inserts into REPLIES before giving its half-open entry up).
        // SAFETY: only tested for presence.
        if unsafe { REPLIES.get(&reply_key) }.is_some() {
            let _ = EMBRYO_REPLIES.remove(&reply_key);
            continue;
        }
        return true;
    }
    false
}

/// A random translated source address of `target`: its route's choice or one of its
/// `--snat-address` entries, equally likely.
#[inline(always)]
fn snat_address(target: &PortTarget) -> Ip {
    let extra = u32::from(target.snat_extra);
    if extra == 0 {
        return target.snat_ip;
    }
    // SAFETY: helper without preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % (extra + 1);
    if pick == 0 {
        return target.snat_ip;
    }
    // An entry userspace has not filled (a reload in progress) reads as ::, never used.
    match SNAT.get(u32::from(target.snat_first) + pick - 1) {
        Some(ip) if *ip != IP_ANY => *ip,
        _ => target.snat_ip,
    }
}

/// Routes, rewrites, counts and sends a packet of a flow. The route comes first, so a
/// program type that cannot send it (XDP) passes the packet up untouched.
#[inline(never)]
fn deliver<C: Frame>(
    ctx: &C,
    pkt: &Packet,
    translated: &FlowKey,
    listen_port: u16,
    inbound: bool,
) -> i32 {
    // Flows are keyed by family-distinct addresses, so a flow never changes family; a
    // packet that would is dropped rather than written into the wrong header layout.
    if ip_is_v4(&translated.dst_ip) != pkt.v4 {
        return count_drop::<C>(listen_port, DropReason::Rewrite);
    }
    let hop = match ctx.route(translated, pkt.v4, pkt.ip_len) {
        Route::Send(hop) => hop,
        Route::Pass => return C::PASS,
        Route::NoRoute => return count_drop::<C>(listen_port, DropReason::NoRoute),
    };
    if ctx
        .rewrite(usize::from(pkt.l4), pkt.v4, &pkt.seen, translated)
        .is_err()
    {
        return count_drop::<C>(listen_port, DropReason::Rewrite);
    }
    if let Some(s) = stats(listen_port) {
        if inbound {
            s.packets_in += 1;
            s.bytes_in += u64::from(pkt.ip_len);
        } else {
            s.packets_out += 1;
            s.bytes_out += u64::from(pkt.ip_len);
        }
    }
    match ctx.send(&hop) {
        Ok(action) => action,
        Err(_) => count_drop::<C>(listen_port, DropReason::Rewrite),
    }
}
