//! Cluster metadata, first at start and then every `--metadata-refresh-interval`: brokers
//! that appear get their listener before any client hears of them.

use std::sync::Arc;

use tracing::{error, warn};

use crate::{
    kafka::discovery,
    mapping::{addr::BrokerAddr, map::Origin},
    proxy::state::ProxyState,
};

/// Refreshes metadata from the first broker that answers; returns what could not be mapped
/// or bound.
pub async fn refresh_metadata(state: &ProxyState) -> anyhow::Result<Vec<anyhow::Error>> {
    let candidates: Vec<BrokerAddr> = state
        .listeners
        .snapshot()
        .map
        .entries()
        .iter()
        .filter(|e| e.origin != Origin::External)
        .map(|e| e.broker.clone())
        .collect();
    let mut last_error = None;
    for broker in candidates {
        let common = &state.config.common;
        match discovery::fetch_brokers(
            &state.upstream,
            &broker,
            common.dial_timeout,
            common.discovery_sasl.as_ref(),
        )
        .await
        {
            Ok(brokers) => {
                let problems = state.learn(&brokers).await;
                state.set_metadata_known();
                return Ok(problems);
            }
            Err(e) => {
                warn!(broker = %broker, error = %format!("{e:#}"), "metadata refresh failed");
                last_error = Some(e);
            }
        }
    }
    state.metrics.metadata_refresh_failures.inc();
    let error = last_error.unwrap_or_else(|| anyhow::anyhow!("no broker to ask for metadata"));
    state.set_discovery_error(format!("{error:#}"));
    Err(error)
}

/// Periodic metadata refresh until shutdown.
pub async fn refresh_loop(state: Arc<ProxyState>) {
    let mut interval = tokio::time::interval(state.config.common.metadata_refresh_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // the first tick is immediate; start already refreshed
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match refresh_metadata(&state).await {
            Ok(problems) => {
                for p in problems {
                    error!(error = %format!("{p:#}"), "broker cannot be served");
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "no broker answered the metadata refresh")
            }
        }
    }
}
