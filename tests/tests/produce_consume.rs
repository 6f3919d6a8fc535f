//! A real client (rdkafka) produces 10,000 messages through kpscd to a 3-partition topic
//! led by three different brokers and consumes them back with a consumer group, with and
//! without leader changes and a broker going down and up mid-stream, under both bulk
//! policies. Every broker the clients ever learn of must be an advertised address.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kpsc_tests::{
    Kpscd, MockCluster, REAL_BROKER_HOST, eventually, free_port_base,
    kernel_path::kernel_counters,
    proxy_args,
    raw_pipeline::{TOPIC as PIPELINE_TOPIC, consume_all},
    response_delay_shim::{HoldPlan, proxy_behind_shim},
    send_waiting,
};
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

/// librdkafka producing with acks=0 to a broker that never answers acks=0, as Kafka does:
/// a shim in front of the mock's broker 1, which leads every partition, drops the mock's
/// answers. Every message must arrive, in order per partition, and kpscd must count no
/// connection error (it would, waiting for an answer that never comes, when the producer
/// leaves).
fn acks_zero_producer_to_a_kafka_like_broker(transfer: Transfer) {
    const PARTITIONS: i32 = 2;
    const PER_PARTITION: usize = 2_000;
    let cluster = MockCluster::led_by_broker_1(PIPELINE_TOPIC, PARTITIONS).unwrap();
    let (shim, kpscd, base) = proxy_behind_shim(
        &cluster,
        HoldPlan::kafka_acks0("rdkafka"),
        &["--bulk-transfer", transfer.name()],
    )
    .unwrap();
    let bootstrap = format!("127.0.1.1:{base}");
    let producer: BaseProducer = client_config(&bootstrap)
        .set("acks", "0")
        // Many requests, not one or two large ones.
        .set("batch.num.messages", "20")
        .set("linger.ms", "1")
        .create()
        .unwrap();
    let values: Vec<Vec<String>> = (0..PARTITIONS)
        .map(|p| {
            (0..PER_PARTITION)
                .map(|i| format!("acks0-{p}-{i}"))
                .collect()
        })
        .collect();
    for i in 0..PER_PARTITION {
        for (p, v) in values.iter().enumerate() {
            send_waiting(
                &producer,
                BaseRecord::<(), _>::to(PIPELINE_TOPIC)
                    .partition(p as i32)
                    .payload(&v[i]),
            )
            .unwrap();
        }
    }
    producer.flush(Duration::from_secs(20)).unwrap();
    // acks=0: flushed means written, not stored; wait for the broker to have them all.
    let watermarks: BaseConsumer = client_config(&bootstrap).create().unwrap();
    eventually(Duration::from_secs(10), || {
        for p in 0..PARTITIONS {
            let (_, high) =
                watermarks.fetch_watermarks(PIPELINE_TOPIC, p, Duration::from_secs(2))?;
            anyhow::ensure!(high == PER_PARTITION as i64, "partition {p} at {high}");
        }
        Ok(())
    })
    .unwrap();
    drop(producer);
    let consumed = consume_all(&bootstrap, &[PER_PARTITION; PARTITIONS as usize]);
    for (p, (got, want)) in consumed.iter().zip(&values).enumerate() {
        let got: Vec<&[u8]> = got.iter().map(Vec::as_slice).collect();
        let want: Vec<&[u8]> = want.iter().map(String::as_bytes).collect();
        assert!(
            got == want,
            "partition {p}: records differ from those produced"
        );
    }
    assert!(shim.errors().is_empty(), "{:?}", shim.errors());
    let dropped = shim.dropped_acks0_answers();
    eprintln!(
        "{}: {dropped} answers to acks=0 Produce requests dropped",
        transfer.name()
    );
    assert!(dropped >= 20, "too few acks=0 requests reached the shim");
    if transfer == Transfer::Sockmap {
        let k = kernel_counters(&kpscd);
        assert!(
            k.redirected_frames > 0.0,
            "the kernel carried no request: {k:?}"
        );
    }
    eventually(Duration::from_secs(5), || {
        let errors = kpscd.metric("kpsc_connection_errors_total", "");
        anyhow::ensure!(errors == 0.0, "{errors} connection errors");
        Ok(())
    })
    .unwrap();
}

#[test]
fn acks_zero_producer_to_a_kafka_like_broker_copying_bulk_bytes() {
    acks_zero_producer_to_a_kafka_like_broker(Transfer::Copy);
}

#[test]
fn acks_zero_producer_to_a_kafka_like_broker_splicing_bulk_bytes() {
    acks_zero_producer_to_a_kafka_like_broker(Transfer::Splice);
}

#[test]
fn acks_zero_producer_to_a_kafka_like_broker_kernel_path() {
    acks_zero_producer_to_a_kafka_like_broker(Transfer::Sockmap);
}
