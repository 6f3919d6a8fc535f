//! A running `kpscd` as an operator runs it, and its admin endpoint (`/ready`, `/metrics`,
//! `/maps`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    http::http_get,
    netns,
    process::{Process, kpscd_bin},
    wait::free_port_base,
};

/// How long kpscd gets to exit after SIGTERM when dropped (a portmap kpscd detaches its
/// programs then).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Environment variable: the `--bulk-transfer` of proxy tests that name none.
pub const SUITE_BULK_TRANSFER: &str = "KPSC_TEST_BULK_TRANSFER";

/// A running `kpscd`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Kpscd {
    process: Process,
    pub admin: SocketAddr,
    /// Its stderr, when captured in a file (removed on drop, printed if a test panics).
    log: Option<PathBuf>,
    /// Network namespace its admin endpoint is reachable in (None: the caller's).
    netns: Option<String>,
}

impl Kpscd {
    /// Starts `kpscd proxy <args> --http-listen-address 127.0.0.1:<free>` and waits for
    /// `/ready`.
    pub fn start(args: &[String]) -> anyhow::Result<Self> {
        let k = Self::spawn(args)?;
        k.wait_ready(Duration::from_secs(20))?;
        Ok(k)
    }

    /// Starts without waiting for readiness. A test that names no `--bulk-transfer`
    /// gets the one in KPSC_TEST_BULK_TRANSFER, if set: `cargo xtask test` runs the proxy
    /// suite again that way, so every proxy test also runs on the copy and kernel paths.
    pub fn spawn(args: &[String]) -> anyhow::Result<Self> {
        let mut args = args.to_vec();
        args.insert(0, "proxy".into());
        let named = args.iter().any(|a| a.starts_with("--bulk-transfer"));
        if let Ok(transfer) = std::env::var(SUITE_BULK_TRANSFER)
            && !transfer.is_empty()
            && !named
        {
            args.extend(["--bulk-transfer".into(), transfer]);
        }
        Self::spawn_mode(&args, None)
    }

    /// Starts `kpscd <args>` (mode included), inside network namespace `netns` when given
    /// (network namespace only, through nsenter, so it shares this process's bpffs), its
    /// stderr in a log file.
    pub fn spawn_mode(args: &[String], netns: Option<&str>) -> anyhow::Result<Self> {
        Self::spawn_mode_with_env(args, netns, &[])
    }

    /// [`Kpscd::spawn_mode`] with extra environment variables for kpscd only (secrets it
    /// reads from its environment, say).
    pub fn spawn_mode_with_env(
        args: &[String],
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port_base(1)).parse()?;
        Self::spawn_at(args, netns, admin, env)
    }

    /// Like [`Kpscd::spawn_mode_with_env`], with the admin endpoint on `admin` (e.g. the
    /// namespace's own address, where a load balancer's health check reaches it).
    pub fn spawn_at(
        args: &[String],
        netns: Option<&str>,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "kpscd-test-{}-{}-{}.log",
            std::process::id(),
            admin.port(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(kpscd_bin());
                c
            }
            None => Command::new(kpscd_bin()),
        };
        cmd.args(args)
            .envs(env.iter().copied())
            // KPSC_TEST_LOG (e.g. `kpsc=debug`) turns a test's kpscd up.
            .env(
                "RUST_LOG",
                std::env::var("KPSC_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut k = Self::launch(cmd, admin, netns.map(str::to_owned))?;
        k.log = Some(log);
        Ok(k)
    }

    /// Starts `cmd`, a kpscd command line (mode and flags, wrapped as the caller likes, e.g.
    /// in taskset), with its admin endpoint on `admin`, reachable from namespace `netns`.
    /// Without a `--shutdown-grace` flag it gets `0s`: tests stop many instances and most
    /// have no load balancer to wait for (a file's `shutdown_grace` is overridden too).
    pub fn launch(
        mut cmd: Command,
        admin: SocketAddr,
        netns: Option<String>,
    ) -> anyhow::Result<Self> {
        cmd.arg("--http-listen-address").arg(admin.to_string());
        if !cmd.get_args().any(|a| a == "--shutdown-grace") {
            cmd.args(["--shutdown-grace", "0s"]);
        }
        let process = Process::spawn(&mut cmd, STOP_GRACE).context("starting kpscd")?;
        Ok(Self {
            process,
            admin,
            log: None,
            netns,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Its stderr so far (empty when not captured).
    /// kpscd's log so far, without the terminal colours its text format puts around field
    /// names (so tests can look for `field=value`).
    pub fn log(&self) -> String {
        let raw = self
            .log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default();
        without_ansi_escapes(&raw)
    }

    /// Sends `signal` (e.g. SIGKILL for a crash) unless it was already reaped.
    pub fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// Still running?
    pub fn alive(&self) -> bool {
        self.process.alive()
    }

    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.get("/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kpscd at {} not ready after {timeout:?}; log:\n{}",
                    self.admin,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET `path` from the admin endpoint: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        netns::maybe_in(self.netns.as_deref(), || http_get(self.admin, path))?
    }

    pub fn maps(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get("/maps")?;
        anyhow::ensure!(status == 200, "/maps returned {status}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Sum of a Prometheus counter over all label sets whose text contains `filter`.
    pub fn metric(&self, name: &str, filter: &str) -> f64 {
        let (_, text) = self.get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<i32> {
        let status = self.process.terminate(timeout).context("kpscd")?;
        status.code().context("kpscd killed by a signal")
    }

    /// Waits for it to exit on its own (after a signal already sent) and its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<i32> {
        let status = self.process.wait(timeout).context("kpscd")?;
        status.code().context("kpscd killed by a signal")
    }
}

impl Drop for Kpscd {
    fn drop(&mut self) {
        self.process.stop();
        if let Some(log) = &self.log {
            if std::thread::panicking() {
                eprintln!("---- kpscd log ----\n{}", self.log());
            }
            let _ = std::fs::remove_file(log);
        }
    }
}

/// `text` without ANSI escape sequences (ESC ... final letter).
fn without_ansi_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn colours_are_removed_from_the_log() {
        let coloured = "\x1b[2m2026-11-27\x1b[0m \x1b[32m INFO\x1b[0m \x1b[3mclient\x1b[0m\x1b[2m=\x1b[0m198.18.3.9:41000";
        assert_eq!(
            super::without_ansi_escapes(coloured),
            "2026-11-27  INFO client=198.18.3.9:41000"
        );
    }
}
