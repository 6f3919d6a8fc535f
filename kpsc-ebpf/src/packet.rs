//! Header parsing shared by the programs, over a `Load` that each program type implements
//! its own way (a helper copy for TC, a bounds-checked direct read for XDP). Headers are
//! copied out: the types are plain byte arrays and integers, valid for any bytes.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
};

/// Copies a `T` out of the frame at `offset`; None when the frame is too short.
pub trait Load {
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// Longest IPv4 header (IHL 15): bounds the TCP offset for the verifier.
pub const MAX_L4: usize = EthHdr::LEN + 60;

/// An unfragmented IPv4 TCP packet's headers.
pub struct Ipv4Tcp {
    pub ip: Ipv4Hdr,
    pub tcp: TcpHdr,
    /// Offset of the TCP header from the start of the frame (at most MAX_L4).
    pub l4: usize,
}

/// Parses Ethernet + IPv4 + TCP. None for anything else, including IP fragments (any
/// offset or more-fragments): those are left to the stack.
#[inline(always)]
pub fn ipv4_tcp<L: Load>(ctx: &L) -> Option<Ipv4Tcp> {
    let eth: EthHdr = ctx.load(0)?;
    if !matches!(eth.ether_type(), Ok(EtherType::Ipv4)) {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN)?;
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
    let tcp: TcpHdr = ctx.load(l4)?;
    Some(Ipv4Tcp { ip, tcp, l4 })
}
