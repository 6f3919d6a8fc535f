//! The kernel programs built from `kpsc-ebpf` and embedded in this binary.
use anyhow::Context as _;
use aya::{Ebpf, programs::SchedClassifier};
use kpsc_common::TC_PORT_COUNTER_PROG;

/// The BPF object file (ELF) for bpfel, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpsc"));

/// Loads the object and the TC port counter into the kernel (not attached).
///
/// Needs CAP_BPF and CAP_NET_ADMIN (or root); the error says so.
pub fn load_port_counter() -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(OBJECT).map_err(|e| privilege_hint(e.into()))?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_PORT_COUNTER_PROG)
        .with_context(|| format!("program {TC_PORT_COUNTER_PROG} missing from the object"))?
        .try_into()?;
    program.load().map_err(|e| privilege_hint(e.into()))?;
    Ok(ebpf)
}

pub fn privilege_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        e.context("loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN (or root)")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_is_an_elf_with_the_port_counter() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        let obj = aya_obj_names(OBJECT);
        assert!(obj.iter().any(|n| n == TC_PORT_COUNTER_PROG), "{obj:?}");
    }

    /// Program names in the object, parsed without the kernel.
    fn aya_obj_names(bytes: &[u8]) -> Vec<String> {
        aya::Ebpf::load(bytes)
            .map(|e| e.programs().map(|(n, _)| n.to_owned()).collect())
            .unwrap_or_else(|_| {
                // Without privileges Ebpf::load fails creating maps; fall back to a byte search
                // for the section name, which still proves the program is embedded.
                let needle = TC_PORT_COUNTER_PROG.as_bytes();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    vec![TC_PORT_COUNTER_PROG.to_owned()]
                } else {
                    vec![]
                }
            })
    }

    /// The verifier accepts the program (CI runs as root, as the daemon would).
    #[test]
    fn port_counter_passes_the_verifier() {
        if !nix_is_root() {
            eprintln!("skipped: loading BPF needs root or CAP_BPF+CAP_NET_ADMIN");
            return;
        }
        let ebpf = load_port_counter().expect("load into the kernel");
        assert!(ebpf.map(kpsc_common::PORT_COUNTERS_MAP).is_some());
    }

    fn nix_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
    }
}
