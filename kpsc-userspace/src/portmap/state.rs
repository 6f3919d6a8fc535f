//! State shared by portmap's loops and the admin endpoint, and what the admin endpoint
//! shows of it.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use kpsc_common::PortmapStats;

use crate::{
    admin::{AdminView, MapRow},
    config::portmap::PortmapConfig,
    mapping::map::Origin,
    metrics::Metrics,
    portmap::{
        datapath::{FlowState, PinnedMaps},
        kernel_metrics,
    },
    shutdown::Draining,
};

/// What the last advertised-listener probe found.
#[derive(Default)]
pub struct ProbeState {
    pub done: bool,
    pub mismatches: Vec<String>,
}

pub struct PortmapState {
    pub config: Mutex<PortmapConfig>,
    /// The kernel maps, read by the admin endpoint; held only to clone the Arc, so a walk
    /// of 65,536 flows never makes another reader wait.
    pub pins: RwLock<Option<Arc<PinnedMaps>>>,
    pub metrics: Arc<Metrics>,
    pub probe: Mutex<ProbeState>,
    pub attached: std::sync::atomic::AtomicBool,
    /// Wakes the prober after a reload.
    pub reprobe: tokio::sync::Notify,
    /// Set on the first SIGTERM/SIGINT: not ready any more, still attached.
    pub draining: Draining,
}

impl PortmapState {
    pub fn set_pins(&self, pins: Option<Arc<PinnedMaps>>) {
        *self.pins.write().unwrap_or_else(PoisonError::into_inner) = pins;
    }

    fn pins(&self) -> Option<Arc<PinnedMaps>> {
        self.pins
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AdminView for PortmapState {
    fn readiness(&self) -> Result<(), String> {
        self.draining.check()?;
        if !self.attached.load(std::sync::atomic::Ordering::Acquire) {
            return Err("program not attached".into());
        }
        let probe = self.probe.lock().expect("probe lock");
        if !probe.done {
            return Err("brokers not probed yet".into());
        }
        if !probe.mismatches.is_empty() {
            return Err(format!(
                "advertised listeners do not match: {}",
                probe.mismatches.join("; ")
            ));
        }
        Ok(())
    }

    fn map_rows(&self) -> Vec<MapRow> {
        let entries = self.config.lock().expect("config lock").entries.clone();
        let pins = self.pins();
        let flows = pins.as_ref().map(|p| p.flows()).unwrap_or_default();
        entries
            .iter()
            .map(|e| {
                let port = e.listen.port();
                let stats = pins.as_ref().map(|p| p.stats(port)).unwrap_or_default();
                let open = flows
                    .iter()
                    .filter(|(k, f)| {
                        u16::from_be(k.dst_port) == port
                            && pins
                                .as_ref()
                                .is_some_and(|p| p.flow_state(f) != FlowState::Closed)
                    })
                    .count();
                MapRow {
                    listen: Some(e.listen.to_string()),
                    node_id: None,
                    broker: e.broker.to_string(),
                    advertised: e.advertised.to_string(),
                    origin: Origin::Static,
                    bound: pins.is_some(),
                    connections_open: open as i64,
                    connections_total: stats.new_flows,
                    bytes_from_client: stats.bytes_in,
                    bytes_to_client: stats.bytes_out,
                    kernel_from_client: None,
                    kernel_to_client: None,
                }
            })
            .collect()
    }

    fn metrics_text(&self) -> String {
        let text = self.metrics.render();
        let (body, eof) = text.split_at(text.rfind("# EOF").unwrap_or(text.len()));
        let mut out = body.to_owned();
        let entries = self.config.lock().expect("config lock").entries.clone();
        if let Some(pins) = self.pins() {
            let rows: Vec<(u16, String, PortmapStats)> = entries
                .iter()
                .map(|e| {
                    (
                        e.listen.port(),
                        e.broker.to_string(),
                        pins.stats(e.listen.port()),
                    )
                })
                .collect();
            kernel_metrics::render(&mut out, &rows);
            kernel_metrics::render_icmp(&mut out, &pins.icmp());
        }
        out.push_str(eof);
        out
    }
}
