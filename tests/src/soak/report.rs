//! The soak's result: counts per kind of damage, produce latency, and the stall each fault
//! caused, as a table (markdown) and JSON.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::json;

use crate::soak::{
    config::SoakConfig,
    faults::{Fault, Injected},
    ledger::{Acks, Reads, Verdict, duplicated, stall_after, tally},
};

/// One injected fault and what it cost the producer.
pub struct FaultResult {
    pub fault: Fault,
    /// Seconds from the start of the run.
    pub at_s: f64,
    pub took: Duration,
    pub detail: String,
    /// Longest wait for an acknowledgement on any partition, from the fault until the
    /// next one ([`stall_after`]).
    pub stall: Duration,
    /// From the fault to the next acknowledged record on any partition.
    pub first_ack: Duration,
    /// Records read twice that were queued up to 2 s before this fault or during its stall
    /// (until the next fault).
    pub duplicates: usize,
}

pub struct Report {
    pub seconds: f64,
    pub rate: u32,
    pub keys: usize,
    pub partitions: i32,
    pub sent: u64,
    pub acked: usize,
    pub failed: usize,
    pub double_reports: usize,
    pub read: usize,
    pub malformed: usize,
    pub redelivered: usize,
    pub verdict: Verdict,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub faults: Vec<FaultResult>,
    pub kpscd_starts: usize,
    pub decode_failures: f64,
    pub delivery_errors: Vec<(String, usize)>,
    pub consumer_errors: Vec<(String, usize)>,
    /// The producer's warnings and errors: (seconds from the start, text).
    pub producer_events: Vec<(f64, String)>,
    /// Records read twice that were queued before the first fault's window.
    pub duplicates_outside_faults: usize,
    /// Each kpscd process's log, in start order (written next to the report).
    pub kpscd_logs: Vec<String>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        config: &SoakConfig,
        elapsed: Duration,
        sent: u64,
        acks: &Acks,
        reads: &Reads,
        injected: &[Injected],
        started: Instant,
        kpscd_starts: usize,
        decode_failures: f64,
    ) -> Self {
        let total = tally(acks, reads);
        let mut latencies = acks.latencies_us.clone();
        latencies.sort_unstable();
        let end = Instant::now();
        // When each record read twice was queued, to find the fault it belongs to.
        let queued_duplicates: Vec<Instant> = acks
            .acked
            .iter()
            .zip(&reads.seqs)
            .flat_map(|(acked, seqs)| {
                duplicated(seqs)
                    .into_iter()
                    .filter_map(|seq| acked.get(&seq).copied())
            })
            .collect();
        // Each duplicate belongs to one fault: the next one if it came within 2 s of the
        // record being queued (the record was in flight when it struck), else the last
        // one before (a retry during its stall).
        let owner = |t: Instant| {
            let next = injected.partition_point(|i| i.at < t);
            match injected.get(next) {
                Some(i) if i.at - t <= Duration::from_secs(2) => Some(next),
                _ => next.checked_sub(1),
            }
        };
        let owners: Vec<Option<usize>> = queued_duplicates.iter().map(|t| owner(*t)).collect();
        let duplicates_outside_faults = owners.iter().filter(|o| o.is_none()).count();
        let faults = injected
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let until = injected.get(n + 1).map_or(end, |next| next.at);
                let (stall, first_ack) = stall_after(acks, i.at, until);
                FaultResult {
                    fault: i.fault,
                    at_s: i.at.duration_since(started).as_secs_f64(),
                    took: i.took,
                    detail: i.detail.clone(),
                    stall,
                    first_ack,
                    duplicates: owners.iter().filter(|o| **o == Some(n)).count(),
                }
            })
            .collect();
        Self {
            seconds: elapsed.as_secs_f64(),
            rate: config.rate,
            keys: config.keys,
            partitions: config.partitions,
            sent,
            acked: acks.acked.iter().map(|a| a.len()).sum(),
            failed: acks.failed.iter().map(|a| a.len()).sum(),
            double_reports: acks.double_reports,
            read: reads.seqs.iter().map(Vec::len).sum(),
            malformed: reads.malformed,
            redelivered: reads.redelivered,
            duplicates_outside_faults,
            kpscd_logs: Vec::new(),
            verdict: total,
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: percentile(&latencies, 1.0),
            faults,
            kpscd_starts,
            // An empty f64 sum is -0.
            decode_failures: decode_failures + 0.0,
            delivery_errors: acks.errors.iter().map(|(e, n)| (e.clone(), *n)).collect(),
            consumer_errors: reads.errors.iter().map(|(e, n)| (e.clone(), *n)).collect(),
            producer_events: acks
                .events
                .iter()
                .map(|(t, e)| (t.duration_since(started).as_secs_f64(), e.clone()))
                .collect(),
        }
    }

    /// The longest stall of each kind of fault over the run.
    pub fn worst_stall(&self, fault: Fault) -> Option<Duration> {
        self.faults
            .iter()
            .filter(|f| f.fault == fault)
            .map(|f| f.stall)
            .max()
    }

    pub fn markdown(&self) -> String {
        let v = &self.verdict;
        let mut md = format!(
            "Changefeed soak: rdkafka producer (enable.idempotence, acks=all, linger 5 ms) -> \
             kpscd proxy -> librdkafka mock cluster (3 brokers), {} keys over {} partitions, \
             {} records/s, {:.0} s; a consumer reads everything back through kpscd.\n\n\
             | records sent | acknowledged | failed | read | lost | duplicated | reordered | \
             produce p50 | p99 | max |\n|---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.0} ms |\n\n\
             | t (s) | fault | took | longest stall (any partition) | to first ack | \
             duplicates | detail |\n|---|---|---|---|---|---|---|\n",
            self.keys,
            self.partitions,
            self.rate,
            self.seconds,
            self.sent,
            self.acked,
            self.failed,
            self.read,
            v.lost,
            v.duplicated,
            v.reordered,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        );
        for f in &self.faults {
            md.push_str(&format!(
                "| {:.1} | {} | {:.2} s | {:.2} s | {:.2} s | {} | {} |\n",
                f.at_s,
                f.fault.name(),
                f.took.as_secs_f64(),
                f.stall.as_secs_f64(),
                f.first_ack.as_secs_f64(),
                f.duplicates,
                f.detail
            ));
        }
        md.push_str(&format!(
            "\nkpscd processes: {}; decode failures in the last one: {}; records read \
             although reported failed: {}; malformed records read: {}; records handed to the \
             consumer again at an offset it had read (client re-delivery, not counted as \
             duplicates): {}; records read twice that were queued before any fault: {}.\n",
            self.kpscd_starts,
            self.decode_failures,
            v.read_unacked,
            self.malformed,
            self.redelivered,
            self.duplicates_outside_faults
        ));
        for (what, errors) in [
            ("delivery errors", &self.delivery_errors),
            (
                "consumer errors (retried by librdkafka)",
                &self.consumer_errors,
            ),
        ] {
            if !errors.is_empty() {
                md.push_str(&format!("\n{what}:\n"));
                for (e, n) in errors {
                    md.push_str(&format!("- {n} x {e}\n"));
                }
            }
        }
        if !self.producer_events.is_empty() {
            md.push_str(&format!(
                "\nproducer warnings and errors ({}, first 40):\n",
                self.producer_events.len()
            ));
            for (t, e) in self.producer_events.iter().take(40) {
                md.push_str(&format!("- {t:.2} s: {e}\n"));
            }
        }
        md
    }

    pub fn json(&self) -> serde_json::Value {
        let v = &self.verdict;
        json!({
            "seconds": self.seconds,
            "rate": self.rate,
            "keys": self.keys,
            "partitions": self.partitions,
            "sent": self.sent,
            "acknowledged": self.acked,
            "failed": self.failed,
            "double_reports": self.double_reports,
            "read": self.read,
            "lost": v.lost,
            "duplicated": v.duplicated,
            "reordered": v.reordered,
            "read_unacknowledged": v.read_unacked,
            "malformed": self.malformed,
            "redelivered_same_offset": self.redelivered,
            "duplicates_outside_faults": self.duplicates_outside_faults,
            "produce_latency_ms": {"p50": self.p50_ms, "p99": self.p99_ms, "max": self.max_ms},
            "kpscd_starts": self.kpscd_starts,
            "decode_failures": self.decode_failures,
            "faults": self.faults.iter().map(|f| json!({
                "fault": f.fault.key(),
                "at_s": f.at_s,
                "took_s": f.took.as_secs_f64(),
                "stall_s": f.stall.as_secs_f64(),
                "first_ack_s": f.first_ack.as_secs_f64(),
                "duplicates": f.duplicates,
                "detail": f.detail,
            })).collect::<Vec<_>>(),
            "delivery_errors": self.delivery_errors,
            "consumer_errors": self.consumer_errors,
            "producer_events": self.producer_events,
        })
    }

    /// Writes `soak-<stamp>.json` and `.md` into `dir`; returns the markdown's path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let md = dir.join(format!("soak-{stamp}.md"));
        std::fs::write(&md, self.markdown())?;
        std::fs::write(
            md.with_extension("json"),
            serde_json::to_string_pretty(&self.json())?,
        )?;
        for (i, log) in self.kpscd_logs.iter().enumerate() {
            std::fs::write(dir.join(format!("soak-{stamp}-kpscd-{}.log", i + 1)), log)?;
        }
        Ok(md)
    }
}
