//! The faults the soak injects, one at a time, into a running changefeed: the broker side
//! (a broker down and up, leaders moving), kpscd itself (SIGTERM or SIGKILL, then a
//! restart on the same ports) and its clients (a storm of connections opened and dropped
//! at once).

use std::{
    io::Write as _,
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kpsc_testkit::Kpscd;

use crate::mock_cluster::{MockCluster, proxy_args};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    BrokerDownUp,
    LeadersMove,
    KpscdSigterm,
    KpscdSigkill,
    DisconnectStorm,
}

impl Fault {
    /// The schedule's cycle.
    pub const ALL: [Fault; 5] = [
        Fault::BrokerDownUp,
        Fault::LeadersMove,
        Fault::KpscdSigterm,
        Fault::KpscdSigkill,
        Fault::DisconnectStorm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::BrokerDownUp => "broker 2 down 3 s, up",
            Fault::LeadersMove => "every partition's leader moves",
            Fault::KpscdSigterm => "kpscd SIGTERM + restart",
            Fault::KpscdSigkill => "kpscd SIGKILL + restart",
            Fault::DisconnectStorm => "client disconnect storm",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Fault::BrokerDownUp => "broker_down_up",
            Fault::LeadersMove => "leaders_move",
            Fault::KpscdSigterm => "kpscd_sigterm",
            Fault::KpscdSigkill => "kpscd_sigkill",
            Fault::DisconnectStorm => "disconnect_storm",
        }
    }
}

/// How long broker 2 stays down.
const BROKER_DOWN: Duration = Duration::from_secs(3);
/// Connections per kpscd port in a disconnect storm.
const STORM_CONNECTIONS: usize = 100;

/// What one injection did.
pub struct Injected {
    pub fault: Fault,
    pub at: Instant,
    /// How long the injection itself took (down time, kpscd's exit and restart).
    pub took: Duration,
    /// What to say about it (e.g. kpscd's exit code, connections opened).
    pub detail: String,
}

/// What the faults act on: the cluster, the topic's partitions, and kpscd (replaced when
/// restarted).
pub struct Target<'a> {
    pub cluster: &'a MockCluster,
    pub topic: &'a str,
    pub partitions: i32,
    pub base: u16,
    pub kpscd: Option<Kpscd>,
    /// kpscd processes started so far (the first included).
    pub kpscd_starts: usize,
    /// The logs of the kpscd processes stopped so far, in order.
    pub kpscd_logs: Vec<String>,
    leader_shift: i32,
}

impl<'a> Target<'a> {
    pub fn new(cluster: &'a MockCluster, topic: &'a str, partitions: i32, base: u16) -> Self {
        Self {
            cluster,
            topic,
            partitions,
            base,
            kpscd: None,
            kpscd_starts: 0,
            kpscd_logs: Vec::new(),
            leader_shift: 0,
        }
    }

    /// Partition p led by broker (p + shift) % 3 + 1.
    pub fn spread_leaders(&mut self) -> anyhow::Result<()> {
        for p in 0..self.partitions {
            self.cluster
                .set_leader(self.topic, p, (p + self.leader_shift) % 3 + 1)?;
        }
        Ok(())
    }

    /// Starts kpscd on the soak's ports and waits until it is ready.
    pub fn start_kpscd(&mut self) -> anyhow::Result<()> {
        let kpscd =
            Kpscd::start(&proxy_args(self.cluster, self.base, &[])).context("starting kpscd")?;
        self.kpscd = Some(kpscd);
        self.kpscd_starts += 1;
        Ok(())
    }

    pub fn kpscd(&self) -> &Kpscd {
        self.kpscd
            .as_ref()
            .expect("kpscd is running between faults")
    }

    /// kpscd's ports: broker 1 static on `base`, brokers 2 and 3 at `base + 10 + id`.
    fn ports(&self) -> [u16; 3] {
        [self.base, self.base + 12, self.base + 13]
    }

    pub fn inject(&mut self, fault: Fault) -> anyhow::Result<Injected> {
        let at = Instant::now();
        let detail = match fault {
            Fault::BrokerDownUp => {
                self.cluster.broker_down(2)?;
                std::thread::sleep(BROKER_DOWN);
                self.cluster.broker_up(2)?;
                format!("down {BROKER_DOWN:?}")
            }
            Fault::LeadersMove => {
                self.leader_shift += 1;
                self.spread_leaders()?;
                format!(
                    "partition p now led by broker (p+{}) % 3 + 1",
                    self.leader_shift
                )
            }
            Fault::KpscdSigterm => {
                let mut old = self.kpscd.take().expect("kpscd running");
                let code = old
                    .terminate(Duration::from_secs(30))
                    .context("kpscd after SIGTERM")?;
                anyhow::ensure!(code == 0, "kpscd exited {code} after SIGTERM");
                self.kpscd_logs.push(old.log());
                drop(old);
                self.start_kpscd()?;
                format!("exit code {code}")
            }
            Fault::KpscdSigkill => {
                let old = self.kpscd.take().expect("kpscd running");
                old.signal(libc::SIGKILL);
                self.kpscd_logs.push(old.log());
                drop(old);
                self.start_kpscd()?;
                "killed".to_owned()
            }
            Fault::DisconnectStorm => {
                let mut conns = Vec::new();
                for port in self.ports() {
                    for i in 0..STORM_CONNECTIONS {
                        let mut s = TcpStream::connect(("127.0.1.1", port))
                            .with_context(|| format!("storm connection to port {port}"))?;
                        // Half of them leave a request half-written: kpscd must drop them
                        // as cleanly as the idle ones.
                        if i % 2 == 0 {
                            s.write_all(&[0, 0, 0, 40, 0, 18])?;
                        }
                        conns.push(s);
                    }
                }
                let opened = conns.len();
                drop(conns);
                anyhow::ensure!(self.kpscd().alive(), "kpscd died in the disconnect storm");
                format!("{opened} connections opened and dropped")
            }
        };
        Ok(Injected {
            fault,
            at,
            took: at.elapsed(),
            detail,
        })
    }
}
