//! Command-line clients through kpscd in front of librdkafka's mock cluster: kcat (a C
//! client, Debian's librdkafka 2.0.2) and kpscctl after real traffic (rdkafka). Brokers
//! really listen on 127.0.0.1; kpscd advertises broker N as 127.0.1.N, so a client that
//! ever sees 127.0.0.1 or a real broker port got a leaked address.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kpsc_tests::{
    Kpscd, LeakWatch, MockCluster, REAL_BROKER_HOST, free_port_base, kpscctl_bin, proxy_args,
    run_with_timeout, send_waiting,
};
use rdkafka::{
    Message,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};
use serde_json::Value;

const KCAT: &str = "/usr/bin/kcat";
const BROKERS: [i32; 3] = [1, 2, 3];

/// A three-broker mock cluster with `topic` (partition p led by broker p + 1) behind kpscd.
struct Setup {
    cluster: MockCluster,
    kpscd: Kpscd,
    base: u16,
}

impl Setup {
    fn new(topic: &str) -> Self {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic(topic, 3).unwrap();
        for p in 0..3 {
            cluster.set_leader(topic, p, p + 1).unwrap();
        }
        let base = free_port_base(20);
        let kpscd = Kpscd::start(&proxy_args(&cluster, base, &[])).unwrap();
        Self {
            cluster,
            kpscd,
            base,
        }
    }

    /// Broker 1 on the static port, the others on base + 10 + id (proxy_args).
    fn port(&self, broker: i32) -> u16 {
        if broker == 1 {
            self.base
        } else {
            self.base + 10 + broker as u16
        }
    }

    fn advertised(&self, broker: i32) -> String {
        format!("127.0.1.{broker}:{}", self.port(broker))
    }

    fn advertised_set(&self) -> BTreeSet<String> {
        BROKERS.iter().map(|&b| self.advertised(b)).collect()
    }

    fn real_ports(&self) -> Vec<u16> {
        self.cluster
            .broker_addrs()
            .iter()
            .map(|a| a.rsplit_once(':').unwrap().1.parse().unwrap())
            .collect()
    }

    /// No decode failures, and a clean exit (code 0, no panic) on SIGTERM.
    fn stop_healthy(mut self) {
        assert_eq!(
            self.kpscd.metric("kpsc_decode_failures_total", ""),
            0.0,
            "kpscd decode failures; log:\n{}",
            self.kpscd.log()
        );
        let code = self.kpscd.terminate(Duration::from_secs(10)).unwrap();
        let log = self.kpscd.log();
        assert_eq!(
            code, 0,
            "kpscd exited with {code} after SIGTERM; log:\n{log}"
        );
        assert!(!log.contains("panicked"), "kpscd panicked; log:\n{log}");
    }
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text[text.len().saturating_sub(3000)..].to_owned()
}

#[test]
fn kcat_lists_produces_and_consumes() {
    assert!(Path::new(KCAT).exists(), "{KCAT} missing");
    let topic = "kpsc-kcat";
    let setup = Setup::new(topic);
    // Each run must succeed and never show the real broker host in its debug output.
    let kcat = |args: &[&str], input: &str| {
        let r = run_with_timeout(
            Command::new(KCAT).args(args),
            input.as_bytes(),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(
            r.status.success(),
            "kcat {args:?}: {}\n{}",
            r.status,
            tail(&r.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&r.stderr).contains(REAL_BROKER_HOST),
            "kcat {args:?}: {}",
            tail(&r.stderr)
        );
        r
    };
    let expected: Vec<Value> = BROKERS
        .iter()
        .map(|&b| serde_json::json!({"id": b, "name": setup.advertised(b)}))
        .collect();

    for via in BROKERS {
        let bootstrap = setup.advertised(via);
        let r = kcat(
            &[
                "-b",
                &bootstrap,
                "-L",
                "-J",
                "-m",
                "10",
                "-X",
                "debug=broker,metadata",
            ],
            "",
        );
        let out = String::from_utf8_lossy(&r.stdout);
        let md: Value = serde_json::from_str(&out).unwrap();
        let mut brokers = md["brokers"].as_array().unwrap().clone();
        brokers.sort_by_key(|b| b["id"].as_i64());
        assert_eq!(brokers, expected, "via {bootstrap}: {}", md["brokers"]);
        assert!(!out.contains(REAL_BROKER_HOST), "{out}");
        let t = md["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == topic)
            .unwrap_or_else(|| panic!("{topic} not listed: {}", md["topics"]));
        let leaders: BTreeMap<i64, i64> = t["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["partition"].as_i64().unwrap(),
                    p["leader"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(leaders, BTreeMap::from([(0, 1), (1, 2), (2, 3)]));
    }

    // Keyed, so the partitioner spreads lines over all three partitions (keyless messages
    // would stick to one partition: librdkafka's sticky partitioner).
    let lines: Vec<String> = (0..200).map(|i| format!("kcat-{i:04}")).collect();
    let keyed: String = lines
        .iter()
        .enumerate()
        .map(|(i, line)| format!("k{i:04}:{line}\n"))
        .collect();
    let bootstrap = setup.advertised(1);
    kcat(
        &[
            "-P",
            "-b",
            &bootstrap,
            "-t",
            topic,
            "-K",
            ":",
            "-X",
            "debug=broker",
            "-X",
            "acks=all",
        ],
        &keyed,
    );

    let r = kcat(
        &[
            "-C",
            "-b",
            &bootstrap,
            "-t",
            topic,
            "-e",
            "-o",
            "beginning",
            "-q",
            "-f",
            "%p %o %k %s\n",
            "-X",
            "debug=broker",
        ],
        "",
    );
    let out = String::from_utf8_lossy(&r.stdout);
    let got: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.splitn(4, ' ').collect())
        .collect();
    let mut values: Vec<&str> = got.iter().map(|f| f[3]).collect();
    values.sort_unstable();
    assert_eq!(values, lines, "kcat consumed {} of 200 lines", got.len());
    let mut per_partition: BTreeMap<i32, Vec<(i64, &str)>> = BTreeMap::new();
    for f in &got {
        let (partition, offset, key, value) = (f[0], f[1], f[2], f[3]);
        assert_eq!(
            &key[1..],
            value.strip_prefix("kcat-").unwrap(),
            "{key} {value}"
        );
        per_partition
            .entry(partition.parse().unwrap())
            .or_default()
            .push((offset.parse().unwrap(), value));
    }
    for (p, records) in &per_partition {
        assert!(
            records.windows(2).all(|w| w[0].0 <= w[1].0),
            "partition {p} offsets"
        );
        assert!(
            records.windows(2).all(|w| w[0].1 <= w[1].1),
            "partition {p} order"
        );
    }
    assert_eq!(
        per_partition.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "kcat used some partitions only"
    );
    setup.stop_healthy();
}

/// Produces `count` messages to partitions 0-2 in turn, each value unique.
fn produce(producer: &BaseProducer<LeakWatch>, watch: &LeakWatch, topic: &str, count: usize) {
    let filler = "x".repeat(100);
    for i in 0..count {
        let value = format!("maps-{i:06}-{filler}");
        watch.delivered().order.push(value.clone().into_bytes());
        let key = format!("k{i}");
        let record = BaseRecord::to(topic)
            .key(&key)
            .payload(&value)
            .partition((i % 3) as i32);
        send_waiting(producer, record).unwrap();
    }
}

/// Consumes `topic` with a fresh consumer group until `expected` messages arrived, then
/// `linger` more to catch duplicates: partition -> [(offset, value)] in consumption order.
fn consume_all(
    watch: &LeakWatch,
    bootstrap: &str,
    topic: &str,
    expected: usize,
    linger: Duration,
) -> BTreeMap<i32, Vec<(i64, Vec<u8>)>> {
    let consumer: BaseConsumer<LeakWatch> = watch
        .config(bootstrap)
        .set("group.id", "kpsc-maps-group")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "500")
        .create_with_context(watch.clone())
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut got: BTreeMap<i32, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
    let (mut count, mut errors) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stop_at = None;
    while Instant::now() < deadline {
        if stop_at.is_none() && count >= expected {
            stop_at = Some(Instant::now() + linger);
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                got.entry(m.partition())
                    .or_default()
                    .push((m.offset(), m.payload().unwrap_or_default().to_vec()));
                count += 1;
            }
            Some(Err(e)) => errors.push(e),
            None => {}
        }
    }
    // Serve the last statistics and logs.
    let served = Instant::now();
    while served.elapsed() < Duration::from_millis(300) {
        consumer.poll(Duration::from_millis(50));
    }
    drop(consumer);
    assert!(errors.is_empty(), "consumer errors: {errors:?}");
    let sizes: BTreeMap<_, _> = got.iter().map(|(p, v)| (p, v.len())).collect();
    assert_eq!(count, expected, "consumed (per partition: {sizes:?})");
    got
}

/// Everything produced was acknowledged once and consumed once, with the acknowledged
/// partition and offset, each partition in produce order.
fn assert_round_trip(watch: &LeakWatch, consumed: &BTreeMap<i32, Vec<(i64, Vec<u8>)>>) {
    let d = watch.delivered();
    assert!(
        d.errors.is_empty(),
        "{} delivery errors, first: {:?}",
        d.errors.len(),
        &d.errors[..d.errors.len().min(3)]
    );
    assert!(
        d.duplicates.is_empty(),
        "two delivery reports for {:?}",
        d.duplicates[0]
    );
    assert_eq!(d.ok.len(), d.order.len(), "messages acknowledged");
    let mut expected: BTreeMap<i32, Vec<&Vec<u8>>> = BTreeMap::new();
    for v in &d.order {
        expected.entry(d.ok[v].0).or_default().push(v);
    }
    for p in 0..3 {
        let wanted = expected.get(&p).cloned().unwrap_or_default();
        let offsets: Vec<i64> = wanted.iter().map(|v| d.ok[*v].1).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: acknowledged offsets not increasing in produce order"
        );
        let got = consumed.get(&p).cloned().unwrap_or_default();
        assert_eq!(
            got.len(),
            wanted.len(),
            "partition {p}: consumed vs produced"
        );
        let values: Vec<&Vec<u8>> = got.iter().map(|(_, v)| v).collect();
        assert!(values == wanted, "partition {p}: content or order differs");
        let got_offsets: Vec<i64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            got_offsets, offsets,
            "partition {p}: consumed offsets differ from acks"
        );
    }
    assert!(
        consumed.keys().all(|p| (0..3).contains(p)),
        "unexpected partitions {:?}",
        consumed.keys()
    );
}

#[test]
fn kpscctl_maps_after_traffic() {
    let topic = "kpsc-maps";
    let setup = Setup::new(topic);
    let watch = LeakWatch::new("broker");
    let bootstrap = setup.advertised(1);
    let producer: BaseProducer<LeakWatch> = watch
        .config(&bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .set("retry.backoff.ms", "100")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "500")
        .create_with_context(watch.clone())
        .unwrap();
    produce(&producer, &watch, topic, 300);
    producer.flush(Duration::from_secs(30)).unwrap();
    drop(producer);
    let consumed = consume_all(&watch, &bootstrap, topic, 300, Duration::from_millis(200));
    assert_round_trip(&watch, &consumed);

    let admin = setup.kpscd.admin.to_string();
    let kpscctl = |args: &[&str]| {
        run_with_timeout(
            Command::new(kpscctl_bin()).arg("maps").args(args),
            b"",
            Duration::from_secs(15),
        )
        .unwrap()
    };
    let r = kpscctl(&["--admin", &admin, "--json"]);
    assert!(r.status.success(), "{}", tail(&r.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&r.stdout).unwrap();
    let by_node: BTreeMap<i64, &Value> = rows
        .iter()
        .map(|r| (r["node_id"].as_i64().unwrap(), r))
        .collect();
    assert!(
        rows.len() == 3 && by_node.keys().copied().eq(BROKERS.map(i64::from)),
        "{rows:?}"
    );
    for b in BROKERS {
        let row = by_node[&i64::from(b)];
        assert_eq!(row["advertised"], setup.advertised(b), "{row}");
        assert_eq!(row["broker"], setup.cluster.broker_addr(b), "{row}");
        assert_eq!(row["listen"], format!("0.0.0.0:{}", setup.port(b)), "{row}");
        assert_eq!(row["bound"], true, "{row}");
        for counter in ["connections_total", "bytes_from_client", "bytes_to_client"] {
            assert!(row[counter].as_u64().unwrap() > 0, "{counter}: {row}");
        }
    }
    // The CLI reports what the endpoint serves.
    let direct = setup.kpscd.maps().unwrap();
    for b in BROKERS {
        let served = direct
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"] == b)
            .unwrap();
        let shown = by_node[&i64::from(b)];
        for key in ["listen", "broker", "advertised", "origin", "bound"] {
            assert_eq!(served[key], shown[key], "{key}: {served} vs {shown}");
        }
        let bytes = |row: &Value| row["bytes_from_client"].as_u64().unwrap();
        assert!(bytes(served) >= bytes(shown), "{served} vs {shown}");
    }

    let r = kpscctl(&["--admin", &admin]);
    assert!(r.status.success(), "{}", tail(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    let table: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(table[0].starts_with("LISTEN"), "{table:?}");
    assert_eq!(table.len(), 1 + BROKERS.len(), "{table:?}");
    for b in BROKERS {
        let broker = setup.cluster.broker_addr(b);
        let matching: Vec<_> = table[1..]
            .iter()
            .filter(|l| l.contains(&setup.advertised(b)) && l.contains(&broker))
            .collect();
        assert_eq!(matching.len(), 1, "broker {b}: {table:?}");
        assert!(
            matching[0].starts_with(&format!("0.0.0.0:{}", setup.port(b))),
            "{}",
            matching[0]
        );
    }
    assert!(!text.contains("NOT BOUND"), "{text}");

    // Wrong admin address: a clear error, not a hang or a zero exit.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = kpscctl(&["--admin", &format!("127.0.0.1:{closed_port}")]);
    assert!(
        !r.status.success() && String::from_utf8_lossy(&r.stderr).contains("cannot reach"),
        "{} {}",
        r.status,
        tail(&r.stderr)
    );
    watch.assert_clean(
        REAL_BROKER_HOST,
        &setup.advertised_set(),
        &setup.real_ports(),
    );
    setup.stop_healthy();
}
