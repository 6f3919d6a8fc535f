//! Checks that every broker advertises what the port map serves: a broker that advertises
//! its real address sends clients around the endpoint, which portmap cannot fix by itself.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{portmap::PortmapEntry, sasl::SaslCredentials},
    kafka::discovery,
    mapping::addr::BrokerAddr,
    portmap::state::{PortmapState, ProbeState},
    upstream::Upstream,
};

/// Compares what each broker advertises with the port map. Returns the mismatches.
pub async fn probe_advertised(
    entries: &[PortmapEntry],
    timeout: Duration,
    sasl: Option<&SaslCredentials>,
) -> Vec<String> {
    let expected: BTreeSet<BrokerAddr> =
        entries.iter().map(|e| e.advertised.normalized()).collect();
    let mut problems = Vec::new();
    // Portmap carries client TLS end to end; its probe speaks plaintext Kafka.
    let upstream = Upstream::plain(timeout);
    for e in entries {
        match discovery::fetch_brokers(&upstream, &e.broker, timeout, sasl).await {
            Ok(brokers) => {
                let brokers: Vec<(i32, BrokerAddr)> = brokers
                    .into_iter()
                    .map(|(id, addr)| (id, addr.normalized()))
                    .collect();
                for (id, addr) in &brokers {
                    if !expected.contains(addr) {
                        problems.push(format!(
                            "broker {} (id {id}) advertises {addr}, which no mapped port serves: \
                             clients will try to reach it directly (fix the broker's \
                             advertised.listeners, or add a mapping for it)",
                            e.broker
                        ));
                    }
                }
                if !brokers.iter().any(|(_, a)| *a == e.advertised.normalized()) {
                    problems.push(format!(
                        "port {} expects its broker to advertise {}, but {} lists {:?}",
                        e.listen.port(),
                        e.advertised,
                        e.broker,
                        brokers
                            .iter()
                            .map(|(id, a)| format!("{id}={a}"))
                            .collect::<Vec<_>>()
                    ));
                }
            }
            Err(err) => problems.push(format!("cannot ask {} for metadata: {err:#}", e.broker)),
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

pub async fn probe_loop(state: Arc<PortmapState>, shutdown: CancellationToken) {
    loop {
        let (entries, interval, timeout, sasl) = {
            let c = state.config.lock().expect("config lock");
            (
                c.entries.clone(),
                c.common.metadata_refresh_interval,
                c.common.dial_timeout,
                c.common.discovery_sasl.clone(),
            )
        };
        let problems = probe_advertised(&entries, timeout, sasl.as_ref()).await;
        for p in &problems {
            warn!("advertised listener mismatch: {p}");
        }
        if problems.is_empty() {
            info!(
                brokers = entries.len(),
                "every broker advertises what the port map serves"
            );
        }
        *state.probe.lock().expect("probe lock") = ProbeState {
            done: true,
            mismatches: problems,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = state.reprobe.notified() => {}
        }
    }
}
