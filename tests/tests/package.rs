//! The package an operator installs: the .deb is built by `cargo xtask package`
//! (cargo-deb), unpacked into a scratch root (`dpkg-deb -x`), its units checked with
//! `systemd-analyze verify --root`, and each unit's ExecStart run the way systemd would
//! run it: as the unit's user, with exactly the unit's capabilities (setpriv) and
//! descriptor limit (prlimit), on the shipped example configuration with only its
//! placeholders replaced. A unit that verifies but cannot start is the failure this finds.
//!
//! Each runs under strace, and every system call it made must be one its unit's
//! SystemCallFilter allows. Not covered (no systemd as PID 1 on the test machine): the
//! rest of the sandboxing (ProtectSystem, RestrictAddressFamilies, ...) is verified for
//! syntax, not enforced.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
};
use kpsc_tests::{
    MockCluster, RawClient, TansuHost, Unit, eventually, free_port_base, http_get,
    netns::{NODE_CLIENT_IP, Topology, broker_ip, in_netns},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Builds the .deb once per test process with `cargo xtask package`, from the release
/// binaries already built (the test command builds them first).
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let out = workspace().join("target").join("debian");
        let _ = std::fs::remove_dir_all(&out);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .current_dir(workspace())
            .args(["xtask", "package", "--no-setup", "--no-build"])
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "cargo xtask package failed (`cargo xtask setup` installs cargo-deb): {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let debs: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        assert_eq!(debs.len(), 1, "{debs:?}");
        debs[0].clone()
    })
}

/// The package unpacked into a scratch root that also has what a Debian host with systemd
/// has and the units name (systemd's own units, /bin/sh, /bin/kill). Removed on drop.
struct ScratchRoot {
    dir: PathBuf,
    /// Absolute paths the package installed.
    packaged: BTreeSet<String>,
}

impl ScratchRoot {
    fn install(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kpsc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The units' users must reach the files (the package's own modes apply inside).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let deb = deb().to_str().unwrap();
        let unpacked = Command::new("dpkg-deb")
            .args(["-x", deb])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(unpacked.success(), "dpkg-deb -x {deb}: {unpacked}");
        let mut packaged = BTreeSet::new();
        walk(&dir, &dir, &mut packaged);
        let root = Self { dir, packaged };
        // What the host contributes, as on an installed system.
        let units = root.dir.join("lib/systemd/system");
        for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
            let entry = entry.unwrap();
            let to = units.join(entry.file_name());
            if entry.file_type().unwrap().is_file() && !to.exists() {
                std::fs::copy(entry.path(), to).unwrap();
            }
        }
        std::fs::create_dir_all(root.dir.join("bin")).unwrap();
        for tool in ["sh", "kill"] {
            std::fs::copy(format!("/bin/{tool}"), root.dir.join("bin").join(tool)).unwrap();
        }
        root
    }

    fn path(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn file(&self, absolute: &str) -> PathBuf {
        self.dir.join(absolute.trim_start_matches('/'))
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The unit `name` (a template instantiated with `instance`), read from the package.
    fn unit(&self, template: &str, instance: &str) -> Unit {
        let text = std::fs::read_to_string(self.file(&format!("/lib/systemd/system/{template}")))
            .unwrap_or_else(|e| panic!("{template} not in the package: {e}"));
        Unit::parse(&text.replace("%i", instance))
    }

    /// `systemd-analyze verify` of the instance, inside the scratch root: must be silent.
    fn verify(&self, unit: &str) {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no", &format!("--root={}", self.path())])
            .arg(format!("/lib/systemd/system/{unit}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }

    /// A command line of the unit with its absolute paths found in the scratch root (the
    /// package's files and the operator's configuration).
    fn argv(&self, line: &str) -> Vec<String> {
        let words = shlex::split(line).unwrap_or_else(|| panic!("cannot split {line:?}"));
        words
            .into_iter()
            .map(|w| {
                if w.starts_with('/') && self.file(&w).exists() {
                    self.file(&w).to_str().unwrap().to_owned()
                } else {
                    w
                }
            })
            .collect()
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(base, &path, out);
        } else {
            out.insert(format!("/{}", path.strip_prefix(base).unwrap().display()));
        }
    }
}

/// The shipped example with its placeholders replaced (each must be there) and every
/// commented-out setting switched on, so the examples an operator uncomments are valid.
fn configure(example: &str, replace: &[(&str, String)]) -> String {
    let mut text = example.to_owned();
    for (from, to) in replace {
        assert!(text.contains(from), "example lost its {from:?}");
        text = text.replace(from, to);
    }
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting)
                if setting.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                setting.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Effective capabilities and uid of a running process.
fn identity(pid: u32) -> (u64, u32, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    let uid = field("Uid:")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    (caps, uid, nofile)
}

#[test]
fn package_holds_binaries_units_and_conffiles() {
    let root = ScratchRoot::install("contents");
    for path in [
        "/usr/bin/kpscd",
        "/usr/bin/kpscctl",
        "/lib/systemd/system/kpscd-proxy@.service",
        "/lib/systemd/system/kpscd-portmap@.service",
        "/etc/kpsc/proxy-example.toml",
        "/etc/kpsc/portmap-example.toml",
        "/usr/share/man/man1/kpscd.1.gz",
        "/usr/share/man/man1/kpscd-proxy.1.gz",
        "/usr/share/man/man1/kpscd-portmap.1.gz",
        "/usr/share/man/man1/kpscctl.1.gz",
    ] {
        assert!(root.packaged.contains(path), "{path} not packaged");
    }
    // The proxy's page documents its flags, the drain included.
    let page = Command::new("zcat")
        .arg(root.file("/usr/share/man/man1/kpscd-proxy.1.gz"))
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains(".TH kpscd-proxy 1"), "{page}");
    assert!(page.contains("shutdown\\-grace"), "{page}");
    let conffiles = root.run(
        "dpkg-deb",
        &["--info", deb().to_str().unwrap(), "conffiles"],
    );
    for conf in [
        "/etc/kpsc/proxy-example.toml",
        "/etc/kpsc/portmap-example.toml",
    ] {
        assert!(conffiles.lines().any(|l| l == conf), "{conffiles}");
    }
    let control = root.run("dpkg-deb", &["--field", deb().to_str().unwrap()]);
    assert!(control.contains("Package: kpsc\n"), "{control}");
    // The packaged binaries run, and explain themselves.
    let help = root.run(
        root.file("/usr/bin/kpscd").to_str().unwrap(),
        &["proxy", "--help"],
    );
    assert!(help.contains("--shutdown-grace"), "{help}");
    let help = root.run(root.file("/usr/bin/kpscctl").to_str().unwrap(), &["--help"]);
    assert!(help.contains("maps"), "{help}");
    // The units' promises.
    let proxy = root.unit("kpscd-proxy@.service", "x");
    assert_eq!(proxy.one("DynamicUser"), Some("yes"));
    assert_eq!(proxy.caps("CapabilityBoundingSet"), "-all");
    assert_eq!(proxy.caps("AmbientCapabilities"), "-all");
    let nofile: u64 = proxy.one("LimitNOFILE").unwrap().parse().unwrap();
    assert!(nofile >= 65536, "{nofile}");
    let portmap = root.unit("kpscd-portmap@.service", "x");
    assert_eq!(
        portmap.caps("CapabilityBoundingSet"),
        "-all,+bpf,+perfmon,+net_admin"
    );
}

#[test]
fn proxy_unit_verifies_and_starts_unprivileged_against_a_real_broker() {
    let root = ScratchRoot::install("proxy");
    let cluster = MockCluster::new(3).unwrap();
    let base = free_port_base(20);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port_base(1)).parse().unwrap();
    let maps: SocketAddr = format!("127.0.0.1:{}", free_port_base(1)).parse().unwrap();
    let example = std::fs::read_to_string(root.file("/etc/kpsc/proxy-example.toml")).unwrap();
    let config = configure(
        &example,
        &[
            ("kafka-1.internal:9092", cluster.broker_addr(1)),
            ("0.0.0.0:9092", format!("0.0.0.0:{base}")),
            ("b1.kafka.example.com:9092", format!("127.0.1.1:{base}")),
            ("= 9100", format!("= {}", base + 10)),
            (
                "b<broker_id>.kafka.example.com",
                "127.0.1.<broker_id>".into(),
            ),
            ("0.0.0.0:9080", admin.to_string()),
            ("127.0.0.1:9079", maps.to_string()),
            (
                "# shutdown_grace = \"5s\"",
                "shutdown_grace = \"1s\"".into(),
            ),
        ],
    );
    std::fs::write(root.file("/etc/kpsc/proxy-pkgtest.toml"), config).unwrap();

    let unit_name = "kpscd-proxy@pkgtest.service";
    root.verify(unit_name);
    let unit = root.unit("kpscd-proxy@.service", "pkgtest");
    assert_eq!(unit.one("DynamicUser"), Some("yes"));
    // A uid from systemd's DynamicUser range that no account uses.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let uid = (61184..65519)
        .find(|u| !passwd.contains(&format!(":{u}:")))
        .unwrap();
    let argv = root.argv(unit.one("ExecStart").unwrap());
    let mut service = unit.start(uid, &argv, None);

    eventually(Duration::from_secs(20), || {
        let (status, body) = http_get(admin, "/ready")?;
        anyhow::ensure!(status == 200, "/ready {status}: {body}");
        Ok(())
    })
    .unwrap();
    let (caps, running_as, nofile) = identity(service.pid);
    assert_eq!(
        (caps, running_as),
        (0, uid),
        "no capabilities, the unit's user"
    );
    assert_eq!(nofile, unit.nofile());
    // A client through the listener it bound, and the packaged kpscctl reading its map.
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    let (metadata, _): (MetadataResponse, _) = client
        .call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    assert_eq!(metadata.brokers.len(), 3);
    // The example serves /maps on loopback only, not beside /ready.
    assert_eq!(http_get(admin, "/maps").unwrap().0, 404);
    let table = root.run(
        root.file("/usr/bin/kpscctl").to_str().unwrap(),
        &["maps", "--admin", &maps.to_string()],
    );
    assert!(table.contains(&format!("0.0.0.0:{base}")), "{table}");
    assert_eq!(service.stop(&unit, "/usr/bin/kpscd"), 0);
}

#[test]
fn portmap_unit_verifies_and_loads_with_only_its_capabilities() {
    const BROKER_PORT: u16 = 39092;
    const PORT: u16 = 9093;
    let root = ScratchRoot::install("portmap");
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, PORT).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port_base(1)).parse().unwrap();
    let example = std::fs::read_to_string(root.file("/etc/kpsc/portmap-example.toml")).unwrap();
    let config = configure(
        &example,
        &[
            (
                "10.0.0.11:39092,0.0.0.0:9093,b1.kafka.example.com:9093",
                format!(
                    "{}:{BROKER_PORT},0.0.0.0:{PORT},{NODE_CLIENT_IP}:{PORT}",
                    broker_ip(0)
                ),
            ),
            ("[\"eth0\"]", "[\"n0\", \"n1\"]".into()),
            // Switched on like every example setting: the test's client range.
            ("[\"10.20.0.0/16\"]", "[\"198.18.0.0/15\"]".into()),
            ("0.0.0.0:9081", admin.to_string()),
            (
                "# shutdown_grace = \"5s\"",
                "shutdown_grace = \"1s\"".into(),
            ),
        ],
    );
    // The instance is the test's node, so its pins do not meet another test's.
    let instance = topo.node.clone();
    std::fs::write(
        root.file(&format!("/etc/kpsc/portmap-{instance}.toml")),
        config,
    )
    .unwrap();

    root.verify(&format!("kpscd-portmap@{instance}.service"));
    let unit = root.unit("kpscd-portmap@.service", &instance);
    assert_eq!(unit.one("User"), Some("root"));
    // ExecStartPre lines marked "+" run with full privileges, as systemd runs them.
    for pre in unit.all("ExecStartPre") {
        let line = pre.strip_prefix('+').expect("only privileged ExecStartPre");
        let argv = root.argv(line);
        let status = Command::new(&argv[0]).args(&argv[1..]).status().unwrap();
        assert!(status.success(), "ExecStartPre {line}: {status}");
    }
    let argv = root.argv(unit.one("ExecStart").unwrap());
    let mut service = unit.start(0, &argv, Some(&topo.node));

    let ready = eventually(Duration::from_secs(20), || {
        let (status, body) = in_netns(&topo.node, || http_get(admin, "/ready"))??;
        anyhow::ensure!(status == 200, "/ready {status}: {body}");
        Ok(())
    });
    if let Err(e) = ready {
        panic!("{e:#}; alive: {}", service.alive());
    }
    let (caps, uid, _) = identity(service.pid);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_BPF: u64 = 1 << 39;
    // The unit grants CAP_PERFMON too: it is only for the verifier, and kpscd gives it up
    // once the program is loaded and attached.
    assert_eq!((caps, uid), (CAP_NET_ADMIN | CAP_BPF, 0));
    // A client on the client host reaches the broker through the node's port.
    let addr = format!("{NODE_CLIENT_IP}:{PORT}");
    let mut client = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap();
    let (r, _): (ApiVersionsResponse, _) = client
        .call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())
        .unwrap();
    assert_eq!(r.error_code, 0);
    assert_eq!(service.stop(&unit, "/usr/bin/kpscd"), 0);
    assert!(
        !Path::new("/sys/fs/bpf/kpsc").join(&instance).exists(),
        "a clean stop removes the pins"
    );
}
