//! State shared by the connections, the metadata refresher and the admin endpoint.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{AdminView, MapRow},
    config::proxy::ProxyConfig,
    mapping::{addr::BrokerAddr, map::PortMap},
    metrics::Metrics,
    proxy::{
        access::Gate,
        budget::RewriteBudget,
        listeners::{Accepted, Listeners},
    },
    shutdown::Draining,
};

pub struct ProxyState {
    pub config: ProxyConfig,
    pub metrics: Arc<Metrics>,
    pub listeners: Listeners,
    /// Memory for rewriting responses, shared by every connection.
    pub rewrite_budget: RewriteBudget,
    /// Admission of new client connections (PROXY header, allow-lists).
    pub gate: Gate,
    metadata_known: AtomicBool,
    /// Why the last metadata refresh failed, for `/ready` while none has succeeded.
    metadata_error: Mutex<Option<String>>,
    /// Set on the first SIGTERM/SIGINT: not ready any more, still serving.
    draining: Draining,
    /// Cancelled on SIGTERM/SIGINT: listeners stop accepting, connections stop reading.
    pub shutdown: CancellationToken,
    /// Every listener and connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl ProxyState {
    /// Binds the static listeners; accepted connections arrive on the returned receiver.
    pub fn start(config: ProxyConfig) -> anyhow::Result<(Arc<Self>, mpsc::Receiver<Accepted>)> {
        let map = PortMap::new(config.port_map.clone())
            .context("invalid --bootstrap-server-mapping/--external-server-mapping")?;
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (accepted, incoming) = mpsc::channel(1024);
        let listeners = Listeners::start(
            map,
            Arc::clone(&metrics),
            accepted,
            shutdown.clone(),
            &tasks,
        )?;
        let state = Arc::new(Self {
            rewrite_budget: RewriteBudget::new(config.rewrite_memory_budget),
            gate: Gate::new(config.access.clone()),
            config,
            metrics,
            listeners,
            metadata_known: AtomicBool::new(false),
            metadata_error: Mutex::new(None),
            draining: Draining::default(),
            shutdown,
            tasks,
        });
        state.update_ready();
        Ok((state, incoming))
    }

    pub fn set_metadata_known(&self) {
        self.metadata_known.store(true, Ordering::Release);
        *self
            .metadata_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.update_ready();
    }

    /// Records why metadata could not be fetched (shown by `/ready` until it is).
    pub fn set_metadata_error(&self, error: String) {
        *self
            .metadata_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Maps and binds the brokers a metadata snapshot or a response names; returns what
    /// could not be.
    pub async fn learn(&self, brokers: &[(i32, BrokerAddr)]) -> Vec<anyhow::Error> {
        let problems = self.listeners.ensure_bound(brokers).await;
        self.update_ready();
        problems
    }

    /// Turns `/ready` (and the ready gauge) to "shutting down"; serving goes on.
    pub fn start_draining(&self) {
        self.draining.start();
        self.update_ready();
    }

    fn update_ready(&self) {
        let ready = self.readiness().is_ok();
        self.metrics.ready.set(i64::from(ready));
        self.metrics
            .brokers_known
            .set(self.listeners.snapshot().map.entries().len() as i64);
    }
}

impl AdminView for ProxyState {
    fn readiness(&self) -> Result<(), String> {
        self.draining.check()?;
        if !self.metadata_known.load(Ordering::Acquire) {
            let error = self
                .metadata_error
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            return Err(match error.as_deref() {
                Some(error) => format!("cluster metadata not fetched yet: {error}"),
                None => "cluster metadata not fetched yet".into(),
            });
        }
        let unbound = self.listeners.snapshot().unbound();
        if !unbound.is_empty() {
            return Err(format!("listen ports not bound: {unbound:?}"));
        }
        Ok(())
    }

    fn map_rows(&self) -> Vec<MapRow> {
        let snapshot = self.listeners.snapshot();
        snapshot
            .map
            .entries()
            .iter()
            .map(|e| {
                let counters = e.listen.and_then(|l| snapshot.bound.get(&l.port()));
                MapRow {
                    listen: e.listen.map(|l| l.to_string()),
                    node_id: e.node_id,
                    broker: e.broker.to_string(),
                    advertised: e.advertised.to_string(),
                    origin: e.origin,
                    bound: counters.is_some(),
                    connections_open: counters.map_or(0, |c| c.connections_open.get()),
                    connections_total: counters.map_or(0, |c| c.connections_total.get()),
                    bytes_from_client: counters.map_or(0, |c| c.bytes_from_client.get()),
                    bytes_to_client: counters.map_or(0, |c| c.bytes_to_client.get()),
                }
            })
            .collect()
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}
