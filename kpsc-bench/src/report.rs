//! Results: every measurement as JSON, medians [min-max] and pairwise ratios as a markdown
//! table, and a throughput chart (SVG).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{churn::ChurnResult, load::ProduceResult};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    pub target: String,
    pub workload: String,
    pub repetition: usize,
    pub mb_per_s: Option<f64>,
    pub records_per_s: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    /// Proxy process CPU (user+system) per GB forwarded; None for direct.
    pub proxy_cpu_s_per_gb: Option<f64>,
    /// Kernel softirq time of the whole machine per GB (network stack + TC programs).
    pub softirq_s_per_gb: Option<f64>,
    /// CPU of the kernel's worker threads (kworker) per GB: deferred kernel work, such as
    /// sockmap's redirect backlog, which neither of the two above shows.
    #[serde(default)]
    pub kworker_s_per_gb: Option<f64>,
    /// Churn and flood workloads: connections opened, answered and closed per second.
    #[serde(default)]
    pub connections_per_s: Option<f64>,
    /// Churn and flood workloads: attempts answered within the timeout, percent.
    #[serde(default)]
    pub success_pct: Option<f64>,
    /// Churn and flood workloads: attempts answered only after a SYN retransmission
    /// (a second or more), percent.
    #[serde(default)]
    pub retried_pct: Option<f64>,
}

fn quantiles(h: &Histogram<u64>) -> (Option<u64>, Option<u64>, Option<u64>) {
    if h.is_empty() {
        return (None, None, None);
    }
    (
        Some(h.value_at_quantile(0.5)),
        Some(h.value_at_quantile(0.99)),
        Some(h.value_at_quantile(0.999)),
    )
}

impl Measurement {
    pub fn produce(
        target: &str,
        workload: &str,
        repetition: usize,
        r: &ProduceResult,
        cpu_s: f64,
        softirq_s: f64,
        kworker_s: f64,
    ) -> Self {
        let secs = r.elapsed.as_secs_f64();
        let gb = r.bytes as f64 / 1e9;
        let (p50, p99, p999) = r.latency.as_ref().map_or((None, None, None), quantiles);
        Self {
            target: target.into(),
            workload: workload.into(),
            repetition,
            mb_per_s: Some(r.bytes as f64 / secs / 1e6),
            records_per_s: Some(r.records as f64 / secs),
            p50_us: p50,
            p99_us: p99,
            p999_us: p999,
            proxy_cpu_s_per_gb: (!matches!(target, "direct" | "routed") && gb > 0.0)
                .then(|| cpu_s / gb),
            softirq_s_per_gb: (gb > 0.0).then(|| softirq_s / gb),
            kworker_s_per_gb: (gb > 0.0).then(|| kworker_s / gb),
            connections_per_s: None,
            success_pct: None,
            retried_pct: None,
        }
    }

    /// A churn run: rate, success and connect + request latency.
    pub fn churn(target: &str, workload: &str, repetition: usize, r: &ChurnResult) -> Self {
        Self {
            connections_per_s: Some(r.connections_per_s()),
            success_pct: Some(r.success_pct()),
            retried_pct: Some(r.retried_pct()),
            ..Self::latency(target, workload, repetition, &r.latency)
        }
    }

    pub fn latency(target: &str, workload: &str, repetition: usize, h: &Histogram<u64>) -> Self {
        let (p50, p99, p999) = quantiles(h);
        Self {
            target: target.into(),
            workload: workload.into(),
            repetition,
            mb_per_s: None,
            records_per_s: None,
            p50_us: p50,
            p99_us: p99,
            p999_us: p999,
            proxy_cpu_s_per_gb: None,
            softirq_s_per_gb: None,
            kworker_s_per_gb: None,
            connections_per_s: None,
            success_pct: None,
            retried_pct: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct Report {
    #[serde(skip)]
    dir: PathBuf,
    pub machine: String,
    pub measurements: Vec<Measurement>,
    /// (open connections, KiB per connection) per target.
    pub idle_kib_per_connection: BTreeMap<String, Vec<(usize, f64)>>,
    pub peak_rss_kib: BTreeMap<String, u64>,
    /// Kernel-side state after a workload (portmap's counters, conntrack entries).
    #[serde(default)]
    pub notes: Vec<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn spread(v: &[f64]) -> String {
    let Some(m) = median(v.to_vec()) else {
        return "-".into();
    };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 {
        format!("{m:.1}")
    } else {
        format!("{m:.1} [{min:.1}-{max:.1}]")
    }
}

impl Report {
    pub fn new(out: &Path, machine: String) -> anyhow::Result<Self> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let dir = out.join(format!("bench-{stamp}"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            machine,
            measurements: Vec::new(),
            idle_kib_per_connection: BTreeMap::new(),
            peak_rss_kib: BTreeMap::new(),
            notes: Vec::new(),
        })
    }

    /// A report written before, from its folder's results.json.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("results.json");
        let json = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let mut report: Self = serde_json::from_str(&json)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
        report.dir = dir.to_owned();
        Ok(report)
    }

    pub fn add(&mut self, m: Measurement) {
        self.measurements.push(m);
    }

    pub fn idle_memory(&mut self, target: &str, points: Vec<(usize, f64)>) {
        self.idle_kib_per_connection.insert(target.into(), points);
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    pub fn peak_rss(&mut self, target: &str, kib: u64) {
        self.peak_rss_kib.insert(target.into(), kib);
    }

    fn values(
        &self,
        workload: &str,
        target: &str,
        f: impl Fn(&Measurement) -> Option<f64>,
    ) -> Vec<f64> {
        self.measurements
            .iter()
            .filter(|m| m.workload == workload && m.target == target)
            .filter_map(f)
            .collect()
    }

    /// Median over repetitions of `f(target, reference)`, each pair from one repetition.
    fn pairwise(
        &self,
        workload: &str,
        target: &str,
        reference: &str,
        f: impl Fn(&Measurement, &Measurement) -> Option<f64>,
    ) -> Option<f64> {
        let reps: Vec<f64> = self
            .measurements
            .iter()
            .filter(|m| m.workload == workload && m.target == target)
            .filter_map(|m| {
                let r = self.measurements.iter().find(|o| {
                    o.workload == workload && o.target == reference && o.repetition == m.repetition
                })?;
                f(m, r)
            })
            .collect();
        median(reps)
    }

    /// Target/reference throughput, pair by pair.
    fn ratio(&self, workload: &str, target: &str, reference: &str) -> Option<f64> {
        self.pairwise(workload, target, reference, |m, r| {
            Some(m.mb_per_s? / r.mb_per_s?)
        })
    }

    /// Target/reference connections per second, pair by pair.
    fn churn_ratio(&self, workload: &str, target: &str, reference: &str) -> Option<f64> {
        self.pairwise(workload, target, reference, |m, r| {
            Some(m.connections_per_s? / r.connections_per_s?)
        })
    }

    /// Workloads and targets in the order they were measured.
    fn workloads_and_targets(&self) -> (Vec<&str>, Vec<&str>) {
        let mut workloads: Vec<&str> = Vec::new();
        let mut targets: Vec<&str> = Vec::new();
        for m in &self.measurements {
            if !workloads.contains(&m.workload.as_str()) {
                workloads.push(&m.workload);
            }
            if !targets.contains(&m.target.as_str()) {
                targets.push(&m.target);
            }
        }
        // Targets measured only for memory (`--workloads idle`).
        for t in self
            .idle_kib_per_connection
            .keys()
            .chain(self.peak_rss_kib.keys())
        {
            if !targets.contains(&t.as_str()) {
                targets.push(t);
            }
        }
        (workloads, targets)
    }

    /// Compact tables: one row per workload, one column per target.
    fn summary(&self) -> String {
        let (workloads, targets) = self.workloads_and_targets();
        // The first target is the no-proxy baseline.
        let baseline = targets.first().copied().unwrap_or("direct");
        let med =
            |w: &str, t: &str, f: fn(&Measurement) -> Option<f64>| median(self.values(w, t, f));
        let header = format!(
            "| workload | {} |\n|---|{}\n",
            targets.join(" | "),
            "---|".repeat(targets.len())
        );
        let mut throughput = String::new();
        let mut latency = String::new();
        let mut churn = String::new();
        for w in &workloads {
            let is_throughput = self
                .measurements
                .iter()
                .any(|m| m.workload == *w && m.mb_per_s.is_some());
            let is_churn = self
                .measurements
                .iter()
                .any(|m| m.workload == *w && m.connections_per_s.is_some());
            let cells: Vec<String> = targets
                .iter()
                .map(|t| {
                    if is_churn {
                        let Some(rate) = med(w, t, |m| m.connections_per_s) else {
                            return "-".into();
                        };
                        let ratio = (t != &baseline)
                            .then(|| self.churn_ratio(w, t, baseline))
                            .flatten()
                            .map_or(String::new(), |r| format!(" ({r:.2}x)"));
                        let q = |f: fn(&Measurement) -> Option<f64>| {
                            med(w, t, f).map_or("-".into(), |v| format!("{v:.0}"))
                        };
                        let ok = med(w, t, |m| m.success_pct).unwrap_or(0.0);
                        let retried = med(w, t, |m| m.retried_pct).unwrap_or(0.0);
                        format!(
                            "{rate:.0}{ratio}, {} / {} µs, {ok:.1}% ok, {retried:.2}% retried",
                            q(|m| m.p50_us.map(|v| v as f64)),
                            q(|m| m.p99_us.map(|v| v as f64)),
                        )
                    } else if is_throughput {
                        let Some(mb) = med(w, t, |m| m.mb_per_s) else {
                            return "-".into();
                        };
                        let cpu = med(w, t, |m| {
                            Some(
                                m.proxy_cpu_s_per_gb.unwrap_or(0.0)
                                    + m.softirq_s_per_gb?
                                    + m.kworker_s_per_gb.unwrap_or(0.0),
                            )
                        });
                        let ratio = (t != &baseline)
                            .then(|| self.ratio(w, t, baseline))
                            .flatten()
                            .map_or(String::new(), |r| format!(" ({r:.2}x)"));
                        let cpu = cpu.map_or(String::new(), |c| format!(", {c:.2} s/GB"));
                        format!("{mb:.0}{ratio}{cpu}")
                    } else {
                        let q = |f: fn(&Measurement) -> Option<f64>| {
                            med(w, t, f).map_or("-".into(), |v| format!("{v:.0}"))
                        };
                        let added = (t != &baseline)
                            .then(|| {
                                self.pairwise(w, t, baseline, |m, r| {
                                    Some(m.p99_us? as f64 - r.p99_us? as f64)
                                })
                            })
                            .flatten()
                            .map_or(String::new(), |a| format!(" ({a:+.0})"));
                        format!(
                            "{} / {} / {}{added}",
                            q(|m| m.p50_us.map(|v| v as f64)),
                            q(|m| m.p99_us.map(|v| v as f64)),
                            q(|m| m.p999_us.map(|v| v as f64)),
                        )
                    }
                })
                .collect();
            let row = format!("| {w} | {} |\n", cells.join(" | "));
            if is_churn {
                churn.push_str(&row);
            } else if is_throughput {
                throughput.push_str(&row);
            } else {
                latency.push_str(&row);
            }
        }
        let mut out = String::new();
        if !throughput.is_empty() {
            out.push_str(&format!(
                "Throughput: MB/s forwarded (median), ratio to {baseline} pair by pair, and CPU \
                 seconds per GB (proxy process + machine softirq + kernel worker threads):\n\n{header}{throughput}\n"
            ));
        }
        if !churn.is_empty() {
            out.push_str(&format!(
                "Connection churn (connect, one ApiVersions request, close): new connections \
                 per second (median), ratio to {baseline} pair by pair, p50 / p99 connect + \
                 request µs, attempts answered within the timeout (3 s) and answered only \
                 after a SYN retransmission (1 s or more):\n\n{header}{churn}\n"
            ));
        }
        if !latency.is_empty() {
            out.push_str(&format!(
                "Latency, µs: p50 / p99 / p99.9 (medians over repetitions), and in brackets \
                 the p99 added over {baseline}, pair by pair:\n\n{header}{latency}\n"
            ));
        }
        out
    }

    fn markdown(&self) -> String {
        let (workloads, targets) = self.workloads_and_targets();
        // The first target is the no-proxy baseline ("direct" on loopback, "routed" when
        // the node only forwards packets).
        let baseline = targets.first().copied().unwrap_or("direct");
        let mut out = format!(
            "Machine: {}\n\n## Summary\n\n{}## All figures\n\n\
             Median [min-max] over repetitions; ratios are medians of per-repetition pairs.\n",
            self.machine,
            self.summary(),
        );
        let is_churn = |w: &str| {
            self.measurements
                .iter()
                .any(|m| m.workload == w && m.connections_per_s.is_some())
        };
        if workloads.iter().any(|w| !is_churn(w)) {
            out.push_str(&format!(
                "\n| workload | target | MB/s | records/s | vs {baseline} | vs kpscd-proxy | p50 us | p99 us | p99.9 us | proxy CPU s/GB | softirq s/GB | kworker s/GB |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|---|\n"
            ));
        }
        for w in workloads.iter().filter(|w| !is_churn(w)) {
            for t in &targets {
                let get = |f: fn(&Measurement) -> Option<f64>| spread(&self.values(w, t, f));
                let ratio = |reference: &str| {
                    if *t == reference {
                        "-".to_owned()
                    } else {
                        self.ratio(w, t, reference)
                            .map_or("-".into(), |r| format!("{r:.2}x"))
                    }
                };
                out.push_str(&format!(
                    "| {w} | {t} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    get(|m| m.mb_per_s),
                    get(|m| m.records_per_s),
                    ratio(baseline),
                    ratio("kpscd-proxy"),
                    get(|m| m.p50_us.map(|v| v as f64)),
                    get(|m| m.p99_us.map(|v| v as f64)),
                    get(|m| m.p999_us.map(|v| v as f64)),
                    get(|m| m.proxy_cpu_s_per_gb),
                    get(|m| m.softirq_s_per_gb),
                    get(|m| m.kworker_s_per_gb),
                ));
            }
        }
        let churn: Vec<&str> = workloads.iter().copied().filter(|w| is_churn(w)).collect();
        if !churn.is_empty() {
            out.push_str(&format!(
                "\n| workload | target | connections/s | vs {baseline} | answered % | retried % | p50 us | p99 us | p99.9 us |\n\
                 |---|---|---|---|---|---|---|---|---|\n"
            ));
        }
        for w in churn {
            for t in &targets {
                let get = |f: fn(&Measurement) -> Option<f64>| spread(&self.values(w, t, f));
                let ratio = if *t == baseline {
                    "-".to_owned()
                } else {
                    self.churn_ratio(w, t, baseline)
                        .map_or("-".into(), |r| format!("{r:.2}x"))
                };
                out.push_str(&format!(
                    "| {w} | {t} | {} | {ratio} | {} | {} | {} | {} | {} |\n",
                    get(|m| m.connections_per_s),
                    get(|m| m.success_pct),
                    get(|m| m.retried_pct),
                    get(|m| m.p50_us.map(|v| v as f64)),
                    get(|m| m.p99_us.map(|v| v as f64)),
                    get(|m| m.p999_us.map(|v| v as f64)),
                ));
            }
        }
        out.push_str(
            "\n| target | proxy memory per idle connection, KiB (at N open) | peak RSS (MiB) |\n|---|---|---|\n",
        );
        for t in &targets {
            out.push_str(&format!(
                "| {t} | {} | {} |\n",
                self.idle_kib_per_connection
                    .get(*t)
                    .filter(|points| !points.is_empty())
                    .map_or("-".into(), |points| {
                        points
                            .iter()
                            .map(|(n, k)| format!("{k:.1} ({n})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }),
                self.peak_rss_kib
                    .get(*t)
                    .map_or("-".into(), |k| format!("{:.1}", *k as f64 / 1024.0)),
            ));
        }
        if !self.notes.is_empty() {
            out.push_str("\nKernel-side state after the connection workloads:\n\n");
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }

    /// Bars of median MB/s per (workload, target) with min-max whiskers.
    fn svg(&self) -> String {
        let mut bars: Vec<(String, f64, f64, f64)> = Vec::new();
        let mut seen: Vec<(String, String)> = Vec::new();
        for m in &self.measurements {
            let key = (m.workload.clone(), m.target.clone());
            if m.mb_per_s.is_none() || seen.contains(&key) {
                continue;
            }
            seen.push(key.clone());
            let v = self.values(&key.0, &key.1, |m| m.mb_per_s);
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            bars.push((
                format!("{} / {}", key.0, key.1),
                median(v).unwrap_or(0.0),
                min,
                max,
            ));
        }
        let top = bars.iter().map(|b| b.3).fold(1.0, f64::max);
        let (w, row) = (760.0, 34.0);
        let h = 40.0 + row * bars.len() as f64;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <text x=\"10\" y=\"20\" font-size=\"14\">Throughput, MB/s (median, min-max)</text>\n"
        );
        for (i, (label, med, min, max)) in bars.iter().enumerate() {
            let y = 34.0 + row * i as f64;
            let scale = |v: f64| 300.0 + v / top * (w - 330.0);
            svg.push_str(&format!(
                "<text x=\"10\" y=\"{:.0}\">{label}</text>\n<rect x=\"300\" y=\"{y:.0}\" width=\"{:.1}\" height=\"20\" fill=\"#4a7ebb\"/>\n\
                 <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.0}\" y2=\"{:.0}\" stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.0}\" fill=\"white\">{med:.0}</text>\n",
                y + 14.0,
                scale(*med) - 300.0,
                scale(*min),
                scale(*max),
                y + 10.0,
                y + 10.0,
                304.0,
                y + 14.0,
            ));
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes results.json, results.md and throughput.svg; returns the folder.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        std::fs::write(
            self.dir.join("results.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        std::fs::write(self.dir.join("results.md"), self.markdown())?;
        std::fs::write(self.dir.join("throughput.svg"), self.svg())?;
        Ok(self.dir.clone())
    }
}
