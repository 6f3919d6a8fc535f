//! `kpscd proxy --bulk-transfer sockmap` and Produce with acks=0, which gets no response
//! from Kafka: acks=0 mixed with acks=1 and Metadata on one connection, and a producer of
//! acks=0 alone, against librdkafka's mock and tansu (both answer acks=0, and kpscd must
//! drop those answers) and against the mock behind a shim that drops them, as Kafka sends
//! none (then the verdicts and kpscd must not wait for them). Needs root.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use kafka_protocol::messages::{MetadataResponse, ProduceResponse};
use kpsc_tests::{
    Kpscd, MockCluster, Tansu, create_topic, free_port_base,
    kernel_path::{kernel_accounted, kernel_delivered, kernel_response_counters},
    proxy_args,
    raw_pipeline::{CLIENT_ID, Req, TOPIC, decode, read_frame, value},
    response_delay_shim::{HoldPlan, proxy_behind_shim},
};

const PARTITIONS: i32 = 4;

fn cluster() -> MockCluster {
    MockCluster::led_by_broker_1(TOPIC, PARTITIONS).unwrap()
}

fn start(cluster: &MockCluster) -> (Kpscd, u16) {
    let base = free_port_base(20);
    let args = proxy_args(cluster, base, &["--bulk-transfer", "sockmap"]);
    (Kpscd::start(&args).unwrap(), base)
}

/// What [`acks_zero_mixed_with_acks_one`] sent.
struct Mixed {
    requests: usize,
    acks0: usize,
    /// Responses owed to Produce requests (acks=1).
    produce_responses: usize,
}

/// Produce acks=0 mixed with acks=1 and Metadata, pipelined, then nothing more owed.
fn acks_zero_mixed_with_acks_one(addr: &str) -> Mixed {
    // acks of each Produce; None: a Metadata request.
    let plan = [
        Some(0),
        Some(0),
        Some(1),
        Some(0),
        None,
        Some(0),
        Some(0),
        Some(0),
        Some(1),
        Some(1),
        Some(0),
        None,
        Some(0),
        Some(1),
        Some(0),
    ];
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut owed = Vec::new();
    // In the last two rounds an acks=0 request shares its write with the requests after
    // it up to the next answered one: its response then reaches the response verdict
    // before kpscd learns of the acks=0 request.
    let mut unsent = Vec::new();
    for round in 0..4 {
        for (i, acks) in plan.iter().enumerate() {
            let n = round * plan.len() + i;
            // acks=0 requests have ids of their own; the others reuse a few.
            let id = if *acks == Some(0) {
                50_000 + n as i32
            } else {
                (n % 5) as i32
            };
            let request = match acks {
                Some(acks) => Req::Produce {
                    version: 7,
                    acks: *acks,
                    partition: (n % 2) as i32,
                    value: value(&format!("acks{acks}-{n}-"), 100 + 1000 * (n % 3)),
                },
                None => Req::Metadata,
            };
            unsent.extend_from_slice(&request.frame(id));
            if *acks != Some(0) {
                owed.push((id, acks.is_some()));
            } else if round >= 2 {
                continue;
            }
            // A pause between writes, as a producer at a steady rate leaves: each starts
            // a segment the kernel may carry (back to back, kpscd tends to keep the stream).
            std::thread::sleep(Duration::from_millis(1));
            stream.write_all(&unsent).unwrap();
            unsent.clear();
        }
    }
    stream.write_all(&unsent).unwrap();
    for (n, (id, produce)) in owed.iter().enumerate() {
        let raw = read_frame(&mut stream).unwrap_or_else(|e| panic!("response {n}: {e:#}"));
        match produce {
            true => {
                let r: ProduceResponse =
                    decode(&raw, *id, 7).unwrap_or_else(|e| panic!("response {n}: {e:#}"));
                assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
            }
            false => {
                let _: MetadataResponse =
                    decode(&raw, *id, 12).unwrap_or_else(|e| panic!("response {n}: {e:#}"));
            }
        }
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let extra = stream.read(&mut [0u8; 1]);
    assert!(
        matches!(&extra, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "an answer to acks=0 reached the client: {extra:?}"
    );
    let requests = plan.len() * 4;
    Mixed {
        requests,
        acks0: requests - owed.len(),
        produce_responses: owed.iter().filter(|(_, produce)| *produce).count(),
    }
}

/// librdkafka's mock and tansu 0.6 both answer acks=0, unlike Kafka (the kernel counters
/// show a response frame for every request); kpscd drops those answers, the response
/// verdict passing each to it. Kafka answers none: a shim in front of the mock drops its
/// answers, and the response verdict must skip the expectations of acks=0 requests. The
/// client gets exactly the responses it expects, in order, from each.
#[test]
fn acks_zero_mixed_with_acks_one_gets_exactly_the_responses_owed() {
    let mock = cluster();
    let (kpscd, base) = start(&mock);
    let sent = acks_zero_mixed_with_acks_one(&format!("127.0.1.1:{base}")).requests;
    let k = kernel_accounted(&kpscd, sent);
    eprintln!(
        "mock: {k:?}; responses: {:?}",
        kernel_response_counters(&kpscd)
    );
    assert!(k.redirected_frames > 0.0, "mock: {k:?}");
    // The mock's answers to acks=0 go to kpscd (which drops them); the others may not.
    kernel_delivered(&kpscd, 1);

    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.addr(), TOPIC, 2).unwrap();
    let tansu_base = free_port_base(1);
    let kpscd = Kpscd::start(&[
        "--bootstrap-server-mapping".into(),
        format!("{},127.0.0.1:{tansu_base}", tansu.addr()),
        "--dynamic-listeners-disable".into(),
        "--bulk-transfer".into(),
        "sockmap".into(),
    ])
    .unwrap();
    let sent = acks_zero_mixed_with_acks_one(&format!("127.0.0.1:{tansu_base}")).requests;
    let k = kernel_accounted(&kpscd, sent);
    eprintln!(
        "tansu: {k:?}; responses: {:?}",
        kernel_response_counters(&kpscd)
    );
    assert!(k.redirected_frames > 0.0, "tansu: {k:?}");
    kernel_delivered(&kpscd, 1);

    let kafka_like = cluster();
    let (shim, kpscd, base) = proxy_behind_shim(
        &kafka_like,
        HoldPlan::kafka_acks0(CLIENT_ID),
        &["--bulk-transfer", "sockmap"],
    )
    .unwrap();
    let sent = acks_zero_mixed_with_acks_one(&format!("127.0.1.1:{base}"));
    let k = kernel_accounted(&kpscd, sent.requests);
    let delivered = kernel_response_counters(&kpscd);
    eprintln!("kafka-like: {k:?}; responses: {delivered:?}");
    assert!(shim.errors().is_empty(), "{:?}", shim.errors());
    assert_eq!(shim.dropped_acks0_answers(), sent.acks0);
    assert!(k.redirected_frames > 0.0, "kafka-like: {k:?}");
    // Nothing answers acks=0 here: the Produce responses the kernel carried skipped the
    // expectations of acks=0 requests before them.
    kernel_delivered(&kpscd, sent.produce_responses / 4);
}

/// A producer of acks=0 alone, one request per packet, stays on the kernel path: each
/// carried request takes an entry of the 32-entry expectation ring, and the ring must
/// not fill. The mock answers acks=0 (each answer goes to kpscd, which drops it and hands
/// the stream back); against Kafka, which answers none, kpscd passes the entries over
/// itself as it takes the reports.
fn acks_zero_producer(broker: Broker) {
    const REQUESTS: usize = 300;
    let cluster = cluster();
    let (shim, kpscd, base) = match broker {
        Broker::Mock => {
            let (kpscd, base) = start(&cluster);
            (None, kpscd, base)
        }
        Broker::KafkaLike => {
            let plan = HoldPlan::kafka_acks0(CLIENT_ID);
            let (shim, kpscd, base) =
                proxy_behind_shim(&cluster, plan, &["--bulk-transfer", "sockmap"]).unwrap();
            (Some(shim), kpscd, base)
        }
    };
    let mut stream = TcpStream::connect(format!("127.0.1.1:{base}")).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for i in 0..REQUESTS {
        let produce = Req::Produce {
            version: 7,
            acks: 0,
            partition: (i % PARTITIONS as usize) as i32,
            value: value(&format!("acks0-{i}-"), 100),
        };
        stream.write_all(&produce.frame(10_000 + i as i32)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // One answered request closes the run: its response, and nothing else, comes back.
    let last = Req::Produce {
        version: 7,
        acks: 1,
        partition: 0,
        value: value("acks1-last-", 100),
    };
    stream.write_all(&last.frame(7)).unwrap();
    let raw = read_frame(&mut stream).unwrap();
    let r: ProduceResponse = decode(&raw, 7, 7).unwrap();
    assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
    let k = kernel_accounted(&kpscd, REQUESTS + 1);
    eprintln!(
        "kernel: {k:?}; responses: {:?}",
        kernel_response_counters(&kpscd)
    );
    assert!(
        k.redirected_frames >= (REQUESTS - 10) as f64,
        "{broker:?}: the kernel carried too few of {REQUESTS} acks=0 requests: {k:?}"
    );
    if let Some(shim) = shim {
        assert_eq!(
            shim.dropped_acks0_answers(),
            REQUESTS,
            "{:?}",
            shim.errors()
        );
    }
}

/// The broker behind kpscd.
#[derive(Clone, Copy, Debug)]
enum Broker {
    /// librdkafka's mock, which answers acks=0.
    Mock,
    /// The mock behind a shim that drops its answers to acks=0, as Kafka sends none.
    KafkaLike,
}

#[test]
fn an_acks_zero_producer_stays_on_the_kernel_path() {
    acks_zero_producer(Broker::Mock);
}

#[test]
fn an_acks_zero_producer_stays_on_the_kernel_path_when_nothing_answers_acks_zero() {
    acks_zero_producer(Broker::KafkaLike);
}
