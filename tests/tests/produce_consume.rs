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
    ClientConfig, ClientContext, Message,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    producer::{BaseProducer, BaseRecord, Producer, ProducerContext},
};

const TOPIC: &str = "changefeed";
const MESSAGES: usize = 10_000;

/// Records every broker name ("host:port/id") librdkafka reports in its statistics: the
/// complete list of brokers the client learned of, from any response.
#[derive(Clone, Default)]
struct SeenBrokers(Arc<Mutex<BTreeSet<String>>>);

impl ClientContext for SeenBrokers {
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<serde_json::Value>(statistics) else {
            return;
        };
        if let Some(brokers) = stats["brokers"].as_object() {
            let mut seen = self.0.lock().unwrap();
            for b in brokers.values() {
                if let Some(name) = b["name"].as_str() {
                    seen.insert(name.to_owned());
                }
            }
        }
    }
}
impl ProducerContext for SeenBrokers {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}
impl ConsumerContext for SeenBrokers {}

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
        .create_with_context(seen.clone())
        .unwrap();
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
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("every message acknowledged");
    eprintln!("produced {MESSAGES} in {:?}", started.elapsed());
    drop(producer);

    let consumer: BaseConsumer<SeenBrokers> = client_config(&bootstrap)
        .set("group.id", format!("g-{policy}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .create_with_context(seen.clone())
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    let mut per_partition: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while received < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "only {received} of {MESSAGES} consumed; kpscd log:\n{}",
            kpscd.log()
        );
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        let key: usize = std::str::from_utf8(m.key().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let value = std::str::from_utf8(m.payload().unwrap()).unwrap();
        assert_eq!(value, format!("message-{key}-partition-{}", m.partition()));
        per_partition.entry(m.partition()).or_default().push(key);
        received += 1;
    }
    // Give the statistics callback one more interval.
    consumer.poll(Duration::from_millis(300));
    drop(consumer);

    let mut all = BTreeSet::new();
    for (partition, keys) in &per_partition {
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "partition {partition}: order not kept"
        );
        assert!(keys.iter().all(|k| (k % 3) as i32 == *partition));
        all.extend(keys.iter().copied());
    }
    assert_eq!(all.len(), MESSAGES, "lost or duplicated messages");

    let seen = seen.0.lock().unwrap().clone();
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
