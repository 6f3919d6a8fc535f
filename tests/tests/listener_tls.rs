//! TLS on kpscd's listeners (`--proxy-listener-tls-enable`): a CA and a server certificate
//! made here with rcgen, confluent-kafka (Python, librdkafka 2.16 with OpenSSL) producing
//! and consuming with `security.protocol=ssl` and hostname verification through every
//! broker's listener; a plaintext client on a TLS listener closes that connection only;
//! a missing certificate or a key of another certificate exits 2 naming the flag; and
//! behind a cloud endpoint, the PROXY header in clear before the TLS handshake.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use kpsc_tests::{
    Cloud, CloudEndpoint, Header, Kpscd, MockCluster, Pki, RawClient,
    confluent_produce_and_consume, free_port_base, kpscd_bin, proxy_args,
};

/// `count` messages produced and consumed over TLS through kpscd's first listener,
/// trusting the test CA.
fn produce_and_consume_over_tls(base: u16, pki: &Pki, count: usize) {
    let ca = pki.path("ca.pem");
    confluent_produce_and_consume(
        &format!("127.0.1.1:{base}"),
        "secure",
        count,
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", &ca),
            ("ssl.endpoint.identification.algorithm", "https"),
        ],
    );
}

fn kpscd_exit(args: &[String]) -> (i32, String) {
    let out = Command::new(kpscd_bin())
        .arg("proxy")
        .args(args)
        .arg("--http-disable")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn confluent_kafka_over_tls_through_every_listener() {
    let pki = Pki::new();
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("secure", 3).unwrap();
    for p in 0..3 {
        cluster.set_leader("secure", p, p + 1).unwrap();
    }
    let base = free_port_base(20);
    let tls_flags = |cert: &str, key: &str| {
        vec![
            "--proxy-listener-tls-enable".to_owned(),
            "--proxy-listener-cert-file".to_owned(),
            pki.path(cert),
            "--proxy-listener-key-file".to_owned(),
            pki.path(key),
        ]
    };
    let flags = tls_flags("server.pem", "server.key");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &flags)).unwrap();

    produce_and_consume_over_tls(base, &pki, 300);
    // All three brokers' listeners carried TLS traffic.
    for port in [base, base + 12, base + 13] {
        assert!(
            kpscd.metric("kpsc_connections_total", &format!("listen_port=\"{port}\"")) >= 1.0,
            "no connection on {port}"
        );
    }

    // A plaintext Kafka client on the TLS listener: its connection closes, nothing else.
    let mut plain = RawClient::connect(&format!("127.0.0.1:{base}")).unwrap();
    plain
        .stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(plain.api_versions().is_err());
    assert!(
        kpscd.metric(
            "kpsc_connections_rejected_total",
            "reason=\"tls_handshake\""
        ) >= 1.0
    );
    assert!(kpscd.alive());
    drop(kpscd);

    // Bad listener TLS configuration: exit 2 naming the flag.
    let mapping = format!("{},127.0.0.1:{base}", cluster.broker_addr(1));
    let with = |extra: Vec<String>| {
        let mut args = vec!["--bootstrap-server-mapping".to_owned(), mapping.clone()];
        args.extend(extra);
        args
    };
    for (args, flag) in [
        (
            with(tls_flags("missing.pem", "server.key")),
            "--proxy-listener-cert-file",
        ),
        (
            with(tls_flags("server.key", "server.key")),
            "--proxy-listener-cert-file",
        ),
        (
            with(tls_flags("server.pem", "other.key")),
            "--proxy-listener-key-file",
        ),
        (
            with(tls_flags("server.pem", "ca.pem")),
            "--proxy-listener-key-file",
        ),
        (
            with(vec!["--proxy-listener-tls-enable".to_owned()]),
            "--proxy-listener-cert-file",
        ),
    ] {
        let (code, stderr) = kpscd_exit(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    assert!(Path::new(&pki.path("ca.pem")).exists());
}

/// The PSC endpoint's PROXY header comes in clear, then the client's TLS: kpscd reads the
/// one, then terminates the other.
#[test]
fn tls_after_the_proxy_protocol_header() {
    let pki = Pki::new();
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("secure", 3).unwrap();
    for p in 0..3 {
        cluster.set_leader("secure", p, p + 1).unwrap();
    }
    let base = free_port_base(20);
    let args: Vec<String> = [
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
        "--proxy-protocol",
        "required",
        "--allow-endpoint-id",
        "77",
        "--proxy-listener-tls-enable",
        "--proxy-listener-cert-file",
        &pki.path("server.pem"),
        "--proxy-listener-key-file",
        &pki.path("server.key"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kpscd = Kpscd::start(&args).unwrap();
    // The endpoint listens on the advertised addresses and forwards to kpscd's.
    let routes: Vec<_> = [(1, base), (2, base + 12), (3, base + 13)]
        .iter()
        .map(|&(id, port)| {
            (
                format!("127.0.1.{id}:{port}").parse().unwrap(),
                format!("127.0.0.1:{port}").parse().unwrap(),
            )
        })
        .collect();
    let header = Header::V2 {
        client: "198.18.3.4:40000".parse().unwrap(),
        cloud: Some(Cloud::GooglePsc(77)),
    };
    let _psc = CloudEndpoint::start(&routes, header).unwrap();
    produce_and_consume_over_tls(base, &pki, 60);
    assert!(kpscd.metric("kpsc_endpoint_connections_total", "endpoint_id=\"77\"") >= 3.0);
}

/// One 8 MB record fetched in one Fetch over TLS by a client with a small receive buffer
/// that pauses a second before reading: the whole response arrives without another
/// request. (kpscd once left the tail of a response queued in rustls, unflushed; here the
/// kernel's autotuned send buffer makes that race rare, so the forwarder's unit test
/// `a_tls_client_gets_the_whole_response_after_pausing` pins it with small buffers.)
#[test]
fn a_large_response_reaches_a_slow_tls_client_whole() {
    use std::{
        io::{Read, Write},
        net::SocketAddr,
        sync::Arc,
    };

    use kafka_protocol::{
        messages::{
            ApiKey, FetchRequest, TopicName,
            fetch_request::{FetchPartition, FetchTopic},
        },
        protocol::StrBytes,
    };
    use kpsc_tests::request_body;
    use rdkafka::{
        ClientConfig,
        producer::{BaseProducer, BaseRecord, Producer},
    };
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

    const VALUE: usize = 8 << 20;
    let pki = Pki::new();
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("large", 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.broker_addr(1))
        .set("message.max.bytes", (2 * VALUE).to_string())
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let value = vec![0x5a; VALUE];
    producer
        .send(BaseRecord::<(), _>::to("large").payload(&value))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(20)).unwrap();
    drop(producer);

    let base = free_port_base(20);
    let flags = [
        "--proxy-listener-tls-enable".to_owned(),
        "--proxy-listener-cert-file".to_owned(),
        pki.path("server.pem"),
        "--proxy-listener-key-file".to_owned(),
        pki.path("server.key"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &flags)).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // Small before connecting, so the window offered stays small too.
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let addr: SocketAddr = format!("127.0.1.1:{base}").parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let tcp: std::net::TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("127.0.1.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);

    // Fetch v4: no flexible versions, no KIP-951 endpoints, passed through unchanged.
    let fetch = FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(64 << 20)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("large")))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(64 << 20),
                ]),
        ]);
    let body = request_body(ApiKey::Fetch, 4, 7, "kpsc-tls-slow", &fetch).unwrap();
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    tls.write_all(&frame).unwrap();
    tls.flush().unwrap();
    // Not reading: kpscd fills the socket buffers and is blocked when it writes the end.
    std::thread::sleep(Duration::from_secs(1));
    let mut size = [0u8; 4];
    tls.read_exact(&mut size).unwrap();
    let size = i32::from_be_bytes(size) as usize;
    assert!(size > VALUE, "the response ({size} bytes) lacks the record");
    let mut response = vec![0u8; size];
    // Without a flush the last bytes never come: the read times out.
    tls.read_exact(&mut response)
        .unwrap_or_else(|e| panic!("reading the {size}-byte response: {e}"));
    assert_eq!(&response[..4], &7i32.to_be_bytes());
    assert!(
        response.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)),
        "the record's value is not in the response"
    );
    assert!(kpscd.alive());
}
