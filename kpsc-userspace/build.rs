//! Builds kpsc-ebpf for bpfel-unknown-none with Debian's 1.96 compiler and leaves the object
//! in OUT_DIR for `include_bytes_aligned!`. That compiler is used because Debian ships a
//! prebuilt `core` for BPF with it (no build-std, which needs rust-src) and it uses the same
//! LLVM 22 that bpf-linker is built against.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// `rustup toolchain link debian-1.96 /usr`, done by `cargo xtask setup`.
const EBPF_TOOLCHAIN: &str = "debian-1.96";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "kpsc-ebpf")
        .ok_or_else(|| anyhow!("kpsc-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("kpsc-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    // aya-ebpf needs `asm_experimental_arch`; this unlocks it for that crate only on the
    // stable compiler (RUSTC_BOOTSTRAP=1 would make aya-build ask for build-std).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs the toolchain \
         (Debian rustc-web 1.96 + libstd-rust-web-dev-bpf, bpf-linker, rustup link debian-1.96)",
    )
}
