//! Stopping in a way a load balancer can follow. The first SIGTERM/SIGINT makes `/ready`
//! answer 503 while everything keeps serving for `--shutdown-grace`, so the balancer's
//! health check sees the instance leave before its port stops accepting; then the mode
//! stops accepting and drains. A second signal at any point stops at once.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// What `/ready` says while the instance is on its way out.
pub const DRAINING_REASON: &str = "shutting down";

/// The signals that stop kpscd. Installed at start, so a signal that arrives early is
/// queued instead of killing the process with the default action.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// The next SIGTERM or SIGINT, by name. Cancel-safe (usable in `select!`).
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// Waits out the grace period; returns the signal that cut it short, if one did.
    pub async fn grace(&mut self, grace: Duration) -> Option<&'static str> {
        if grace.is_zero() {
            return None;
        }
        tokio::select! {
            _ = tokio::time::sleep(grace) => None,
            name = self.recv() => Some(name),
        }
    }
}

/// Set once the first stop signal arrived; readiness checks read it first.
#[derive(Debug, Default)]
pub struct Draining(AtomicBool);

impl Draining {
    pub fn start(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// `Err` with the reason `/ready` gives while draining.
    pub fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::Acquire) {
            Err(DRAINING_REASON.to_owned())
        } else {
            Ok(())
        }
    }
}
