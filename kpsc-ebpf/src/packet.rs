//! Header parsing shared by the programs.
//!
//! `TcContext::load` copies bytes out with `bpf_skb_load_bytes`, which checks the range at
//! run time (a packet too short for a header gives `None`), so no pointer into packet data
//! is kept and the verifier needs no bounds checks here. The header types are plain byte
//! arrays and integers, valid for any bytes the helper writes.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
};

/// An unfragmented IPv4 TCP packet's headers.
pub struct Ipv4Tcp {
    pub ip: Ipv4Hdr,
    pub tcp: TcpHdr,
    /// Offset of the TCP header from the start of the frame.
    pub l4: usize,
}

/// Parses Ethernet + IPv4 + TCP. None for anything else, including IP fragments (any
/// offset or more-fragments): those are left to the stack.
#[inline(always)]
pub fn ipv4_tcp(ctx: &TcContext) -> Option<Ipv4Tcp> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if !matches!(eth.ether_type(), Ok(EtherType::Ipv4)) {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).ok()?;
    if ip.proto != u8::from(IpProto::Tcp) {
        return None;
    }
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return None;
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < Ipv4Hdr::LEN {
        return None;
    }
    let l4 = EthHdr::LEN + ihl;
    let tcp: TcpHdr = ctx.load(l4).ok()?;
    Some(Ipv4Tcp { ip, tcp, l4 })
}
