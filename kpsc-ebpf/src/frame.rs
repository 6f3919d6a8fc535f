//! What the portmap logic (`portmap`) needs from the program type it runs in: the headers,
//! a route for the translated packet, the rewrite, and the send. `tc` and `xdp` implement
//! it; the flow and NAT logic exists once.

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use kpsc_common::FlowKey;

use crate::packet::Headers;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The next hop of a translated packet, from `bpf_fib_lookup`.
pub struct Hop {
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The neighbour's MAC is known (else TC lets the kernel resolve it).
    pub resolved: bool,
}

pub enum Route {
    Send(Hop),
    /// This program type cannot send it: leave the packet untouched for the next stage
    /// (XDP passes it up to TC, which translates it there).
    Pass,
    NoRoute,
}

/// Why the rewrite or the send failed (the program counts it as a rewrite drop).
pub struct Failed;

pub trait Frame {
    /// Leave the packet to the stack (or to the next program).
    const PASS: i32;
    /// No run of this logic follows this program type's (TC; XDP passes up to TC): only
    /// the last hook counts the packets it passes on, so each counts once.
    const LAST_HOOK: bool;
    const DROP: i32;
    fn headers(&self) -> Option<Headers>;
    /// Where a packet translated to `to` (IPv4 if `v4`) goes next.
    fn route(&self, to: &FlowKey, v4: bool, ip_len: u16) -> Route;
    /// Rewrites addresses and ports from `old` to `new` (one family, `v4` or IPv6),
    /// keeping the IPv4 header checksum and the TCP checksum (its pseudo-header holds the
    /// addresses, all 128 bits of them in IPv6) right.
    fn rewrite(&self, l4: usize, v4: bool, old: &FlowKey, new: &FlowKey) -> Result<(), Failed>;
    /// Sets the MACs and hands the packet to `hop`; returns the program's verdict.
    fn send(&self, hop: &Hop) -> Result<i32, Failed>;
}

/// Route lookup parameters for a packet translated to `to` (IPv4 if `v4`), arriving on
/// `ifindex`. `tot_len` 0 leaves the MTU check to the kernel (needed for TC's GSO
/// packets).
#[inline(always)]
pub fn fib_params(to: &FlowKey, v4: bool, ifindex: u32, tot_len: u16) -> FibParams {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = 6;
    params.sport = to.src_port;
    params.dport = to.dst_port;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    if v4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = to.src_ip[3];
        params.__bindgen_anon_4.ipv4_dst = to.dst_ip[3];
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = to.src_ip;
        params.__bindgen_anon_4.ipv6_dst = to.dst_ip;
    }
    params
}

/// Offset of the first address word the rewrite touches in the frame, source or
/// destination: IPv4 holds only word 3 of its mapped form; IPv6 all four.
#[inline(always)]
pub fn addr_offset(v4: bool, src: bool) -> usize {
    use network_types::eth::EthHdr;
    match (v4, src) {
        (true, true) => EthHdr::LEN + 12,
        (true, false) => EthHdr::LEN + 16,
        (false, true) => EthHdr::LEN + 8,
        (false, false) => EthHdr::LEN + 24,
    }
}
