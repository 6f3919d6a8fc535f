//! kpscd behind a cloud private endpoint that prepends the PROXY protocol header: a real
//! client (rdkafka) produces and consumes through the endpoint stand-in (`CloudEndpoint`)
//! with each cloud's endpoint-id TLV, allowed and refused by `--allow-endpoint-id` and
//! `--allow-source`; v1 headers; and raw connections with malformed, truncated, missing
//! and unexpected headers, each closing one connection while the daemon keeps serving.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use kpsc_tests::{
    Cloud, CloudEndpoint, Header, Kpscd, MockCluster, RawClient, encode_v2, eventually,
    free_port_base,
};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
    topic_partition_list::{Offset, TopicPartitionList},
};

const TOPIC: &str = "changefeed";
const PSC_ID: u64 = 43_686_719_580_552_292;
const AZURE_LINK_ID: u32 = 0x2600_0033;
const VPCE_ID: &str = "vpce-08d2bf15fac5001c9";

/// kpscd listening on 127.0.0.1 only (the node's address behind the endpoint), broker 1
/// statically on `base`, the others at `base + 10 + id`, all advertised as
/// `127.0.1.<id>`: the endpoint's addresses.
fn start_kpscd(cluster: &MockCluster, base: u16, extra: &[&str]) -> Kpscd {
    let mut args: Vec<String> = [
        "--bootstrap-server-mapping",
        &format!(
            "{},127.0.0.1:{base},127.0.1.1:{base}",
            cluster.broker_addr(1)
        ),
        "--dynamic-sequential-min-port",
        &(base + 10).to_string(),
        "--dynamic-advertised-listener",
        "127.0.1.<broker_id>",
        "--default-listener-ip",
        "127.0.0.1",
        "--metadata-refresh-interval",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Kpscd::start(&args).unwrap()
}

/// The endpoint's address for each broker -> kpscd's listener for it.
fn routes(base: u16) -> Vec<(SocketAddr, SocketAddr)> {
    [(1, base), (2, base + 12), (3, base + 13)]
        .iter()
        .map(|&(id, port)| {
            (
                format!("127.0.1.{id}:{port}").parse().unwrap(),
                format!("127.0.0.1:{port}").parse().unwrap(),
            )
        })
        .collect()
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .set("socket.connection.setup.timeout.ms", "3000");
    c
}

/// Produces `n` messages over all three partitions (leaders on all three brokers, so every
/// endpoint route is used) and reads them back; returns how many came back.
fn produce_and_consume(bootstrap: &str, n: usize) -> usize {
    let producer: BaseProducer = client_config(bootstrap)
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    for i in 0..n {
        let value = format!("message-{i}");
        let record = BaseRecord::<(), _>::to(TOPIC)
            .partition((i % 3) as i32)
            .payload(&value);
        producer.send(record).map_err(|(e, _)| e).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "proxy-protocol-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..3 {
        assignment
            .add_partition_offset(TOPIC, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200))
            && m.payload().is_some()
        {
            got += 1;
        }
    }
    got
}

/// Whether a client gets metadata through `bootstrap` within 3 s.
fn metadata_ok(bootstrap: &str) -> bool {
    let producer: BaseProducer = client_config(bootstrap).create().unwrap();
    producer
        .client()
        .fetch_metadata(None, Duration::from_secs(3))
        .is_ok()
}

fn cluster() -> MockCluster {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(TOPIC, 3).unwrap();
    for p in 0..3 {
        cluster.set_leader(TOPIC, p, p + 1).unwrap();
    }
    cluster
}

/// Connections kpscd admitted on its listeners (accepted and forwarded to a broker).
fn admitted(kpscd: &Kpscd) -> f64 {
    kpscd.metric("kpsc_connections_total", "")
}

#[test]
fn each_clouds_endpoint_id_is_read_logged_and_checked() {
    let cluster = cluster();
    let base = free_port_base(20);
    let kpscd = start_kpscd(
        &cluster,
        base,
        &[
            "--proxy-protocol",
            "required",
            "--allow-endpoint-id",
            &PSC_ID.to_string(),
            "--allow-endpoint-id",
            &AZURE_LINK_ID.to_string(),
        ],
    );
    let bootstrap = format!("127.0.1.1:{base}");
    let consumer_at = |port: u16| -> SocketAddr { format!("198.18.3.4:{port}").parse().unwrap() };

    // Google PSC, allowed: the whole produce/consume path through the endpoint.
    {
        let header = Header::V2 {
            client: consumer_at(40001),
            cloud: Some(Cloud::GooglePsc(PSC_ID)),
        };
        let _psc = CloudEndpoint::start(&routes(base), header).unwrap();
        assert_eq!(produce_and_consume(&bootstrap, 300), 300);
    }
    let log = kpscd.log();
    assert!(
        log.contains(&format!("endpoint_id={PSC_ID}"))
            && log.contains("client=198.18.3.4:40001")
            && log.contains("cloud=\"gcp_psc\""),
        "{log}"
    );
    assert!(
        kpscd.metric(
            "kpsc_endpoint_connections_total",
            &format!("endpoint_id=\"{PSC_ID}\"")
        ) >= 3.0
    );

    // Azure Private Link, allowed.
    std::thread::sleep(Duration::from_millis(100)); // the previous endpoint's listeners close
    {
        let header = Header::V2 {
            client: consumer_at(40002),
            cloud: Some(Cloud::AzurePrivateLink(AZURE_LINK_ID)),
        };
        let _azure = CloudEndpoint::start(&routes(base), header).unwrap();
        assert!(metadata_ok(&bootstrap));
        assert_eq!(produce_and_consume(&bootstrap, 30), 30);
    }
    assert!(kpscd.log().contains("endpoint_id=637534259"));

    // AWS PrivateLink with an endpoint not on the list: refused before any broker is
    // dialled; the client retries, the log says so once.
    std::thread::sleep(Duration::from_millis(100));
    let before = admitted(&kpscd);
    let bytes_before = kpscd.metric("kpsc_bytes_total", "direction=\"from_client\"");
    {
        let header = Header::V2 {
            client: consumer_at(40003),
            cloud: Some(Cloud::AwsPrivateLink(VPCE_ID.into())),
        };
        let _aws = CloudEndpoint::start(&routes(base), header).unwrap();
        assert!(!metadata_ok(&bootstrap));
    }
    let refused = kpscd.metric(
        "kpsc_connections_rejected_total",
        "reason=\"endpoint_id_not_allowed\"",
    );
    assert!(refused >= 2.0, "rdkafka retries: {refused}");
    assert_eq!(
        admitted(&kpscd),
        before,
        "a refused connection reached a broker"
    );
    assert_eq!(
        kpscd.metric("kpsc_bytes_total", "direction=\"from_client\""),
        bytes_before
    );
    let log = kpscd.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused") && l.contains(VPCE_ID))
        .collect();
    assert_eq!(lines.len(), 1, "logged once per source:\n{log}");
    assert!(
        lines[0].contains("aws_privatelink") && lines[0].contains("client=198.18.3.4"),
        "{}",
        lines[0]
    );
    assert!(kpscd.alive());
}

#[test]
fn v1_headers_and_allow_source() {
    let cluster = cluster();
    let base = free_port_base(20);
    let kpscd = start_kpscd(
        &cluster,
        base,
        &[
            "--proxy-protocol",
            "optional",
            "--allow-source",
            "198.18.3.0/24",
        ],
    );
    let bootstrap = format!("127.0.1.1:{base}");
    {
        let header = Header::V1 {
            client: "198.18.3.9:41000".parse().unwrap(),
        };
        let _lb = CloudEndpoint::start(&routes(base), header).unwrap();
        assert_eq!(produce_and_consume(&bootstrap, 60), 60);
    }
    assert!(kpscd.log().contains("client=198.18.3.9:41000"));
    assert!(kpscd.log().contains("proxy_protocol=1"));

    // A v2 header naming a source outside the list, and a client without a header (whose
    // TCP peer, 127.0.0.1, is outside it too): both refused.
    std::thread::sleep(Duration::from_millis(100));
    let before = admitted(&kpscd);
    {
        let header = Header::V2 {
            client: "198.18.9.9:41001".parse().unwrap(),
            cloud: None,
        };
        let _lb = CloudEndpoint::start(&routes(base), header).unwrap();
        assert!(!metadata_ok(&bootstrap));
    }
    assert!(!metadata_ok(&format!("127.0.0.1:{base}")));
    assert!(
        kpscd.metric(
            "kpsc_connections_rejected_total",
            "reason=\"source_not_allowed\""
        ) >= 2.0
    );
    assert_eq!(admitted(&kpscd), before);
    let log = kpscd.log();
    assert!(
        log.lines()
            .any(|l| l.contains("connection refused") && l.contains("client=198.18.9.9")),
        "{log}"
    );
}

/// Writes `bytes` to kpscd and waits for it to close the connection (within 5 s).
fn closed_after(addr: &str, bytes: &[u8], then_close: bool) -> bool {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    if then_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn api_versions_request() -> Vec<u8> {
    // ApiVersions v0, correlation id 1, client id "t".
    let body = [0u8, 18, 0, 0, 0, 0, 0, 1, 0, 1, b't'];
    [&(body.len() as i32).to_be_bytes()[..], &body].concat()
}

#[test]
fn malformed_truncated_missing_and_unexpected_headers_close_one_connection() {
    let cluster = cluster();
    let base = free_port_base(20);
    let kpscd = start_kpscd(
        &cluster,
        base,
        &[
            "--proxy-protocol",
            "required",
            "--proxy-protocol-timeout",
            "1s",
        ],
    );
    let addr = format!("127.0.0.1:{base}");
    let src: SocketAddr = "198.18.3.4:40000".parse().unwrap();
    let dst: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let good = encode_v2(src, dst, Some(&Cloud::GooglePsc(7)));
    let mut bad_version = good.clone();
    bad_version[12] = 0x31;
    let mut short_psc = encode_v2(src, dst, None);
    short_psc.extend_from_slice(&[0xE0, 0, 3, 1, 2, 3]);
    let n = short_psc.len();
    short_psc[14..16].copy_from_slice(&((n - 16) as u16).to_be_bytes());
    let request = api_versions_request();
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "v2 version 3",
            [&bad_version[..], &request].concat(),
            false,
            "proxy_header_malformed",
        ),
        (
            "psc id of 3 bytes",
            [&short_psc[..], &request].concat(),
            false,
            "proxy_header_malformed",
        ),
        (
            "v1 garbage",
            [&b"PROXY TCP4 x y 1 2\r\n"[..], &request].concat(),
            false,
            "proxy_header_malformed",
        ),
        (
            "truncated v2",
            good[..20].to_vec(),
            true,
            "proxy_header_truncated",
        ),
        (
            "stalled v2",
            good[..20].to_vec(),
            false,
            "proxy_header_timeout",
        ),
        ("no header", request.clone(), false, "proxy_header_missing"),
    ];
    for (name, bytes, then_close, reason) in &cases {
        let before = kpscd.metric(
            "kpsc_connections_rejected_total",
            &format!("reason=\"{reason}\""),
        );
        let started = Instant::now();
        assert!(
            closed_after(&addr, bytes, *then_close),
            "{name}: not closed"
        );
        eventually(Duration::from_secs(3), || {
            let now = kpscd.metric(
                "kpsc_connections_rejected_total",
                &format!("reason=\"{reason}\""),
            );
            anyhow::ensure!(now == before + 1.0, "{name}: {reason} {before} -> {now}");
            Ok(())
        })
        .unwrap();
        if *reason == "proxy_header_timeout" {
            assert!(started.elapsed() >= Duration::from_millis(900), "{name}");
        }
    }
    assert_eq!(
        admitted(&kpscd),
        0.0,
        "no refused connection reached a broker"
    );
    assert!(kpscd.log().contains("malformed PROXY protocol header"));

    // The daemon still serves a well-formed connection.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.write_all(&good).unwrap();
    let mut client = RawClient::from_stream(stream).unwrap();
    let (versions, _) = client.api_versions().unwrap();
    assert!(!versions.api_keys.is_empty());
    assert!(kpscd.alive());
    drop(kpscd);

    // Off (the default): a header is not read, its bytes go on as Kafka bytes, which
    // kpscd's frame reader refuses (a size of 0x0D0A0D0A); nothing counts as rejected.
    let off = start_kpscd(&cluster, base + 5, &[]);
    let addr = format!("127.0.0.1:{}", base + 5);
    assert!(closed_after(&addr, &[&good[..], &request].concat(), false));
    assert_eq!(off.metric("kpsc_connections_rejected_total", ""), 0.0);
    assert!(
        off.metric(
            "kpsc_connection_errors_total",
            "reason=\"client_frame_too_large\""
        ) >= 1.0
    );
    let mut client = RawClient::connect(&addr).unwrap();
    assert!(client.api_versions().is_ok());
}
