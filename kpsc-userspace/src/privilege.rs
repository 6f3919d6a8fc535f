//! The process's privileges: which capabilities it holds, giving root up (proxy), and
//! keeping only the capabilities still needed (portmap).
//!
//! Credentials are per thread in Linux. glibc's setuid family changes every thread of the
//! process (it signals each one), which is why the root drop goes through it (nix calls
//! the libc functions) and not through raw syscalls. Capability sets have no such
//! broadcast, so they are narrowed while the process has one thread (portmap does it
//! before its async runtime starts). Either way every thread is checked in /proc
//! afterwards, so a thread that kept a privilege stops the daemon instead of going
//! unnoticed.

use anyhow::{Context as _, bail};
pub use caps::Capability;
use caps::{CapSet, CapsHashSet};
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

/// Exit code when a needed capability is missing.
pub const EXIT_PRIVILEGE: u8 = 4;

/// The capabilities of `needed` this process lacks, by name. CAP_SYS_ADMIN stands in for
/// CAP_BPF and CAP_PERFMON, as the kernel lets it.
pub fn missing_capabilities(needed: &[Capability]) -> Vec<String> {
    let caps = effective_caps();
    let has = |c: Capability| caps & (1 << c.index()) != 0;
    needed
        .iter()
        .filter(|&&c| {
            let sys_admin_will_do = matches!(c, Capability::CAP_BPF | Capability::CAP_PERFMON);
            !(has(c) || sys_admin_will_do && has(Capability::CAP_SYS_ADMIN))
        })
        .map(ToString::to_string)
        .collect()
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
    for_every_thread(|status| {
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
        let caps = effective_caps_in(status);
        if uids.len() != 4
            || uids.iter().any(|&u| u != run_as.uid)
            || gids.iter().any(|&g| g != run_as.gid)
            || caps != Some(0)
        {
            bail!("uids {uids:?}, gids {gids:?}, capabilities {caps:x?}");
        }
        Ok(())
    })
}

/// Runs `check` on the /proc status text of every thread of this process.
fn for_every_thread(check: impl Fn(&str) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")?;
    for task in tasks {
        let path = task?.path().join("status");
        let status = match std::fs::read_to_string(&path) {
            Ok(status) => status,
            // A thread that ended since the listing is not a thread that kept privileges.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        check(&status).with_context(|| format!("{} still has", path.display()))?;
    }
    Ok(())
}

/// Narrows this thread's capabilities to those of `keep` it holds: effective and
/// permitted sets, nothing inheritable or ambient, and a bounding set without the rest
/// where CAP_SETPCAP allows it. Call it while the process has a single thread: the
/// check afterwards fails if another thread still holds more.
pub fn keep_only_capabilities(keep: &[Capability]) -> anyhow::Result<()> {
    let held = caps::read(None, CapSet::Permitted).context("reading the permitted capabilities")?;
    let kept: CapsHashSet = keep.iter().copied().filter(|c| held.contains(c)).collect();
    // The bounding set first, while CAP_SETPCAP (if held) is still effective.
    if held.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all().difference(&kept) {
            caps::drop(None, CapSet::Bounding, *cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    let cleared = caps::clear(None, CapSet::Ambient)
        .and_then(|()| caps::clear(None, CapSet::Inheritable))
        .and_then(|()| caps::set(None, CapSet::Effective, &kept))
        .and_then(|()| caps::set(None, CapSet::Permitted, &kept));
    cleared.context("narrowing the capability sets")?;
    let mask = kept.iter().fold(0u64, |m, c| m | c.bitmask());
    for_every_thread(|status| {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        let (effective, permitted) = (field("CapEff:"), field("CapPrm:"));
        if effective != Some(mask) || permitted != Some(mask) {
            bail!(
                "capabilities effective {effective:x?} permitted {permitted:x?}, expected {mask:x}"
            );
        }
        Ok(())
    })
    .context("after narrowing the capabilities")?;
    let names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    info!(
        kept = names.join(","),
        "loaded and attached; every other capability dropped"
    );
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
