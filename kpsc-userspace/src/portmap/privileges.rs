//! The capabilities portmap needs, checked before anything is loaded so the operator is
//! told what to grant instead of getting EPERM from the kernel.

/// Exit code when privileges are missing.
pub const EXIT_PRIVILEGE: u8 = 4;

/// What portmap needs, as operators grant it (systemd's names).
pub const NEEDED: &str = "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root)";

/// The capabilities portmap needs that this process lacks. CAP_PERFMON: without it the
/// verifier refuses the program's stack pointer arithmetic ("pointer arithmetic with it
/// prohibited for !root"), found running the packaged unit with CAP_BPF and CAP_NET_ADMIN
/// only.
pub fn missing_capabilities() -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let caps = crate::privilege::effective_caps();
    let has = |c: u32| caps & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}
