//! A SYN flooder: TCP segments with spoofed source addresses, written with a raw socket so
//! the tests need no extra tool. Sources must lie in 198.18.0.0/15 or 2001:2::/48 (the
//! benchmark ranges the test namespaces use), so whatever answers them stays inside those
//! namespaces.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP flags of the segments the sender makes.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A TCP header without options; the checksum is left to the caller (`pseudo` is the
/// family's pseudo-header).
fn tcp_segment(pseudo: &[u8], ports: (u16, u16), seq: u32, ack: u32, flags: u8) -> [u8; TCP_LEN] {
    let mut tcp = [0u8; TCP_LEN];
    tcp[0..2].copy_from_slice(&ports.0.to_be_bytes());
    tcp[2..4].copy_from_slice(&ports.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = checksum(&[pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

const TCP_LEN: usize = 20;

/// An address family the sender spoofs: its test range, its packets and its socket.
pub trait Spoofed: Copy + std::fmt::Display {
    /// The raw socket's family (IPPROTO_RAW: the packet carries its own IP header).
    const DOMAIN: libc::c_int;
    /// Whether the address lies in the test range of its family.
    fn in_test_range(self) -> bool;
    /// One IP + TCP segment without payload, valid checksums.
    fn segment(from: (Self, u16), to: (Self, u16), seq: u32, ack: u32, flags: u8) -> Vec<u8>;
    /// Sends `packet` to `dst` on the raw socket `fd`; sendto's result.
    fn send_to(fd: i32, packet: &[u8], dst: Self) -> isize;
}

impl Spoofed for Ipv4Addr {
    const DOMAIN: libc::c_int = libc::AF_INET;

    /// 198.18.0.0/15.
    fn in_test_range(self) -> bool {
        let [a, b, ..] = self.octets();
        a == 198 && (b == 18 || b == 19)
    }

    fn segment(
        (src, src_port): (Self, u16),
        (dst, dst_port): (Self, u16),
        seq: u32,
        ack: u32,
        flags: u8,
    ) -> Vec<u8> {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + TCP_LEN) as u16).to_be_bytes());
        ip[8] = 64; // TTL
        ip[9] = 6; // TCP
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let ip_sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
        let tcp = tcp_segment(&pseudo, (src_port, dst_port), seq, ack, flags);
        [&ip[..], &tcp].concat()
    }

    fn send_to(fd: i32, packet: &[u8], dst: Self) -> isize {
        // SAFETY: an all-zero sockaddr_in is valid; the fields that matter are set.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: `packet` and `to` are valid for the lengths passed.
        unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
    }
}

impl Spoofed for Ipv6Addr {
    const DOMAIN: libc::c_int = libc::AF_INET6;

    /// 2001:2::/48.
    fn in_test_range(self) -> bool {
        matches!(self.segments(), [0x2001, 2, 0, ..])
    }

    fn segment(
        (src, src_port): (Self, u16),
        (dst, dst_port): (Self, u16),
        seq: u32,
        ack: u32,
        flags: u8,
    ) -> Vec<u8> {
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
        ip[6] = 6; // next header: TCP
        ip[7] = 64; // hop limit
        ip[8..24].copy_from_slice(&src.octets());
        ip[24..40].copy_from_slice(&dst.octets());
        // RFC 8200 8.1: both addresses, the upper-layer length (32 bits), 3 zero bytes
        // and the next header.
        let mut pseudo = [0u8; 40];
        pseudo[0..32].copy_from_slice(&ip[8..40]);
        pseudo[34..36].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
        pseudo[39] = 6;
        let tcp = tcp_segment(&pseudo, (src_port, dst_port), seq, ack, flags);
        [&ip[..], &tcp].concat()
    }

    fn send_to(fd: i32, packet: &[u8], dst: Self) -> isize {
        // SAFETY: an all-zero sockaddr_in6 is valid; the fields that matter are set (the
        // port must stay 0 on an IPPROTO_RAW socket).
        let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        to.sin6_addr.s6_addr = dst.octets();
        // SAFETY: `packet` and `to` are valid for the lengths passed.
        unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// A raw socket of family `A` that sends hand-made segments (root only). Closed on drop.
pub struct RawSender<A> {
    fd: i32,
    family: std::marker::PhantomData<A>,
}

/// Sends IPv4 segments.
pub type SynSender = RawSender<Ipv4Addr>;
/// Sends IPv6 segments.
pub type SynSender6 = RawSender<Ipv6Addr>;

impl<A: Spoofed> RawSender<A> {
    /// Opens the socket in the calling thread's network namespace.
    pub fn new() -> anyhow::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned by the value and closed on drop.
        let fd = unsafe { libc::socket(A::DOMAIN, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            family: std::marker::PhantomData,
        })
    }

    /// Sends one SYN; waits out a full transmit queue rather than lose the packet.
    pub fn send(
        &self,
        src: A,
        src_port: u16,
        dst: A,
        dst_port: u16,
        seq: u32,
    ) -> anyhow::Result<()> {
        self.send_segment((src, src_port), (dst, dst_port), seq, 0, SYN)
    }

    /// Sends one segment with `flags` (FIN, SYN, RST, ACK) and acknowledgement number `ack`.
    pub fn send_segment(
        &self,
        from: (A, u16),
        to: (A, u16),
        seq: u32,
        ack: u32,
        flags: u8,
    ) -> anyhow::Result<()> {
        if !from.0.in_test_range() {
            bail!("spoofed source {} is outside the test ranges", from.0);
        }
        let packet = A::segment(from, to, seq, ack, flags);
        loop {
            if A::send_to(self.fd, &packet, to.0) >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(e).context("sending a raw segment");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl<A> Drop for RawSender<A> {
    fn drop(&mut self) {
        // SAFETY: fd is ours and open.
        unsafe { libc::close(self.fd) };
    }
}

/// Sends `count` SYNs to `dst:dst_port` from the addresses `source(i)` (source ports and
/// sequence numbers vary per packet), spread evenly over `over`. Call it from a thread in
/// the namespace the flood comes from. Returns how many were sent.
pub fn flood<A: Spoofed>(
    dst: A,
    dst_port: u16,
    count: u32,
    over: Duration,
    source: impl Fn(u32) -> A,
) -> anyhow::Result<u32> {
    let sender = RawSender::<A>::new()?;
    const BURST: u32 = 500;
    let bursts = count.div_ceil(BURST).max(1);
    let started = Instant::now();
    for i in 0..count {
        sender.send(source(i), 1024 + (i % 64_000) as u16, dst, dst_port, i)?;
        if (i + 1) % BURST == 0 {
            let due = over.mul_f64(f64::from((i + 1) / BURST) / f64::from(bursts));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(count)
}

/// The flood's sources as a flood from a few hosts plus a spread one looks: even packets
/// from 50,000 addresses in 198.19.0.0/16, odd ones from 198.18.200.1 and .2. None is a
/// client or broker address of the namespace topologies.
pub fn few_and_many_sources(i: u32) -> Ipv4Addr {
    if i.is_multiple_of(2) {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (i / 2) % 50_000)
    } else {
        Ipv4Addr::new(198, 18, 200, 1 + (i / 2 % 2) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let p = Ipv4Addr::segment(
            (Ipv4Addr::new(198, 19, 1, 2), 4242),
            (Ipv4Addr::new(198, 18, 1, 1), 9093),
            7,
            9,
            ACK,
        );
        assert_eq!(checksum(&[&p[..20]]), 0, "IP header checksum");
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&p[12..16]);
        pseudo[4..8].copy_from_slice(&p[16..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "TCP checksum");
    }

    #[test]
    fn flood_sources_stay_in_the_test_range() {
        assert!((0..200_000).all(|i| few_and_many_sources(i).in_test_range()));
    }

    #[test]
    fn ipv6_syn_checksums_verify() {
        let src: Ipv6Addr = "2001:2:0:ff00::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:2:0:1::1".parse().unwrap();
        let p = Ipv6Addr::segment((src, 4242), (dst, 9093), 7, 9, SYN);
        assert_eq!(p.len(), 60);
        assert_eq!(p[0] >> 4, 6, "version");
        let mut pseudo = [0u8; 40];
        pseudo[0..32].copy_from_slice(&p[8..40]);
        pseudo[35] = TCP_LEN as u8;
        pseudo[39] = 6;
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0, "TCP checksum");
        // A wrong address in the pseudo-header fails it: the addresses are covered.
        pseudo[31] ^= 1;
        assert_ne!(checksum(&[&pseudo, &p[40..]]), 0);
    }

    #[test]
    fn sources_outside_the_test_range_are_refused() {
        let err = flood(Ipv4Addr::LOCALHOST, 9, 1, Duration::ZERO, |_| {
            Ipv4Addr::new(10, 0, 0, 1)
        });
        assert!(err.is_err());
        let outside: Ipv6Addr = "2001:3::1".parse().unwrap();
        let err = flood(Ipv6Addr::LOCALHOST, 9, 1, Duration::ZERO, |_| outside);
        assert!(err.is_err());
        assert!(
            "2001:2:0:ffff::1"
                .parse::<Ipv6Addr>()
                .unwrap()
                .in_test_range()
        );
        assert!(!"2001:2:1::1".parse::<Ipv6Addr>().unwrap().in_test_range());
    }
}
