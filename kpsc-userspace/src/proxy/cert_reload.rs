//! Listener certificate rotation without a restart: certificate and key are read again on
//! SIGHUP and when either file changes (polled: no inotify dependency, and it also sees a
//! Kubernetes secret's symlink swap). New connections get the new pair; established ones
//! keep their session. A pair that fails to load is logged at ERROR and the old one stays.

use std::{path::Path, sync::Arc, time::Duration, time::SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::tls::listener::ListenerCert;

/// How often the files' metadata is compared.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Reads the pair again and says how it went.
pub fn reload(cert: &ListenerCert, trigger: &'static str) {
    match cert.reload() {
        Ok(described) => info!(trigger, certificate = %described, "listener certificate reloaded"),
        Err(e) => error!(
            trigger,
            error = %e,
            still_serving = %cert.describe(),
            "listener certificate not reloaded; the previous one stays in use"
        ),
    }
}

/// What identifies a version of a file: an unreadable file is a version too (None), so
/// its return is noticed.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Polls the certificate and key files until shutdown; reloads when either changes.
pub async fn watch(cert: Arc<ListenerCert>, shutdown: CancellationToken) {
    let stamps = || cert.files().map(stamp);
    let mut seen = stamps();
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = stamps();
        if now != seen {
            seen = now;
            reload(&cert, "file changed");
        }
    }
}
