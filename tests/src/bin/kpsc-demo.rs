//! `cargo xtask demo`: a three-broker Kafka cluster (librdkafka's mock) behind `kpscd
//! proxy`, advertised with a TiDB-style `<broker_id>` pattern, and a real client (rdkafka)
//! producing and consuming through it. Leaves nothing running.
use std::{
    collections::HashMap,
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use kpsc_tests::{
    ADVERTISED_PATTERN, Kpscd, MockCluster, REAL_BROKER_HOST, kpscctl_bin, send_waiting,
};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};

#[derive(Parser)]
struct Args {
    /// Messages to produce and consume.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
}

const TOPIC: &str = "changefeed";
const PAYLOAD_BYTES: usize = 1024;

fn ports_free(base: u16) -> bool {
    [base, base + 12, base + 13]
        .iter()
        .all(|p| TcpListener::bind(("0.0.0.0", *p)).is_ok())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = MockCluster::new(3)?;
    cluster.create_topic(TOPIC, 3)?;
    for partition in 0..3 {
        cluster.set_leader(TOPIC, partition, partition + 1)?;
    }
    println!("\n1. Kafka cluster (librdkafka mock), brokers listen on:");
    for (i, addr) in cluster.broker_addrs().iter().enumerate() {
        println!("     broker {} at {addr}", i + 1);
    }

    let base = (19092..30000)
        .step_by(100)
        .find(|b| ports_free(*b))
        .context("no free port range")?;
    let kpscd_args = kpsc_tests::proxy_args(&cluster, base, &[]);
    println!("\n2. kpscd proxy \\");
    for pair in kpscd_args.chunks(2) {
        println!("     {} \"{}\" \\", pair[0], pair[1]);
    }
    let started = Instant::now();
    let mut kpscd = Kpscd::start(&kpscd_args)?;
    println!(
        "   ready in {:.0?} (admin endpoint {})",
        started.elapsed(),
        kpscd.admin
    );

    println!("\n3. kpscctl maps");
    print_maps(&kpscd)?;

    let bootstrap = format!("127.0.1.1:{base}");
    println!("\n4. a real client (rdkafka) bootstraps through {bootstrap} and sees:");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()?;
    let metadata = producer
        .client()
        .fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
    for b in metadata.brokers() {
        println!("     broker {} at {}:{}", b.id(), b.host(), b.port());
        ensure!(
            b.host() != REAL_BROKER_HOST,
            "real broker address leaked: {}:{}",
            b.host(),
            b.port()
        );
    }
    for p in metadata.topics()[0].partitions() {
        println!("     {TOPIC}[{}] leader: broker {}", p.id(), p.leader());
    }

    println!(
        "\n5. produce {} x {PAYLOAD_BYTES} B messages",
        args.messages
    );
    let payload = vec![b'k'; PAYLOAD_BYTES - 16];
    let started = Instant::now();
    for i in 0..args.messages {
        let key = format!("key-{i:08}");
        let value = [format!("{i:016}").as_bytes(), &payload].concat();
        let record = BaseRecord::to(TOPIC)
            .key(&key)
            .payload(&value)
            .partition((i % 3) as i32);
        send_waiting(&producer, record)?;
    }
    producer.flush(Duration::from_secs(30))?;
    let produce_time = started.elapsed();
    report("produced", args.messages, produce_time);

    println!("\n6. consume them back with consumer group \"demo\"");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "demo")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[TOPIC])?;
    let started = Instant::now();
    let mut per_partition: HashMap<i32, usize> = HashMap::new();
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received < args.messages {
        ensure!(
            Instant::now() < deadline,
            "only {received} of {} messages consumed",
            args.messages
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            ensure!(
                m.payload().map(|p| p.len()) == Some(PAYLOAD_BYTES),
                "bad payload"
            );
            *per_partition.entry(m.partition()).or_default() += 1;
            received += 1;
        }
    }
    report("consumed", received, started.elapsed());
    let mut parts: Vec<_> = per_partition.into_iter().collect();
    parts.sort();
    for (p, n) in parts {
        println!("     {TOPIC}[{p}]: {n} messages");
    }
    drop(consumer);
    drop(producer);

    println!("\n7. kpscctl maps (after the run)");
    print_maps(&kpscd)?;
    println!(
        "   rewritten responses: {} (Metadata {}, FindCoordinator {}, ApiVersions {})",
        kpscd.metric("kpsc_rewrites_total", ""),
        kpscd.metric("kpsc_rewrites_total", "api=\"Metadata\""),
        kpscd.metric("kpsc_rewrites_total", "api=\"FindCoordinator\""),
        kpscd.metric("kpsc_rewrites_total", "api=\"ApiVersions\""),
    );
    let code = kpscd.terminate(Duration::from_secs(15))?;
    println!(
        "\n8. kpscd stopped (SIGTERM, exit code {code}); mock cluster shut down. Nothing left running."
    );
    ensure!(code == 0, "kpscd exited with {code}");
    println!(
        "   advertised pattern used: {ADVERTISED_PATTERN} (production: b<broker_id>.<your endpoint domain>)"
    );
    Ok(())
}

fn report(what: &str, n: usize, took: Duration) {
    let secs = took.as_secs_f64();
    println!(
        "   {what} {n} messages in {:.2}s: {:.0} msg/s, {:.1} MB/s",
        secs,
        n as f64 / secs,
        (n * PAYLOAD_BYTES) as f64 / secs / 1e6
    );
}

fn print_maps(kpscd: &Kpscd) -> anyhow::Result<()> {
    let out = Command::new(kpscctl_bin())
        .args(["maps", "--admin", &kpscd.admin.to_string()])
        .output()
        .context("running kpscctl")?;
    ensure!(
        out.status.success(),
        "kpscctl maps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
    Ok(())
}
