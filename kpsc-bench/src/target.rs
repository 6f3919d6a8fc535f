//! What the load goes through: nothing (direct), `kpscd proxy`, `kpscd portmap`, nftables
//! DNAT + masquerade, or an external proxy; and what it costs them (CPU from /proc, memory).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
use kpsc_testkit::{Kpscd, Process, RawClient, free_port_base, wait_listening};

use crate::{nftables::NatRules, sink::Sink};

pub enum TargetKind {
    /// Straight to the sink (loopback), or routed by the node (namespaces).
    Direct,
    /// `kpscd proxy` with its `--bulk-transfer`: `copy` (the plain tokio path), `splice`,
    /// `uring` or `sockmap` (requests carried by the kernel).
    KpscdProxy {
        bin: PathBuf,
        transfer: &'static str,
    },
    /// The TC data plane; the sink given advertises the node's address and port, as a
    /// broker configured for portmap does.
    KpscdPortmap {
        bin: PathBuf,
        sink: Sink,
        /// kpscd's `--syn-rate-per-source` (0: no budget).
        syn_rate_per_source: u32,
        /// kpscd's `--attach` (`tc` or `xdp`).
        attach: String,
        /// kpscd's `--snat-address` list (node addresses the bench has set up); empty:
        /// the route's choice.
        snat_addresses: Vec<IpAddr>,
    },
    /// nftables DNAT + masquerade on the node (namespaces only); the sink advertises the
    /// node's address and port, as for portmap.
    Nftables {
        sink: Sink,
        /// SNAT addresses (a contiguous range, first to last); empty: masquerade.
        snat_addresses: Vec<IpAddr>,
    },
    External(String),
    /// The sockmap ceiling probe (`kpsc-sockmap-ceiling`, next to kpsc-bench): every byte
    /// redirected socket to socket in the kernel, no framing; the bound for a sockmap
    /// `kpscd proxy`. `counters`: the file it keeps its byte counts in.
    SockmapCeiling {
        bin: PathBuf,
        counters: PathBuf,
    },
    /// A Kafka-unaware relay probe (`kpsc-relay-ceiling`, next to kpsc-bench): socket ->
    /// pipe -> socket with no framing, `mode` `splice` (epoll), `uring` (linked
    /// IORING_OP_SPLICE), `uring-sqpoll`, or `uring-recv-send` (socket -> buffer ->
    /// socket); the bound for a `kpscd proxy` on that path.
    /// `counters`: the file it keeps its byte count and threads' CPU in.
    RelayCeiling {
        bin: PathBuf,
        mode: &'static str,
        counters: PathBuf,
    },
}

/// Which CPUs the load generator, the sink and the proxy run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pinning {
    /// Generator and sink on CPU 0, the proxy on CPU 1: each gets a core.
    Split,
    /// Everything on CPU 0: no cross-CPU wake-ups, one core's worth of work.
    Shared,
    /// Wherever the scheduler puts them.
    None,
}

impl Pinning {
    pub fn generator_cpu(self) -> Option<usize> {
        match self {
            Self::Split | Self::Shared => Some(0),
            Self::None => None,
        }
    }

    pub fn proxy_cpu(self) -> Option<usize> {
        match self {
            Self::Split => Some(1),
            Self::Shared => Some(0),
            Self::None => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Split => "generator+sink pinned to CPU 0, proxy to CPU 1",
            Self::Shared => "generator, sink and proxy all pinned to CPU 0",
            Self::None => "not pinned",
        }
    }
}

/// Where proxies run and listen.
pub struct Placement {
    /// The proxy node's network namespace; None: this process's.
    pub node_ns: Option<String>,
    /// Address proxies listen on and clients connect to.
    pub listen_ip: String,
    /// Interfaces of the node (portmap attaches there).
    pub interfaces: Vec<String>,
    /// The load generator's network namespace (where a flood comes from); None: this
    /// process's (loopback, where nothing is flooded).
    pub client_ns: Option<String>,
    pub pinning: Pinning,
}

/// Fixed ports in a fresh namespace; free ones on a shared loopback. By index: kpscd
/// proxy, portmap, external, splice, nftables, sockmap ceiling, portmap under XDP, proxy
/// with sockmap, the splice, uring, uring-sqpoll and uring-recv-send relay ceilings, and
/// proxy with uring.
const NETNS_PORTS: [u16; 13] = [
    19092, 19093, 19094, 19095, 19096, 19097, 19098, 19099, 19100, 19101, 19102, 19103, 19104,
];
/// Node ports of the targets whose broker (sink) must advertise them.
pub const PORTMAP_PORT: u16 = NETNS_PORTS[1];
pub const NFTABLES_PORT: u16 = NETNS_PORTS[4];
pub const PORTMAP_XDP_PORT: u16 = NETNS_PORTS[6];

/// Sinks advertising the node's ports, one per target that needs its broker to advertise
/// the node (namespaces only).
pub struct NodeSinks {
    pub portmap: Sink,
    pub portmap_xdp: Sink,
    pub nftables: Sink,
}

impl Placement {
    pub fn loopback(pinning: Pinning) -> Self {
        Self {
            node_ns: None,
            listen_ip: "127.0.0.1".into(),
            interfaces: Vec::new(),
            client_ns: None,
            pinning,
        }
    }

    /// (listen port, admin port) for the target at `index`.
    fn ports(&self, index: usize) -> (u16, u16) {
        match self.node_ns {
            Some(_) => (NETNS_PORTS[index], NETNS_PORTS[index] + 100),
            None => (free_port_base(1), free_port_base(1)),
        }
    }

    /// `program args`, inside the node namespace and on the proxy's CPU.
    fn command(&self, program: &std::ffi::OsStr, args: &[String]) -> Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpu) = self.pinning.proxy_cpu() {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
        }
        if let Some(ns) = &self.node_ns {
            argv.extend([
                "nsenter".into(),
                format!("--net=/var/run/netns/{ns}").into(),
            ]);
        }
        argv.push(program.to_owned());
        argv.extend(args.iter().map(Into::into));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdout(Stdio::null());
        cmd
    }

    /// Starts kpscd (`args`: mode and flags) as `command` places it, its admin endpoint
    /// on `admin_port`, and waits until it is ready.
    async fn start_kpscd(
        &self,
        bin: &Path,
        args: &[String],
        admin_port: u16,
    ) -> anyhow::Result<Kpscd> {
        let admin: SocketAddr = format!("{}:{admin_port}", self.listen_ip).parse()?;
        let kpscd = Kpscd::launch(
            self.command(bin.as_os_str(), args),
            admin,
            self.node_ns.clone(),
        )?;
        blocking(move || {
            kpscd.wait_ready(Duration::from_secs(20))?;
            Ok(kpscd)
        })
        .await
    }
}

pub struct Target {
    pub name: String,
    /// Where the load generator connects.
    pub addr: String,
    /// The sink behind this target.
    pub sink: Sink,
    proxy: Proxy,
}

/// What a target runs, stopped (SIGTERM, then SIGKILL) when the target is dropped.
enum Proxy {
    None,
    Kpscd(Kpscd),
    /// Rules in the node's namespace, deleted on drop.
    Nat {
        _rules: NatRules,
    },
    External(Process),
    /// A ceiling probe (sockmap or relay) and the file it writes its counters to.
    Probe {
        process: Process,
        counters: PathBuf,
    },
}

/// How long an external proxy gets to exit after SIGTERM (what the kit gives kpscd).
const STOP_GRACE: Duration = Duration::from_secs(5);

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// CPU time (user + system) of the kernel's worker threads, `kworker/*`, seconds: where
/// deferred kernel work runs, such as sockmap's redirect backlog (`sk_psock_backlog`),
/// which neither a proxy's process time nor softirq time includes. Threads that exited
/// during a run take their time with them, so this can only undercount.
pub fn kernel_worker_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let ticks: u64 = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", name.to_str()?)).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            if !head.contains("(kworker") {
                return None;
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

/// Kernel softirq time of all CPUs (where TC programs and the network stack run), seconds.
pub fn softirq_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            line.split_whitespace().nth(7)?.parse::<f64>().ok()
        })
        .map_or(0.0, |t| t / clock_ticks())
}

/// Pins thread `tid` (0: the calling thread) to one CPU.
fn pin_thread(tid: libc::pid_t, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({tid}, CPU {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

pub fn pin_self_to_cpu(cpu: usize) -> anyhow::Result<()> {
    pin_thread(0, cpu)
}

pub fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs blocking kit code (readiness, the raw client) off the runtime's thread: in a
/// loopback run the sink shares that thread, and kpscd is ready only once the sink has
/// answered its metadata request. The blocking pool's threads are started from the
/// runtime's thread, so they share its network namespace (the client's in a namespace run).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// A connection to `addr` that completed one request (ApiVersions v0), so both of a
/// proxy's sides exist.
fn idle_connection(addr: &str) -> anyhow::Result<RawClient> {
    let mut client = RawClient::connect(addr)?;
    let (_, _): (ApiVersionsResponse, _) =
        client.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
    Ok(client)
}

impl Target {
    pub async fn start(kind: TargetKind, sink: &Sink, place: &Placement) -> anyhow::Result<Self> {
        raise_fd_limit();
        let ip = &place.listen_ip;
        let kpscd_args = |mode: &str, flags: Vec<String>| -> Vec<String> {
            let mut args = vec![mode.into(), "--log-level".into(), "warning".into()];
            args.extend(flags);
            args
        };
        match kind {
            TargetKind::Direct => Ok(Self {
                name: if place.node_ns.is_some() {
                    "routed"
                } else {
                    "direct"
                }
                .into(),
                addr: sink.addr.to_string(),
                sink: sink.clone(),
                proxy: Proxy::None,
            }),
            TargetKind::KpscdProxy { bin, transfer } => {
                let (name, index) = match transfer {
                    "splice" => ("kpscd-splice", 3),
                    "sockmap" => ("kpscd-sockmap", 7),
                    "uring" => ("kpscd-uring", 12),
                    _ => ("kpscd-proxy", 0),
                };
                let (port, admin) = place.ports(index);
                let listen = format!("{ip}:{port}");
                let args = kpscd_args(
                    "proxy",
                    vec![
                        "--bootstrap-server-mapping".into(),
                        format!("{},{listen},{listen}", sink.addr),
                        "--dynamic-listeners-disable".into(),
                        "--bulk-transfer".into(),
                        transfer.into(),
                    ],
                );
                Ok(Self {
                    name: name.into(),
                    addr: listen,
                    sink: sink.clone(),
                    proxy: Proxy::Kpscd(place.start_kpscd(&bin, &args, admin).await?),
                })
            }
            TargetKind::KpscdPortmap {
                bin,
                sink: advertising_sink,
                syn_rate_per_source,
                attach,
                snat_addresses,
            } => {
                let ns = place
                    .node_ns
                    .clone()
                    .context("portmap needs the namespace topology (--topology netns)")?;
                let xdp = attach == "xdp";
                let (port, admin) = place.ports(if xdp { 6 } else { 1 });
                // Each daemon its own pins: both may run on the node in one bench run.
                let instance = if xdp { format!("{ns}-xdp") } else { ns };
                let args = kpscd_args(
                    "portmap",
                    vec![
                        "--bootstrap-server-mapping".into(),
                        format!("{},0.0.0.0:{port},{ip}:{port}", advertising_sink.addr),
                        "--interface".into(),
                        place.interfaces.join(","),
                        "--instance".into(),
                        instance,
                        "--syn-rate-per-source".into(),
                        syn_rate_per_source.to_string(),
                        "--attach".into(),
                        attach.clone(),
                    ]
                    .into_iter()
                    .chain(
                        snat_addresses
                            .iter()
                            .flat_map(|a| ["--snat-address".to_owned(), a.to_string()]),
                    )
                    .collect(),
                );
                Ok(Self {
                    name: if attach == "tc" {
                        "kpscd-portmap".into()
                    } else {
                        format!("kpscd-portmap-{attach}")
                    },
                    addr: format!("{ip}:{port}"),
                    proxy: Proxy::Kpscd(place.start_kpscd(&bin, &args, admin).await?),
                    sink: advertising_sink,
                })
            }
            TargetKind::Nftables {
                sink: advertising_sink,
                snat_addresses,
            } => {
                let ns = place
                    .node_ns
                    .as_deref()
                    .context("nftables needs the namespace topology (--topology netns)")?;
                let (port, _) = place.ports(4);
                let listen: SocketAddr = format!("{ip}:{port}").parse()?;
                let rules = NatRules::load(ns, listen, advertising_sink.addr, &snat_addresses)?;
                Ok(Self {
                    name: "nftables".into(),
                    addr: listen.to_string(),
                    sink: advertising_sink,
                    proxy: Proxy::Nat { _rules: rules },
                })
            }
            TargetKind::External(template) => {
                let (port, _) = place.ports(2);
                let listen = format!("{ip}:{port}");
                let line = template
                    .replace("{broker}", &sink.addr.to_string())
                    .replace("{listen}", &listen);
                let mut cmd = place.command("sh".as_ref(), &["-c".into(), format!("exec {line}")]);
                let process = Process::spawn(&mut cmd, STOP_GRACE)?;
                let addr = listen.clone();
                blocking(move || wait_listening(&addr, Duration::from_secs(20)))
                    .await
                    .context("--proxy-cmd")?;
                Ok(Self {
                    name: "external".into(),
                    addr: listen,
                    sink: sink.clone(),
                    proxy: Proxy::External(process),
                })
            }
            TargetKind::SockmapCeiling { bin, counters } => {
                let (port, _) = place.ports(5);
                let listen = format!("{ip}:{port}");
                let args = [
                    listen.clone(),
                    sink.addr.to_string(),
                    counters.display().to_string(),
                ];
                let process =
                    Process::spawn(&mut place.command(bin.as_os_str(), &args), STOP_GRACE)?;
                let addr = listen.clone();
                blocking(move || wait_listening(&addr, Duration::from_secs(20)))
                    .await
                    .context("the sockmap ceiling probe did not listen")?;
                Ok(Self {
                    name: "sockmap-ceiling".into(),
                    addr: listen,
                    sink: sink.clone(),
                    proxy: Proxy::Probe { process, counters },
                })
            }
            TargetKind::RelayCeiling {
                bin,
                mode,
                counters,
            } => {
                let index = match mode {
                    "splice" => 8,
                    "uring" => 9,
                    "uring-sqpoll" => 10,
                    _ => 11,
                };
                let (port, _) = place.ports(index);
                let listen = format!("{ip}:{port}");
                let args = [
                    mode.to_owned(),
                    listen.clone(),
                    sink.addr.to_string(),
                    counters.display().to_string(),
                ];
                let process =
                    Process::spawn(&mut place.command(bin.as_os_str(), &args), STOP_GRACE)?;
                let addr = listen.clone();
                blocking(move || wait_listening(&addr, Duration::from_secs(20)))
                    .await
                    .with_context(|| format!("the {mode} relay probe did not listen"))?;
                Ok(Self {
                    name: format!("{mode}-ceiling"),
                    addr: listen,
                    sink: sink.clone(),
                    proxy: Proxy::Probe { process, counters },
                })
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        match &self.proxy {
            Proxy::None | Proxy::Nat { .. } => None,
            Proxy::Kpscd(k) => Some(k.pid()),
            Proxy::External(p) | Proxy::Probe { process: p, .. } => Some(p.id()),
        }
    }

    /// User + system CPU of the proxy process so far (0 for direct and nftables).
    pub fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.pid() else { return 0.0 };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command name, which may contain spaces.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(
                    (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
                        / clock_ticks(),
                )
            })
            .unwrap_or(0.0)
    }

    /// Moves every thread of the proxy process to `cpu` (nothing for direct).
    pub fn pin_to_cpu(&self, cpu: usize) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing the threads of {} (pid {pid})", self.name))?;
        for task in tasks {
            let tid = task?.file_name().to_string_lossy().parse()?;
            pin_thread(tid, cpu).with_context(|| format!("pinning {}", self.name))?;
        }
        Ok(())
    }

    /// What the kernel-side targets hold or dropped so far, for the report's notes:
    /// portmap's flow and drop counters, nftables' conntrack entries.
    pub fn kernel_state(&self) -> Option<String> {
        match &self.proxy {
            Proxy::Kpscd(k) if self.name.starts_with("kpscd-portmap") => {
                let (_, metrics) = k.get("/metrics").ok()?;
                // `kpsc_portmap_<name>{...,reason="r"} value` -> `<name> r value`.
                let counters: Vec<String> = metrics
                    .lines()
                    .filter_map(|l| {
                        let name = l.strip_prefix("kpsc_portmap_")?.split('{').next()?;
                        let value = l.rsplit(' ').next()?;
                        let reason = l
                            .split("reason=\"")
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                            .map_or(String::new(), |r| format!(" {r}"));
                        (matches!(
                            name,
                            "drops_total" | "flows_total" | "half_open_flows_total"
                        ) && value != "0")
                            .then(|| format!("{name}{reason} {value}"))
                    })
                    .collect();
                Some(counters.join(", "))
            }
            Proxy::Nat { _rules: rules } => rules
                .conntrack_count()
                .ok()
                .map(|n| format!("{n} conntrack entries")),
            Proxy::Probe { counters, .. } => std::fs::read_to_string(counters)
                .ok()
                .map(|line| line.trim().to_owned()),
            _ => None,
        }
    }

    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.pid()?, "VmHWM:")
    }

    /// KiB of proxy memory per idle connection at n/10, n/2 and n open connections (each
    /// completed one request, so both sides exist): flat figures mean no per-connection
    /// growth beyond the buffers.
    pub async fn idle_memory(&self, n: usize) -> anyhow::Result<Vec<(usize, f64)>> {
        let Some(pid) = self.pid() else {
            return Ok(Vec::new());
        };
        let rss = || status_kib(pid, "VmRSS:").context("reading the proxy's RSS");
        let before = rss()?;
        let mut conns = Vec::with_capacity(n);
        let mut points = Vec::new();
        for checkpoint in [n / 10, n / 2, n] {
            let (addr, more) = (self.addr.clone(), checkpoint.saturating_sub(conns.len()));
            let opened: Vec<RawClient> =
                blocking(move || (0..more).map(|_| idle_connection(&addr)).collect()).await?;
            conns.extend(opened);
            if checkpoint == 0 {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            points.push((
                checkpoint,
                rss()?.saturating_sub(before) as f64 / checkpoint as f64,
            ));
        }
        Ok(points)
    }
}
