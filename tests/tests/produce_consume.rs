//! A real client (rdkafka) produces 10,000 messages through kpscd to a 3-partition topic
//! led by three different brokers and consumes them back with a consumer group, with and
//! without leader changes and a broker going down and up mid-stream, under both bulk
//! policies. Every broker the clients ever learn of must be an advertised address.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kpsc_tests::{Kpscd, MockCluster, REAL_BROKER_HOST, free_port_base, proxy_args, send_waiting};
use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::KafkaResult,
    message::{BorrowedMessage, DeliveryResult},
    producer::{BaseProducer, BaseRecord, Producer, ProducerContext},
};

const TOPIC: &str = "changefeed";
const MESSAGES: usize = 10_000;

/// Records every broker name ("host:port/id") librdkafka reports in its statistics: the
/// complete list of brokers the client learned of, from any response; and which brokers
/// the last statistics showed connected. For the producer, also its delivery reports and
/// its IMPLICITACK debug lines (see [`shortfall_report`]).
#[derive(Clone, Default)]
struct SeenBrokers {
    seen: Arc<Mutex<BTreeSet<String>>>,
    /// Statistics received, and the brokers (node ids) connected in the last.
    up: Arc<Mutex<(u64, BTreeSet<i64>)>>,
    delivered: Arc<Mutex<Deliveries>>,
    implicit_acks: Arc<Mutex<Vec<String>>>,
}

/// The producer's delivery reports.
#[derive(Default)]
struct Deliveries {
    /// key -> (partition, offset; negative when the report had none)
    acked: BTreeMap<usize, (i32, i64)>,
    /// partition -> (failed, the first error)
    failed: BTreeMap<i32, (usize, String)>,
}

impl SeenBrokers {
    fn statistics(&self) -> u64 {
        self.up.lock().unwrap().0
    }

    fn up(&self, node: i64) -> bool {
        self.up.lock().unwrap().1.contains(&node)
    }
}

impl ClientContext for SeenBrokers {
    fn log(&self, _: RDKafkaLogLevel, facility: &str, message: &str) {
        if facility == "IMPLICITACK" {
            self.implicit_acks.lock().unwrap().push(message.to_owned());
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<serde_json::Value>(statistics) else {
            return;
        };
        if let Some(brokers) = stats["brokers"].as_object() {
            let mut seen = self.seen.lock().unwrap();
            for b in brokers.values() {
                if let Some(name) = b["name"].as_str() {
                    seen.insert(name.to_owned());
                }
            }
            let up = brokers
                .values()
                .filter(|b| b["state"] == "UP")
                .filter_map(|b| b["nodeid"].as_i64())
                .collect();
            let mut last = self.up.lock().unwrap();
            *last = (last.0 + 1, up);
        }
    }
}
impl ProducerContext for SeenBrokers {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        // No panic here: this runs inside a librdkafka callback.
        let mut d = self.delivered.lock().unwrap();
        match result {
            Ok(m) => {
                if let Some(key) = message_key(m) {
                    d.acked.insert(key, (m.partition(), m.offset()));
                }
            }
            Err((e, m)) => {
                let failed = d.failed.entry(m.partition()).or_insert((0, e.to_string()));
                failed.0 += 1;
            }
        }
    }
}
impl ConsumerContext for SeenBrokers {}

fn message_key(m: &BorrowedMessage<'_>) -> Option<usize> {
    std::str::from_utf8(m.key()?).ok()?.parse().ok()
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("statistics.interval.ms", "100")
        .set("topic.metadata.refresh.interval.ms", "1000");
    c
}

#[derive(Clone, Copy)]
enum Disruption {
    None,
    /// Move partition leaders (under `rewrite`, the mock then answers Produce v10+ with
    /// KIP-951 `node_endpoints`), take broker 3 down and up.
    LeaderChangesAndBrokerRestart,
}

/// How kpscd moves bulk bytes (`--bulk-transfer`).
#[derive(Clone, Copy, PartialEq)]
enum Transfer {
    Splice,
    Copy,
    /// Requests, and responses that need no rewrite, in the kernel.
    Sockmap,
}

impl Transfer {
    fn name(self) -> &'static str {
        match self {
            Transfer::Splice => "splice",
            Transfer::Copy => "copy",
            Transfer::Sockmap => "sockmap",
        }
    }
}

fn produce_and_consume(policy: &str, disruption: Disruption, transfer: Transfer) {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(TOPIC, 3).unwrap();
    for p in 0..3 {
        cluster.set_leader(TOPIC, p, p + 1).unwrap();
    }
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(
        &cluster,
        base,
        &["--bulk-policy", policy, "--bulk-transfer", transfer.name()],
    ))
    .unwrap();
    let bootstrap = format!("127.0.1.1:{base}");
    let seen = SeenBrokers::default();

    let producer: BaseProducer<SeenBrokers> = client_config(&bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "60000")
        // For the report on a shortfall: librdkafka's IMPLICITACK lines.
        .set("debug", "eos")
        .set_log_level(RDKafkaLogLevel::Debug)
        .create_with_context(seen.clone())
        .unwrap();
    let mut produced = [0usize; 3];
    let started = Instant::now();
    for i in 0..MESSAGES {
        match disruption {
            Disruption::LeaderChangesAndBrokerRestart if i == MESSAGES / 4 => {
                producer.flush(Duration::from_secs(30)).unwrap();
                cluster.set_leader(TOPIC, 0, 2).unwrap();
            }
            Disruption::LeaderChangesAndBrokerRestart if i == MESSAGES / 2 => {
                producer.flush(Duration::from_secs(30)).unwrap();
                cluster.broker_down(3).unwrap();
                // Produce on only once the producer has seen its connection to broker 3
                // (through kpscd) close. Until then it may send partition 2's next batch
                // into that connection, a request whose fate it cannot know: librdkafka
                // retries it, but (idempotent) takes a later batch's success as proof
                // that it was written after all ("implicitly acked"), since a broker
                // checking sequence numbers would have refused the later batch. The mock
                // checks them only for transactional producers
                // (`rd_kafka_mock_validate_records`): it takes the later batch, and the
                // lost one counts as acknowledged. Nothing is in flight now (flushed) or
                // sent while we wait; no connection to broker 3 comes up before it does,
                // so every later request is answered. kpscd not passing the close on
                // fails here.
                producer.poll(Duration::ZERO); // serves statistics taken before
                let taken_before = seen.statistics();
                let deadline = Instant::now() + Duration::from_secs(10);
                while seen.statistics() == taken_before || seen.up(3) {
                    assert!(
                        Instant::now() < deadline,
                        "the producer's connection to broker 3 did not close when the \
                         broker went down; kpscd log:\n{}",
                        kpscd.log()
                    );
                    producer.poll(Duration::from_millis(20));
                }
            }
            Disruption::LeaderChangesAndBrokerRestart if i == MESSAGES / 2 + 500 => {
                cluster.broker_up(3).unwrap();
                cluster.set_leader(TOPIC, 2, 1).unwrap();
            }
            _ => {}
        }
        let partition = (i % 3) as i32;
        let key = format!("{i}");
        let value = format!("message-{i}-partition-{partition}");
        let record = BaseRecord::to(TOPIC)
            .partition(partition)
            .key(&key)
            .payload(&value);
        send_waiting(&producer, record).unwrap();
        produced[partition as usize] += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("every message acknowledged");
    eprintln!(
        "produced {MESSAGES} in {:?}, {} acknowledged with no offset (implicitly)",
        started.elapsed(),
        seen.delivered
            .lock()
            .unwrap()
            .acked
            .values()
            .filter(|(_, offset)| *offset < 0)
            .count()
    );
    drop(producer);

    let consumer: BaseConsumer<SeenBrokers> = client_config(&bootstrap)
        .set("group.id", format!("g-{policy}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .create_with_context(seen.clone())
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    // partition -> (offset, key) in the order read
    let mut per_partition: BTreeMap<i32, Vec<(i64, usize)>> = BTreeMap::new();
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while received < MESSAGES && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        let key = message_key(&m).unwrap();
        let value = std::str::from_utf8(m.payload().unwrap()).unwrap();
        assert_eq!(value, format!("message-{key}-partition-{}", m.partition()));
        per_partition
            .entry(m.partition())
            .or_default()
            .push((m.offset(), key));
        received += 1;
    }
    let keys: BTreeSet<usize> = per_partition.values().flatten().map(|r| r.1).collect();
    if received != MESSAGES || keys.len() != MESSAGES {
        panic!(
            "{received} of {MESSAGES} consumed, {} different: lost or duplicated messages\n{}\
             kpscd log:\n{}",
            keys.len(),
            shortfall_report(&cluster, &consumer, produced, &seen, &per_partition),
            kpscd.log()
        );
    }
    // Give the statistics callback one more interval.
    consumer.poll(Duration::from_millis(300));
    drop(consumer);

    let delivered = seen.delivered.lock().unwrap();
    assert!(delivered.failed.is_empty(), "{:?}", delivered.failed);
    for (partition, read) in &per_partition {
        assert!(
            read.windows(2).all(|w| w[0].1 < w[1].1),
            "partition {partition}: order not kept"
        );
        assert!(read.iter().all(|(_, k)| (k % 3) as i32 == *partition));
        // Each message where its acknowledgement said it was written.
        for (offset, key) in read {
            if let Some((p, acked_at)) = delivered.acked.get(key).filter(|a| a.1 >= 0) {
                assert_eq!(
                    (p, acked_at),
                    (partition, offset),
                    "message {key} read elsewhere than acknowledged"
                );
            }
        }
    }
    drop(delivered);

    let seen = seen.seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "no statistics received");
    for name in &seen {
        // "bootstrap" pseudo-brokers are named after the configured bootstrap address.
        assert!(
            !name.contains(REAL_BROKER_HOST),
            "client learned a real broker address: {name} (all: {seen:?})"
        );
    }
    for id in 1..=3 {
        let advertised = format!("127.0.1.{id}:");
        assert!(
            seen.iter().any(|n| n.contains(&advertised)),
            "client never used broker {id} through kpsc: {seen:?}"
        );
    }
    eprintln!(
        "rewrites: Produce {}, Fetch {}",
        kpscd.metric("kpsc_rewrites_total", "api=\"Produce\""),
        kpscd.metric("kpsc_rewrites_total", "api=\"Fetch\"")
    );
    let produce_rewrites = kpscd.metric("kpsc_rewrites_total", "api=\"Produce\"");
    match (policy, disruption) {
        // The leader moved under the producer: the old leader answered NOT_LEADER with the
        // new leader's endpoint (KIP-951), which kpsc rewrote.
        ("rewrite", Disruption::LeaderChangesAndBrokerRestart) => assert!(
            produce_rewrites >= 1.0,
            "the KIP-951 path was not exercised"
        ),
        ("cap", _) => assert_eq!(produce_rewrites, 0.0, "Produce above v9 under cap"),
        _ => {}
    }
    assert_eq!(kpscd.metric("kpsc_decode_failures_total", ""), 0.0);
    assert_eq!(
        kpscd.metric("kpsc_connection_errors_total", "unmapped_broker"),
        0.0
    );
    // The record batches went through the chosen path.
    let spliced = kpscd.metric("kpsc_spliced_bytes_total", "");
    match transfer {
        Transfer::Splice => assert!(spliced > 0.0, "nothing was spliced"),
        Transfer::Copy => assert_eq!(spliced, 0.0),
        Transfer::Sockmap => {
            // The producer's record batches went through the kernel; ApiVersions (and
            // what shares a packet with it) through kpscd.
            let port = "direction=\"from_client\"";
            let redirected = kpscd.metric("kpsc_kernel_redirected_bytes_total", port);
            let frames = kpscd.metric("kpsc_kernel_redirected_frames_total", port);
            let passed = kpscd.metric("kpsc_kernel_passed_frames_total", port);
            eprintln!("kernel: {redirected} bytes, {frames} frames; {passed} frames passed");
            assert!(
                redirected > (MESSAGES * 20) as f64,
                "the kernel carried only {redirected} bytes"
            );
            assert!(frames > 0.0 && passed > 0.0);
            // kpscctl maps shows the same per port.
            let admin = kpscd.admin.to_string();
            let out = std::process::Command::new(kpsc_tests::kpscctl_bin())
                .args(["maps", "--admin", &admin])
                .output()
                .unwrap();
            let table = String::from_utf8_lossy(&out.stdout);
            assert!(
                table.contains("IN BY KERNEL") && table.contains("OUT BY KERNEL"),
                "{table}"
            );
            // The responses: Produce and Fetch ones through the kernel, Metadata and
            // FindCoordinator through kpscd (they are rewritten).
            let to_client = "direction=\"to_client\"";
            let responses = kpscd.metric("kpsc_kernel_redirected_frames_total", to_client);
            let responses_passed = kpscd.metric("kpsc_kernel_passed_frames_total", to_client);
            eprintln!("responses: {responses} by the kernel, {responses_passed} by kpscd");
            assert!(responses > 0.0 && responses_passed > 0.0);
            let rows = kpscd.maps().unwrap();
            let listed = |direction: &str| -> f64 {
                rows.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r[direction]["redirected_frames"].as_f64().unwrap())
                    .sum()
            };
            assert_eq!(listed("kernel_from_client"), frames, "{rows}");
            assert_eq!(
                listed("kernel_to_client"),
                kpscd.metric("kpsc_kernel_redirected_frames_total", to_client),
                "{rows}"
            );
        }
    }
}

/// Why the consumer did not read back every message, per partition: produced,
/// acknowledged (and how many with no offset: acknowledged only implicitly), failed,
/// consumed, the watermarks through kpscd and straight from the mock, the consumer's
/// position, and the acknowledged messages not consumed: which, and how many of them the
/// mock's log holds (read from the mock, bypassing kpscd). Then librdkafka's IMPLICITACK
/// lines: an idempotent producer whose request failed with its fate unknown (a
/// connection closed under it) takes a later batch's success as proof it was written,
/// which holds only with a broker checking sequence numbers.
fn shortfall_report(
    cluster: &MockCluster,
    consumer: &BaseConsumer<SeenBrokers>,
    produced: [usize; 3],
    watch: &SeenBrokers,
    consumed: &BTreeMap<i32, Vec<(i64, usize)>>,
) -> String {
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.broker_addrs().join(","))
        .set("group.id", "direct-check")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(5);
    let marks = |wm: KafkaResult<(i64, i64)>| match wm {
        Ok((lo, hi)) => format!("{lo}..{hi}"),
        Err(e) => format!("({e})"),
    };
    let positions: BTreeMap<i32, Offset> = consumer
        .position()
        .map(|list| {
            list.elements_for_topic(TOPIC)
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect()
        })
        .unwrap_or_default();
    let in_mock = keys_in_mock(&direct);
    let delivered = watch.delivered.lock().unwrap();
    let mut report = String::new();
    for p in 0..3 {
        let acked: Vec<(usize, i64)> = delivered
            .acked
            .iter()
            .filter(|(_, (ap, _))| *ap == p)
            .map(|(k, (_, o))| (*k, *o))
            .collect();
        let implicit = acked.iter().filter(|(_, o)| *o < 0).count();
        let read: BTreeSet<usize> = consumed
            .get(&p)
            .into_iter()
            .flatten()
            .map(|r| r.1)
            .collect();
        let missing: Vec<usize> = acked
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !read.contains(k))
            .collect();
        let mock_log = in_mock.get(&p).cloned().unwrap_or_default();
        let (failed, error) = delivered.failed.get(&p).cloned().unwrap_or_default();
        report += &format!(
            "partition {p}: produced {}, acked {} ({implicit} with no offset), failed {failed}{}, \
             consumed {} ({} different); watermarks through kpscd {}, mock {}; position {}; \
             acked not consumed {}{}, of them in the mock's log {} (it holds {})\n",
            produced[p as usize],
            acked.len(),
            if failed > 0 {
                format!(" ({error})")
            } else {
                String::new()
            },
            consumed.get(&p).map_or(0, Vec::len),
            read.len(),
            marks(consumer.fetch_watermarks(TOPIC, p, timeout)),
            marks(direct.fetch_watermarks(TOPIC, p, timeout)),
            positions.get(&p).map_or("-".to_owned(), |o| match o {
                Offset::Offset(n) => n.to_string(),
                other => format!("{other:?}"),
            }),
            missing.len(),
            match (missing.first(), missing.last()) {
                (Some(a), Some(b)) => format!(" (keys {a}..={b})"),
                _ => String::new(),
            },
            missing.iter().filter(|k| mock_log.contains(k)).count(),
            mock_log.len(),
        );
    }
    let implicit = watch.implicit_acks.lock().unwrap();
    report += &format!("librdkafka IMPLICITACK lines: {}\n", implicit.len());
    for line in implicit.iter().take(5) {
        report += &format!("  {line}\n");
    }
    report
}

/// Every key in the mock's log, per partition, read from the mock directly.
fn keys_in_mock(direct: &BaseConsumer) -> BTreeMap<i32, BTreeSet<usize>> {
    let mut ends = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for p in 0..3 {
        if let Ok((_, hi)) = direct.fetch_watermarks(TOPIC, p, Duration::from_secs(5)) {
            ends.insert(p, hi);
            list.add_partition_offset(TOPIC, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut keys: BTreeMap<i32, BTreeSet<usize>> = BTreeMap::new();
    if direct.assign(&list).is_err() {
        return keys;
    }
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && ends.iter().any(|(p, hi)| next.get(p).unwrap_or(&0) < hi) {
        if let Some(Ok(m)) = direct.poll(Duration::from_millis(100)) {
            next.insert(m.partition(), m.offset() + 1);
            if let Some(key) = message_key(&m) {
                keys.entry(m.partition()).or_default().insert(key);
            }
        }
    }
    keys
}

#[test]
fn ten_thousand_messages_round_trip_cap_policy() {
    produce_and_consume("cap", Disruption::None, Transfer::Splice);
}

#[test]
fn ten_thousand_messages_round_trip_copying_bulk_bytes() {
    produce_and_consume("cap", Disruption::None, Transfer::Copy);
}

/// The same round trip with the producer's and consumer's requests carried by the
/// kernel (`--bulk-transfer sockmap`): needs CAP_BPF and CAP_NET_ADMIN (root in CI).
#[test]
fn ten_thousand_messages_round_trip_kernel_requests() {
    produce_and_consume("cap", Disruption::None, Transfer::Sockmap);
}

#[test]
fn leader_changes_and_broker_restart_kernel_requests() {
    produce_and_consume(
        "rewrite",
        Disruption::LeaderChangesAndBrokerRestart,
        Transfer::Sockmap,
    );
}

#[test]
fn leader_changes_and_broker_restart_cap_policy() {
    produce_and_consume(
        "cap",
        Disruption::LeaderChangesAndBrokerRestart,
        Transfer::Splice,
    );
}

#[test]
fn leader_changes_and_broker_restart_rewrite_policy() {
    produce_and_consume(
        "rewrite",
        Disruption::LeaderChangesAndBrokerRestart,
        Transfer::Splice,
    );
}
