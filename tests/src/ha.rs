//! Several kpscd instances behind a real load balancer, in network namespaces on the real
//! kernel:
//!
//! ```text
//!  client ns                lb ns (HAProxy, or          switch ns (bridge)
//!                           nftables: passthrough_lb)
//!  198.18.10.2 ---- 198.18.10.1 + VIP 198.18.10.100       br0
//!                   198.18.20.1 ------------------------- |-- instance i: 198.18.20.(11+i)
//!                                                        |-- broker ns: 198.18.20.2
//! ```
//!
//! For the proxy instances, the broker namespace runs librdkafka's mock cluster, which can
//! only listen on loopback; nftables there forwards 198.18.20.2:<its ports> to it
//! (route_localnet), and the brokers advertise 198.18.20.2. Portmap nodes get tansu
//! brokers on 198.18.20.2 advertising the VIP, and routes back through the lb. Everything
//! is removed on drop.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use kpsc_testkit::{
    Kpscd, Process,
    netns::{self, ip},
};

use crate::mock_cluster::MockCluster;

pub const VIP: &str = "198.18.10.100";
pub const BROKER_IP: &str = "198.18.20.2";
/// Every instance's admin endpoint (`/ready`) port, on its own address.
pub const ADMIN_PORT: u16 = 8080;
/// Broker 1's port on the VIP and on every instance; broker n gets `MIN_PORT + n`.
pub const FIRST_PORT: u16 = 9092;
const MIN_PORT: u16 = FIRST_PORT - 1;

pub fn instance_ip(i: usize) -> String {
    format!("198.18.20.{}", 11 + i)
}

/// The client namespace's address.
pub const CLIENT_IP: &str = "198.18.10.2";
/// The clients' network, and the load balancer's address on the instances' network.
pub const CLIENT_NET: &str = "198.18.10.0/24";
pub const LB_IP: &str = "198.18.20.1";

/// `ip netns exec <ns> <program> <args>`, with `stdin` fed to it.
pub fn exec_in(ns: &str, program: &str, args: &[&str], stdin: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {ns}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces and links of the picture above.
pub struct HaTopology {
    pub client: String,
    pub lb: String,
    pub broker: String,
    pub instances: Vec<String>,
    switch: String,
}

impl HaTopology {
    pub fn new(instances: usize) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = format!(
            "kpscha{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let topo = Self {
            client: format!("{p}c"),
            lb: format!("{p}l"),
            broker: format!("{p}b"),
            instances: (0..instances).map(|i| format!("{p}i{i}")).collect(),
            switch: format!("{p}s"),
        };
        for ns in topo.all() {
            ip(&["netns", "add", ns])?;
            kpsc_testkit::cleanup::resource_created(ns, netns::remove_namespace);
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &topo.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &topo.switch, "link", "set", "br0", "up"])?;
        // Client <-> load balancer.
        ip(&[
            "link",
            "add",
            "c0",
            "netns",
            &topo.client,
            "type",
            "veth",
            "peer",
            "name",
            "l0",
            "netns",
            &topo.lb,
        ])?;
        topo.address(&topo.client, "c0", &format!("{CLIENT_IP}/24"))?;
        topo.address(&topo.lb, "l0", "198.18.10.1/24")?;
        topo.address(&topo.lb, "l0", &format!("{VIP}/32"))?;
        // Load balancer, broker and instances on the switch.
        let mut hosts = vec![(topo.lb.clone(), LB_IP.to_owned())];
        hosts.push((topo.broker.clone(), BROKER_IP.to_owned()));
        for (i, ns) in topo.instances.iter().enumerate() {
            hosts.push((ns.clone(), instance_ip(i)));
        }
        for (port, (ns, addr)) in hosts.iter().enumerate() {
            let peer = format!("p{port}");
            ip(&[
                "link",
                "add",
                "e0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &topo.switch,
            ])?;
            ip(&["-n", &topo.switch, "link", "set", &peer, "master", "br0"])?;
            ip(&["-n", &topo.switch, "link", "set", &peer, "up"])?;
            topo.address(ns, "e0", &format!("{addr}/24"))?;
        }
        Ok(topo)
    }

    fn all(&self) -> impl Iterator<Item = &String> {
        [&self.client, &self.lb, &self.broker, &self.switch]
            .into_iter()
            .chain(&self.instances)
    }

    fn address(&self, ns: &str, dev: &str, cidr: &str) -> anyhow::Result<()> {
        netns::add_address(ns, cidr, dev)?;
        ip(&["-n", ns, "link", "set", dev, "up"])
    }

    /// For a passthrough balancer (one that rewrites only the destination): the load
    /// balancer forwards, and the instances send what is for the clients back through it,
    /// where conntrack turns their source back into the VIP.
    pub fn route_clients_via_lb(&self) -> anyhow::Result<()> {
        exec_in(&self.lb, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], "")?;
        for ns in &self.instances {
            exec_in(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], "")?;
            ip(&["-n", ns, "route", "add", CLIENT_NET, "via", LB_IP])?;
        }
        Ok(())
    }

    /// Starts the mock cluster in the broker namespace, reachable (and advertised) at
    /// 198.18.20.2 on its own ports.
    pub fn start_brokers(&self, brokers: usize) -> anyhow::Result<MockCluster> {
        // librdkafka's threads, listeners included, inherit the creating thread's namespace.
        let cluster = netns::in_netns(&self.broker, || MockCluster::new(brokers))??;
        let mut ports = Vec::new();
        for (i, addr) in cluster.broker_addrs().iter().enumerate() {
            let port: u16 = addr.rsplit_once(':').context("host:port")?.1.parse()?;
            cluster.set_advertised(i as i32 + 1, BROKER_IP, port)?;
            ports.push(port.to_string());
        }
        for key in [
            "net.ipv4.conf.all.route_localnet",
            "net.ipv4.conf.e0.route_localnet",
        ] {
            exec_in(&self.broker, "sysctl", &["-qw", &format!("{key}=1")], "")?;
        }
        let rules = format!(
            "table ip kpsc_ha {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  \
             ip daddr {BROKER_IP} tcp dport {{ {} }} dnat to 127.0.0.1\n }}\n}}\n",
            ports.join(", ")
        );
        exec_in(&self.broker, "nft", &["-f", "-"], &rules)?;
        Ok(cluster)
    }
}

impl Drop for HaTopology {
    fn drop(&mut self) {
        for ns in self.all() {
            netns::remove_namespace(ns);
        }
    }
}

/// The command line every instance runs, identical on all of them: broker 1 mapped
/// statically to the VIP's first port, the others at deterministic ports, all advertised
/// as the VIP.
pub fn instance_args(cluster: &MockCluster, shutdown_grace: &str) -> Vec<String> {
    [
        "proxy",
        "--bootstrap-server-mapping",
        &format!(
            "{BROKER_IP}:{},0.0.0.0:{FIRST_PORT},{VIP}:{FIRST_PORT}",
            cluster
                .broker_addr(1)
                .rsplit_once(':')
                .map_or("", |(_, p)| p)
        ),
        "--dynamic-sequential-min-port",
        &MIN_PORT.to_string(),
        "--dynamic-advertised-listener",
        VIP,
        "--default-listener-ip",
        "0.0.0.0",
        "--metadata-refresh-interval",
        "1s",
        "--shutdown-grace",
        shutdown_grace,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// An instance's port map from `/maps` without counters: (listen, broker, advertised,
/// node id; "-" and -1 where absent) per row, sorted.
pub fn map_rows(k: &Kpscd) -> Vec<(String, String, String, i64)> {
    let mut rows: Vec<_> = k
        .maps()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["listen"].as_str().unwrap_or("-").to_owned(),
                r["broker"].as_str().unwrap().to_owned(),
                r["advertised"].as_str().unwrap().to_owned(),
                r["node_id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// HAProxy in TCP mode on the VIP, every broker port, each instance a server checked with
/// `GET /ready` on its admin port; killed on drop.
pub struct Haproxy {
    _process: Process,
    socket: PathBuf,
    dir: PathBuf,
}

/// Health check period and how many failures take a server out: an instance is out
/// within about 2 x 300 ms of turning unready.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(300);
pub const CHECK_FALL: u32 = 2;

impl Haproxy {
    pub fn start(topo: &HaTopology, brokers: u16) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("kpsc-haproxy-{}", topo.lb));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("admin.sock");
        let servers: String = (0..topo.instances.len())
            .map(|i| format!("  server i{i} {}\n", instance_ip(i)))
            .collect();
        let config = format!(
            "global\n  maxconn 4096\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  \
             timeout server 60s\n  retries 3\n  option redispatch 1\n\
             frontend kafka\n  bind {VIP}:{FIRST_PORT}-{}\n  default_backend kpscd\n\
             backend kpscd\n  balance leastconn\n  option httpchk GET /ready\n  \
             http-check expect status 200\n  \
             default-server check port {ADMIN_PORT} inter {}ms fall {CHECK_FALL} rise 2\n{servers}",
            socket.display(),
            FIRST_PORT + brokers - 1,
            CHECK_INTERVAL.as_millis()
        );
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config)?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let process = Process::spawn(
            Command::new("ip")
                .args(["netns", "exec", &topo.lb, "haproxy", "-db", "-f"])
                .arg(&cfg)
                .stdout(log.try_clone()?)
                .stderr(log),
            Duration::ZERO,
        )
        .context("starting haproxy (`cargo xtask setup` installs it)")?;
        let haproxy = Self {
            _process: process,
            socket,
            dir,
        };
        netns::wait_listening(&topo.client, VIP, FIRST_PORT, Duration::from_secs(10))?;
        Ok(haproxy)
    }

    /// HAProxy's status of each server ("UP", "DOWN", "UP 1/2", ...), from its admin socket.
    pub fn statuses(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut s = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        s.write_all(b"show stat\n")?;
        let mut csv = String::new();
        s.read_to_string(&mut csv)?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty stats")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, st) = (
            col("pxname").context("pxname")?,
            col("svname").context("svname")?,
            col("status").context("status")?,
        );
        Ok(lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == "kpscd" && f[sv].starts_with('i'))
            .map(|f| (f[sv].to_owned(), f[st].to_owned()))
            .collect())
    }

    /// Whether server `i` is in service.
    pub fn is_up(&self, i: usize) -> anyhow::Result<bool> {
        let name = format!("i{i}");
        let statuses = self.statuses()?;
        let (_, status) = statuses
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("no server {name} in {statuses:?}"))?;
        // "UP", or "UP 1/2" while a failing check has not reached the threshold yet.
        Ok(status.starts_with("UP"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
