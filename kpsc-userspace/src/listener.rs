//! Listeners: one TCP listener per mapped broker, bound from the port map, plus the
//! shared state every connection of the proxy sees.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin::{AdminView, MapRow},
    config::ProxyConfig,
    forward,
    metrics::{Metrics, PortCounters},
    portmap::{BrokerAddr, MapEntry, PortMap},
};

/// Where a listen port forwards to.
#[derive(Clone, Debug)]
pub struct Route {
    pub listen_port: u16,
    pub broker: BrokerAddr,
    pub counters: PortCounters,
}

/// State shared by listeners, connections, the refresher and the admin endpoint.
pub struct ProxyState {
    pub config: ProxyConfig,
    pub map: RwLock<PortMap>,
    pub metrics: Arc<Metrics>,
    /// listen port -> counters, for every port actually bound.
    bound: Mutex<HashMap<u16, PortCounters>>,
    metadata_known: AtomicBool,
    /// Cancelled on SIGTERM/SIGINT: listeners stop accepting, connections stop reading.
    pub shutdown: CancellationToken,
    /// Every listener and connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl ProxyState {
    pub fn new(config: ProxyConfig) -> anyhow::Result<Arc<Self>> {
        let map = PortMap::new(config.map.port_map.clone())
            .context("invalid --bootstrap-server-mapping/--external-server-mapping")?;
        Ok(Arc::new(Self {
            config,
            map: RwLock::new(map),
            metrics: Metrics::new(),
            bound: Mutex::new(HashMap::new()),
            metadata_known: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    pub fn set_metadata_known(&self) {
        self.metadata_known.store(true, Ordering::Release);
        self.update_ready();
    }

    fn unbound_ports(&self) -> Vec<SocketAddr> {
        let bound = self.bound.lock().expect("bound lock");
        self.map
            .read()
            .expect("map lock")
            .entries()
            .iter()
            .filter_map(|e| e.listen)
            .filter(|l| !bound.contains_key(&l.port()))
            .collect()
    }

    fn update_ready(&self) {
        let ready = self.readiness().is_ok();
        self.metrics.ready.set(i64::from(ready));
        self.metrics
            .brokers_known
            .set(self.map.read().expect("map lock").entries().len() as i64);
    }

    /// Binds the listener of one map entry and starts accepting on it.
    /// Synchronous on purpose: connections call it (through `learn`) when a response names
    /// a new broker, and the port must be bound before the client hears of it.
    pub fn bind(self: &Arc<Self>, entry: &MapEntry) -> anyhow::Result<()> {
        let Some(listen) = entry.listen else {
            return Ok(());
        };
        let listener = std::net::TcpListener::bind(listen)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .with_context(|| {
                format!(
                    "cannot listen on {listen} for broker {} ({:?} mapping)",
                    entry.broker, entry.origin
                )
            })?;
        let route = Route {
            listen_port: listen.port(),
            broker: entry.broker.clone(),
            counters: self.metrics.port(listen.port(), &entry.broker.to_string()),
        };
        self.bound
            .lock()
            .expect("bound lock")
            .insert(listen.port(), route.counters.clone());
        info!(
            listen = %listen,
            broker = %entry.broker,
            node_id = ?entry.node_id,
            advertised = %entry.advertised,
            "listening"
        );
        let state = Arc::clone(self);
        self.tasks.spawn(accept_loop(listener, route, state));
        self.update_ready();
        Ok(())
    }

    /// Adds brokers from a metadata snapshot (or a response) to the map and binds ports
    /// for the new ones. Returns what could not be mapped or bound.
    pub fn learn(self: &Arc<Self>, brokers: &[(i32, BrokerAddr)]) -> Vec<anyhow::Error> {
        let fully_known = {
            let map = self.map.read().expect("map lock");
            brokers.iter().all(|(id, b)| {
                map.entries()
                    .iter()
                    .any(|e| &e.broker == b && e.node_id == Some(*id))
            })
        };
        if fully_known {
            return Vec::new();
        }
        let (added, errors) = self.map.write().expect("map lock").learn(brokers);
        let mut problems: Vec<anyhow::Error> = errors.into_iter().map(anyhow::Error::new).collect();
        for entry in &added {
            if let Err(e) = self.bind(entry) {
                problems.push(e);
            }
        }
        self.update_ready();
        problems
    }

    /// Refreshes metadata from the first broker that answers.
    pub async fn refresh_metadata(self: &Arc<Self>) -> anyhow::Result<Vec<anyhow::Error>> {
        let candidates: Vec<BrokerAddr> = {
            let map = self.map.read().expect("map lock");
            map.entries()
                .iter()
                .filter(|e| e.origin != crate::portmap::Origin::External)
                .map(|e| e.broker.clone())
                .collect()
        };
        let mut last_error = None;
        for broker in candidates {
            match crate::discovery::fetch_brokers(&broker, self.config.map.dial_timeout).await {
                Ok(brokers) => {
                    let problems = self.learn(&brokers);
                    self.set_metadata_known();
                    return Ok(problems);
                }
                Err(e) => {
                    warn!(broker = %broker, error = %format!("{e:#}"), "metadata refresh failed");
                    last_error = Some(e);
                }
            }
        }
        self.metrics.metadata_refresh_failures.inc();
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no broker to ask for metadata")))
    }

    /// Periodic metadata refresh until shutdown.
    pub async fn refresh_loop(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.config.map.metadata_refresh_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await; // the first tick is immediate; start already refreshed
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            match self.refresh_metadata().await {
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
}

async fn accept_loop(listener: TcpListener, route: Route, state: Arc<ProxyState>) {
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let route = route.clone();
                let conn_state = Arc::clone(&state);
                state
                    .tasks
                    .spawn(forward::serve(stream, peer, route, conn_state));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener stays up.
                warn!(listen_port = route.listen_port, error = %e, "accept failed");
                state.metrics.connection_error("accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl AdminView for ProxyState {
    fn readiness(&self) -> Result<(), String> {
        if !self.metadata_known.load(Ordering::Acquire) {
            return Err("cluster metadata not fetched yet".into());
        }
        let unbound = self.unbound_ports();
        if !unbound.is_empty() {
            return Err(format!("listen ports not bound: {unbound:?}"));
        }
        Ok(())
    }

    fn map_rows(&self) -> Vec<MapRow> {
        let bound = self.bound.lock().expect("bound lock");
        self.map
            .read()
            .expect("map lock")
            .entries()
            .iter()
            .map(|e| {
                let counters = e.listen.and_then(|l| bound.get(&l.port()));
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
