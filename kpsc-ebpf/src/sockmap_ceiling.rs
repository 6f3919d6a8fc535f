//! `kpsc_sockmap_ceiling`: a benchmark probe, not a kpscd data path. It measures the most
//! any sockmap design of `kpscd proxy` could reach on this kernel: every skb that arrives
//! on a socket in CEILING_SOCKETS is redirected, whole, to its peer socket's egress, so
//! the kernel carries every byte and userspace none. It knows nothing of Kafka framing,
//! so it cannot rewrite a response or keep two writers in order; kpsc-bench's
//! `sockmap-ceiling` target runs it against the benchmark sink to compare with splice.
//!
//! Attached to the map as a verdict without a stream parser: it runs once per skb as TCP
//! delivers it (a parser would make the kernel buffer whole messages first).
//! Kept in its own object so loading it creates none of portmap's maps.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use kpsc_common::sockmap_ceiling::{COUNTER_PASSED, COUNTER_REDIRECTED, COUNTERS, MAX_SOCKETS};

/// Every forwarded socket, keyed by its own cookie.
#[map(name = "CEILING_SOCKETS")]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> the peer socket's cookie.
#[map(name = "CEILING_PEERS")]
static PEERS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> bytes redirected to it so far. Userspace waits until the socket's TCP
/// stream holds them before it sends a FIN, which would otherwise overtake bytes still on
/// the redirect backlog. Each socket has one source (its peer), whose verdict runs one skb
/// at a time, so a plain add is safe.
#[map(name = "CEILING_DELIVERED")]
static DELIVERED: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Bytes redirected and bytes passed to userspace (which should stay 0).
#[map(name = "CEILING_COUNTERS")]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

fn count(index: u32, bytes: u32) {
    if let Some(slot) = COUNTS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; the program is not preempted by itself on one CPU.
        unsafe { *slot += u64::from(bytes) };
    }
}

#[stream_verdict]
pub fn kpsc_sockmap_ceiling(ctx: SkBuffContext) -> u32 {
    // SAFETY: the program's context pointer is the helper's only argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain lookup, copied at once.
    let Some(mut peer) = (unsafe { PEERS.get(&cookie) }).copied() else {
        // Peer not registered yet (or gone): userspace gets the bytes and counts them.
        count(COUNTER_PASSED, ctx.len());
        return SK_PASS;
    };
    count(COUNTER_REDIRECTED, ctx.len());
    if let Some(delivered) = DELIVERED.get_ptr_mut(&peer) {
        // SAFETY: only this socket's verdict writes the peer's entry (see DELIVERED).
        unsafe { *delivered += u64::from(ctx.len()) };
    }
    // Flags 0: the peer's egress (its send queue, via the psock backlog worker). A failed
    // redirect (peer left the map) drops the skb: its connection is ending.
    SOCKETS.redirect_skb(&ctx, &mut peer, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: `license` is the section the loader reads the program's license from (a C
// string); LICENSE is the only symbol of that name. GPL-compatible: sk_skb redirects need
// it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
