//! Incremental Internet checksum updates (RFC 1624) computed in the program, for packet
//! bytes it rewrites itself (XDP) or checksums no kernel helper keeps (the TCP checksum
//! inside an ICMP error). Values are read from the frame in native byte order: one's
//! complement sums do not depend on it.

/// One's complement sum folded to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, for a 32-bit field.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// The same for a 16-bit field.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}
