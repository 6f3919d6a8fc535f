use which::which;

/// Rebuild the eBPF programs when bpf-linker changes (aya's template does the same):
/// cargo does not otherwise know the linker is an input.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
