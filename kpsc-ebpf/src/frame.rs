//! What the portmap logic (`portmap`) needs from the program type it runs in: the headers,
//! a route for the translated packet, the rewrite, and the send. `tc` and `xdp` implement
//! it; the flow and NAT logic exists once.

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use kpsc_common::FlowKey;

use crate::packet::Ipv4Tcp;

const AF_INET: u8 = 2;

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
    const DROP: i32;
    fn headers(&self) -> Option<Ipv4Tcp>;
    /// Where a packet translated to `to` goes next.
    fn route(&self, to: &FlowKey, ip_len: u16) -> Route;
    /// Rewrites addresses and ports from `old` to `new`, keeping IP and TCP checksums right.
    fn rewrite(&self, l4: usize, old: &FlowKey, new: &FlowKey) -> Result<(), Failed>;
    /// Sets the MACs and hands the packet to `hop`; returns the program's verdict.
    fn send(&self, hop: &Hop) -> Result<i32, Failed>;
}

/// Route lookup parameters for a packet translated to `to`, arriving on `ifindex`.
/// `tot_len` 0 leaves the MTU check to the kernel (needed for TC's GSO packets).
#[inline(always)]
pub fn fib_params(to: &FlowKey, ifindex: u32, tot_len: u16) -> FibParams {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = 6;
    params.sport = to.src_port;
    params.dport = to.dst_port;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = to.src_ip;
    params.__bindgen_anon_4.ipv4_dst = to.dst_ip;
    params
}
