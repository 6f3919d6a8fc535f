//! The capabilities portmap needs, checked before anything is loaded so the operator is
//! told what to grant instead of getting EPERM from the kernel.

use crate::privilege::{Capability, missing_capabilities as missing_of};

pub use crate::privilege::EXIT_PRIVILEGE;

/// What portmap needs, as operators grant it (systemd's names).
pub const NEEDED: &str = "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root)";

/// The capabilities portmap needs that this process lacks. CAP_PERFMON: without it the
/// verifier refuses the program's stack pointer arithmetic ("pointer arithmetic with it
/// prohibited for !root"), found running the packaged unit with CAP_BPF and CAP_NET_ADMIN
/// only.
pub fn missing_capabilities() -> Vec<String> {
    missing_of(&[
        Capability::CAP_BPF,
        Capability::CAP_PERFMON,
        Capability::CAP_NET_ADMIN,
    ])
}
