//! kpsc-bench: kpsc's data paths against the no-proxy limit, side by side in one run.
//!
//! Targets (same topology, same run, interleaved A B A B so drift hits all alike):
//! - `direct`: the load generator talks to the benchmark sink (the limit);
//! - `kpscd-proxy`: through `kpscd proxy --bulk-transfer copy` (the plain tokio path);
//! - `kpscd-splice`: through `kpscd proxy` moving bulk bytes with splice(2);
//! - `kpscd-uring`: through `kpscd proxy` splicing bulk bytes in linked io_uring operations;
//! - `kpscd-sockmap`: through `kpscd proxy` whose requests the kernel carries (sockmap);
//! - `kpscd-portmap`: through the kernel programs of `kpscd portmap` (namespaces only;
//!   `--portmap-attach tc|xdp`);
//! - `nftables`: DNAT + masquerade rules the bench loads on the node (namespaces only),
//!   what an operator writes instead of portmap;
//! - `external`: any proxy the user names with `--proxy-cmd` (placeholders `{broker}`,
//!   `{listen}`), e.g. the kafka-proxy binary they run today.
//!
//! The broker side is the benchmark sink (see `sink.rs`), so the proxy and not the broker
//! is what gets measured. `--quick` runs every target briefly and checks correctness only
//! (every record acknowledged, or with acks=0 read by the sink; responses in order), never
//! a timing.

mod cli;

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, ensure};
use clap::Parser;
use cli::{Args, describe, target_kinds};

use kpsc_bench::{
    churn::{ChurnLoad, ChurnResult, Flood, flood_during, run_churn},
    load::{ControlRequest, ProduceLoad, run_control, run_produce},
    report::{Measurement, Report},
    sink::Sink,
    target::{self, NodeSinks, Pinning, Placement, Target, TargetKind},
};
use kpsc_testkit::{
    cleanup,
    netns::{self, Topology},
};

/// How long the kernel-side targets keep a closed connection: conntrack's TIME_WAIT
/// (120 s), which also covers portmap's closed flows (60 s, removed by a sweep), and a margin.
const CHURN_STATE_GONE: Duration = Duration::from_secs(125);

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    cleanup::install_signal_handlers("kpsc-bench")?;
    if let Some(dir) = &args.render {
        Report::load(dir)?.write()?;
        print!("{}", std::fs::read_to_string(dir.join("results.md"))?);
        return Ok(());
    }
    target::raise_fd_limit();
    if args.quick {
        args.repetitions = 1;
        args.duration = Duration::from_millis(500);
        args.warmup = Duration::ZERO;
        args.idle_connections = 20;
        args.batch_bytes = vec![65_536];
        args.sweep_connections = vec![1, 20];
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // With two or more cores: the load generator and the sink share core 0 (a
    // current-thread runtime), the proxy under test gets core 1.
    if cpus < 2 || args.quick {
        args.pinning = Pinning::None;
    }
    let pinning = args.pinning;
    let machine = describe(&args, pinning, cpus);
    let kpscd = args.kpscd.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("exe")
            .with_file_name("kpscd")
    });
    if args.topology != "netns" {
        run_loopback(&args, pinning, &machine, &kpscd)?;
    }
    if args.topology != "loopback" {
        run_netns(&args, pinning, &machine, &kpscd)?;
    }
    Ok(())
}

fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run_loopback(args: &Args, pinning: Pinning, machine: &str, kpscd: &Path) -> anyhow::Result<()> {
    // A thread of its own, so pinning it leaves the main thread alone.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(cpu) = pinning.generator_cpu() {
                    target::pin_self_to_cpu(cpu)?;
                }
                current_thread_runtime()?.block_on(async {
                    let sink = Sink::start("127.0.0.1:0".parse()?, None).await?;
                    let kinds = target_kinds(args, kpscd, None);
                    let place = Placement::loopback(pinning);
                    run(args, &format!("{machine}; loopback"), &sink, kinds, &place).await
                })
            })
            .join()
            .expect("benchmark thread panicked")
    })
}

/// Client host -> proxy node -> broker host. "routed" means the node only forwards.
fn run_netns(args: &Args, pinning: Pinning, machine: &str, kpscd: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.full_checksums || !args.portmap_attach.iter().any(|a| a == "xdp"),
        "--portmap-attach xdp needs --full-checksums (XDP cannot fix a veth peer's partial checksums)"
    );
    let topo = if args.full_checksums {
        let topo = Topology::without_checksum_offload(1, 1)?;
        topo.enable_xdp_delivery()?;
        topo
    } else {
        Topology::new(1, 1)?
    };
    topo.add_routes()?;
    for extra in cli::snat_addresses(args.portmap_snat_addresses) {
        netns::add_address(&topo.node, &format!("{extra}/24"), "n1")?;
    }
    if let Some(cpu) = args.node_receive_cpu {
        topo.steer_receive(&topo.node, &["n0", "n1"], cpu)?;
    }
    // A busy client host reuses ports in TIME_WAIT for new connections; without it the
    // churn would measure the client's own port space (28,232 ports per destination per
    // minute), not the node.
    topo.sysctl(&topo.client, "net.ipv4.tcp_tw_reuse", "1")?;
    let broker_ip = netns::broker_ip(0);
    let sink_addr: SocketAddr = format!("{broker_ip}:39092").parse()?;
    let portmap_sink_addr: SocketAddr = format!("{broker_ip}:39093").parse()?;
    let nftables_sink_addr: SocketAddr = format!("{broker_ip}:39094").parse()?;
    let portmap_xdp_sink_addr: SocketAddr = format!("{broker_ip}:39095").parse()?;
    // Sinks live in the broker namespace on a thread of their own.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let broker_ns = topo.broker.clone();
    std::thread::spawn(move || {
        let started = (|| {
            netns::enter(&broker_ns)?;
            if let Some(cpu) = pinning.generator_cpu() {
                target::pin_self_to_cpu(cpu)?;
            }
            let rt = current_thread_runtime()?;
            let sinks = rt.block_on(async {
                let sink = Sink::start(sink_addr, None).await?;
                // Advertises the node's portmap port, as a broker set up for portmap does.
                let advertising = |sink_addr, port: u16| {
                    Sink::start(
                        sink_addr,
                        Some(SocketAddr::new(
                            netns::NODE_CLIENT_IP.parse().unwrap(),
                            port,
                        )),
                    )
                };
                let node_sinks = NodeSinks {
                    portmap: advertising(portmap_sink_addr, target::PORTMAP_PORT).await?,
                    portmap_xdp: advertising(portmap_xdp_sink_addr, target::PORTMAP_XDP_PORT)
                        .await?,
                    nftables: advertising(nftables_sink_addr, target::NFTABLES_PORT).await?,
                };
                anyhow::Ok((sink, node_sinks))
            })?;
            anyhow::Ok((rt, sinks))
        })();
        match started {
            Ok((rt, sinks)) => {
                let _ = ready_tx.send(Ok(sinks));
                rt.block_on(std::future::pending::<()>());
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    let (sink, node_sinks) = ready_rx.recv().context("sink thread")??;
    let client_ns = topo.client.clone();
    let place = Placement {
        node_ns: Some(topo.node.clone()),
        listen_ip: netns::NODE_CLIENT_IP.into(),
        interfaces: vec!["n0".into(), "n1".into()],
        client_ns: Some(client_ns.clone()),
        pinning,
    };
    let kinds = target_kinds(args, kpscd, Some(node_sinks));
    let result = netns::in_netns(&client_ns, || {
        if let Some(cpu) = pinning.generator_cpu() {
            target::pin_self_to_cpu(cpu)?;
        }
        current_thread_runtime()?.block_on(run(
            args,
            &format!(
                "{machine}; namespaces client -> node -> broker over veth{}{}; portmap --attach {}, {} SNAT address(es)",
                if args.full_checksums {
                    " (client/broker: checksum offload off, GRO on)"
                } else {
                    ""
                },
                args.node_receive_cpu
                    .map_or(String::new(), |c| format!(", node receive on CPU {c}")),
                args.portmap_attach.join(" and "),
                args.portmap_snat_addresses
            ),
            &sink,
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
    sink: &Sink,
    kinds: Vec<TargetKind>,
    place: &Placement,
) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for kind in kinds {
        targets.push(Target::start(kind, sink, place).await?);
    }
    eprintln!(
        "kpsc-bench: {} target(s), broker side = benchmark sink at {}, {} repetition(s) x {:?}, {}",
        targets.len(),
        sink.addr,
        args.repetitions,
        args.duration,
        place.pinning.describe(),
    );
    let mut bench = Bench {
        args,
        targets: &targets,
        report: Report::new(&args.out, machine.to_owned())?,
        runs: 0,
        failures: Vec::new(),
    };
    let wants = |w: &str| args.workloads.iter().any(|x| x == w);
    // First, while the proxies are fresh: after the throughput workloads their allocators
    // hold freed buffers that new connections would reuse, hiding the growth.
    if wants("idle") {
        for t in &targets {
            let points = t.idle_memory(args.idle_connections).await?;
            bench.report.idle_memory(&t.name, points);
        }
    }
    let pipelined = |fetch: bool, batch_bytes: usize, acks: i16| ProduceLoad {
        connections: args.connections,
        in_flight: args.in_flight,
        records_per_batch: (batch_bytes / args.record_bytes).max(1),
        record_bytes: args.record_bytes,
        acks,
        duration: args.duration,
        verify: args.quick,
        fetch,
    };
    for &batch_bytes in &args.batch_bytes {
        let kib = batch_bytes / 1024;
        if wants("produce") {
            for &acks in &args.acks {
                let workload = format!("produce {kib} KiB batches, acks={acks}");
                bench
                    .throughput(&workload, &pipelined(false, batch_bytes, acks))
                    .await?;
            }
        }
        if wants("fetch") {
            let workload = format!("fetch {kib} KiB batches");
            bench
                .throughput(&workload, &pipelined(true, batch_bytes, 1))
                .await?;
        }
    }
    if wants("sweep") {
        for &connections in &args.sweep_connections {
            let load = ProduceLoad {
                connections,
                in_flight: 1,
                ..pipelined(false, 65_536, 1)
            };
            let workload = format!("produce 64 KiB batches, {connections} connection(s) x 1");
            bench.throughput(&workload, &load).await?;
        }
    }
    // Latency: with a core each, every hop through a proxy wakes a CPU that went idle,
    // which a virtualised machine makes slow; so with `split` the latency workloads run
    // a second time with the proxy moved onto the generator's CPU.
    let mut placements = vec![(None, "")];
    if let (Some(own), Some(shared)) = (place.pinning.proxy_cpu(), place.pinning.generator_cpu())
        && own != shared
    {
        placements = vec![
            (Some(own), ", proxy on its own CPU"),
            (Some(shared), ", all on one CPU"),
        ];
    }
    for (cpu, suffix) in placements {
        if let Some(cpu) = cpu {
            for t in &targets {
                t.pin_to_cpu(cpu)?;
            }
        }
        if wants("small") {
            bench.small_requests(suffix).await?;
        }
        if wants("control") {
            bench.control(suffix).await;
        }
        // Every new connection wakes the proxy: as latency-bound as the above.
        if wants("churn") {
            bench.churn(suffix).await;
        }
    }
    if let Some(cpu) = place.pinning.proxy_cpu() {
        for t in &targets {
            t.pin_to_cpu(cpu)?;
        }
    }
    // Last: a flood leaves state behind (conntrack keeps a flooded SYN for 120 s).
    if wants("flood") {
        if place.client_ns.is_some() {
            if wants("churn") && !args.quick {
                // The churn's closed connections stay in portmap's flow table for a minute
                // and in conntrack (TIME_WAIT) for two: let both go, so the flood meets
                // tables that hold only what the flood itself puts there.
                eprintln!(
                    "kpsc-bench: waiting {CHURN_STATE_GONE:?} for the churn's flow state to expire"
                );
                tokio::time::sleep(CHURN_STATE_GONE).await;
            }
            bench.flood().await;
        } else {
            eprintln!("kpsc-bench: flood skipped on loopback (spoofed sources need namespaces)");
        }
    }
    for t in &targets {
        if let Some(peak) = t.peak_rss_kib() {
            bench.report.peak_rss(&t.name, peak);
        }
    }
    let dir = bench.report.write()?;
    if args.quick {
        println!(
            "kpsc-bench: {} passed, {} failed",
            bench.runs - bench.failures.len(),
            bench.failures.len()
        );
    } else {
        print!("{}", std::fs::read_to_string(dir.join("results.md"))?);
        eprintln!("results in {}", dir.display());
    }
    for f in &bench.failures {
        eprintln!("FAILED: {f}");
    }
    ensure!(
        bench.failures.is_empty(),
        "{} benchmark run(s) failed",
        bench.failures.len()
    );
    Ok(())
}

/// One benchmark run over a set of started targets.
struct Bench<'a> {
    args: &'a Args,
    targets: &'a [Target],
    report: Report,
    /// Runs attempted, and the ones that failed (the --quick verdict).
    runs: usize,
    failures: Vec<String>,
}

/// Targets in the order of repetition `rep`: A B, then B A, so each runs first as often as
/// last and drift hits all alike.
fn order(targets: &[Target], rep: usize) -> Vec<&Target> {
    if rep.is_multiple_of(2) {
        targets.iter().collect()
    } else {
        targets.iter().rev().collect()
    }
}

impl Bench<'_> {
    fn outcome<T>(&mut self, target: &Target, workload: &str, r: anyhow::Result<T>) -> Option<T> {
        self.runs += 1;
        r.map_err(|e| {
            self.failures
                .push(format!("{} {workload}: {e:#}", target.name))
        })
        .ok()
    }

    /// Warm-up, then interleaved repetitions of a throughput workload.
    async fn throughput(&mut self, workload: &str, load: &ProduceLoad) -> anyhow::Result<()> {
        if !self.args.warmup.is_zero() {
            for t in self.targets {
                let warm = ProduceLoad {
                    duration: self.args.warmup,
                    ..load.clone()
                };
                run_produce(&t.addr, &warm, t.sink.produce_requests())
                    .await
                    .with_context(|| format!("warm-up of {} for {workload}", t.name))?;
            }
        }
        for rep in 0..self.args.repetitions {
            for t in order(self.targets, rep) {
                let cpu_before = t.cpu_seconds();
                let softirq_before = target::softirq_seconds();
                let kworker_before = target::kernel_worker_seconds();
                let result = run_produce(&t.addr, load, t.sink.produce_requests())
                    .await
                    .and_then(|r| {
                        ensure!(r.requests > 0, "no request completed");
                        Ok(r)
                    });
                if let Some(r) = self.outcome(t, workload, result) {
                    self.report.add(Measurement::produce(
                        &t.name,
                        workload,
                        rep,
                        &r,
                        t.cpu_seconds() - cpu_before,
                        target::softirq_seconds() - softirq_before,
                        target::kernel_worker_seconds() - kworker_before,
                    ));
                    eprintln!(
                        "  {workload} #{rep} {:<14} {:>8.1} MB/s",
                        t.name,
                        r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6
                    );
                }
            }
        }
        self.note_kernel_state(workload);
        Ok(())
    }

    /// Small requests, one at a time: the latency a proxy adds when nothing queues.
    async fn small_requests(&mut self, suffix: &str) -> anyhow::Result<()> {
        let workload = &format!("small produce, 1 in flight{suffix}");
        let small = ProduceLoad {
            connections: 1,
            in_flight: 1,
            records_per_batch: 1,
            record_bytes: 100,
            acks: 1,
            duration: self.args.duration / 2,
            verify: self.args.quick,
            fetch: false,
        };
        for rep in 0..self.args.repetitions {
            for t in order(self.targets, rep) {
                let result = run_produce(&t.addr, &small, t.sink.produce_requests()).await;
                if let Some(r) = self.outcome(t, workload, result) {
                    let h = r.latency.context("acks=1 produce has latencies")?;
                    self.report
                        .add(Measurement::latency(&t.name, workload, rep, &h));
                }
            }
        }
        Ok(())
    }

    fn churn_load(&self) -> ChurnLoad {
        ChurnLoad {
            concurrency: self.args.churn_concurrency,
            duration: self.args.duration,
            attempt_timeout: Duration::from_secs(3),
        }
    }

    /// Connections opened, one request, closed, as fast as the loops go. With --quick
    /// every attempt must be answered.
    async fn churn(&mut self, suffix: &str) {
        let load = self.churn_load();
        let workload = &format!("churn, {} at once{suffix}", load.concurrency);
        for rep in 0..self.args.repetitions {
            for t in order(self.targets, rep) {
                let result = run_churn(&t.addr, &load).await.and_then(|r| {
                    ensure!(
                        r.completed > 0,
                        "no connection answered: {:?}",
                        r.first_failure
                    );
                    ensure!(
                        !self.args.quick || r.completed == r.attempts,
                        "{} of {} attempts failed, first: {:?}",
                        r.attempts - r.completed,
                        r.attempts,
                        r.first_failure
                    );
                    Ok(r)
                });
                if let Some(r) = self.outcome(t, workload, result) {
                    report_churn(t, workload, rep, &r, None);
                    self.report
                        .add(Measurement::churn(&t.name, workload, rep, &r));
                }
            }
        }
        self.note_kernel_state(workload);
    }

    /// Portmap's counters, conntrack's entries and the sockmap probe's byte counts after a
    /// workload, into the report.
    fn note_kernel_state(&mut self, workload: &str) {
        for t in self.targets {
            // Blocking, briefly: kpscd's admin endpoint answers without the sink (which has
            // a thread of its own where portmap and nftables exist).
            if let Some(state) = t.kernel_state() {
                let note = format!("after \"{workload}\", {}: {state}", t.name);
                eprintln!("  {note}");
                self.report.note(note);
            }
        }
    }

    /// The churn while spoofed SYNs hit the target's address: how many legitimate
    /// connections still get through, and how fast.
    async fn flood(&mut self) {
        let load = self.churn_load();
        let flood = Flood {
            rate: self.args.flood_rate,
        };
        let workload = &format!(
            "churn, {} at once, under {} spoofed SYN/s",
            load.concurrency, flood.rate
        );
        let expected = (f64::from(flood.rate) * load.duration.as_secs_f64()) as u32;
        // Lets the SYN-ACK retransmissions of one run die down before the next.
        let settle = if self.args.quick {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        for rep in 0..self.args.repetitions {
            for t in order(self.targets, rep) {
                let result = flood_during(&t.addr, &load, flood)
                    .await
                    .and_then(|(r, sent)| {
                        ensure!(sent == expected, "{sent} SYNs sent, {expected} due");
                        ensure!(
                            r.completed > 0,
                            "no connection answered during the flood: {:?}",
                            r.first_failure
                        );
                        Ok((r, sent))
                    });
                if let Some((r, sent)) = self.outcome(t, workload, result) {
                    report_churn(t, workload, rep, &r, Some(sent));
                    self.report
                        .add(Measurement::churn(&t.name, workload, rep, &r));
                }
                tokio::time::sleep(settle).await;
            }
        }
        self.note_kernel_state(workload);
    }

    /// Metadata and FindCoordinator one at a time: responses kpscd decodes and rewrites.
    async fn control(&mut self, suffix: &str) {
        for request in [ControlRequest::Metadata, ControlRequest::FindCoordinator] {
            let workload = &format!("{}{suffix}", request.workload());
            for rep in 0..self.args.repetitions {
                for t in order(self.targets, rep) {
                    let result = run_control(&t.addr, request, self.args.duration / 2).await;
                    if let Some(h) = self.outcome(t, workload, result) {
                        self.report
                            .add(Measurement::latency(&t.name, workload, rep, &h));
                    }
                }
            }
        }
    }
}

fn report_churn(t: &Target, workload: &str, rep: usize, r: &ChurnResult, syns: Option<u32>) {
    eprintln!(
        "  {workload} #{rep} {:<14} {:>7.0} conn/s, {:.1}% of {} answered ({} after a SYN \
         retransmission, {} timed out){}{}",
        t.name,
        r.connections_per_s(),
        r.success_pct(),
        r.attempts,
        r.retried,
        r.timeouts,
        syns.map_or(String::new(), |n| format!(", {n} SYNs sent")),
        r.first_failure
            .as_ref()
            .filter(|_| r.completed < r.attempts)
            .map_or(String::new(), |f| format!("; first failure: {f}")),
    );
}
