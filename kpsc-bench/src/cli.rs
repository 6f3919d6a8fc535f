//! kpsc-bench's command line: the flags, the targets they select, and the one-line
//! description of the run that heads the report.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use kpsc_bench::target::{NodeSinks, Pinning, TargetKind};

#[derive(Parser, Debug)]
#[command(name = "kpsc-bench", version, about)]
pub struct Args {
    /// Brief correctness run of every target (no timings judged); used by the test command.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each (target, workload); medians with min/max are reported.
    #[arg(long, default_value_t = 5)]
    pub repetitions: usize,
    /// Duration of each measured run.
    #[arg(long, default_value = "4s", value_parser = humantime_duration)]
    pub duration: Duration,
    /// Warm-up run per target before measuring.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    pub warmup: Duration,
    /// Workloads to run, comma-separated: `produce` and `fetch` (pipelined, per batch
    /// size), `sweep` (produce over a range of connection counts), `small` (one small
    /// produce at a time), `control` (Metadata and FindCoordinator, the rewrite path),
    /// `idle` (memory per idle connection), `churn` (connect, one ApiVersions, close:
    /// new connections per second), `flood` (churn while spoofed SYNs hit the same
    /// address; namespaces only).
    #[arg(long, value_delimiter = ',', default_values_t = WORKLOADS.map(String::from),
          value_parser = WORKLOADS)]
    pub workloads: Vec<String>,
    /// Connections the churn and flood workloads open at once (each a loop of connect,
    /// request, close).
    #[arg(long, default_value_t = 16)]
    pub churn_concurrency: usize,
    /// Spoofed SYNs per second of the flood workload (sources in 198.18.0.0/15: half
    /// from 50,000 addresses, half from two).
    #[arg(long, default_value_t = 20_000)]
    pub flood_rate: u32,
    /// `--syn-rate-per-source` of the portmap target. 0 (no per-source budget) by
    /// default: the churn comes from one client address, and kpscd's default budget
    /// (1,000 new flows per second and address) would measure the budget, not the data
    /// path.
    #[arg(long, default_value_t = 0)]
    pub portmap_syn_rate: u32,
    /// `--attach` of the portmap target, comma-separated: `tc`, `xdp`, or `tc,xdp` for
    /// both side by side in one run (two kpscd portmap on the node, each with its own
    /// port, broker sink and pins; the TC target's packets then also pass the XDP
    /// daemon's program, as a table miss). `xdp` needs --full-checksums.
    #[arg(long, value_delimiter = ',', default_value = "tc", value_parser = ["tc", "xdp"])]
    pub portmap_attach: Vec<String>,
    /// Node addresses the portmap and nftables targets translate sources to. 1: the
    /// node's own address towards the broker (portmap's default, nftables' masquerade).
    /// More: N addresses the bench adds on the node's broker side (198.18.2.200 up), given
    /// to portmap as `--snat-address` and to nftables as `snat to` a range. Each address
    /// gives portmap about 36,000 translated ports towards one broker; nftables picks one
    /// address per (client address, broker address) pair by hash.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=50))]
    pub portmap_snat_addresses: u8,
    /// Namespaces only: the client and broker hosts send full checksums (checksum offload
    /// off, as frames from a real wire carry) and receive XDP-redirected frames (GRO on).
    /// XDP on the node needs both; use it for the TC run too, to compare like with like.
    #[arg(long)]
    pub full_checksums: bool,
    /// Namespaces only: the node's receive processing runs on this CPU (RPS), not on the
    /// sending host's CPU; kernel-resident paths then do their node work there, as a
    /// pinned proxy does (e.g. 1 with --pinning split).
    #[arg(long)]
    pub node_receive_cpu: Option<usize>,
    /// Producer connections of the produce and fetch workloads.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Record batch sizes to measure (bytes per Produce request), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![65_536usize, 1_048_576])]
    pub batch_bytes: Vec<usize>,
    /// Bytes per record (changefeed rows are around 1 KiB).
    #[arg(long, default_value_t = 1024)]
    pub record_bytes: usize,
    /// Produce acks to measure, comma-separated: 0, 1 or -1. The sink answers -1 like 1
    /// (it replicates nothing), so -1 only differs from 1 against a real cluster.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1i16, 0],
          allow_hyphen_values = true, value_parser = clap::value_parser!(i16).range(-1..=1))]
    pub acks: Vec<i16>,
    /// Connection counts of the `sweep` workload (64 KiB produce batches, acks=1, one
    /// request in flight per connection).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 10, 100, 1000])]
    pub sweep_connections: Vec<usize>,
    /// Targets to run, comma-separated (default: every one that applies): `direct`
    /// (`routed` in namespaces), `proxy` (kpscd proxy copying through userspace: the
    /// plain tokio path), `splice` (kpscd proxy moving bulk bytes with splice(2)), `uring`
    /// (kpscd proxy splicing bulk bytes in linked io_uring operations),
    /// `portmap` (kpscd portmap, namespaces only), `nftables` (DNAT + masquerade rules
    /// loaded on the node, namespaces only), `external` (the --proxy-cmd proxy), and,
    /// only when named, `sockmap` (kpscd proxy whose requests the kernel carries; needs
    /// root) and `sockmap-ceiling` (a probe that redirects every byte socket to
    /// socket in the kernel with sockmap, no Kafka framing: the most a sockmap proxy could
    /// reach here; produce, fetch and small workloads only; needs root), and the
    /// Kafka-unaware relay probes `splice-ceiling` (splice(2) socket -> pipe -> socket
    /// driven by epoll), `uring-ceiling` (the same as linked io_uring splice operations
    /// on registered files), `uring-sqpoll-ceiling` (plus a kernel thread polling the
    /// submission queue) and `uring-recv-send-ceiling` (multishot io_uring recv into
    /// provided buffers, then send): what each path delivers without any Kafka work;
    /// produce, fetch and small workloads only.
    #[arg(long, value_delimiter = ',',
          value_parser = ["direct", "proxy", "splice", "uring", "sockmap", "portmap", "nftables", "external",
                          "sockmap-ceiling", "splice-ceiling", "uring-ceiling", "uring-sqpoll-ceiling",
                          "uring-recv-send-ceiling"])]
    pub targets: Vec<String>,
    /// Idle connections to open per proxy target for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    pub idle_connections: usize,
    /// An external proxy to compare with, e.g.
    /// `kafka-proxy server --bootstrap-server-mapping {broker},{listen}`.
    #[arg(long)]
    pub proxy_cmd: Option<String>,
    /// kpscd binary (default: next to this binary).
    #[arg(long)]
    pub kpscd: Option<PathBuf>,
    /// `loopback` (everything on 127.0.0.1), `netns` (client host -> proxy node -> broker
    /// host in network namespaces, 198.18.0.0/15; needs root; adds the portmap target), or
    /// `both`.
    #[arg(long, default_value = "both", value_parser = ["loopback", "netns", "both"])]
    pub topology: String,
    /// CPU placement: `split` gives the generator+sink and the proxy a core each;
    /// `shared` puts all on CPU 0 (no cross-CPU wake-ups); `none` leaves it to the
    /// scheduler. With fewer than two CPUs, or with --quick, nothing is pinned.
    #[arg(long, value_enum, default_value = "split")]
    pub pinning: Pinning,
    /// Write results.md and throughput.svg again from DIR/results.json, then exit.
    #[arg(long, value_name = "DIR")]
    pub render: Option<PathBuf>,
    /// Results folder (a timestamped subfolder is created).
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

pub const WORKLOADS: [&str; 8] = [
    "produce", "fetch", "sweep", "small", "control", "idle", "churn", "flood",
];

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 4s or 500ms"))?;
    Ok(match unit {
        "ms" => Duration::from_secs_f64(value / 1000.0),
        "s" | "" => Duration::from_secs_f64(value),
        "m" => Duration::from_secs_f64(value * 60.0),
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    })
}

/// The targets of one topology that --targets selects; portmap and nftables only where
/// sinks advertising the node's ports exist (namespaces).
pub fn target_kinds(args: &Args, kpscd: &Path, node_sinks: Option<NodeSinks>) -> Vec<TargetKind> {
    let wanted = |name: &str| args.targets.is_empty() || args.targets.iter().any(|t| t == name);
    let mut kinds = Vec::new();
    if wanted("direct") {
        kinds.push(TargetKind::Direct);
    }
    // sockmap only when named, like the ceiling: it needs root, and the default run does not.
    let named = |name: &str| args.targets.iter().any(|t| t == name);
    for (target, transfer) in [
        ("proxy", "copy"),
        ("splice", "splice"),
        ("uring", "uring"),
        ("sockmap", "sockmap"),
    ] {
        if (target != "sockmap" && wanted(target)) || named(target) {
            kinds.push(TargetKind::KpscdProxy {
                bin: kpscd.to_owned(),
                transfer,
            });
        }
    }
    if let Some(sinks) = node_sinks {
        if wanted("portmap") {
            for attach in &args.portmap_attach {
                kinds.push(TargetKind::KpscdPortmap {
                    bin: kpscd.to_owned(),
                    sink: match attach.as_str() {
                        "xdp" => sinks.portmap_xdp.clone(),
                        _ => sinks.portmap.clone(),
                    },
                    syn_rate_per_source: args.portmap_syn_rate,
                    attach: attach.clone(),
                    snat_addresses: snat_addresses(args.portmap_snat_addresses),
                });
            }
        }
        if wanted("nftables") {
            kinds.push(TargetKind::Nftables {
                sink: sinks.nftables,
                snat_addresses: snat_addresses(args.portmap_snat_addresses),
            });
        }
    }
    if let Some(cmd) = args.proxy_cmd.as_ref().filter(|_| wanted("external")) {
        kinds.push(TargetKind::External(cmd.clone()));
    }
    // Never by default: it is a measurement of the kernel path, not a proxy (it cannot
    // answer the rewrite or churn workloads correctly).
    if args.targets.iter().any(|t| t == "sockmap-ceiling") {
        kinds.push(TargetKind::SockmapCeiling {
            bin: std::env::current_exe()
                .expect("exe")
                .with_file_name("kpsc-sockmap-ceiling"),
            counters: std::env::temp_dir().join(format!(
                "kpsc-sockmap-ceiling-{}.counters",
                std::process::id()
            )),
        });
    }
    for (target, mode) in [
        ("splice-ceiling", "splice"),
        ("uring-ceiling", "uring"),
        ("uring-sqpoll-ceiling", "uring-sqpoll"),
        ("uring-recv-send-ceiling", "uring-recv-send"),
    ] {
        if named(target) {
            kinds.push(TargetKind::RelayCeiling {
                bin: std::env::current_exe()
                    .expect("exe")
                    .with_file_name("kpsc-relay-ceiling"),
                mode,
                counters: std::env::temp_dir()
                    .join(format!("kpsc-{target}-{}.counters", std::process::id())),
            });
        }
    }
    kinds
}

/// The SNAT addresses `--portmap-snat-addresses n` asks for: none for 1 (the node's own
/// address), else `n` on the broker-side subnet from 198.18.2.200, a contiguous range.
pub fn snat_addresses(n: u8) -> Vec<IpAddr> {
    match n {
        0 | 1 => Vec::new(),
        n => (0..n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 2, 200 + i)))
            .collect(),
    }
}

pub fn describe(args: &Args, pinning: Pinning, cpus: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} x {cpu}, Linux {}; {} connection(s) x {} in flight unless stated, {} B records; {} repetition(s) of {:?}; {}",
        cpus,
        kernel.trim(),
        args.connections,
        args.in_flight,
        args.record_bytes,
        args.repetitions,
        args.duration,
        pinning.describe()
    )
}
