//! Operating kpscd: the port map (deterministic, identical across instances, growing when
//! a broker joins), configuration errors, `kpscctl maps`, graceful shutdown (unready
//! first, then drained), and a second
//! independent broker implementation (tansu).

use std::{
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kafka_protocol::{
    messages::{
        ApiKey, DescribeClusterRequest, DescribeClusterResponse, FindCoordinatorRequest,
        FindCoordinatorResponse, MetadataRequest, MetadataResponse,
    },
    protocol::StrBytes,
};
use kpsc_tests::{
    Kpscd, MockCluster, RawClient, Tansu, contains_bytes, eventually, free_port_base, ha::map_rows,
    kpscctl_bin, kpscd_bin, proxy_args, send_waiting,
};
use rdkafka::{
    ClientConfig, ClientContext, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
};

/// Same flags for every instance but the IP it listens on (two instances of one
/// configuration cannot bind the same ports on one machine; on two nodes they would).
fn instance_args(cluster: &MockCluster, base: u16, listen_ip: &str) -> Vec<String> {
    [
        "--bootstrap-server-mapping",
        &format!(
            "{},{listen_ip}:{base},b1.kpsc.test:{base}",
            cluster.broker_addr(1)
        ),
        "--dynamic-sequential-min-port",
        &(base + 10).to_string(),
        "--dynamic-advertised-listener",
        "b<broker_id>.kpsc.test",
        "--default-listener-ip",
        listen_ip,
        "--metadata-refresh-interval",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn late_broker_gets_its_deterministic_port_and_instances_agree() {
    let cluster = MockCluster::new(3).unwrap();
    let base = free_port_base(40);
    let first = Kpscd::start(&instance_args(&cluster, base, "127.0.3.1")).unwrap();
    let second = Kpscd::start(&instance_args(&cluster, base, "127.0.4.1")).unwrap();
    let normalized = |k: &Kpscd, ip: &str| -> Vec<_> {
        map_rows(k)
            .into_iter()
            .map(|(l, b, a, id)| (l.replace(ip, "IP"), b, a, id))
            .collect()
    };
    let initial = normalized(&first, "127.0.3.1");
    assert_eq!(
        initial,
        vec![
            (
                format!("IP:{base}"),
                cluster.broker_addr(1),
                format!("b1.kpsc.test:{base}"),
                1
            ),
            (
                format!("IP:{}", base + 12),
                cluster.broker_addr(2),
                format!("b2.kpsc.test:{}", base + 12),
                2
            ),
            (
                format!("IP:{}", base + 13),
                cluster.broker_addr(3),
                format!("b3.kpsc.test:{}", base + 13),
                3
            ),
        ]
    );
    assert_eq!(
        normalized(&second, "127.0.4.1"),
        initial,
        "two instances, same configuration, different maps"
    );

    cluster.add_broker(4).unwrap();
    let expected = (
        format!("IP:{}", base + 14),
        format!("b4.kpsc.test:{}", base + 14),
    );
    for (k, ip) in [(&first, "127.0.3.1"), (&second, "127.0.4.1")] {
        eventually(Duration::from_secs(15), || {
            let rows = normalized(k, ip);
            anyhow::ensure!(
                rows.iter()
                    .any(|r| (r.0.clone(), r.2.clone()) == expected && r.3 == 4),
                "{rows:?}"
            );
            Ok(())
        })
        .unwrap();
        let (status, _) = k.get("/ready").unwrap();
        assert_eq!(status, 200, "broker 4's port should be bound");
    }
    assert_eq!(
        normalized(&first, "127.0.3.1"),
        normalized(&second, "127.0.4.1")
    );
    // The new port serves broker 4; its metadata lists four brokers, all advertised.
    let mut client = RawClient::connect(&format!("127.0.3.1:{}", base + 14)).unwrap();
    let (r, raw): (MetadataResponse, _) = client
        .call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    let mut hosts: Vec<String> = r
        .brokers
        .iter()
        .map(|b| format!("{}:{}", b.host, b.port))
        .collect();
    hosts.sort();
    assert_eq!(hosts.len(), 4);
    assert_eq!(hosts[3], expected.1);
    assert!(!contains_bytes(&raw, b"127.0.0.1"));
}

fn kpscd_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(kpscd_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_2_and_names_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--tls-insecure-skip-verify",
            ],
            "--tls-enable",
        ),
        (
            &["proxy", "--tls-client-key-password=x"],
            "--tls-client-key-password",
        ),
        // kafka-proxy's SASL flags need --sasl-enable (kafka-proxy would ignore them).
        (
            &[
                "server",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--sasl-username=x",
            ],
            "--sasl-username",
        ),
        (&["server", "--sasl-plugin-enable"], "--sasl-plugin-enable"),
        (&["proxy"], "--bootstrap-server-mapping"),
        (
            &["proxy", "--bootstrap-server-mapping", "127.0.0.1:1"],
            "--bootstrap-server-mapping",
        ),
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--dynamic-listeners-disable",
                "--bulk-policy",
                "fast",
            ],
            "--bulk-policy",
        ),
        // Dynamic listeners asked for (an advertised pattern) but no first port. (Without
        // any dynamic flag, kafka-proxy's all-static command line, kpscd starts.)
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--dynamic-advertised-listener",
                "b<broker_id>.example.com",
            ],
            "--dynamic-sequential-min-port",
        ),
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--proxy-protocol",
                "sometimes",
            ],
            "--proxy-protocol",
        ),
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--allow-source",
                "10.0.0.0/40",
            ],
            "--allow-source",
        ),
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--allow-endpoint-id",
                "vpce-0abc",
            ],
            "--allow-endpoint-id",
        ),
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "a:1,127.0.0.1:2",
                "--bootstrap-server-mapping",
                "b:1,127.0.0.1:2",
                "--dynamic-listeners-disable",
            ],
            "a:1",
        ),
        (&["proxy", "--no-such-flag"], "--no-such-flag"),
        (&["proxy", "--config", "/nonexistent/kpsc.toml"], "--config"),
        (
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:1,127.0.0.1:2",
                "--shutdown-grace",
                "soon",
            ],
            "--shutdown-grace",
        ),
    ];
    // An argument that is not UTF-8 is a configuration error too, not a panic.
    {
        use std::os::unix::ffi::OsStrExt;
        let out = Command::new(kpscd_bin())
            .arg("proxy")
            .arg("--bootstrap-server-mapping")
            .arg(std::ffi::OsStr::from_bytes(b"\xff:1,127.0.0.1:2"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--bootstrap-server-mapping"), "{stderr}");
    }
    for (args, needle) in cases {
        let (code, stderr) = kpscd_exit(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should name {needle}"
        );
    }
}

#[test]
fn port_conflict_found_in_metadata_is_a_startup_error_naming_both_brokers() {
    let cluster = MockCluster::new(3).unwrap();
    let base = free_port_base(20);
    // min port base-2 puts broker 2 on base, where broker 1 is mapped statically.
    let mapping = format!("{},127.0.0.1:{base}", cluster.broker_addr(1));
    let (code, stderr) = kpscd_exit(&[
        "proxy",
        "--bootstrap-server-mapping",
        &mapping,
        "--dynamic-sequential-min-port",
        &(base - 2).to_string(),
        "--http-disable",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&cluster.broker_addr(1)) && stderr.contains(&cluster.broker_addr(2)),
        "{stderr}"
    );
}

#[test]
fn kpscctl_maps_prints_table_and_json() {
    let cluster = MockCluster::new(3).unwrap();
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &[])).unwrap();
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    let _: (MetadataResponse, _) = client
        .call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    let admin = kpscd.admin.to_string();
    let table = Command::new(kpscctl_bin())
        .args(["maps", "--admin", &admin])
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("LISTEN") && lines[0].contains("ADVERTISED"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "{table}");
    let row1 = lines
        .iter()
        .find(|l| l.contains(&format!("127.0.1.1:{base}")))
        .unwrap();
    assert!(
        row1.contains(&cluster.broker_addr(1)) && row1.contains("static"),
        "{row1}"
    );
    // One open connection on broker 1's port.
    assert!(row1.split_whitespace().any(|c| c == "1"), "{row1}");

    let json = Command::new(kpscctl_bin())
        .args(["maps", "--json", "--admin", &admin])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node_id"] == 1)
        .unwrap();
    assert_eq!(row["connections_open"], 1);
    assert!(row["bytes_to_client"].as_u64().unwrap() > 0);

    let down = Command::new(kpscctl_bin())
        .args(["maps", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach kpscd"));
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let cluster = MockCluster::new(3).unwrap();
    let base = free_port_base(20);
    let mut kpscd = Kpscd::start(&proxy_args(&cluster, base, &[])).unwrap();
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    cluster.set_rtt(1, Duration::from_millis(1500)).unwrap();
    let id = client
        .send(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let pid = kpscd.pid();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // Admission stops at once: new connections are refused.
    eventually(Duration::from_secs(2), || {
        anyhow::ensure!(std::net::TcpStream::connect(("127.0.1.1", base)).is_err());
        Ok(())
    })
    .unwrap();
    let (r, _): (MetadataResponse, _) = client.recv(id, 12).unwrap();
    assert_eq!(r.brokers.len(), 3);
    let code = kpscd.terminate(Duration::from_secs(15)).unwrap();
    assert_eq!(code, 0);
    assert!(started.elapsed() >= Duration::from_millis(1000));
}

/// Records when each message was delivered (producer) or received (consumer).
#[derive(Clone, Default)]
struct Timeline(Arc<Mutex<Vec<Instant>>>);

impl Timeline {
    fn push(&self) {
        self.0.lock().unwrap().push(Instant::now());
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn between(&self, from: Instant, to: Instant) -> usize {
        let times = self.0.lock().unwrap();
        times.iter().filter(|t| **t >= from && **t < to).count()
    }
}

impl ClientContext for Timeline {}
impl ProducerContext for Timeline {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            self.push();
        }
    }
}

/// A producer and a consumer through kpscd until `stop`, each marking its messages on
/// its timeline.
fn run_clients(
    bootstrap: String,
    stop: Arc<AtomicBool>,
) -> (Timeline, Timeline, Vec<std::thread::JoinHandle<()>>) {
    let (produced, consumed) = (Timeline::default(), Timeline::default());
    let config = |bootstrap: &str| {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap)
            .set("topic.metadata.refresh.interval.ms", "1000")
            .set("reconnect.backoff.max.ms", "200");
        c
    };
    let producer: BaseProducer<Timeline> = config(&bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "5000")
        .create_with_context(produced.clone())
        .unwrap();
    let consumer: BaseConsumer = config(&bootstrap)
        .set("group.id", "drain")
        // Closing would otherwise try to commit to a coordinator that is gone, for as
        // long as the session timeout.
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset("t", p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let stop_p = Arc::clone(&stop);
    let p = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop_p.load(Ordering::Relaxed) {
            let value = n.to_string();
            send_waiting(&producer, BaseRecord::to("t").key(&value).payload(&value)).unwrap();
            n += 1;
            producer.poll(Duration::from_millis(10));
        }
        // Whatever is left after kpscd exited cannot be delivered: do not wait for it.
        producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
    });
    let timeline = consumed.clone();
    let c = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(50)) {
                timeline.push();
            }
        }
    });
    (produced, consumed, vec![p, c])
}

/// What a load balancer's health check follows: on SIGTERM `/ready` turns 503 at once,
/// while kpscd serves on for `--shutdown-grace` (existing clients and new connections);
/// then it stops accepting, drains and exits. A second signal in the grace stops at once.
#[test]
fn sigterm_turns_unready_first_and_serves_through_the_grace() {
    const GRACE: Duration = Duration::from_secs(3);
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    let base = free_port_base(20);
    let mut kpscd = Kpscd::start(&proxy_args(&cluster, base, &["--shutdown-grace", "3s"])).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (produced, consumed, clients) = run_clients(format!("127.0.1.1:{base}"), Arc::clone(&stop));
    eventually(Duration::from_secs(20), || {
        anyhow::ensure!(
            produced.count() >= 50 && consumed.count() >= 50,
            "clients not flowing yet"
        );
        Ok(())
    })
    .unwrap();

    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &kpscd.pid().to_string()])
        .status()
        .unwrap();
    eventually(Duration::from_millis(500), || {
        let (status, body) = kpscd.get("/ready")?;
        anyhow::ensure!(status == 503, "/ready still {status}");
        anyhow::ensure!(body.contains("shutting down"), "{body}");
        Ok(())
    })
    .unwrap();
    // During the grace: still unready, and a new connection is accepted and served.
    std::thread::sleep(Duration::from_secs(1));
    let mut fresh = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    let (metadata, _): (MetadataResponse, _) = fresh
        .call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    assert_eq!(metadata.brokers.len(), 3);
    assert_eq!(kpscd.get("/ready").unwrap().0, 503);
    let (_, metrics) = kpscd.get("/metrics").unwrap();
    assert!(metrics.lines().any(|l| l == "kpsc_ready 0"), "{metrics}");
    assert!(
        kpscd.alive(),
        "exited during the grace; log:\n{}",
        kpscd.log()
    );

    let code = kpscd.wait_exit(GRACE + Duration::from_secs(5)).unwrap();
    let exited = signalled.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(code, 0, "log:\n{}", kpscd.log());
    assert!(
        exited >= GRACE,
        "exited {exited:?} after SIGTERM, before the grace ended"
    );
    assert!(
        exited < GRACE + Duration::from_secs(3),
        "drain took {exited:?} in all"
    );
    // The clients kept going between the 503 and the end of the grace.
    let window = (signalled + Duration::from_millis(500), signalled + GRACE);
    let (p, c) = (
        produced.between(window.0, window.1),
        consumed.between(window.0, window.1),
    );
    assert!(
        p >= 20 && c >= 20,
        "during the grace: {p} delivered, {c} consumed"
    );
    eprintln!("grace {GRACE:?}: exited after {exited:?}; during it {p} delivered, {c} consumed");

    // A second signal in the grace stops at once.
    let mut kpscd = Kpscd::start(&proxy_args(
        &cluster,
        free_port_base(20),
        &["--shutdown-grace", "60s"],
    ))
    .unwrap();
    Command::new("kill")
        .args(["-TERM", &kpscd.pid().to_string()])
        .status()
        .unwrap();
    eventually(Duration::from_millis(500), || {
        anyhow::ensure!(kpscd.get("/ready")?.0 == 503);
        Ok(())
    })
    .unwrap();
    let second = Instant::now();
    Command::new("kill")
        .args(["-INT", &kpscd.pid().to_string()])
        .status()
        .unwrap();
    assert_eq!(kpscd.wait_exit(Duration::from_secs(3)).unwrap(), 0);
    assert!(second.elapsed() < Duration::from_secs(3));
    assert!(kpscd.log().contains("stopping now"), "{}", kpscd.log());
}

/// tansu: an independent Kafka-compatible broker. It supports FindCoordinator v4-6 and
/// DescribeCluster, which the mock lacks.
#[test]
fn tansu_broker_through_kpsc() {
    let tansu = Tansu::start().unwrap();
    let broker_port = tansu.port;
    let base = free_port_base(200);
    // tansu reports node id 111: deterministic port base + 111.
    let kpscd = Kpscd::start(&[
        "--bootstrap-server-mapping".into(),
        format!("127.0.0.1:{broker_port},0.0.0.0:{base},127.0.1.1:{base}"),
        "--dynamic-sequential-min-port".into(),
        (base + 1).to_string(),
        "--dynamic-advertised-listener".into(),
        "127.0.1.<broker_id>".into(),
    ])
    .unwrap();
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    for version in 0..=12 {
        let (r, raw): (MetadataResponse, _) = client
            .call(
                ApiKey::Metadata,
                version,
                &MetadataRequest::default().with_topics(if version == 0 {
                    Some(vec![])
                } else {
                    None
                }),
            )
            .unwrap();
        assert!(
            r.brokers
                .iter()
                .all(|b| b.host.as_str() == "127.0.1.1" && b.port == i32::from(base)),
            "v{version}: {:?}",
            r.brokers
        );
        assert!(!contains_bytes(&raw, b"127.0.0.1"), "v{version}");
    }
    for version in 0..=6 {
        let request = if version < 4 {
            FindCoordinatorRequest::default().with_key(StrBytes::from_static_str("g"))
        } else {
            FindCoordinatorRequest::default()
                .with_coordinator_keys(vec![StrBytes::from_static_str("g")])
        };
        let (r, raw): (FindCoordinatorResponse, _) = client
            .call(ApiKey::FindCoordinator, version, &request)
            .unwrap();
        let hosts: Vec<String> = if version < 4 {
            vec![r.host.to_string()]
        } else {
            r.coordinators.iter().map(|c| c.host.to_string()).collect()
        };
        assert!(
            hosts.iter().all(|h| h == "127.0.1.1"),
            "v{version}: {hosts:?}"
        );
        assert!(!contains_bytes(&raw, b"127.0.0.1"), "v{version}");
    }
    for version in 0..=1 {
        let (r, raw): (DescribeClusterResponse, _) = client
            .call(
                ApiKey::DescribeCluster,
                version,
                &DescribeClusterRequest::default(),
            )
            .unwrap();
        assert!(r.brokers.iter().all(|b| b.host.as_str() == "127.0.1.1"));
        assert!(!contains_bytes(&raw, b"127.0.0.1"), "v{version}");
    }
    assert!(kpscd.metric("kpsc_rewrites_total", "DescribeCluster") >= 2.0);
    drop(tansu);
}
