//! kpsc-bench: kpsc's data paths against the no-proxy limit, side by side in one run.
//!
//! Targets (same topology, same run, interleaved A B A B so drift hits all alike):
//! - `direct`: the load generator talks to the benchmark sink (the limit);
//! - `kpscd-proxy`: through `kpscd proxy` (the tokio path);
//! - `external`: any proxy the user names with `--proxy-cmd` (placeholders `{broker}`,
//!   `{listen}`), e.g. the kafka-proxy binary they run today.
//!
//! The broker side is the benchmark sink (see `sink.rs`), so the proxy and not the broker
//! is what gets measured. `--quick` runs every target briefly and checks correctness only
//! (every record acknowledged, responses in order), never a timing.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use clap::Parser;

use kpsc_bench::{
    load::{ProduceLoad, run_metadata, run_produce},
    netns::{self, Topology},
    report::{Measurement, Report},
    sink::Sink,
    target::{self, Placement, Target, TargetKind},
};

#[derive(Parser, Debug)]
#[command(name = "kpsc-bench", version, about)]
struct Args {
    /// Brief correctness run of every target (no timings judged); used by the test command.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each (target, workload); medians with min/max are reported.
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Duration of each measured run.
    #[arg(long, default_value = "4s", value_parser = humantime_duration)]
    duration: Duration,
    /// Warm-up run per target before measuring.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    warmup: Duration,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Record batch sizes to measure (bytes per Produce request), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![65_536usize, 1_048_576])]
    batch_bytes: Vec<usize>,
    /// Bytes per record (changefeed rows are around 1 KiB).
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Produce acks: 0, 1 or -1.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    acks: i16,
    /// Idle connections to open per proxy target for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// An external proxy to compare with, e.g.
    /// `kafka-proxy server --bootstrap-server-mapping {broker},{listen}`.
    #[arg(long)]
    proxy_cmd: Option<String>,
    /// kpscd binary (default: next to this binary).
    #[arg(long)]
    kpscd: Option<PathBuf>,
    /// `loopback` (everything on 127.0.0.1), `netns` (client host -> proxy node -> broker
    /// host in network namespaces, 198.18.0.0/15; needs root; adds the portmap target), or
    /// `both`.
    #[arg(long, default_value = "both", value_parser = ["loopback", "netns", "both"])]
    topology: String,
    /// Do not pin the generator+sink and the proxy to separate cores.
    #[arg(long)]
    no_pin: bool,
    /// Results folder (a timestamped subfolder is created).
    #[arg(long, default_value = "results")]
    out: PathBuf,
}

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

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    target::raise_fd_limit();
    if args.quick {
        args.repetitions = 1;
        args.duration = Duration::from_millis(500);
        args.warmup = Duration::ZERO;
        args.idle_connections = 20;
        args.batch_bytes = vec![65_536];
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // With two or more cores: the load generator and the sink share core 0 (a
    // current-thread runtime), the proxy under test gets core 1.
    let pinned = cpus >= 2 && !args.quick && !args.no_pin;
    let machine = describe(&args, pinned, cpus);
    let kpscd = args.kpscd.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("exe")
            .with_file_name("kpscd")
    });
    if args.topology != "netns" {
        run_loopback(&args, pinned, &machine, &kpscd)?;
    }
    if args.topology != "loopback" {
        run_netns(&args, pinned, &machine, &kpscd)?;
    }
    Ok(())
}

fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run_loopback(args: &Args, pinned: bool, machine: &str, kpscd: &Path) -> anyhow::Result<()> {
    // A thread of its own, so pinning it leaves the main thread alone.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if pinned {
                    target::pin_self_to_cpu(0)?;
                }
                current_thread_runtime()?.block_on(async {
                    let sink = Sink::start("127.0.0.1:0".parse()?, None).await?;
                    let mut kinds =
                        vec![TargetKind::Direct, TargetKind::KpscdProxy(kpscd.to_owned())];
                    if let Some(cmd) = &args.proxy_cmd {
                        kinds.push(TargetKind::External(cmd.clone()));
                    }
                    let place = Placement::loopback(pinned);
                    run(
                        args,
                        &format!("{machine}; loopback"),
                        sink.addr,
                        kinds,
                        &place,
                    )
                    .await
                })
            })
            .join()
            .expect("benchmark thread panicked")
    })
}

/// Client host -> proxy node -> broker host. "routed" means the node only forwards.
fn run_netns(args: &Args, pinned: bool, machine: &str, kpscd: &Path) -> anyhow::Result<()> {
    let topo = Topology::new(1, 1)?;
    topo.add_routes()?;
    let broker_ip = netns::broker_ip(0);
    let sink_addr: SocketAddr = format!("{broker_ip}:39092").parse()?;
    let portmap_sink_addr: SocketAddr = format!("{broker_ip}:39093").parse()?;
    // Sinks live in the broker namespace on a thread of their own.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let broker_ns = topo.broker.clone();
    std::thread::spawn(move || {
        let started = (|| {
            netns::enter(&broker_ns)?;
            if pinned {
                target::pin_self_to_cpu(0)?;
            }
            let rt = current_thread_runtime()?;
            rt.block_on(async {
                Sink::start(sink_addr, None).await?;
                // Advertises the node's portmap port, as a broker set up for portmap does.
                Sink::start(
                    portmap_sink_addr,
                    Some(format!("{}:19093", netns::NODE_CLIENT_IP).parse()?),
                )
                .await?;
                anyhow::Ok(())
            })?;
            anyhow::Ok(rt)
        })();
        match started {
            Ok(rt) => {
                let _ = ready_tx.send(Ok(()));
                rt.block_on(std::future::pending::<()>());
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready_rx.recv().context("sink thread")??;
    let client_ns = topo.client.clone();
    let place = Placement {
        node_ns: Some(topo.node.clone()),
        listen_ip: netns::NODE_CLIENT_IP.into(),
        interfaces: vec!["n0".into(), "n1".into()],
        pinned,
    };
    let kinds = vec![
        TargetKind::Direct,
        TargetKind::KpscdProxy(kpscd.to_owned()),
        TargetKind::KpscdPortmap {
            bin: kpscd.to_owned(),
            sink: portmap_sink_addr,
        },
    ];
    let result = netns::in_netns(&client_ns, || {
        if pinned {
            target::pin_self_to_cpu(0)?;
        }
        current_thread_runtime()?.block_on(run(
            args,
            &format!("{machine}; namespaces client -> node -> broker over veth"),
            sink_addr,
            kinds,
            &place,
        ))
    })?;
    drop(topo);
    result
}

async fn run(
    args: &Args,
    machine: &str,
    sink: SocketAddr,
    kinds: Vec<TargetKind>,
    place: &Placement,
) -> anyhow::Result<()> {
    let pinned = place.pinned;
    let mut targets = Vec::new();
    for kind in kinds {
        targets.push(Target::start(kind, sink, place).await?);
    }
    eprintln!(
        "kpsc-bench: {} target(s), broker side = benchmark sink at {}, {} repetition(s) x {:?}{}",
        targets.len(),
        sink,
        args.repetitions,
        args.duration,
        if pinned {
            ", generator+sink on CPU 0, proxy on CPU 1"
        } else {
            ""
        }
    );

    let mut report = Report::new(&args.out, machine.to_owned())?;
    let mut failures = Vec::new();
    let workloads = args
        .batch_bytes
        .iter()
        .flat_map(|b| [(false, *b), (true, *b)]);
    for (fetch, batch_bytes) in workloads {
        let load = ProduceLoad {
            connections: args.connections,
            in_flight: args.in_flight,
            records_per_batch: (batch_bytes / args.record_bytes).max(1),
            record_bytes: args.record_bytes,
            acks: args.acks,
            duration: args.duration,
            verify: args.quick,
            fetch,
        };
        let workload = format!(
            "{} {} KiB batches",
            if fetch { "fetch" } else { "produce" },
            batch_bytes / 1024
        );
        if !args.warmup.is_zero() {
            for t in &targets {
                let warm = ProduceLoad {
                    duration: args.warmup,
                    ..load.clone()
                };
                run_produce(&t.addr, &warm)
                    .await
                    .with_context(|| format!("warm-up of {}", t.name))?;
            }
        }
        for rep in 0..args.repetitions {
            // A B, then B A: each target runs first as often as last.
            let order: Vec<&Target> = if rep % 2 == 0 {
                targets.iter().collect()
            } else {
                targets.iter().rev().collect()
            };
            for t in order {
                let cpu_before = t.cpu_seconds();
                let softirq_before = target::softirq_seconds();
                match run_produce(&t.addr, &load).await {
                    Ok(r) => {
                        ensure!(r.requests > 0, "{}: no request completed", t.name);
                        report.add(Measurement::produce(
                            &t.name,
                            &workload,
                            rep,
                            &r,
                            t.cpu_seconds() - cpu_before,
                            target::softirq_seconds() - softirq_before,
                        ));
                        eprintln!(
                            "  {workload} #{rep} {:<12} {:>8.1} MB/s",
                            t.name,
                            r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6
                        );
                    }
                    Err(e) => failures.push(format!("{} {workload}: {e:#}", t.name)),
                }
            }
        }
    }
    // Small requests, one at a time: the latency a proxy adds when nothing queues.
    let small = ProduceLoad {
        connections: 1,
        in_flight: 1,
        records_per_batch: 1,
        record_bytes: 100,
        acks: 1,
        duration: args.duration / 2,
        verify: args.quick,
        fetch: false,
    };
    for rep in 0..args.repetitions {
        for t in &targets {
            match run_produce(&t.addr, &small).await {
                Ok(r) => {
                    let h = r.latency.context("acks=1 produce has latencies")?;
                    report.add(Measurement::latency(
                        &t.name,
                        "small produce, 1 in flight",
                        rep,
                        &h,
                    ));
                }
                Err(e) => failures.push(format!("{} small produce: {e:#}", t.name)),
            }
            match run_metadata(&t.addr, args.duration / 2).await {
                Ok(h) => report.add(Measurement::latency(
                    &t.name,
                    "metadata (rewrite path)",
                    rep,
                    &h,
                )),
                Err(e) => failures.push(format!("{} metadata: {e:#}", t.name)),
            }
        }
    }
    for t in &targets {
        report.idle_memory(&t.name, t.idle_memory(args.idle_connections).await?);
        if let Some(peak) = t.peak_rss_kib() {
            report.peak_rss(&t.name, peak);
        }
    }
    let dir = report.write()?;
    if args.quick {
        let checks = targets.len() * (2 * args.batch_bytes.len() + 2) * args.repetitions;
        println!(
            "kpsc-bench: {} passed, {} failed",
            checks - failures.len(),
            failures.len()
        );
    } else {
        print!("{}", std::fs::read_to_string(dir.join("results.md"))?);
        eprintln!("results in {}", dir.display());
    }
    for f in &failures {
        eprintln!("FAILED: {f}");
    }
    ensure!(
        failures.is_empty(),
        "{} benchmark run(s) failed",
        failures.len()
    );
    Ok(())
}

fn describe(args: &Args, pinned: bool, cpus: usize) -> String {
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
        "{} x {cpu}, Linux {}; {} connection(s) x {} in flight, acks={}, {} B records; {} repetition(s) of {:?}{}",
        cpus,
        kernel.trim(),
        args.connections,
        args.in_flight,
        args.acks,
        args.record_bytes,
        args.repetitions,
        args.duration,
        if pinned {
            "; generator+sink pinned to CPU 0, proxy to CPU 1"
        } else {
            ""
        }
    )
}
