//! A passthrough L4 load balancer in the HA topology's lb namespace, standing in for a
//! cloud's internal passthrough load balancer (IPVS is not built into this kernel): an
//! nftables rule DNATs each new connection to the VIP's ports to one backend, spread
//! with `numgen inc`; conntrack keeps every later packet of the flow on that backend and
//! turns the backend's replies (routed back through the lb, see
//! [`HaTopology::route_clients_via_lb`]) back into the VIP's. Nothing is proxied: a
//! backend sees the client's own address.
//!
//! [`HealthCheck`] plays the cloud's health checker: it asks each backend's `/ready` every
//! [`CHECK_INTERVAL`] and rewrites the rule without a backend after [`CHECK_FALL`] failed
//! checks in a row. Like a passthrough balancer, it only stops *new* flows from going
//! there: flows already pinned to a dead backend stay pinned until their clients give up.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kpsc_testkit::{http_get_within, netns};

use crate::ha::{CHECK_FALL, CHECK_INTERVAL, HaTopology, VIP, exec_in};

const TABLE: &str = "kpsc_passthrough_lb";

/// The nftables rule set; conntrack entries outlive it, so replacing it moves no flow.
pub struct PassthroughLb {
    ns: String,
    ports: Vec<u16>,
}

impl PassthroughLb {
    /// Spreads new connections to `VIP:ports` over `backends` (addresses).
    pub fn start(topo: &HaTopology, ports: &[u16], backends: &[String]) -> anyhow::Result<Self> {
        let lb = Self {
            ns: topo.lb.clone(),
            ports: ports.to_vec(),
        };
        lb.set_backends(backends)?;
        Ok(lb)
    }

    /// Replaces the backend list in one nftables transaction (what an operator's or the
    /// cloud's health check does); no backend: new connections reach the lb itself and
    /// are refused.
    pub fn set_backends(&self, backends: &[String]) -> anyhow::Result<()> {
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let rule = if backends.is_empty() {
            String::new()
        } else {
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {b}"))
                .collect();
            format!(
                "  ip daddr {VIP} tcp dport {{ {} }} dnat to numgen inc mod {} map {{ {} }}\n",
                ports.join(", "),
                backends.len(),
                map.join(", ")
            )
        };
        // Declared first so that the delete never fails on the first call.
        let rules = format!(
            "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n \
             chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n\
             {rule} }}\n}}\n"
        );
        exec_in(&self.ns, "nft", &["-f", "-"], &rules)
    }
}

/// When a backend was taken out of the rule.
#[derive(Clone, Debug)]
pub struct TakenOut {
    pub backend: usize,
    pub at: Instant,
}

/// Checks every backend's `/ready` from the lb namespace, on its own thread, until dropped.
pub struct HealthCheck {
    stop: Arc<AtomicBool>,
    taken_out: Arc<Mutex<Vec<TakenOut>>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl HealthCheck {
    /// `backends[i]`: (address the rule sends to, its admin endpoint). Checks time out
    /// after one interval, as a cloud health check's timeout is at most its interval.
    pub fn start(
        topo: &HaTopology,
        lb: PassthroughLb,
        backends: Vec<(String, SocketAddr)>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let taken_out = Arc::new(Mutex::new(Vec::new()));
        let ns = topo.lb.clone();
        let thread = {
            let (stop, taken_out) = (Arc::clone(&stop), Arc::clone(&taken_out));
            std::thread::spawn(move || {
                netns::enter(&ns)?;
                let mut failures = vec![0u32; backends.len()];
                let mut in_service = vec![true; backends.len()];
                while !stop.load(Ordering::Relaxed) {
                    let round = Instant::now();
                    for (i, (_, admin)) in backends.iter().enumerate() {
                        if !in_service[i] {
                            continue;
                        }
                        let ready = matches!(
                            http_get_within(*admin, "/ready", CHECK_INTERVAL, CHECK_INTERVAL),
                            Ok((200, _))
                        );
                        failures[i] = if ready { 0 } else { failures[i] + 1 };
                        if failures[i] >= CHECK_FALL {
                            in_service[i] = false;
                            let up: Vec<String> = backends
                                .iter()
                                .zip(&in_service)
                                .filter(|(_, up)| **up)
                                .map(|((addr, _), _)| addr.clone())
                                .collect();
                            lb.set_backends(&up)?;
                            crate::soak::lock(&taken_out).push(TakenOut {
                                backend: i,
                                at: Instant::now(),
                            });
                        }
                    }
                    std::thread::sleep(CHECK_INTERVAL.saturating_sub(round.elapsed()));
                }
                Ok(())
            })
        };
        Self {
            stop,
            taken_out,
            thread: Some(thread),
        }
    }

    /// Backends taken out so far, in order.
    pub fn taken_out(&self) -> Vec<TakenOut> {
        crate::soak::lock(&self.taken_out).clone()
    }

    /// Stops checking; an error the checker met (e.g. nft refusing a rule) is returned.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().expect("health check thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for HealthCheck {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// How long a dead backend can keep receiving new flows: CHECK_FALL failed checks, each
/// taking up to an interval and a timeout.
pub fn detection_bound() -> Duration {
    CHECK_INTERVAL * 2 * (CHECK_FALL + 1)
}
