//! Established flows leave the kernel's table (which nothing evicts) here: closed ones a
//! while after they close, and ones that have been silent for ESTABLISHED_IDLE (a client
//! that vanished without FIN or RST).

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use kpsc_common::FlowKey;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::portmap::datapath::{FlowState, PinnedMaps, monotonic_ns};

/// How long a closed flow stays in the table (late segments, the client's TIME_WAIT)
/// before userspace removes it.
const CLOSED_FLOW_LINGER: Duration = Duration::from_secs(60);
/// How long an established flow may carry no packet either way before it is removed. Kafka
/// brokers close connections idle for 10 minutes (`connections.max.idle.ms`), and clients
/// send metadata requests more often than that, so a live Kafka connection never gets here.
pub const ESTABLISHED_IDLE: Duration = Duration::from_secs(3600);
const FLOW_CLEANUP_INTERVAL: Duration = Duration::from_secs(10);
/// How long a reply entry without its flow entry must stay silent before it is removed: a
/// promotion writes the reply entry a moment before the flow entry.
const ORPHAN_REPLY_GRACE: Duration = Duration::from_secs(10);

/// Removes flows that have been closed for CLOSED_FLOW_LINGER or idle for
/// ESTABLISHED_IDLE, so the table holds live flows only. Uses its own handles on the pinned
/// maps, and walks them off the async threads: a walk of 65,536 flows is as many system
/// calls, and neither the admin endpoint nor the runtime waits for it.
pub async fn cleanup_loop(pin_dir: PathBuf, shutdown: CancellationToken) {
    let mut maps: Option<PinnedMaps> = None;
    let mut closed_since: HashMap<FlowKey, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FLOW_CLEANUP_INTERVAL) => {}
        }
        let opened = match maps.take() {
            Some(maps) => maps,
            None => match PinnedMaps::open(&pin_dir) {
                Ok(maps) => maps,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "flow cleanup cannot open the pinned maps; retrying");
                    continue;
                }
            },
        };
        let since = std::mem::take(&mut closed_since);
        let walk = tokio::task::spawn_blocking(move || {
            let mut opened = opened;
            let (since, removed) = remove_closed(&mut opened, since, Instant::now());
            (opened, since, removed)
        });
        match walk.await {
            Ok((walked, since, removed)) => {
                maps = Some(walked);
                closed_since = since;
                if removed > 0 {
                    tracing::debug!(removed, "closed flows removed");
                }
            }
            // The handles went with the failed walk: the next pass opens new ones.
            Err(e) => error!(error = %e, "flow cleanup pass failed; retrying"),
        }
    }
}

/// One pass: flows closed for CLOSED_FLOW_LINGER by `now`, or idle for ESTABLISHED_IDLE,
/// are removed (each only if its entry is unchanged since the walk read it), and so are
/// reply entries left without their flow; returns when each still-lingering closed flow was first seen closed, and
/// how many were removed.
fn remove_closed(
    maps: &mut PinnedMaps,
    closed_since: HashMap<FlowKey, Instant>,
    now: Instant,
) -> (HashMap<FlowKey, Instant>, usize) {
    let mut still_closed = HashMap::new();
    let mut removed = 0;
    let now_ns = monotonic_ns();
    for (key, flow) in maps.flows() {
        if maps.flow_state(&flow) != FlowState::Closed {
            let idle = now_ns.saturating_sub(maps.last_activity_ns(&flow));
            if idle >= ESTABLISHED_IDLE.as_nanos() as u64 && maps.remove_flow(&key, &flow) {
                removed += 1;
            }
            continue;
        }
        let since = closed_since.get(&key).copied().unwrap_or(now);
        if now.duration_since(since) < CLOSED_FLOW_LINGER {
            still_closed.insert(key, since);
        } else if maps.remove_flow(&key, &flow) {
            removed += 1;
        }
    }
    removed += maps.remove_orphaned_replies(now_ns, ORPHAN_REPLY_GRACE.as_nanos() as u64);
    (still_closed, removed)
}
