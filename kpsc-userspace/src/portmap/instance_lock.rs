//! One `kpscd portmap` per pin directory. bpffs belongs to the mount namespace, not the
//! network namespace: two daemons on one host (one per network namespace, say) given the
//! same `--instance` would pin into the same `<pin-root>/<instance>/`. Unguarded, the
//! second took the first's live pins for a crash's leftovers and reused them (both nodes
//! then shared one flow table), and the first to stop unpinned the other's maps. An
//! exclusive flock on the directory, held for the daemon's life, refuses the second; the
//! kernel drops it when the process dies, so a crash leaves nothing that blocks a restart.

use std::{
    fs::{File, TryLockError},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::config::error::ConfigError;

/// A killed daemon's lock goes only when its last thread has exited, which can be after
/// its PID already shows as a zombie (the main thread goes first): a restart right after
/// a crash waits this long for it.
const EXITING_GRACE: Duration = Duration::from_secs(3);

/// Held while the daemon runs; dropping it (or dying) releases the directory.
#[derive(Debug)]
pub struct InstanceLock {
    _dir: File,
}

impl InstanceLock {
    /// Creates `dir` if needed and locks it. Another live daemon holding it is a
    /// configuration error on `--instance` (exit 2: restarting would not fix it).
    pub fn acquire(dir: &Path) -> anyhow::Result<Self> {
        Self::acquire_within(dir, EXITING_GRACE)
    }

    /// [`InstanceLock::acquire`], waiting up to `grace` for a holder that may be exiting.
    pub fn acquire_within(dir: &Path, grace: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + grace;
        // A stopping daemon removes its directory: a lock taken on the removed one is
        // retried on the new one.
        for _ in 0..3 {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let mut locked = file.try_lock();
            while matches!(locked, Err(TryLockError::WouldBlock)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                locked = file.try_lock();
            }
            match locked {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(ConfigError::new(
                        "--instance",
                        format!(
                            "another kpscd portmap is running with its maps pinned in {} \
                             (bpffs is shared by every network namespace of this host); \
                             give each kpscd portmap on a host its own --instance",
                            dir.display()
                        ),
                    )
                    .into());
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", dir.display()));
                }
            }
            let held = file.metadata()?;
            if std::fs::metadata(dir).is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino())
            {
                return Ok(Self { _dir: file });
            }
        }
        bail!("{} kept being replaced while locking it", dir.display())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::InstanceLock;
    use crate::config::error::ConfigError;

    #[test]
    fn a_second_holder_is_refused_naming_the_flag_and_a_released_lock_is_free_again() {
        let root = std::env::temp_dir().join(format!("kpsc-lock-test-{}", std::process::id()));
        let dir = root.join("node");
        let first = InstanceLock::acquire(&dir).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts
        // as another process's would.
        let err = InstanceLock::acquire_within(&dir, Duration::ZERO).unwrap_err();
        let config = err.downcast_ref::<ConfigError>().expect("a ConfigError");
        assert_eq!(config.flag, "--instance");
        assert!(config.message.contains(&dir.display().to_string()), "{err}");
        drop(first);
        let again = InstanceLock::acquire(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
