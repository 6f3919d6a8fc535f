//! Helpers for the real client the tests drive, rdkafka (librdkafka): queueing without
//! failing on a full queue, and watching what the client learns about brokers.

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::bail;
use rdkafka::{
    ClientConfig, ClientContext, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::RDKafkaLogLevel,
    consumer::ConsumerContext,
    error::KafkaError,
    message::ToBytes,
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext},
    types::RDKafkaErrorCode,
};

/// Queues `record`, polling while librdkafka's queue is full; any other error fails.
pub fn send_waiting<'a, C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'a, K, P, C::DeliveryOpaque>,
) -> anyhow::Result<()>
where
    C: ProducerContext,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => {
                producer.poll(Duration::ZERO);
                return Ok(());
            }
            Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                record = r;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => bail!("produce failed: {e}"),
        }
    }
}

/// Watches every rdkafka client made from [`LeakWatch::config`]: its debug log lines,
/// statistics and (for producers) delivery reports, to check that no real broker address
/// ever reached the client and that every message was acknowledged once.
#[derive(Clone, Default)]
pub struct LeakWatch {
    debug: &'static str,
    logs: Arc<Mutex<Vec<String>>>,
    stats: Arc<Mutex<Vec<String>>>,
    delivered: Arc<Mutex<Delivered>>,
}

/// Delivery reports of one producer.
#[derive(Default)]
pub struct Delivered {
    /// value -> (partition, offset)
    pub ok: HashMap<Vec<u8>, (i32, i64)>,
    /// Values in produce order.
    pub order: Vec<Vec<u8>>,
    pub errors: Vec<(Vec<u8>, KafkaError)>,
    /// Values reported delivered twice (recorded, not asserted: a panic in a librdkafka
    /// callback would abort).
    pub duplicates: Vec<Vec<u8>>,
    pub reports: usize,
}

impl ClientContext for LeakWatch {
    fn log(&self, _: RDKafkaLogLevel, facility: &str, message: &str) {
        lock(&self.logs).push(format!("{facility} {message}"));
    }

    fn stats_raw(&self, statistics: &[u8]) {
        lock(&self.stats).push(String::from_utf8_lossy(statistics).into_owned());
    }
}

impl ProducerContext for LeakWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut d = lock(&self.delivered);
        d.reports += 1;
        match result {
            Ok(m) => {
                let value = m.payload().unwrap_or_default().to_vec();
                match d.ok.entry(value) {
                    Entry::Occupied(e) => {
                        let value = e.key().clone();
                        d.duplicates.push(value);
                    }
                    Entry::Vacant(e) => {
                        e.insert((m.partition(), m.offset()));
                    }
                }
            }
            Err((e, m)) => {
                let value = m.payload().unwrap_or_default().to_vec();
                d.errors.push((value, e.clone()));
            }
        }
    }
}

impl ConsumerContext for LeakWatch {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeakWatch {
    /// `debug`: librdkafka's debug contexts to collect (e.g. "broker,metadata").
    pub fn new(debug: &'static str) -> Self {
        Self {
            debug,
            ..Self::default()
        }
    }

    /// A client configuration for `bootstrap` whose logs and statistics come here.
    pub fn config(&self, bootstrap: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap)
            .set("statistics.interval.ms", "200")
            .set("debug", self.debug)
            // Without a `log` logger rdkafka would ask librdkafka for errors only.
            .set_log_level(RDKafkaLogLevel::Debug);
        c
    }

    pub fn delivered(&self) -> MutexGuard<'_, Delivered> {
        lock(&self.delivered)
    }

    /// Every broker name in the statistics: "host:port/id", "host:port/bootstrap",
    /// "nodename=host:port", or logical names without an address.
    pub fn broker_names_in_stats(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for s in lock(&self.stats).iter() {
            let Ok(stats) = serde_json::from_str::<serde_json::Value>(s) else {
                continue;
            };
            for (key, b) in stats["brokers"].as_object().into_iter().flatten() {
                names.insert(key.clone());
                names.insert(b["name"].as_str().unwrap_or_default().to_owned());
                if let Some(node) = b["nodename"].as_str().filter(|n| !n.is_empty()) {
                    names.insert(format!("nodename={node}"));
                }
            }
        }
        names.remove("");
        names
    }

    /// No real broker address in any log line or statistics: not `real_host`, no broker
    /// name but the `advertised` addresses, and no `real_ports` behind any IPv4 address (a
    /// half-rewritten "127.0.1.2:<real port>").
    pub fn assert_clean(&self, real_host: &str, advertised: &BTreeSet<String>, real_ports: &[u16]) {
        let logs = lock(&self.logs).clone();
        let stats = lock(&self.stats).clone();
        assert!(!stats.is_empty(), "librdkafka emitted no statistics");
        assert!(!logs.is_empty(), "librdkafka emitted no debug logs");
        let leaked: Vec<_> = logs.iter().filter(|l| l.contains(real_host)).collect();
        assert!(
            leaked.is_empty(),
            "{} librdkafka debug lines mention {real_host}, first: {:?}",
            leaked.len(),
            &leaked[..leaked.len().min(5)]
        );
        if let Some(s) = stats.iter().find(|s| s.contains(real_host)) {
            panic!(
                "librdkafka stats mention {real_host}: {}",
                &s[..s.len().min(2000)]
            );
        }
        let bad: Vec<_> = self
            .broker_names_in_stats()
            .into_iter()
            .filter(|name| {
                let addr = name.strip_prefix("nodename=").unwrap_or(name);
                let addr = addr.split('/').next().unwrap_or_default();
                addr.contains(':') && !addr.starts_with(':') && !advertised.contains(addr)
            })
            .collect();
        assert!(
            bad.is_empty(),
            "librdkafka stats name non-advertised brokers: {bad:?} (advertised: {advertised:?})"
        );
        for line in &logs {
            for (host, port) in ipv4_ports(line) {
                assert!(
                    !real_ports.contains(&port),
                    "librdkafka debug line names a real broker port ({host}:{port}): {line}"
                );
            }
        }
    }
}

/// Every "a.b.c.d:port" in `text` (as the regex `(\d+\.\d+\.\d+\.\d+):(\d+)` finds them).
fn ipv4_ports(text: &str) -> Vec<(String, u16)> {
    let mut found = Vec::new();
    for token in text.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')) {
        let parts: Vec<&str> = token.split(':').collect();
        for pair in parts.windows(2) {
            let groups: Vec<&str> = pair[0].split('.').collect();
            let port: String = pair[1].chars().take_while(char::is_ascii_digit).collect();
            if groups.len() >= 4
                && groups[groups.len() - 4..].iter().all(|g| !g.is_empty())
                && let Ok(port) = port.parse()
            {
                found.push((groups[groups.len() - 4..].join("."), port));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv4_ports_finds_addresses_with_ports_only() {
        assert_eq!(
            super::ipv4_ports("connect to 127.0.1.2:30012/2 (from 10.0.0.1) ipv4#127.0.0.1:5"),
            vec![("127.0.1.2".to_owned(), 30012), ("127.0.0.1".to_owned(), 5)]
        );
        assert!(super::ipv4_ports("v1.2.3 at 12:30, 1.2.3:4").is_empty());
    }
}

/// Counts the messages the brokers acknowledged (flush alone returns Ok for messages
/// that timed out).
#[derive(Default)]
struct Acked(std::sync::atomic::AtomicUsize);

impl ClientContext for Acked {}
impl ProducerContext for Acked {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Produces `n` messages (acks=all) through `bootstrap` to topic `topic`, spread over its
/// partitions 0..3 (the tests lead them from three different brokers, so every broker's
/// port is used); returns how many were acknowledged.
pub fn produce_acked(bootstrap: &str, topic: &str, n: usize) -> usize {
    let producer: BaseProducer<Acked> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("log_level", "3")
        .set("message.timeout.ms", "20000")
        .create_with_context(Acked::default())
        .expect("creating the producer");
    for i in 0..n {
        let value = format!("m{i}");
        let record = BaseRecord::<(), _>::to(topic)
            .partition((i % 3) as i32)
            .payload(&value);
        producer
            .send(record)
            .map_err(|(e, _)| e)
            .expect("queueing a message");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flushing");
    producer
        .context()
        .0
        .load(std::sync::atomic::Ordering::SeqCst)
}

/// Creates `topic` with `partitions` (replication 1) through `bootstrap`, from the calling
/// thread's network namespace.
pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let created = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))?;
    anyhow::ensure!(created.iter().all(|r| r.is_ok()), "{created:?}");
    Ok(())
}
