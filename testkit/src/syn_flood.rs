//! A SYN flooder: TCP SYNs with spoofed source addresses, written with a raw socket so the
//! tests need no extra tool. Sources must lie in 198.18.0.0/15 (the benchmark range the
//! test namespaces use), so whatever answers them stays inside those namespaces.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// 198.18.0.0/15.
fn in_test_range(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 198 && (b == 18 || b == 19)
}

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

/// One IPv4 + TCP segment without payload (20 + 20 bytes, valid checksums).
fn segment(
    (src, src_port): (Ipv4Addr, u16),
    (dst, dst_port): (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = checksum(&[&pseudo, &p[20..]]);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// A raw IPv4 socket that sends hand-made SYNs (root only). Closed on drop.
pub struct SynSender {
    fd: i32,
}

impl SynSender {
    /// Opens the socket in the calling thread's network namespace.
    pub fn new() -> anyhow::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned by the value and closed on drop.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Sends one SYN; waits out a full transmit queue rather than lose the packet.
    pub fn send(
        &self,
        src: Ipv4Addr,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
        seq: u32,
    ) -> anyhow::Result<()> {
        self.send_segment((src, src_port), (dst, dst_port), seq, 0, SYN)
    }

    /// Sends one segment with `flags` (FIN, SYN, RST, ACK) and acknowledgement number `ack`.
    pub fn send_segment(
        &self,
        from: (Ipv4Addr, u16),
        to_addr: (Ipv4Addr, u16),
        seq: u32,
        ack: u32,
        flags: u8,
    ) -> anyhow::Result<()> {
        let (src, dst) = (from.0, to_addr.0);
        if !in_test_range(src) {
            bail!("spoofed source {src} is outside 198.18.0.0/15");
        }
        let packet = segment(from, to_addr, seq, ack, flags);
        // SAFETY: an all-zero sockaddr_in is valid; the fields that matter are set.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        loop {
            // SAFETY: `packet` and `to` are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(e).context("sending a SYN");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for SynSender {
    fn drop(&mut self) {
        // SAFETY: fd is ours and open.
        unsafe { libc::close(self.fd) };
    }
}

/// Sends `count` SYNs to `dst:dst_port` from the addresses `source(i)` (source ports and
/// sequence numbers vary per packet), spread evenly over `over`. Call it from a thread in
/// the namespace the flood comes from. Returns how many were sent.
pub fn flood(
    dst: Ipv4Addr,
    dst_port: u16,
    count: u32,
    over: Duration,
    source: impl Fn(u32) -> Ipv4Addr,
) -> anyhow::Result<u32> {
    let sender = SynSender::new()?;
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
        let p = segment(
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
        assert!((0..200_000).all(|i| in_test_range(few_and_many_sources(i))));
    }

    #[test]
    fn sources_outside_the_test_range_are_refused() {
        let err = flood(Ipv4Addr::LOCALHOST, 9, 1, Duration::ZERO, |_| {
            Ipv4Addr::new(10, 0, 0, 1)
        });
        assert!(err.is_err());
    }
}
