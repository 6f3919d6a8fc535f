//! librdkafka's mock Kafka cluster (a real, independent broker implementation shipped with
//! librdkafka), owned by this process, and kpscd's flags in front of it.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

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

    /// Takes broker `id` down: its connections end (their peers see the close at once)
    /// and it accepts none until [`MockCluster::broker_up`].
    ///
    /// The mock alone does not guarantee the first part. It accepts connections without
    /// SOCK_CLOEXEC, so every child process this test process spawns while one is open
    /// (another test's kpscd, a kpscctl) inherits its descriptor, and the mock's close(2)
    /// then sends nothing while the child lives: the peer sees a broker that is down
    /// still connected, taking requests no one reads, until the child exits (an RST, as
    /// the unread bytes are dropped). Hence the shutdown(2) here, which acts on the socket
    /// whoever holds it.
    pub fn broker_down(&self, id: i32) -> anyhow::Result<()> {
        let addr: SocketAddr = self.broker_addr(id).parse()?;
        // Copies taken before the mock closes its descriptors, shut down after: by then
        // the broker accepts nothing new, so no peer can reconnect to it in between.
        let accepted = accepted_connections(addr)?;
        // SAFETY: valid handle.
        mock_ok(
            unsafe { rd::rd_kafka_mock_broker_set_down(self.cluster, id) },
            "broker_set_down",
        )?;
        for socket in &accepted {
            // Fails only if the connection already ended.
            let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
        }
        Ok(())
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

/// Copies of this process's descriptors of connections accepted at `addr` (a mock
/// broker's listen address): sockets bound to it with a peer.
fn accepted_connections(addr: SocketAddr) -> anyhow::Result<Vec<OwnedFd>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // A copy, checked and later shut down as one: should the mock close `fd` and the
        // number be reused meanwhile, the copy is of whatever it was when taken.
        // SAFETY: fcntl on any number is sound; it fails on one that is not open.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            continue;
        }
        // SAFETY: `copy` is a descriptor just created for us alone.
        let copy = unsafe { OwnedFd::from_raw_fd(copy) };
        let socket = socket2::SockRef::from(&copy);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        if local == Some(addr) && socket.peer_addr().is_ok() {
            found.push(copy);
        }
    }
    Ok(found)
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

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        process::Command,
        time::{Duration, Instant},
    };

    use super::MockCluster;

    /// A connection to a broker taken down ends at once, although a child process spawned
    /// while it was open holds a copy of the mock's descriptor (the mock accepts without
    /// SOCK_CLOEXEC): without the shutdown in `broker_down`, the client would see it open
    /// until the child exits.
    #[test]
    fn broker_down_ends_connections_a_child_process_inherited() {
        let cluster = MockCluster::new(3).unwrap();
        let mut client = TcpStream::connect(cluster.broker_addr(3)).unwrap();
        // ApiVersions v0, answered: the mock has accepted the connection.
        client
            .write_all(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff])
            .unwrap();
        let mut size = [0; 4];
        client.read_exact(&mut size).unwrap();
        let mut body = vec![0; u32::from_be_bytes(size) as usize];
        client.read_exact(&mut body).unwrap();
        assert_eq!(body[..4], 1i32.to_be_bytes(), "correlation id");

        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        cluster.broker_down(3).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = Instant::now();
        let read = client.read(&mut [0; 1]);
        let waited = started.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the connection stayed open {waited:?} after the broker went down: {read:?}"
        );
    }
}
