//! Child processes (daemons, brokers, proxies): registered for cleanup at an interrupt
//! while they live, stopped when dropped; and where the workspace's binaries are.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cleanup;

/// A running child process, stopped on drop: SIGTERM and `grace` to exit, then SIGKILL.
pub struct Process {
    child: Child,
    grace: Duration,
    /// Set once reaped; the PID may belong to another process from then on.
    status: Option<ExitStatus>,
}

impl Process {
    /// Spawns `cmd`. `grace`: how long a SIGTERM waits before SIGKILL on drop (zero:
    /// SIGKILL at once, for brokers whose shutdown nothing checks).
    pub fn spawn(cmd: &mut Command, grace: Duration) -> anyhow::Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        cleanup::child_started(child.id());
        Ok(Self {
            child,
            grace,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Still running? Does not reap, so the PID stays this process's.
    pub fn alive(&self) -> bool {
        self.status.is_none() && !cleanup::exited(self.child.id())
    }

    /// Sends `signal` unless the process was reaped (a reaped PID may be recycled).
    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: signalling our own child, not reaped yet, by PID.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(timeout).context("after SIGTERM")
    }

    /// Waits up to `timeout` for the exit status, sending nothing.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() > deadline {
                bail!("did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self.reap())
    }

    /// Waits for an exited (or killed) child; deregistered first, so a PID still listed
    /// for cleanup is never a recycled one.
    fn reap(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        cleanup::child_ended(self.child.id());
        let status = self.child.wait().expect("waiting for our own child");
        self.status = Some(status);
        status
    }

    /// SIGTERM, `grace` to exit, then SIGKILL; reaped.
    pub fn stop(&mut self) {
        if self.alive() && !self.grace.is_zero() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.signal(libc::SIGKILL);
        self.reap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A binary of the workspace: `$env`, or next to the running binary (target/<profile>/
/// kpsc-e2e-bench), or one folder up from a test binary (target/<profile>/deps/<test>).
fn bin(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("binary folder");
    let sibling = dir.join(name);
    if sibling.exists() {
        return sibling;
    }
    dir.parent().expect("target dir").join(name)
}

/// A workspace binary that must have been built.
fn built_bin(env: &str, name: &str) -> PathBuf {
    let p = bin(env, name);
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build --release --bins`; `cargo xtask test` does)",
        p.display()
    );
    p
}

pub fn kpscd_bin() -> PathBuf {
    built_bin("KPSCD_BIN", "kpscd")
}

pub fn kpscctl_bin() -> PathBuf {
    built_bin("KPSCCTL_BIN", "kpscctl")
}

pub fn kpsc_bench_bin() -> PathBuf {
    built_bin("KPSC_BENCH_BIN", "kpsc-bench")
}
