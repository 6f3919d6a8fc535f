//! An XDP program that passes every frame, attached to a veth so that its peer's XDP_TX
//! frames are delivered. A veth wakes its peer's receive side after XDP_TX only when that
//! peer has an XDP program (GRO on, enough for redirected frames, is not enough here): the
//! frames otherwise wait in the peer's ring until something else polls it.
//!
//! Two instructions (`r0 = XDP_PASS; exit`), loaded and attached with the bpf syscall
//! (BPF_PROG_LOAD, BPF_LINK_CREATE); detached when the link's fd closes.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-extends).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> anyhow::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *const T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The attached program; detached on drop.
pub struct XdpPass {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Attaches a pass-everything XDP program (native mode) to `dev` in the calling thread's
/// network namespace.
pub fn attach_xdp_pass(dev: &str) -> anyhow::Result<XdpPass> {
    // mov64 r0, 2 (XDP_PASS); exit.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"kpsc_pass");
    let prog = bpf(
        BPF_PROG_LOAD,
        &ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_XDP,
            ..Default::default()
        },
    )
    .context("loading the XDP pass program")?;
    let c_dev = std::ffi::CString::new(dev)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c_dev.as_ptr()) };
    if ifindex == 0 {
        bail!("interface {dev}: {}", std::io::Error::last_os_error());
    }
    use std::os::fd::AsRawFd as _;
    let link = bpf(
        BPF_LINK_CREATE,
        &LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            // 0: native mode where the driver has it (veth does).
            flags: 0,
        },
    )
    .with_context(|| format!("attaching the XDP pass program to {dev}"))?;
    Ok(XdpPass {
        _link: link,
        _prog: prog,
    })
}
