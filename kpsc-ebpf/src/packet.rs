//! Header parsing shared by the programs, over a `Load` that each program type implements
//! its own way (a helper copy for TC, a bounds-checked direct read for XDP). Headers are
//! copied out: the types are plain byte arrays and integers, valid for any bytes.

use kpsc_common::{Ip, ip_from_v4, ip_is_v4};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

/// Copies a `T` out of the frame at `offset`; None when the frame is too short.
pub trait Load {
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// IPv6 extension headers walked before TCP, at most (Hop-by-Hop, Routing, Destination
/// Options; each may appear once, Destination Options twice).
const MAX_EXTENSIONS: usize = 4;
/// Longest header chain walked: the IPv6 header and 256 bytes of extension headers. It
/// bounds the TCP offset for the verifier (the longest IPv4 header, 60 bytes, is shorter).
pub const MAX_L4: usize = EthHdr::LEN + Ipv6Hdr::LEN + 256;

/// An unfragmented TCP packet's headers, IPv4 or IPv6.
pub struct Headers {
    pub tcp: TcpHdr,
    /// Offset of the TCP header from the start of the frame (at most MAX_L4).
    pub l4: usize,
    pub src: Ip,
    pub dst: Ip,
    /// The whole IP packet's length (IPv4 total length; IPv6 40 + payload length).
    pub ip_len: u16,
    pub v4: bool,
}

/// Parses Ethernet + IPv4 or IPv6 + TCP. None for anything else, which is left to the
/// stack: IPv4 fragments (any offset or more-fragments), IPv6 packets with a Fragment
/// header or any extension header other than Hop-by-Hop, Routing and Destination Options
/// (those are walked), more extension headers or bytes than MAX_EXTENSIONS/MAX_L4, and
/// IPv6 headers carrying IPv4-mapped addresses (never valid on the wire; they would look
/// like IPv4 flows in the tables).
#[inline(always)]
pub fn tcp<L: Load>(ctx: &L) -> Option<Headers> {
    let eth: EthHdr = ctx.load(0)?;
    match eth.ether_type() {
        Ok(EtherType::Ipv4) => ipv4_tcp(ctx),
        Ok(EtherType::Ipv6) => ipv6_tcp(ctx),
        _ => None,
    }
}

#[inline(always)]
fn ipv4_tcp<L: Load>(ctx: &L) -> Option<Headers> {
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
    Some(Headers {
        tcp,
        l4,
        src: ip_from_v4(ip.src_addr),
        dst: ip_from_v4(ip.dst_addr),
        ip_len: u16::from_be_bytes(ip.tot_len),
        v4: true,
    })
}

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const DESTINATION_OPTIONS: u8 = 60;

#[inline(always)]
fn ipv6_tcp<L: Load>(ctx: &L) -> Option<Headers> {
    let ip: Ipv6Hdr = ctx.load(EthHdr::LEN)?;
    let (src, dst) = (words(ip.src_addr), words(ip.dst_addr));
    if ip_is_v4(&src) || ip_is_v4(&dst) {
        return None;
    }
    let mut next = ip.next_hdr;
    let mut l4 = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut walked = 0;
    while next != u8::from(IpProto::Tcp) {
        if walked == MAX_EXTENSIONS || !matches!(next, HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS) {
            return None;
        }
        // Every one of these starts with next header and length in 8-octet units,
        // not counting the first 8.
        let ext: [u8; 2] = ctx.load(l4)?;
        next = ext[0];
        l4 += (usize::from(ext[1]) + 1) * 8;
        if l4 > MAX_L4 {
            return None;
        }
        walked += 1;
    }
    let tcp: TcpHdr = ctx.load(l4)?;
    Some(Headers {
        tcp,
        l4,
        src,
        dst,
        ip_len: u16::from_be_bytes(ip.payload_len).checked_add(Ipv6Hdr::LEN as u16)?,
        v4: false,
    })
}

/// An address's 16 bytes as the program's `Ip` (same bytes, network order).
#[inline(always)]
fn words(b: [u8; 16]) -> Ip {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
