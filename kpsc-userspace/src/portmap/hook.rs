//! Which kernel hook translates packets (`--attach`): the choice `auto` makes, and what a
//! refused native XDP attach tells the operator (the interface's driver).

use std::ffi::CStr;

use crate::config::portmap::AttachMode;

/// A resolved `--attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress only.
    Tc,
    /// Native XDP in front of TC ingress.
    Xdp,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Tc => "tc",
            Hook::Xdp => "xdp",
        }
    }
}

/// The hook for `mode`, and why (logged at start).
pub fn choose(mode: AttachMode) -> (Hook, &'static str) {
    match mode {
        AttachMode::Tc => (Hook::Tc, "--attach tc"),
        AttachMode::Xdp => (Hook::Xdp, "--attach xdp"),
        AttachMode::Auto => (Hook::Tc, AUTO_REASON),
    }
}

/// Why `auto` is TC, from the measurements in the README ("TC or XDP", docs/bench/xdp):
/// on veth, the one driver measured, XDP matched TC on small requests and connection
/// churn and was ahead on bulk, but there it is correct only when the veth peers send
/// full checksums and receive with GRO on, which kpscd cannot see from its namespace;
/// no NIC driver could be measured here, so XDP stays opt-in.
const AUTO_REASON: &str = "auto: tc (measured on veth: XDP equal on small requests and churn, \
     ahead on bulk, but correct only if the peers send full checksums, which kpscd cannot \
     check; NIC drivers unmeasured: use --attach xdp to opt in)";

/// The driver behind `iface` (ethtool's driver name, e.g. `veth`, `virtio_net`), or
/// "unknown" when the interface does not say.
pub fn driver(iface: &str) -> String {
    driver_of(iface).unwrap_or_else(|| "unknown".to_owned())
}

/// ETHTOOL_GDRVINFO's reply (linux/ethtool.h), only the fields up to the driver name used.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

fn driver_of(iface: &str) -> Option<String> {
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: DrvInfo and ifreq are plain C structs for which all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with a NUL-terminated name and ifru_data pointing at a
    // DrvInfo that lives across the call; the kernel writes at most size_of::<DrvInfo>().
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let driver = CStr::from_bytes_until_nul(&info.driver).ok()?;
    Some(driver.to_string_lossy().into_owned()).filter(|d| !d.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_driver_and_auto_explains_itself() {
        // lo answers ETHTOOL_GDRVINFO with an empty driver name, or not at all.
        assert_eq!(driver("lo"), "unknown");
        assert_eq!(driver("no-such-interface-x"), "unknown");
        let (hook, why) = choose(AttachMode::Auto);
        assert_eq!(why, AUTO_REASON);
        assert_eq!(choose(AttachMode::Xdp).0, Hook::Xdp);
        assert_eq!(hook, Hook::Tc);
    }
}
