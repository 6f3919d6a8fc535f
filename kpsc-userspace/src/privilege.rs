//! The process's privileges: which capabilities it holds, and giving root up.
//!
//! Credentials are per thread in Linux. glibc's setuid family changes every thread of the
//! process (it signals each one), which is why the drop goes through it (nix calls the
//! libc functions) and not through raw syscalls; afterwards every thread is checked in
//! /proc, so a thread that kept root would stop the daemon instead of going unnoticed.

use anyhow::{Context as _, bail};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
use tracing::{info, warn};

use crate::config::run_as::RunAs;

/// Effective capability mask in a /proc status file's text.
fn effective_caps_in(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Effective capabilities of this process (from /proc/self/status; 0 if unreadable).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps_in(&s))
        .unwrap_or(0)
}

/// Becomes `run_as` for good (real, effective and saved ids, no supplementary groups):
/// the kernel then clears every capability, since no uid is 0 any more.
pub fn drop_root(run_as: &RunAs) -> anyhow::Result<()> {
    let gid = Gid::from_raw(run_as.gid);
    let uid = Uid::from_raw(run_as.uid);
    let needs = "--user needs kpscd started as root (or with CAP_SETUID and CAP_SETGID)";
    setgroups(&[gid]).with_context(|| format!("dropping supplementary groups: {needs}"))?;
    setresgid(gid, gid, gid).with_context(|| format!("becoming group {}: {needs}", run_as.gid))?;
    setresuid(uid, uid, uid)
        .with_context(|| format!("becoming user {} ({}): {needs}", run_as.user, run_as.uid))?;
    check_every_thread(run_as).context("after dropping root")?;
    info!(
        user = %run_as.user,
        uid = run_as.uid,
        gid = run_as.gid,
        "listeners bound; running as an unprivileged user from here on"
    );
    Ok(())
}

/// Every thread runs as `run_as` and holds no capability.
fn check_every_thread(run_as: &RunAs) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")?;
    for task in tasks {
        let path = task?.path().join("status");
        let status = match std::fs::read_to_string(&path) {
            Ok(status) => status,
            // A thread that ended since the listing is not a thread that kept root.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let ids = |field: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (uids, gids) = (ids("Uid:"), ids("Gid:"));
        let caps = effective_caps_in(&status);
        if uids.len() != 4
            || uids.iter().any(|&u| u != run_as.uid)
            || gids.iter().any(|&g| g != run_as.gid)
            || caps != Some(0)
        {
            bail!(
                "{} still has uids {uids:?}, gids {gids:?}, capabilities {caps:x?}",
                path.display()
            );
        }
    }
    Ok(())
}

/// Says once that running as root is unnecessary for what this mode does.
pub fn warn_if_root(what_needs_no_root: &str) {
    if Uid::effective().is_root() {
        warn!(
            "running as root: {what_needs_no_root}; pass --user (and --group) to drop root \
             once the listeners are bound"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_mask() {
        let status = "Name:\tkpscd\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_caps_in(status), Some(0x3000));
        assert_eq!(effective_caps_in("Name:\tx\n"), None);
    }
}
