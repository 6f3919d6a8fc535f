//! A real client (rdkafka) producing with acks=0 through kpscd to a broker that never
//! answers acks=0, as Kafka: librdkafka's mock behind `ResponseDelayShim` (a fault
//! injector, not a broker) set to drop the mock's answers to them. Under each of
//! `--bulk-transfer copy`, `splice` and `sockmap` (the last as root).

use std::time::Duration;

use kpsc_tests::{
    MockCluster, eventually,
    kernel_path::kernel_counters,
    raw_pipeline::{TOPIC, consume_all},
    response_delay_shim::{HoldPlan, proxy_behind_shim},
    send_waiting,
};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Transfer {
    Copy,
    Splice,
    Sockmap,
}

impl Transfer {
    fn name(self) -> &'static str {
        match self {
            Transfer::Copy => "copy",
            Transfer::Splice => "splice",
            Transfer::Sockmap => "sockmap",
        }
    }
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// librdkafka producing with acks=0 to a broker that never answers acks=0, as Kafka does:
/// a shim in front of the mock's broker 1, which leads every partition, drops the mock's
/// answers. Every message must arrive, in order per partition, and kpscd must count no
/// connection error (it would, waiting for an answer that never comes, when the producer
/// leaves).
fn acks_zero_producer_to_a_kafka_like_broker(transfer: Transfer) {
    const PARTITIONS: i32 = 2;
    const PER_PARTITION: usize = 2_000;
    let cluster = MockCluster::led_by_broker_1(TOPIC, PARTITIONS).unwrap();
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
                BaseRecord::<(), _>::to(TOPIC)
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
            let (_, high) = watermarks.fetch_watermarks(TOPIC, p, Duration::from_secs(2))?;
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
