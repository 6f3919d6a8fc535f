//! A systemd unit's [Service] settings, and its ExecStart run the way systemd would run
//! it without systemd: the unit's user, capabilities and descriptor limit (setpriv,
//! prlimit), under strace, so that the system calls it made can be checked against the
//! unit's SystemCallFilter afterwards.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use kpsc_testkit::Process;

/// The [Service] settings of a unit, each key with its values in order.
pub struct Unit(HashMap<String, Vec<String>>);

impl Unit {
    pub fn parse(text: &str) -> Self {
        let mut settings: HashMap<String, Vec<String>> = HashMap::new();
        let mut section = "";
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if section == "[Service]"
                && let Some((k, v)) = line.split_once('=')
                && !line.starts_with('#')
            {
                settings
                    .entry(k.trim().to_owned())
                    .or_default()
                    .push(v.trim().to_owned());
            }
        }
        Self(settings)
    }

    pub fn one(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.last()).map(String::as_str)
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .get(key)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Capability names as setpriv takes them: "-all,+bpf,+perfmon,+net_admin".
    pub fn caps(&self, key: &str) -> String {
        let mut list = "-all".to_owned();
        for cap in self.one(key).unwrap_or_default().split_whitespace() {
            list.push_str(",+");
            list.push_str(&cap.trim_start_matches("CAP_").to_ascii_lowercase());
        }
        list
    }

    pub fn timeout_stop(&self) -> Duration {
        let text = self.one("TimeoutStopSec").expect("TimeoutStopSec");
        Duration::from_secs(text.trim_end_matches('s').parse().unwrap())
    }

    /// The unit's LimitNOFILE, as far as this machine lets a process raise it: systemd
    /// (PID 1, every capability) applies it whole, but a test run inside a container
    /// without CAP_SYS_RESOURCE cannot go past its own hard limit.
    pub fn nofile(&self) -> u64 {
        let wanted: u64 = self
            .one("LimitNOFILE")
            .expect("LimitNOFILE")
            .parse()
            .unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let effective = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        const CAP_SYS_RESOURCE: u64 = 1 << 24;
        if effective & CAP_SYS_RESOURCE == 0 && limit.rlim_max < wanted {
            eprintln!(
                "LimitNOFILE={wanted} applied as {}: this test process cannot raise its hard limit",
                limit.rlim_max
            );
            return limit.rlim_max;
        }
        wanted
    }

    /// `prlimit` + `setpriv` running `argv` as the unit runs its ExecStart: uid and gid,
    /// no supplementary groups, the unit's capability sets and descriptor limit.
    pub fn command(&self, uid: u32, argv: &[String]) -> Command {
        let nofile = self.nofile();
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={}", self.caps("AmbientCapabilities")))
            .arg(format!(
                "--ambient-caps={}",
                self.caps("AmbientCapabilities")
            ))
            .arg(format!(
                "--bounding-set={}",
                self.caps("CapabilityBoundingSet")
            ));
        if self.one("NoNewPrivileges") == Some("yes") {
            cmd.arg("--no-new-privs");
        }
        cmd.arg("--").args(argv);
        cmd
    }
}

/// A unit's ExecStart running under strace.
pub struct Started {
    strace: Process,
    /// The service's own process (strace's child).
    pub pid: u32,
    trace: PathBuf,
}

impl Unit {
    /// Starts `argv` as this unit's ExecStart, inside network namespace `netns` if given.
    pub fn start(&self, uid: u32, argv: &[String], netns: Option<&str>) -> Started {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let trace = std::env::temp_dir().join(format!(
            "kpsc-unit-trace-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let inner = self.command(uid, argv);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg("strace");
                c
            }
            None => Command::new("strace"),
        };
        cmd.args(["-f", "-qq", "-o"])
            .arg(&trace)
            .arg(inner.get_program())
            .args(inner.get_args());
        let strace = Process::spawn(&mut cmd, Duration::from_secs(5)).unwrap();
        // strace forks short-lived children of its own at start (probing ptrace): the
        // service is the child whose executable became argv[0].
        let children = format!("/proc/{0}/task/{0}/children", strace.id());
        let service = std::fs::canonicalize(&argv[0]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            let found = text.split_whitespace().find(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == service)
            });
            if let Some(pid) = found {
                break pid.parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start under strace",
                service.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Started { strace, pid, trace }
    }

    /// The SystemCallFilter as (allowed, denied): groups expanded by systemd-analyze.
    pub fn syscall_filter(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
        for value in self.all("SystemCallFilter") {
            let (set, list) = match value.strip_prefix('~') {
                Some(list) => (&mut denied, list),
                None => (&mut allowed, value),
            };
            for name in list.split_whitespace() {
                set.extend(expand_syscalls(name));
            }
        }
        (allowed, denied)
    }
}

impl Drop for Started {
    /// A test that failed half-way: the service must not outlive it (killing strace alone
    /// would leave it running, detached). SIGTERM first, so portmap removes its pins.
    fn drop(&mut self) {
        if self.strace.alive() {
            // SAFETY: kill(2) on the service, our strace's child, which is still running.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            if self.strace.wait(Duration::from_secs(5)).is_err() {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_file(&self.trace);
    }
}

impl Started {
    pub fn alive(&self) -> bool {
        self.strace.alive()
    }

    /// SIGTERM to the service, its exit code, which must come within the unit's
    /// TimeoutStopSec, and then every system call it made after exec'ing `binary` must be
    /// one the unit's SystemCallFilter allows (systemd would kill it with SIGSYS).
    pub fn stop(&mut self, unit: &Unit, binary: &str) -> i32 {
        let started = Instant::now();
        // SAFETY: kill(2) on the service, a child of our strace that is still running.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = self.strace.wait(unit.timeout_stop()).unwrap();
        eprintln!("stopped in {:?}", started.elapsed());
        let log = std::fs::read_to_string(&self.trace).unwrap();
        let _ = std::fs::remove_file(&self.trace);
        let used = syscalls_after_exec(&log, binary);
        assert!(used.len() > 20, "trace of {binary} too short: {used:?}");
        let (allowed, denied) = unit.syscall_filter();
        let refused: Vec<&String> = used
            .iter()
            .filter(|s| !allowed.contains(*s) || denied.contains(*s))
            .collect();
        assert!(
            refused.is_empty(),
            "{binary} made system calls its unit's SystemCallFilter refuses: {refused:?}"
        );
        status.code().expect("exit code")
    }
}

/// The system calls in an `strace -f` log after the last exec of `binary`.
fn syscalls_after_exec(log: &str, binary: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = log.lines().collect();
    let exec = lines
        .iter()
        .rposition(|l| l.contains("execve(\"") && l.contains(binary))
        .unwrap_or_else(|| panic!("no exec of {binary} in the trace"));
    lines[exec..]
        .iter()
        .filter_map(|l| {
            let call = l.split_once(' ')?.1.trim_start();
            // "<... x resumed>", "--- SIGTERM", "+++ exited" are not new calls.
            let name = call.split('(').next()?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then(|| name.to_owned())
        })
        .collect()
}

/// A syscall name, or a group (`@system-service`) expanded with its nested groups.
fn expand_syscalls(name: &str) -> BTreeSet<String> {
    if !name.starts_with('@') {
        return BTreeSet::from([name.to_owned()]);
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {name}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .flat_map(expand_syscalls)
        .collect()
}
