//! What the soak's producer was told (delivery reports) and what its consumer read, per
//! key, so that lost, duplicated and reordered records can be counted afterwards.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext, Message,
    config::RDKafkaLogLevel,
    consumer::ConsumerContext,
    error::KafkaError,
    producer::{DeliveryResult, ProducerContext},
};

/// One record in flight: which key, which sequence number of that key, when it was queued.
pub struct Sent {
    pub key: usize,
    pub seq: u64,
    pub at: Instant,
}

/// The producer's delivery reports.
#[derive(Default)]
pub struct Acks {
    /// Per key: sequence numbers the broker acknowledged, with when each was queued.
    pub acked: Vec<BTreeMap<u64, Instant>>,
    /// Per key: sequence numbers the client gave up on (a delivery error).
    pub failed: Vec<BTreeSet<u64>>,
    /// Acknowledged twice (librdkafka should never report a record twice).
    pub double_reports: usize,
    /// Queue-to-acknowledgement time of every acknowledged record, microseconds.
    pub latencies_us: Vec<u64>,
    /// Per partition: when each acknowledgement arrived, in arrival order.
    pub ack_times: BTreeMap<i32, Vec<Instant>>,
    /// Delivery error texts and how often each was seen.
    pub errors: BTreeMap<String, usize>,
    /// The producer's warnings and errors (librdkafka retries through them).
    pub events: Vec<(Instant, String)>,
}

/// What the consumer read, per key, in read order.
#[derive(Default)]
pub struct Reads {
    pub seqs: Vec<Vec<u64>>,
    /// (partition, offset) of every record read: a record the consumer is handed twice
    /// at the same offset is a re-delivery, not a duplicate in the log.
    pub offsets: BTreeSet<(i32, i64)>,
    /// Records handed to the consumer again at an offset it had already read.
    pub redelivered: usize,
    /// Records whose key or value did not parse (must stay 0).
    pub malformed: usize,
    /// Consumer errors (transport errors during the faults are expected and retried).
    pub errors: BTreeMap<String, usize>,
}

/// Shared by the producer's delivery callback and the soak's analysis.
#[derive(Clone)]
pub struct ProducerLedger(pub Arc<Mutex<Acks>>);

/// Shared by the consumer thread and the soak's analysis.
#[derive(Clone, Default)]
pub struct ConsumerLedger(pub Arc<Mutex<Reads>>);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ProducerLedger {
    pub fn new(keys: usize) -> Self {
        Self(Arc::new(Mutex::new(Acks {
            acked: vec![BTreeMap::new(); keys],
            failed: vec![BTreeSet::new(); keys],
            ..Acks::default()
        })))
    }
}

impl ClientContext for ProducerLedger {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if std::env::var_os("KPSC_SOAK_DEBUG").is_some() {
            eprintln!(
                "{:?} producer {level:?} {facility} {message}",
                Instant::now()
            );
        }
        // Warnings and worse explain a stall (e.g. an idempotence epoch bump).
        if (level as i32) <= RDKafkaLogLevel::Warning as i32 {
            lock(&self.0)
                .events
                .push((Instant::now(), format!("{facility} {message}")));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        lock(&self.0)
            .events
            .push((Instant::now(), format!("error {error}: {reason}")));
    }
}

impl ProducerContext for ProducerLedger {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Sent>) {
        let now = Instant::now();
        let mut acks = lock(&self.0);
        match result {
            Ok(m) => {
                if acks.acked[sent.key].insert(sent.seq, sent.at).is_some() {
                    acks.double_reports += 1;
                }
                let us = now.duration_since(sent.at).as_micros() as u64;
                acks.latencies_us.push(us);
                acks.ack_times.entry(m.partition()).or_default().push(now);
            }
            Err((e, _)) => {
                acks.failed[sent.key].insert(sent.seq);
                *acks.errors.entry(e.to_string()).or_default() += 1;
            }
        }
    }
}

impl ConsumerLedger {
    pub fn new(keys: usize) -> Self {
        Self(Arc::new(Mutex::new(Reads {
            seqs: vec![Vec::new(); keys],
            ..Reads::default()
        })))
    }

    /// Records one consumed record: key `k<key>`, value `<key>:<seq>:<padding>`.
    pub fn record(&self, m: &impl Message) {
        let (key, value) = (m.key(), m.payload());
        if !lock(&self.0).offsets.insert((m.partition(), m.offset())) {
            lock(&self.0).redelivered += 1;
            return;
        }
        let parsed = (|| {
            let key: usize = std::str::from_utf8(key?)
                .ok()?
                .strip_prefix('k')?
                .parse()
                .ok()?;
            let value = std::str::from_utf8(value?).ok()?;
            let mut parts = value.splitn(3, ':');
            let value_key: usize = parts.next()?.parse().ok()?;
            let seq: u64 = parts.next()?.parse().ok()?;
            (value_key == key).then_some((key, seq))
        })();
        let mut reads = lock(&self.0);
        match parsed {
            Some((key, seq)) if key < reads.seqs.len() => reads.seqs[key].push(seq),
            _ => reads.malformed += 1,
        }
    }

    pub fn error(&self, e: &dyn std::fmt::Display) {
        *lock(&self.0).errors.entry(e.to_string()).or_default() += 1;
    }

    /// Distinct records read so far.
    pub fn distinct(&self) -> usize {
        lock(&self.0)
            .seqs
            .iter()
            .map(|s| s.iter().collect::<BTreeSet<_>>().len())
            .sum()
    }
}

impl ConsumerContext for ConsumerLedger {}
impl ClientContext for ConsumerLedger {}

/// Lost, duplicated and reordered records of one key.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged but never read.
    pub lost: usize,
    /// Read more than once.
    pub duplicated: usize,
    /// Read after a higher sequence number of the same key (first reading only).
    pub reordered: usize,
    /// Read although the producer reported it failed (allowed: a failed delivery may
    /// still have been written).
    pub read_unacked: usize,
}

impl std::ops::AddAssign for Verdict {
    fn add_assign(&mut self, o: Self) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.read_unacked += o.read_unacked;
    }
}

/// Checks one key's reads against its acknowledgements.
pub fn verdict(acked: &BTreeMap<u64, Instant>, reads: &[u64]) -> Verdict {
    let mut v = Verdict::default();
    let mut seen = BTreeSet::new();
    let mut highest = None;
    for &seq in reads {
        if !seen.insert(seq) {
            v.duplicated += 1;
            continue;
        }
        if highest.is_some_and(|h| seq < h) {
            v.reordered += 1;
        }
        highest = highest.max(Some(seq));
        if !acked.contains_key(&seq) {
            v.read_unacked += 1;
        }
    }
    v.lost = acked.keys().filter(|s| !seen.contains(s)).count();
    v
}

/// Sequence numbers read more than once (each extra reading once).
pub fn duplicated(reads: &[u64]) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    reads.iter().copied().filter(|s| !seen.insert(*s)).collect()
}

/// Lost, duplicated and reordered records over all keys.
pub fn tally(acks: &Acks, reads: &Reads) -> Verdict {
    let mut total = Verdict::default();
    for (acked, seqs) in acks.acked.iter().zip(&reads.seqs) {
        total += verdict(acked, seqs);
    }
    total
}

/// What a fault at `at` cost until `until` (the next fault, or the end): the longest wait
/// for an acknowledgement on any partition that had any — the gaps between its
/// acknowledgements from `at` on, the first gap starting at `at`, the last one closed by
/// the first acknowledgement after `until` (a partition with none after `at` waited until
/// `until`) — and the time from `at` to the first acknowledgement on any partition.
pub fn stall_after(acks: &Acks, at: Instant, until: Instant) -> (Duration, Duration) {
    let mut longest = Duration::ZERO;
    let mut first: Option<Duration> = None;
    for times in acks.ack_times.values() {
        let after = &times[times.partition_point(|t| *t < at)..];
        let Some(&next) = after.first() else {
            longest = longest.max(until.saturating_duration_since(at));
            continue;
        };
        let to_next = next - at;
        first = Some(first.map_or(to_next, |f| f.min(to_next)));
        let mut previous = at;
        for &t in after {
            longest = longest.max(t - previous);
            previous = t;
            if t > until {
                break;
            }
        }
    }
    (longest, first.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use super::{Acks, Verdict, duplicated, stall_after, verdict};

    #[test]
    fn stall_is_the_longest_gap_after_the_fault() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let acks = Acks {
            ack_times: BTreeMap::from([
                (0, vec![ms(0), ms(100), ms(110), ms(900), ms(910)]),
                (1, vec![ms(0), ms(105), ms(115), ms(125)]),
            ]),
            ..Acks::default()
        };
        // Fault at 100: partition 0 waits 110 -> 900 (790 ms), closed after the window.
        assert_eq!(
            stall_after(&acks, ms(100), ms(500)),
            (Duration::from_millis(790), Duration::ZERO)
        );
        // Fault at 200: partition 1 never acknowledges again: it waits the whole window.
        assert_eq!(
            stall_after(&acks, ms(200), ms(1000)),
            (Duration::from_millis(800), Duration::from_millis(700))
        );
    }

    #[test]
    fn verdict_counts_each_kind_once() {
        let acked: BTreeMap<u64, Instant> = (1..=5).map(|s| (s, Instant::now())).collect();
        assert_eq!(verdict(&acked, &[1, 2, 3, 4, 5]), Verdict::default());
        let v = verdict(&acked, &[1, 3, 2, 3, 5, 6]);
        assert_eq!(
            v,
            Verdict {
                lost: 1,
                duplicated: 1,
                reordered: 1,
                read_unacked: 1
            }
        );
        assert_eq!(duplicated(&[1, 3, 2, 3, 5, 3]), vec![3, 3]);
    }
}
