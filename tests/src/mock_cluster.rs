//! librdkafka's mock Kafka cluster (a real, independent broker implementation shipped with
//! librdkafka), owned by this process, and kpscd's flags in front of it.

use std::{collections::BTreeMap, ffi::CString, time::Duration};

use anyhow::{Context as _, bail};
use rdkafka::{
    ClientConfig, bindings as rd,
    producer::{BaseProducer, Producer},
};

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
    /// Three brokers and `topic` with `partitions` all led by broker 1 (kpscd's static
    /// port in [`proxy_args`]), so one connection can produce to and fetch from every
    /// partition.
    pub fn led_by_broker_1(topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let cluster = Self::new(3)?;
        cluster.create_topic(topic, partitions)?;
        for p in 0..partitions {
            cluster.set_leader(topic, p, 1)?;
        }
        Ok(cluster)
    }

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

    /// Makes broker `id` advertise `host:port` in metadata (it keeps listening where it
    /// was): a broker whose advertised name the proxy node must dial under another.
    pub fn set_advertised(&self, id: i32, host: &str, port: u16) -> anyhow::Result<()> {
        let host = CString::new(host)?;
        // SAFETY: valid handle; librdkafka copies the host string.
        unsafe {
            rd::rd_kafka_mock_broker_set_host_port(self.cluster, id, host.as_ptr(), port.into())
        };
        Ok(())
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

/// What kpscd started with [`proxy_args`] advertises for a 3-broker cluster: node id ->
/// (host, port); broker 1 at `base`, the others at `base + 10 + id`.
pub fn advertised_addresses(base: u16) -> BTreeMap<i32, (String, i32)> {
    let base = i32::from(base);
    (1..=3)
        .map(|id| {
            let port = if id == 1 { base } else { base + 10 + id };
            (id, (format!("127.0.1.{id}"), port))
        })
        .collect()
}
