//! Listeners: one TCP listener per mapped broker. A reconciler task owns the port map and
//! the listeners; everyone else asks it to `ensure_bound` the brokers they saw and reads
//! its published snapshot.
//!
//! Invariants:
//! - a broker's port is reported ready only after its listener is bound: requests are
//!   handled one at a time by the single owner, so a concurrent caller asking for the same
//!   broker waits for the bind instead of seeing a half-made entry;
//! - an entry whose bind failed stays in the map and is retried on every request, so a
//!   port that was busy once is not lost for good;
//! - nothing here knows what a connection does: accepted streams go out on a channel.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    mapping::{
        addr::BrokerAddr,
        map::{MapEntry, PortMap},
    },
    metrics::{Metrics, PortCounters},
};

/// Where a listen port forwards to.
#[derive(Clone, Debug)]
pub struct Route {
    pub listen_port: u16,
    pub broker: BrokerAddr,
    pub counters: PortCounters,
}

/// A client connection accepted on a listener, with where it goes.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub route: Route,
}

/// What the reconciler has made true: the map, and the ports bound for it.
pub struct Snapshot {
    pub map: PortMap,
    /// listen port -> counters, for every port actually bound.
    pub bound: HashMap<u16, PortCounters>,
}

impl Snapshot {
    /// Listen addresses of map entries that have no listener.
    pub fn unbound(&self) -> Vec<SocketAddr> {
        self.map
            .entries()
            .iter()
            .filter_map(|e| e.listen)
            .filter(|l| !self.bound.contains_key(&l.port()))
            .collect()
    }

    /// Every broker is in the map under its node id, and has its listener if it needs one.
    fn serves(&self, brokers: &[(i32, BrokerAddr)]) -> bool {
        brokers.iter().all(|(id, broker)| {
            self.map.entries().iter().any(|e| {
                &e.broker == broker
                    && e.node_id == Some(*id)
                    && e.listen.is_none_or(|l| self.bound.contains_key(&l.port()))
            })
        })
    }
}

struct EnsureBound {
    brokers: Vec<(i32, BrokerAddr)>,
    reply: oneshot::Sender<Vec<anyhow::Error>>,
}

/// Handle to the reconciler.
#[derive(Clone)]
pub struct Listeners {
    requests: mpsc::Sender<EnsureBound>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl Listeners {
    /// Binds the listeners of the map's initial entries (a failure is a start-up error),
    /// then hands map and listeners to the reconciler task. Accepted connections are sent
    /// to `accepted`.
    pub fn start(
        map: PortMap,
        metrics: Arc<Metrics>,
        accepted: mpsc::Sender<Accepted>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let mut owner = Owner {
            map,
            bound: HashMap::new(),
            metrics,
            accepted,
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        let initial: Vec<MapEntry> = owner.map.entries().to_vec();
        for entry in &initial {
            owner.bind(entry)?;
        }
        let (publish, snapshot) = watch::channel(owner.snapshot());
        let (requests, inbox) = mpsc::channel(64);
        tasks.spawn(owner.run(inbox, publish));
        Ok(Self { requests, snapshot })
    }

    /// The map and bound ports as of now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.borrow())
    }

    /// Adds `brokers` to the map where they are new, binds every listener the map needs,
    /// and returns what could not be mapped or bound among `brokers`. Returns at once when
    /// everything is already in place (the common case for a Metadata response).
    pub async fn ensure_bound(&self, brokers: &[(i32, BrokerAddr)]) -> Vec<anyhow::Error> {
        if self.snapshot.borrow().serves(brokers) {
            return Vec::new();
        }
        let (reply, answer) = oneshot::channel();
        let request = EnsureBound {
            brokers: brokers.to_vec(),
            reply,
        };
        if self.requests.send(request).await.is_err() {
            return vec![anyhow::anyhow!("kpscd is shutting down")];
        }
        answer
            .await
            .unwrap_or_else(|_| vec![anyhow::anyhow!("kpscd is shutting down")])
    }
}

/// The reconciler's state: only its task touches it.
struct Owner {
    map: PortMap,
    bound: HashMap<u16, PortCounters>,
    metrics: Arc<Metrics>,
    accepted: mpsc::Sender<Accepted>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Owner {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<EnsureBound>,
        publish: watch::Sender<Arc<Snapshot>>,
    ) {
        loop {
            let request = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                request = inbox.recv() => match request {
                    Some(r) => r,
                    None => return,
                },
            };
            let problems = self.reconcile(&request.brokers);
            publish.send_replace(self.snapshot());
            // The asker may have gone (its connection closed); the work stands.
            let _ = request.reply.send(problems);
        }
    }

    fn reconcile(&mut self, brokers: &[(i32, BrokerAddr)]) -> Vec<anyhow::Error> {
        let (_added, errors) = self.map.learn(brokers);
        for e in &errors {
            self.metrics.broker_refused(e.reason());
        }
        let mut problems: Vec<anyhow::Error> = errors.into_iter().map(anyhow::Error::new).collect();
        let unbound: Vec<MapEntry> = self
            .map
            .entries()
            .iter()
            .filter(|e| {
                e.listen
                    .is_some_and(|l| !self.bound.contains_key(&l.port()))
            })
            .cloned()
            .collect();
        for entry in unbound {
            if let Err(e) = self.bind(&entry) {
                self.metrics.broker_refused("bind_failed");
                if brokers.iter().any(|(_, b)| b == &entry.broker) {
                    problems.push(e);
                } else {
                    warn!(error = %format!("{e:#}"), "listener still not bound; retrying on the next metadata");
                }
            }
        }
        problems
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            map: self.map.clone(),
            bound: self.bound.clone(),
        })
    }

    /// Binds the listener of one map entry and starts accepting on it.
    fn bind(&mut self, entry: &MapEntry) -> anyhow::Result<()> {
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
        self.bound.insert(listen.port(), route.counters.clone());
        info!(
            listen = %listen,
            broker = %entry.broker,
            node_id = ?entry.node_id,
            advertised = %entry.advertised,
            "listening"
        );
        self.tasks.spawn(accept_loop(
            listener,
            route,
            self.accepted.clone(),
            self.shutdown.clone(),
            Arc::clone(&self.metrics),
        ));
        Ok(())
    }
}

async fn accept_loop(
    listener: TcpListener,
    route: Route,
    accepted: mpsc::Sender<Accepted>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) {
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = listener.accept() => result,
        };
        match result {
            Ok((stream, peer)) => {
                let connection = Accepted {
                    stream,
                    peer,
                    route: route.clone(),
                };
                if accepted.send(connection).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener stays up.
                warn!(listen_port = route.listen_port, error = %e, "accept failed");
                metrics.connection_error("accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::map::{DynamicPorts, PortMapConfig};

    /// Two consecutive free loopback ports.
    fn free_pair() -> u16 {
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                return port;
            }
        }
    }

    #[tokio::test]
    async fn failed_binds_are_retried_and_no_caller_sees_an_unbound_port() {
        let first = free_pair();
        let map = PortMap::new(PortMapConfig {
            static_mappings: vec![],
            external: vec![],
            dynamic: DynamicPorts::Deterministic {
                min_port: first - 1,
                max_ports: 0,
                id_offset: 0,
            },
            listen_ip: [127, 0, 0, 1].into(),
            advertised: None,
            max_dynamic: 8,
        })
        .unwrap();
        let (accepted, _incoming) = mpsc::channel(8);
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let listeners =
            Listeners::start(map, Metrics::new(), accepted, shutdown.clone(), &tasks).unwrap();
        let broker_1 = (1, BrokerAddr::new("kafka-1", 9092));

        // Broker 1's port (min + 1) is taken: the caller hears so, and the entry stays.
        let blocker = std::net::TcpListener::bind(("127.0.0.1", first)).unwrap();
        let problems = listeners
            .ensure_bound(std::slice::from_ref(&broker_1))
            .await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(format!("{:#}", problems[0]).contains("cannot listen on"));
        assert_eq!(listeners.snapshot().unbound().len(), 1);

        // Once the port is free the next request binds it.
        drop(blocker);
        let problems = listeners
            .ensure_bound(std::slice::from_ref(&broker_1))
            .await;
        assert!(problems.is_empty(), "{problems:?}");
        assert!(listeners.snapshot().unbound().is_empty());
        tokio::net::TcpStream::connect(("127.0.0.1", first))
            .await
            .unwrap();

        // Concurrent callers naming the same new broker: each returns only once its port
        // accepts connections.
        async fn check(listeners: Listeners, first: u16) {
            let broker_2 = [(2, BrokerAddr::new("kafka-2", 9092))];
            assert!(listeners.ensure_bound(&broker_2).await.is_empty());
            tokio::net::TcpStream::connect(("127.0.0.1", first + 1))
                .await
                .unwrap();
        }
        tokio::join!(
            check(listeners.clone(), first),
            check(listeners.clone(), first)
        );
        shutdown.cancel();
    }
}
