//! `kpscd portmap`: the kernel moves every byte (see `kpsc-ebpf/src/portmap.rs`); this side
//! loads and attaches the program, fills its port map, reloads it on SIGHUP, checks what the
//! brokers advertise, serves metrics from the kernel counters, and cleans up on exit.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Args;
use kpsc_common::PortTarget;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminView, MapRow},
    config::{ConfigError, FileConfig, MapSettings, PortMapArgs, load_file, pick, pick_list},
    datapath::{DEFAULT_PIN_ROOT, Datapath, PinnedMaps},
    discovery,
    metrics::Metrics,
    portmap::{BrokerAddr, DynamicPorts, Origin},
};

/// Portmap-mode flags: the port map (static mappings only) plus where to attach.
#[derive(Args, Debug, Default, Clone)]
pub struct PortmapArgs {
    #[command(flatten)]
    pub map: PortMapArgs,

    /// Interface(s) to attach the TC program to (client- and broker-facing; repeatable
    /// or comma-separated).
    #[arg(long = "interface", value_delimiter = ',', value_name = "IFACE")]
    pub interface: Vec<String>,

    /// Instance name: maps are pinned under <pin-root>/<instance>/.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,

    /// bpffs directory for the pins.
    #[arg(long = "pin-root", value_name = "DIR")]
    pub pin_root: Option<PathBuf>,
}

/// One validated mapping: listen port -> broker, and what the broker should advertise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortmapEntry {
    pub listen: SocketAddr,
    pub broker: BrokerAddr,
    pub advertised: BrokerAddr,
}

#[derive(Clone, Debug)]
pub struct PortmapConfig {
    pub args: PortmapArgs,
    pub map: MapSettings,
    pub entries: Vec<PortmapEntry>,
    pub interfaces: Vec<String>,
    pub instance: String,
    pub pin_root: PathBuf,
}

impl PortmapConfig {
    pub fn resolve(args: PortmapArgs) -> Result<Self, ConfigError> {
        let original = args.clone();
        let mut file: FileConfig = load_file(&args.map.config)?;
        for (flag, set) in [
            (
                "--dynamic-sequential-min-port",
                args.map
                    .dynamic_sequential_min_port
                    .or(file.dynamic_sequential_min_port)
                    .is_some(),
            ),
            (
                "--dynamic-advertised-listener",
                args.map.dynamic_advertised_listener.is_some()
                    || file.dynamic_advertised_listener.is_some(),
            ),
            (
                "--external-server-mapping",
                !args.map.external_server_mapping.is_empty()
                    || !file.external_server_mapping.is_empty(),
            ),
        ] {
            if set {
                return Err(ConfigError::new(
                    flag,
                    "portmap mode maps only --bootstrap-server-mapping entries: the brokers \
                     advertise the endpoint's names, so metadata cannot reveal real addresses",
                ));
            }
        }
        let interfaces = pick_list(args.interface.clone(), std::mem::take(&mut file.interface));
        if interfaces.is_empty() {
            return Err(ConfigError::new(
                "--interface",
                "portmap needs the interface(s) to attach to, e.g. --interface eth0",
            ));
        }
        let instance = pick(args.instance.clone(), file.instance.take())
            .unwrap_or_else(|| "default".to_owned());
        if instance.is_empty() || instance.contains('/') || instance.starts_with('.') {
            return Err(ConfigError::new(
                "--instance",
                format!("{instance:?} is not a valid name"),
            ));
        }
        let pin_root = pick(args.pin_root.clone(), file.pin_root.take())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT));
        let raw_mappings = if args.map.bootstrap_server_mapping.is_empty() {
            file.bootstrap_server_mapping.clone()
        } else {
            args.map.bootstrap_server_mapping.clone()
        };
        if let Some(m) = raw_mappings.iter().find(|m| m.split(',').count() != 3) {
            return Err(ConfigError::new(
                "--bootstrap-server-mapping",
                format!(
                    "{m:?}: portmap needs broker_host:port,listen_ip:port,advertised_host:port \
                     (the advertised address is what the broker must announce)"
                ),
            ));
        }
        let mut map_args = args.map;
        map_args.dynamic_listeners_disable = Some(true);
        let map = MapSettings::resolve(map_args, &mut file)?;
        debug_assert_eq!(map.port_map.dynamic, DynamicPorts::Disabled);
        let entries = map
            .port_map
            .static_mappings
            .iter()
            .map(|m| PortmapEntry {
                listen: m.listen,
                broker: m.broker.clone(),
                advertised: m.advertised.clone(),
            })
            .collect::<Vec<_>>();
        if let Some(e) = entries.iter().find(|e| !e.listen.is_ipv4()) {
            return Err(ConfigError::new(
                "--bootstrap-server-mapping",
                format!("{}: portmap handles IPv4 only", e.listen),
            ));
        }
        Ok(Self {
            args: original,
            map,
            entries,
            interfaces,
            instance,
            pin_root,
        })
    }
}

fn ipv4_bits(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Resolves each broker and the node's source address towards it (the route's own choice).
pub fn kernel_targets(entries: &[PortmapEntry]) -> anyhow::Result<Vec<(u16, PortTarget)>> {
    entries
        .iter()
        .map(|e| {
            let broker = (e.broker.host.as_str(), e.broker.port)
                .to_socket_addrs()
                .with_context(|| format!("resolving broker {}", e.broker))?
                .find(|a| a.is_ipv4())
                .with_context(|| format!("broker {} has no IPv4 address", e.broker))?;
            let probe = UdpSocket::bind("0.0.0.0:0")?;
            probe
                .connect(broker)
                .with_context(|| format!("no route to broker {broker}"))?;
            let (IpAddr::V4(snat), IpAddr::V4(broker_ip), IpAddr::V4(listen)) =
                (probe.local_addr()?.ip(), broker.ip(), e.listen.ip())
            else {
                bail!("portmap handles IPv4 only");
            };
            Ok((
                e.listen.port(),
                PortTarget {
                    listen_ip: ipv4_bits(listen),
                    broker_ip: ipv4_bits(broker_ip),
                    snat_ip: ipv4_bits(snat),
                    broker_port: e.broker.port.to_be(),
                    _pad: 0,
                },
            ))
        })
        .collect()
}

/// Effective capabilities of this process (from /proc/self/status).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The capabilities portmap needs that this process lacks.
pub fn missing_capabilities() -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let caps = effective_caps();
    let has = |c: u32| caps & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// The program forwards with bpf_fib_lookup, which honours the interface's forwarding flag.
fn check_forwarding(interfaces: &[String]) -> anyhow::Result<()> {
    for iface in interfaces {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
        let value = std::fs::read_to_string(&path)
            .with_context(|| format!("interface {iface:?} not found ({path} unreadable)"))?;
        if value.trim() != "1" {
            bail!(
                "IPv4 forwarding is off on {iface}: portmap forwards packets between client and \
                 brokers, enable it with `sysctl -w net.ipv4.conf.{iface}.forwarding=1` \
                 (or net.ipv4.ip_forward=1)"
            );
        }
    }
    Ok(())
}

/// What the last advertised-listener probe found.
#[derive(Default)]
struct ProbeState {
    done: bool,
    mismatches: Vec<String>,
}

struct PortmapState {
    config: Mutex<PortmapConfig>,
    pins: Mutex<Option<PinnedMaps>>,
    metrics: Arc<Metrics>,
    probe: Mutex<ProbeState>,
    attached: std::sync::atomic::AtomicBool,
    /// Wakes the prober after a reload.
    reprobe: tokio::sync::Notify,
}

/// Compares what each broker advertises with the port map. Returns the mismatches.
pub async fn probe_advertised(entries: &[PortmapEntry], timeout: Duration) -> Vec<String> {
    let expected: BTreeSet<BrokerAddr> = entries.iter().map(|e| e.advertised.clone()).collect();
    let mut problems = Vec::new();
    for e in entries {
        match discovery::fetch_brokers(&e.broker, timeout).await {
            Ok(brokers) => {
                for (id, addr) in &brokers {
                    if !expected.contains(addr) {
                        problems.push(format!(
                            "broker {} (id {id}) advertises {addr}, which no mapped port serves: \
                             clients will try to reach it directly (fix the broker's \
                             advertised.listeners, or add a mapping for it)",
                            e.broker
                        ));
                    }
                }
                if !brokers.iter().any(|(_, a)| a == &e.advertised) {
                    problems.push(format!(
                        "port {} expects its broker to advertise {}, but {} lists {:?}",
                        e.listen.port(),
                        e.advertised,
                        e.broker,
                        brokers
                            .iter()
                            .map(|(id, a)| format!("{id}={a}"))
                            .collect::<Vec<_>>()
                    ));
                }
            }
            Err(err) => problems.push(format!("cannot ask {} for metadata: {err:#}", e.broker)),
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

impl AdminView for PortmapState {
    fn readiness(&self) -> Result<(), String> {
        if !self.attached.load(std::sync::atomic::Ordering::Acquire) {
            return Err("program not attached".into());
        }
        let probe = self.probe.lock().expect("probe lock");
        if !probe.done {
            return Err("brokers not probed yet".into());
        }
        if !probe.mismatches.is_empty() {
            return Err(format!(
                "advertised listeners do not match: {}",
                probe.mismatches.join("; ")
            ));
        }
        Ok(())
    }

    fn map_rows(&self) -> Vec<MapRow> {
        let config = self.config.lock().expect("config lock");
        let pins = self.pins.lock().expect("pins lock");
        let flows = pins.as_ref().map(|p| p.flows()).unwrap_or_default();
        config
            .entries
            .iter()
            .map(|e| {
                let port = e.listen.port();
                let stats = pins.as_ref().map(|p| p.stats(port)).unwrap_or_default();
                let open = flows
                    .iter()
                    .filter(|(k, f)| {
                        u16::from_be(k.dst_port) == port
                            && pins.as_ref().is_some_and(|p| {
                                p.flow_state(f) != crate::datapath::FlowState::Closed
                            })
                    })
                    .count();
                MapRow {
                    listen: Some(e.listen.to_string()),
                    node_id: None,
                    broker: e.broker.to_string(),
                    advertised: e.advertised.to_string(),
                    origin: Origin::Static,
                    bound: pins.is_some(),
                    connections_open: open as i64,
                    connections_total: stats.new_flows,
                    bytes_from_client: stats.bytes_in,
                    bytes_to_client: stats.bytes_out,
                }
            })
            .collect()
    }

    fn metrics_text(&self) -> String {
        let text = self.metrics.render();
        let (body, eof) = text.split_at(text.rfind("# EOF").unwrap_or(text.len()));
        let mut out = body.to_owned();
        let config = self.config.lock().expect("config lock");
        let pins = self.pins.lock().expect("pins lock");
        if let Some(pins) = pins.as_ref() {
            let rows: Vec<(u16, String, kpsc_common::PortmapStats)> = config
                .entries
                .iter()
                .map(|e| {
                    (
                        e.listen.port(),
                        e.broker.to_string(),
                        pins.stats(e.listen.port()),
                    )
                })
                .collect();
            let family = |out: &mut String, name: &str, help: &str, pick: &dyn Fn(&kpsc_common::PortmapStats) -> Vec<(&'static str, u64)>| {
                out.push_str(&format!("# HELP kpsc_portmap_{name} {help}\n# TYPE kpsc_portmap_{name} counter\n"));
                for (port, broker, s) in &rows {
                    for (extra, v) in pick(s) {
                        out.push_str(&format!(
                            "kpsc_portmap_{name}_total{{listen_port=\"{port}\",broker=\"{broker}\"{extra}}} {v}\n"
                        ));
                    }
                }
            };
            family(
                &mut out,
                "packets",
                "Packets translated by the TC program, per port and direction",
                &|s| {
                    vec![
                        (",direction=\"from_client\"", s.packets_in),
                        (",direction=\"to_client\"", s.packets_out),
                    ]
                },
            );
            family(
                &mut out,
                "bytes",
                "IP bytes translated by the TC program, per port and direction",
                &|s| {
                    vec![
                        (",direction=\"from_client\"", s.bytes_in),
                        (",direction=\"to_client\"", s.bytes_out),
                    ]
                },
            );
            family(
                &mut out,
                "flows",
                "Flows opened by the TC program, per port",
                &|s| vec![("", s.new_flows)],
            );
            family(
                &mut out,
                "drops",
                "Packets dropped by the TC program, per port and reason",
                &|s| {
                    vec![
                        (",reason=\"no_flow\"", s.drop_no_flow),
                        (",reason=\"no_port\"", s.drop_no_port),
                        (",reason=\"no_route\"", s.drop_no_route),
                        (",reason=\"rewrite\"", s.drop_rewrite),
                    ]
                },
            );
        }
        out.push_str(eof);
        out
    }
}

/// Exit code when privileges are missing.
pub const EXIT_PRIVILEGE: u8 = 4;

/// Runs portmap mode until SIGTERM/SIGINT. Errors are reported (and turned into an exit
/// code) by kpscd's `main`.
pub async fn run(config: PortmapConfig) -> anyhow::Result<ExitCode> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        eprintln!(
            "kpscd portmap needs CAP_BPF and CAP_NET_ADMIN (or root); missing: {}",
            missing.join(", ")
        );
        return Ok(ExitCode::from(EXIT_PRIVILEGE));
    }
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    check_forwarding(&config.interfaces)?;
    let targets = kernel_targets(&config.entries)?;

    let mut datapath = Datapath::load(&config.pin_root, &config.instance)?;
    datapath.set_targets(&targets)?;
    let shutdown = CancellationToken::new();
    let state = Arc::new(PortmapState {
        pins: Mutex::new(None),
        metrics: Metrics::new(),
        probe: Mutex::new(ProbeState::default()),
        attached: false.into(),
        reprobe: tokio::sync::Notify::new(),
        config: Mutex::new(config.clone()),
    });
    let admin = admin::serve(
        &config.map.http,
        Arc::clone(&state) as Arc<dyn AdminView>,
        shutdown.clone(),
    )
    .await;
    let result = async {
        let admin = admin?;
        for iface in &config.interfaces {
            datapath.attach(iface)?;
        }
        *state.pins.lock().expect("pins lock") = Some(PinnedMaps::open(datapath.pin_dir())?);
        state.attached.store(true, std::sync::atomic::Ordering::Release);
        for (port, t) in &targets {
            info!(
                listen_port = port,
                broker = %Ipv4Addr::from(t.broker_ip.to_ne_bytes()),
                broker_port = u16::from_be(t.broker_port),
                snat = %Ipv4Addr::from(t.snat_ip.to_ne_bytes()),
                "port mapped in the kernel"
            );
        }
        let prober = tokio::spawn(probe_loop(Arc::clone(&state), shutdown.clone()));
        let cleaner = tokio::spawn(cleanup_loop(Arc::clone(&state), shutdown.clone()));
        let stop = loop {
            tokio::select! {
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                _ = sighup.recv() => {
                    let args = state.config.lock().expect("config lock").args.clone();
                    match PortmapConfig::resolve(args).map_err(anyhow::Error::new).and_then(|c| {
                        let targets = kernel_targets(&c.entries)?;
                        Ok((c, targets))
                    }) {
                        Ok((new, targets)) => {
                            datapath.set_targets(&targets)?;
                            info!(ports = targets.len(), "SIGHUP: port map reloaded; established flows keep their brokers");
                            *state.config.lock().expect("config lock") = new;
                            state.probe.lock().expect("probe lock").done = false;
                            state.reprobe.notify_one();
                        }
                        Err(e) => error!(error = %format!("{e:#}"), "SIGHUP: new configuration rejected, keeping the old one"),
                    }
                }
            }
        };
        info!(signal = stop, "stopping");
        prober.abort();
        cleaner.abort();
        shutdown.cancel();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        anyhow::Ok(())
    }
    .await;
    *state.pins.lock().expect("pins lock") = None;
    datapath.shutdown()?;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// How long a closed flow stays in the table (late segments, the client's TIME_WAIT)
/// before userspace removes it; LRU eviction is the backstop.
const CLOSED_FLOW_LINGER: Duration = Duration::from_secs(60);
const FLOW_CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// Removes flows that have been closed for CLOSED_FLOW_LINGER, so the table shows live
/// flows and the LRU does not evict open ones first.
async fn cleanup_loop(state: Arc<PortmapState>, shutdown: CancellationToken) {
    let mut closed_since: std::collections::HashMap<kpsc_common::FlowKey, std::time::Instant> =
        Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FLOW_CLEANUP_INTERVAL) => {}
        }
        let mut pins = state.pins.lock().expect("pins lock");
        let Some(maps) = pins.as_mut() else { continue };
        let now = std::time::Instant::now();
        let mut still_closed = std::collections::HashMap::new();
        let mut removed = 0;
        for (key, flow) in maps.flows() {
            if maps.flow_state(&flow) != crate::datapath::FlowState::Closed {
                continue;
            }
            let since = closed_since.get(&key).copied().unwrap_or(now);
            if now.duration_since(since) >= CLOSED_FLOW_LINGER {
                maps.remove_flow(&key, &flow);
                removed += 1;
            } else {
                still_closed.insert(key, since);
            }
        }
        closed_since = still_closed;
        if removed > 0 {
            tracing::debug!(removed, "closed flows removed");
        }
    }
}

async fn probe_loop(state: Arc<PortmapState>, shutdown: CancellationToken) {
    loop {
        let (entries, interval, timeout) = {
            let c = state.config.lock().expect("config lock");
            (
                c.entries.clone(),
                c.map.metadata_refresh_interval,
                c.map.dial_timeout,
            )
        };
        let problems = probe_advertised(&entries, timeout).await;
        for p in &problems {
            warn!("advertised listener mismatch: {p}");
        }
        if problems.is_empty() {
            info!(
                brokers = entries.len(),
                "every broker advertises what the port map serves"
            );
        }
        *state.probe.lock().expect("probe lock") = ProbeState {
            done: true,
            mismatches: problems,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = state.reprobe.notified() => {}
        }
    }
}
