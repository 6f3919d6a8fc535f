//! One soak run: an idempotent, acks=all producer writes keyed, sequence-numbered records
//! through kpscd to the 3-broker mock at a steady rate while a consumer reads them back
//! through kpscd and the faults run on a schedule; afterwards every key's sequence is
//! checked.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kpsc_testkit::free_port_base;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer as _},
    producer::{BaseProducer, BaseRecord, Producer as _},
};

use crate::{
    mock_cluster::MockCluster,
    rdkafka_client::send_waiting,
    soak::{
        config::SoakConfig,
        faults::{Fault, Injected, Target},
        ledger::{ConsumerLedger, ProducerLedger, Sent, lock},
        report::Report,
    },
};

const TOPIC: &str = "changefeed-soak";

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        // Leader moves are found by the next metadata refresh (or the broker's error).
        .set("topic.metadata.refresh.interval.ms", "2000")
        // Warnings reach the ledger's log callback (rdkafka would otherwise ask for the
        // `log` crate's level).
        .set_log_level(RDKafkaLogLevel::Warning);
    // librdkafka's own account of a stall, e.g. KPSC_SOAK_DEBUG=broker,eos,msg.
    if let Ok(debug) = std::env::var("KPSC_SOAK_DEBUG") {
        c.set("debug", debug).set_log_level(RDKafkaLogLevel::Debug);
    }
    c
}

/// Produces keyed records `<key>:<seq>:<padding>` to `topic` at `config.rate` until
/// `stop`, then waits for every delivery report; returns how many were queued.
pub fn produce(
    bootstrap: &str,
    topic: &str,
    config: &SoakConfig,
    ledger: ProducerLedger,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut settings = client(bootstrap);
    settings
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // Longer than any fault: a record is given up only if something stays broken.
        .set("message.timeout.ms", "120000");
    for (key, value) in &config.producer_config {
        settings.set(key, value);
    }
    let producer: BaseProducer<ProducerLedger> = settings
        .create_with_context(ledger)
        .context("creating the producer")?;
    let started = Instant::now();
    let mut seqs = vec![0u64; config.keys];
    let mut sent = 0u64;
    let padding = "x".repeat(config.value_bytes);
    while !stop.load(Ordering::Relaxed) {
        // Paced against the start, so a stall is not made up by a burst above the rate.
        let due = started + Duration::from_secs_f64(sent as f64 / f64::from(config.rate));
        let now = Instant::now();
        if due > now {
            producer.poll(due - now);
            continue;
        }
        let key = (sent % config.keys as u64) as usize;
        seqs[key] += 1;
        let seq = seqs[key];
        let key_text = format!("k{key}");
        let value = format!("{key}:{seq}:{padding}");
        let record = BaseRecord::with_opaque_to(
            topic,
            Box::new(Sent {
                key,
                seq,
                at: Instant::now(),
            }),
        )
        .key(&key_text)
        .payload(&value);
        send_waiting(&producer, record)?;
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(150))
        .context("flushing the producer")?;
    Ok(sent)
}

/// Reads every partition of `topic` from the start until `stop` is set and `want()`
/// distinct records were read (or 60 s after `stop`).
pub fn consume(
    bootstrap: &str,
    topic: &str,
    config: &SoakConfig,
    ledger: &ConsumerLedger,
    stop: &AtomicBool,
    want: impl Fn() -> usize,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<ConsumerLedger> = client(bootstrap)
        .set("group.id", "soak-unused")
        .set("enable.auto.commit", "false")
        .create_with_context(ledger.clone())
        .context("creating the consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..config.partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut deadline = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
            if ledger.distinct() >= want() || Instant::now() > d {
                return Ok(());
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => ledger.record(&m),
            Some(Err(e)) => ledger.error(&e),
            None => {}
        }
    }
}

/// Runs the soak; the report says what happened (the caller decides what must hold).
pub fn run(config: &SoakConfig) -> anyhow::Result<Report> {
    let cluster = MockCluster::new(3)?;
    cluster.create_topic(TOPIC, config.partitions)?;
    let base = free_port_base(20);
    let mut target = Target::new(&cluster, TOPIC, config.partitions, base);
    target.spread_leaders()?;
    target.start_kpscd()?;
    let bootstrap = format!("127.0.1.1:{base}");

    let producer_ledger = ProducerLedger::new(config.keys);
    let consumer_ledger = ConsumerLedger::new(config.keys);
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut injected: Vec<Injected> = Vec::new();

    let (sent, consumed) = std::thread::scope(|s| -> anyhow::Result<_> {
        let producer = s.spawn(|| {
            produce(
                &bootstrap,
                TOPIC,
                config,
                producer_ledger.clone(),
                &stop_producing,
            )
        });
        let consumer = s.spawn(|| {
            let acks = producer_ledger.clone();
            consume(
                &bootstrap,
                TOPIC,
                config,
                &consumer_ledger,
                &stop_consuming,
                || lock(&acks.0).acked.iter().map(|a| a.len()).sum(),
            )
        });
        let schedule = (|| -> anyhow::Result<()> {
            let mut next = started + config.fault_gap;
            for fault in Fault::ALL.iter().cycle() {
                if next + config.fault_gap > started + config.duration {
                    break;
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                eprintln!(
                    "soak: {:>5.1} s  {}",
                    started.elapsed().as_secs_f64(),
                    fault.name()
                );
                injected.push(target.inject(*fault)?);
                next += config.fault_gap;
            }
            std::thread::sleep(
                (started + config.duration).saturating_duration_since(Instant::now()),
            );
            Ok(())
        })();
        stop_producing.store(true, Ordering::Relaxed);
        let sent = producer.join().expect("producer thread");
        stop_consuming.store(true, Ordering::Relaxed);
        let consumed = consumer.join().expect("consumer thread");
        schedule?;
        Ok((sent?, consumed))
    })?;
    consumed?;
    let kpscd = target.kpscd();
    let decode_failures = kpscd.metric("kpsc_decode_failures_total", "");
    target.kpscd_logs.push(kpscd.log());
    let elapsed = started.elapsed();
    let mut report = Report::build(
        config,
        elapsed,
        sent,
        &lock(&producer_ledger.0),
        &lock(&consumer_ledger.0),
        &injected,
        started,
        target.kpscd_starts,
        decode_failures,
    );
    report.kpscd_logs = std::mem::take(&mut target.kpscd_logs);
    Ok(report)
}
