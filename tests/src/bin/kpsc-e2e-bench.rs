//! End-to-end benchmark for realism: a real client (rdkafka) against a real three-broker
//! cluster (librdkafka's mock), directly and through `kpscd proxy` (copying and splicing),
//! interleaved in one run.
//! The mock broker, not the proxy, is usually the bottleneck here: this shows what a user
//! would see, `kpsc-bench` shows what the proxy costs.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use kpsc_tests::{Kpscd, MockCluster, free_port_base, proxy_args, send_waiting};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};

#[derive(Parser)]
struct Args {
    /// Messages per run (the mock keeps a bounded log; 10,000 x 1 KiB fits).
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// One short run per target, checking counts only (used by the test command).
    #[arg(long)]
    quick: bool,
    /// Results folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
}

const PARTITIONS: i32 = 3;

/// Produces `n` messages to `topic` and reads them back; returns (produce s, consume s).
fn run_once(bootstrap: &str, topic: &str, n: usize, bytes: usize) -> anyhow::Result<(f64, f64)> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let payload = vec![b'e'; bytes];
    let started = Instant::now();
    for i in 0..n {
        let record = BaseRecord::<(), [u8]>::to(topic)
            .partition((i % PARTITIONS as usize) as i32)
            .payload(&payload);
        send_waiting(&producer, record)?;
    }
    producer.flush(Duration::from_secs(120))?;
    let produce = started.elapsed().as_secs_f64();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "e2e-unused")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut got = 0;
    let deadline = started + Duration::from_secs(120);
    while got < n {
        ensure!(
            Instant::now() < deadline,
            "only {got} of {n} consumed from {topic}"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            ensure!(m?.payload().map(<[u8]>::len) == Some(bytes), "bad payload");
            got += 1;
        }
    }
    Ok((produce, started.elapsed().as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.messages = 2_000;
        args.repetitions = 1;
    }
    let cluster = MockCluster::new(3)?;
    // One kpscd per way of moving bulk bytes.
    let start = |transfer: &str| -> anyhow::Result<(Kpscd, u16)> {
        let base = free_port_base(20);
        let kpscd = Kpscd::start(&proxy_args(&cluster, base, &["--bulk-transfer", transfer]))?;
        Ok((kpscd, base))
    };
    let (copying, copy_base) = start("copy")?;
    let (splicing, splice_base) = start("splice")?;
    let targets = [
        ("direct", cluster.broker_addrs().join(",")),
        ("kpscd-proxy", format!("127.0.1.1:{copy_base}")),
        ("kpscd-splice", format!("127.0.1.1:{splice_base}")),
    ];
    let mb = (args.messages * args.message_bytes) as f64 / 1e6;
    // (target, rep) -> (produce MB/s, consume MB/s)
    let mut rows: Vec<(&str, usize, f64, f64)> = Vec::new();
    for rep in 0..args.repetitions {
        let order: Vec<_> = if rep % 2 == 0 {
            targets.iter().collect()
        } else {
            targets.iter().rev().collect()
        };
        for (name, bootstrap) in order {
            let topic = format!("e2e-{name}-{rep}");
            cluster.create_topic(&topic, PARTITIONS)?;
            for p in 0..PARTITIONS {
                cluster.set_leader(&topic, p, p + 1)?;
            }
            let (p, c) = run_once(bootstrap, &topic, args.messages, args.message_bytes)
                .with_context(|| format!("{name}, repetition {rep}"))?;
            eprintln!(
                "  #{rep} {name:<12} produce {:>7.1} MB/s  consume {:>7.1} MB/s",
                mb / p,
                mb / c
            );
            rows.push((name, rep, mb / p, mb / c));
        }
    }
    let mut table = format!(
        "End to end: rdkafka -> librdkafka mock cluster (3 brokers), {} x {} B messages, acks=all, \
         {} repetition(s), medians; ratios per repetition.\n\n\
         | target | produce MB/s | consume MB/s | produce vs direct | consume vs direct |\n|---|---|---|---|---|\n",
        args.messages, args.message_bytes, args.repetitions
    );
    for (name, _) in &targets {
        let mine: Vec<_> = rows.iter().filter(|r| r.0 == *name).collect();
        let ratio = |pick: fn(&(&str, usize, f64, f64)) -> f64| {
            median(
                mine.iter()
                    .filter_map(|r| {
                        let d = rows.iter().find(|o| o.0 == "direct" && o.1 == r.1)?;
                        Some(pick(r) / pick(d))
                    })
                    .collect(),
            )
        };
        table.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.2}x | {:.2}x |\n",
            median(mine.iter().map(|r| r.2).collect()),
            median(mine.iter().map(|r| r.3).collect()),
            ratio(|r| r.2),
            ratio(|r| r.3),
        ));
    }
    for kpscd in [&copying, &splicing] {
        ensure!(
            kpscd.metric("kpsc_decode_failures_total", "") == 0.0,
            "kpscd failed to decode a response"
        );
    }
    std::fs::create_dir_all(&args.out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path = args.out.join(format!("e2e-{stamp}.md"));
    std::fs::write(&path, &table)?;
    if args.quick {
        println!("kpsc-e2e-bench: {} passed, 0 failed", rows.len());
    } else {
        print!("{table}");
        eprintln!("written to {}", path.display());
    }
    Ok(())
}
