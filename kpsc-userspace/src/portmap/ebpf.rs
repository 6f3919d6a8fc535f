//! The kernel programs built from `kpsc-ebpf` and embedded in this binary.

/// The BPF object file (ELF) for bpfel, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpsc"));

/// Adds the capabilities to a permission error from the kernel, so the operator knows
/// what to grant.
pub fn privilege_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        e.context("loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root)")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpsc_common::portmap::PROGRAM;

    #[test]
    fn object_is_an_elf_with_the_portmap_program() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        let name = PROGRAM.as_bytes();
        assert!(OBJECT.windows(name.len()).any(|w| w == name));
    }
}
