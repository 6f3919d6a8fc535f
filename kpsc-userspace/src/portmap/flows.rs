//! Closed flows are removed a while after they close, so the table shows live flows and
//! the LRU does not evict open ones first.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::portmap::{datapath::FlowState, state::PortmapState};

/// How long a closed flow stays in the table (late segments, the client's TIME_WAIT)
/// before userspace removes it; LRU eviction is the backstop.
const CLOSED_FLOW_LINGER: Duration = Duration::from_secs(60);
const FLOW_CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// Removes flows that have been closed for CLOSED_FLOW_LINGER, so the table shows live
/// flows and the LRU does not evict open ones first.
pub async fn cleanup_loop(state: Arc<PortmapState>, shutdown: CancellationToken) {
    let mut closed_since: std::collections::HashMap<kpsc_common::FlowKey, std::time::Instant> =
        Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FLOW_CLEANUP_INTERVAL) => {}
        }
        let mut pins = state.pins.lock().expect("pins lock");
        let Some(maps) = pins.as_mut() else { continue };
        let now = std::time::Instant::now();
        let mut still_closed = std::collections::HashMap::new();
        let mut removed = 0;
        for (key, flow) in maps.flows() {
            if maps.flow_state(&flow) != FlowState::Closed {
                continue;
            }
            let since = closed_since.get(&key).copied().unwrap_or(now);
            if now.duration_since(since) >= CLOSED_FLOW_LINGER {
                maps.remove_flow(&key, &flow);
                removed += 1;
            } else {
                still_closed.insert(key, since);
            }
        }
        closed_since = still_closed;
        if removed > 0 {
            tracing::debug!(removed, "closed flows removed");
        }
    }
}
