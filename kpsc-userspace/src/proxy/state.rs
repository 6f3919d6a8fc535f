//! State shared by the connections, the metadata refresher and the admin endpoint.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{AdminView, KernelRow, MapRow},
    config::proxy::{BulkTransfer, ProxyConfig},
    mapping::{addr::BrokerAddr, map::PortMap},
    metrics::Metrics,
    proxy::rewrite::policy,
    proxy::{
        access::Gate,
        budget::RewriteBudget,
        bulk::{sockmap::KernelPath, uring::ring::Ring},
        listeners::{Accepted, Listeners},
    },
    shutdown::Draining,
    upstream::Upstream,
};

pub struct ProxyState {
    pub config: ProxyConfig,
    pub metrics: Arc<Metrics>,
    pub listeners: Listeners,
    /// Memory for rewriting responses, shared by every connection.
    pub rewrite_budget: RewriteBudget,
    /// Admission of new client connections (PROXY header, allow-lists).
    pub gate: Gate,
    /// How connections to brokers are made (dial mapping, TLS), for clients and discovery.
    pub upstream: Upstream,
    /// `--bulk-transfer sockmap`: the loaded request verdict.
    pub kernel_path: Option<Arc<KernelPath>>,
    /// The io_uring that moves spans under `--bulk-transfer uring`.
    pub uring: Option<Arc<Ring>>,
    metadata_known: AtomicBool,
    /// Why the last metadata request failed, until one succeeds: `/ready` says it.
    discovery_error: Mutex<Option<String>>,
    /// Set on the first SIGTERM/SIGINT: not ready any more, still serving.
    draining: Draining,
    /// Cancelled on SIGTERM/SIGINT: listeners stop accepting, connections stop reading.
    pub shutdown: CancellationToken,
    /// Every listener and connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// The API keys whose requests the kernel may carry without kpscd seeing them: every key
/// kpscd knows but those it answers or refuses itself (ApiVersions newer than it decodes,
/// `--forbidden-api-keys`) and SASL, which it keeps in view.
fn kernel_keys(config: &ProxyConfig) -> Vec<i16> {
    use kafka_protocol::messages::ApiKey;
    let kept = [
        ApiKey::ApiVersions as i16,
        ApiKey::SaslHandshake as i16,
        ApiKey::SaslAuthenticate as i16,
    ];
    // Only keys kpscd knows: an unknown one is refused by kpscd's header check.
    (0..128)
        .filter(|&k| ApiKey::try_from(k).is_ok())
        .filter(|k| !kept.contains(k) && !config.forbidden_api_keys.contains(k))
        .collect()
}

/// Per API key, the lowest version whose responses kpscd must rewrite (i16::MAX: none):
/// the response verdict carries the responses to lower versions. Whether a response needs
/// a rewrite only ever turns on from some version up, so a binary search finds it.
fn rewritten_from() -> [i16; 128] {
    std::array::from_fn(|key| {
        let needs = |version: i16| policy::response_needs_rewrite(key as i16, version);
        if !needs(i16::MAX) {
            return i16::MAX;
        }
        let (mut low, mut high) = (0i16, i16::MAX);
        while low < high {
            let mid = low + (high - low) / 2;
            if needs(mid) {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        low
    })
}

impl ProxyState {
    /// Binds the static listeners; accepted connections arrive on the returned receiver.
    pub fn start(config: ProxyConfig) -> anyhow::Result<(Arc<Self>, mpsc::Receiver<Accepted>)> {
        let map = PortMap::new(config.port_map.clone())
            .context("invalid --bootstrap-server-mapping/--external-server-mapping")?;
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let kernel_path = (config.bulk_transfer == BulkTransfer::Sockmap)
            .then(|| {
                KernelPath::load(
                    kernel_keys(&config),
                    rewritten_from(),
                    config.max_frame_size,
                )
            })
            .transpose()
            .context("--bulk-transfer sockmap")?;
        let uring = (config.bulk_transfer == BulkTransfer::Uring)
            .then(Ring::start)
            .transpose()
            .context("--bulk-transfer uring")?;
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
            upstream: Upstream::new(
                config.dial.clone(),
                config.upstream_tls.as_ref().map(|t| Arc::clone(&t.config)),
                config.common.dial_timeout,
            ),
            discovery_error: Mutex::new(None),
            kernel_path,
            uring,
            config,
            metrics,
            listeners,
            metadata_known: AtomicBool::new(false),
            draining: Draining::default(),
            shutdown,
            tasks,
        });
        state.update_ready();
        Ok((state, incoming))
    }

    pub fn set_metadata_known(&self) {
        *self.discovery_error_slot() = None;
        self.metadata_known.store(true, Ordering::Release);
        self.update_ready();
    }

    /// Records why no broker answered the last metadata request.
    pub fn set_discovery_error(&self, error: String) {
        *self.discovery_error_slot() = Some(error);
    }

    fn discovery_error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.discovery_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
            return Err(match self.discovery_error_slot().as_deref() {
                Some(why) => format!("cluster metadata not fetched yet: {why}"),
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
                    kernel_from_client: self.kernel_path.as_ref().map(|_| {
                        counters.map_or_else(KernelRow::default, |c| {
                            KernelRow::from(&c.kernel_from_client)
                        })
                    }),
                    kernel_to_client: self.kernel_path.as_ref().map(|_| {
                        counters.map_or_else(KernelRow::default, |c| {
                            KernelRow::from(&c.kernel_to_client)
                        })
                    }),
                }
            })
            .collect()
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}
