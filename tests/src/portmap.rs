//! What the portmap tests share: the namespace topology's port plan (broker i behind node
//! port `FIRST_PORT + i`), kpscd portmap's command line, and where its maps are pinned.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
use kpsc_testkit::{
    Kpscd, RawClient,
    datapath::{DEFAULT_PIN_ROOT, pin_dir},
    netns::{
        NODE_CLIENT_IP, NODE_CLIENT_IP6, Topology, broker_ip, broker_ip6, client_ip, client_ip6,
        in_netns,
    },
};

use crate::tansu::TansuHost;

/// Brokers of the mapped-source-port test.
const BROKERS: usize = 3;

/// `kpscd portmap --attach`, for tests that run under both hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Tc,
    Xdp,
}

impl Attach {
    pub fn args(self) -> [&'static str; 2] {
        match self {
            Attach::Tc => ["--attach", "tc"],
            Attach::Xdp => ["--attach", "xdp"],
        }
    }

    /// The namespace topology this hook needs. XDP: the client's and broker's veth ends
    /// receive redirected frames (GRO on), and send full checksums as a real wire does
    /// (checksum offload off), which also makes a checksum the program got wrong a
    /// dropped segment.
    pub fn topology(self, client_ips: usize, broker_ips: usize) -> anyhow::Result<Topology> {
        match self {
            Attach::Tc => Topology::new(client_ips, broker_ips),
            Attach::Xdp => {
                let topo = Topology::without_checksum_offload(client_ips, broker_ips)?;
                topo.enable_xdp_delivery()?;
                Ok(topo)
            }
        }
    }
}

/// The address family a portmap test runs over (the topology has both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The node's address on the client side.
    pub fn node(self) -> &'static str {
        match self {
            Family::V4 => NODE_CLIENT_IP,
            Family::V6 => NODE_CLIENT_IP6,
        }
    }

    pub fn client(self, i: usize) -> String {
        match self {
            Family::V4 => client_ip(i),
            Family::V6 => client_ip6(i),
        }
    }

    pub fn broker(self, i: usize) -> String {
        match self {
            Family::V4 => broker_ip(i),
            Family::V6 => broker_ip6(i),
        }
    }

    /// Every node address of this family.
    pub fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn endpoint(self, host: &str, port: u16) -> String {
        match self {
            Family::V4 => format!("{host}:{port}"),
            Family::V6 => format!("[{host}]:{port}"),
        }
    }

    /// `--bootstrap-server-mapping` of broker `i` listening on `listen_host`, advertising
    /// the node's client-side address.
    pub fn mapping_on(self, i: usize, listen_host: &str) -> String {
        let port = FIRST_PORT + i as u16;
        format!(
            "{},{},{}",
            self.endpoint(&self.broker(i), BROKER_PORT),
            self.endpoint(listen_host, port),
            self.endpoint(self.node(), port)
        )
    }

    /// Starts tansu broker `i` on its address of this family, advertising the node's.
    pub fn start_broker(self, topo: &mut Topology, i: usize) -> anyhow::Result<()> {
        let port = FIRST_PORT + i as u16;
        topo.start_tansu(
            &self.endpoint(&self.broker(i), BROKER_PORT),
            &self.endpoint(self.node(), port),
            &format!("cluster-{i}"),
        )
    }
}

/// The IPv4 address an `Ip` from the kernel maps holds (panics on IPv6: for tests whose
/// flows are all IPv4).
pub fn v4_of(ip: &kpsc_common::Ip) -> Ipv4Addr {
    match kpsc_common::ip_addr(ip) {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => panic!("{v6} where an IPv4 address was expected"),
    }
}

/// Where each tansu broker listens in the broker namespace.
pub const BROKER_PORT: u16 = 39092;
/// Broker i is served on node port FIRST_PORT + i (the guide's 9093, 9094, ...).
pub const FIRST_PORT: u16 = 9093;

/// `--bootstrap-server-mapping` of broker `i`, listening on `listen_host`.
pub fn mapping_on(i: usize, listen_host: &str) -> String {
    Family::V4.mapping_on(i, listen_host)
}

/// `--bootstrap-server-mapping` of broker `i` on every node address (the README's form).
pub fn mapping(i: usize) -> String {
    mapping_on(i, "0.0.0.0")
}

/// `kpscd portmap` on both node interfaces, instance named after the node namespace.
pub fn portmap_args(topo: &Topology, mappings: &[String], extra: &[&str]) -> Vec<String> {
    portmap_command(&topo.node, "n0,n1", mappings, extra)
}

/// `kpscd portmap` attached to `interfaces` (comma-separated), pinning as `instance`
/// (tests name it after the node's namespace, whose removal then removes the pins too).
pub fn portmap_command(
    instance: &str,
    interfaces: &str,
    mappings: &[String],
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec!["portmap".to_owned()];
    for m in mappings {
        args.push("--bootstrap-server-mapping".into());
        args.push(m.clone());
    }
    args.extend(
        [
            "--interface",
            interfaces,
            "--instance",
            instance,
            "--metadata-refresh-interval",
            "1s",
            "--kafka-dial-timeout",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts kpscd portmap in the node namespace and waits until it reports ready.
pub fn start_portmap(topo: &Topology, args: &[String]) -> Kpscd {
    let k = Kpscd::spawn_mode(args, Some(&topo.node)).unwrap();
    k.wait_ready(Duration::from_secs(20)).unwrap();
    k
}

/// One client namespace, one tansu broker advertising the node's first port, and kpscd
/// portmap mapping `FIRST_PORT` on every node address: where most flow tests start.
pub fn one_broker_behind_portmap() -> (Topology, Kpscd) {
    one_broker_behind_portmap_with(Attach::Tc)
}

/// [`one_broker_behind_portmap`] under `attach`, in the topology that hook needs.
pub fn one_broker_behind_portmap_with(attach: Attach) -> (Topology, Kpscd) {
    one_broker_behind_portmap_over(Family::V4, attach)
}

/// [`one_broker_behind_portmap_with`] over `family`: the broker listens and advertises on
/// its addresses of that family, and the mapping listens on every node address of it.
pub fn one_broker_behind_portmap_over(family: Family, attach: Attach) -> (Topology, Kpscd) {
    let mut topo = attach.topology(1, 1).unwrap();
    family.start_broker(&mut topo, 0).unwrap();
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[family.mapping_on(0, family.any())], &attach.args()),
    );
    (topo, kpscd)
}

/// A port nothing listens on in the node namespace (kpscd portmap binds no port there).
const UNUSED_NODE_PORT: u16 = 9;

/// Resolves the node's client-side address of `family` on the client (ARP or neighbour
/// discovery) with a connection the node refuses, to a port no mapping uses: segments
/// crafted on a raw socket are sent once, and any sent before the resolution wait behind
/// it. An IPv6 node whose link came up moments before may miss the client's first
/// neighbour solicitation (seen here: the flood of crafted SYNs then waited 1 s for the
/// next one, past the test's own timing); a TCP connect rides that out.
pub fn resolve_node_from_client(topo: &Topology, family: Family) -> anyhow::Result<()> {
    let node: SocketAddr = family.endpoint(family.node(), UNUSED_NODE_PORT).parse()?;
    let refused = in_netns(&topo.client, || {
        std::net::TcpStream::connect_timeout(&node, Duration::from_secs(5))
    })?;
    match refused {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e).with_context(|| format!("resolving {node} from the client")),
        Ok(_) => anyhow::bail!("{node} accepted a connection: expected nothing listening"),
    }
}

/// The sum of the `ethtool -S` counters ending in `suffix` (e.g. `xdp_redirect`,
/// `xdp_drops`, `xdp_tx`: the XDP verdicts veth counts per queue) over the node's `devs`.
pub fn node_nic_counter(topo: &Topology, devs: &[&str], suffix: &str) -> u64 {
    devs.iter()
        .map(|dev| {
            topo.nic_counter(&topo.node, dev, suffix)
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .sum()
}

/// What XDP did with the frames the node's `dev` received so far.
#[derive(Clone, Copy, Debug)]
pub struct XdpVerdicts {
    /// Finished in XDP: redirected, sent back out (XDP_TX) or dropped.
    pub done: u64,
    /// Passed up to the stack (and TC): veth counts every frame its program ran on, and
    /// each verdict but XDP_PASS.
    pub passed: u64,
}

impl XdpVerdicts {
    pub fn read(topo: &Topology, dev: &str) -> Self {
        let n = |suffix| node_nic_counter(topo, &[dev], suffix);
        let done = n("xdp_redirect") + n("xdp_tx") + n("xdp_drops");
        Self {
            done,
            passed: n("xdp_packets") - done,
        }
    }

    /// The verdicts taken since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            done: self.done - before.done,
            passed: self.passed - before.passed,
        }
    }
}

/// Connects from `client_ip(0):src_port` to the node's `port`, within `timeout`.
pub fn connect_from(src_port: u16, port: u16, timeout: Duration) -> anyhow::Result<RawClient> {
    connect_bound(&client_ip(0), src_port, port, timeout)
}

/// Connects from `src_ip:src_port` (0: any port) to the node's `port`, within `timeout`.
pub fn connect_bound(
    src_ip: &str,
    src_port: u16,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<RawClient> {
    connect_family(Family::V4, src_ip, src_port, port, timeout)
}

/// Connects from `src_ip:src_port` (0: any port) to the node's `port` on its address of
/// `family`, within `timeout`.
pub fn connect_family(
    family: Family,
    src_ip: &str,
    src_port: u16,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<RawClient> {
    connect_to(
        family.endpoint(src_ip, src_port).parse()?,
        family.endpoint(family.node(), port).parse()?,
        timeout,
    )
}

/// Connects from `local` (port 0: any port) to `remote`, within `timeout`.
pub fn connect_to(
    local: SocketAddr,
    remote: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<RawClient> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Earlier connections from this source port linger in TIME_WAIT (other destinations).
    socket.set_reuseaddr(true)?;
    socket.bind(local)?;
    // into_std deregisters from the runtime's reactor: inside the runtime.
    let stream = rt.block_on(async {
        tokio::time::timeout(timeout, socket.connect(remote))
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out after {timeout:?}"))??
            .into_std()
            .map_err(anyhow::Error::from)
    })?;
    stream.set_nonblocking(false)?;
    RawClient::from_stream(stream)
}

/// The cluster id the broker behind a connection reports (tansu broker i: `cluster-i`).
pub fn cluster_id(conn: &mut RawClient) -> anyhow::Result<String> {
    let (r, _): (MetadataResponse, _) = conn.call(
        ApiKey::Metadata,
        4,
        &MetadataRequest::default().with_topics(Some(vec![])),
    )?;
    Ok(r.cluster_id.map(|c| c.to_string()).unwrap_or_default())
}

/// From every mapped port as source port, to every mapped port: each connection reaches
/// the broker of its destination port. A broker's reply to a translated source port that
/// equals a mapped port used to be taken for a client packet to that port and dropped.
pub fn every_mapped_source_port_connects(listen_host: &str, attach: Attach) {
    every_mapped_source_port_connects_over(Family::V4, listen_host, attach)
}

/// `every_mapped_source_port_connects` over `family`.
pub fn every_mapped_source_port_connects_over(family: Family, listen_host: &str, attach: Attach) {
    let mut topo = attach.topology(1, BROKERS).unwrap();
    for i in 0..BROKERS {
        family.start_broker(&mut topo, i).unwrap();
    }
    let mappings: Vec<String> = (0..BROKERS)
        .map(|i| family.mapping_on(i, listen_host))
        .collect();
    let kpscd = start_portmap(&topo, &portmap_args(&topo, &mappings, &attach.args()));
    let ports: Vec<u16> = (0..BROKERS).map(|i| FIRST_PORT + i as u16).collect();
    let mut failures = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        for &src_port in &ports {
            let got = in_netns(&topo.client, || {
                let mut conn = connect_family(
                    family,
                    &family.client(0),
                    src_port,
                    port,
                    Duration::from_secs(3),
                )?;
                cluster_id(&mut conn)
            })
            .unwrap()
            .map_err(|e| format!("{e:#}"));
            match got {
                Ok(id) if id == format!("cluster-{i}") => {}
                other => failures.push(format!("{src_port} -> {port}: {other:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "listen {listen_host}, {attach:?}, {family:?}: {failures:#?}\nkpscd log:\n{}",
        kpscd.log()
    );
}

/// A one-record batch (Kafka record batch v2, uncompressed).
pub fn record_batch(key: Option<&[u8]>, value: &[u8]) -> bytes::Bytes {
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: 0,
        key: key.map(bytes::Bytes::copy_from_slice),
        value: Some(bytes::Bytes::copy_from_slice(value)),
        headers: Default::default(),
    };
    let mut batch = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut batch,
        [record].iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    batch.freeze()
}

/// Produces one record on `conn` (acks=1) and checks the broker took it.
pub fn produce_one(conn: &mut RawClient, topic: &str, value: &[u8]) -> anyhow::Result<()> {
    produce_keyed(conn, topic, None, value)
}

/// [`produce_one`] with a record key.
pub fn produce_keyed(
    conn: &mut RawClient,
    topic: &str,
    key: Option<&[u8]>,
    value: &[u8],
) -> anyhow::Result<()> {
    use kafka_protocol::{
        messages::{
            ProduceRequest, ProduceResponse, TopicName,
            produce_request::{PartitionProduceData, TopicProduceData},
        },
        protocol::StrBytes,
    };
    let request = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(record_batch(key, value))),
                ]),
        ]);
    let (r, _): (ProduceResponse, _) = conn.call(ApiKey::Produce, 7, &request)?;
    let code = r
        .responses
        .first()
        .and_then(|t| t.partition_responses.first())
        .map(|p| p.error_code);
    anyhow::ensure!(code == Some(0), "produce answered {code:?}");
    Ok(())
}

/// From namespace `client_ns`: creates `topic` (one partition), produces `n` records
/// (acks=all, `message-<i>-` and 200 bytes) and consumes them back, all through
/// `bootstrap`; returns the consumed values in order.
pub fn produce_and_consume(client_ns: &str, bootstrap: &str, topic: &str, n: usize) -> Vec<String> {
    use rdkafka::{
        ClientConfig, Message, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
        producer::{BaseProducer, BaseRecord, Producer},
    };
    in_netns(client_ns, || {
        crate::create_topic(bootstrap, topic, 1).unwrap();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        for i in 0..n {
            let value = format!("message-{i}-{}", "x".repeat(200));
            producer
                .send(BaseRecord::<(), _>::to(topic).partition(0).payload(&value))
                .unwrap();
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "unused")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got.len() < n && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
            }
        }
        got
    })
    .unwrap()
}

/// Where the instance of `topo` pins its maps.
pub fn pins(topo: &Topology) -> PathBuf {
    pin_dir(std::path::Path::new(DEFAULT_PIN_ROOT), &topo.node)
}

/// `kpscctl maps --instance <instance> <extra>`'s output; panics if it fails.
pub fn kpscctl_maps(instance: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new(kpsc_testkit::kpscctl_bin())
        .args(["maps", "--instance", instance])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kpscctl maps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kpscctl maps --json` of `instance`.
pub fn kpscctl_maps_json(instance: &str) -> serde_json::Value {
    serde_json::from_str(&kpscctl_maps(instance, &["--json"])).unwrap()
}

/// Sends SIGHUP to `kpscd` and waits until it logs the reloaded port map.
pub fn reload(kpscd: &Kpscd) {
    // SAFETY: kill(2) of a process the test started.
    assert_eq!(
        unsafe { libc::kill(kpscd.pid() as libc::pid_t, libc::SIGHUP) },
        0,
        "SIGHUP to kpscd"
    );
    kpsc_testkit::eventually(Duration::from_secs(10), || {
        anyhow::ensure!(
            kpscd.log().contains("port map reloaded"),
            "not reloaded yet"
        );
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}; log:\n{}", kpscd.log()));
}
