//! Network-namespace topologies (for the portmap tests and the benchmark), on the real
//! kernel:
//!
//! ```text
//!  client ns                node ns (kpscd portmap)                 broker ns
//!  198.18.1.2..  c0 ---- n0 198.18.1.1 | 198.18.2.1 n1 ---- b0  198.18.2.2.. (brokers)
//!  2001:2:0:1::2..          2001:2:0:1::1 | 2001:2:0:2::1           2001:2:0:2::2..
//! ```
//!
//! Addresses come from 198.18.0.0/15 and 2001:2::/48 (reserved for benchmarks, RFC 2544
//! and RFC 5180); IPv6 ones skip duplicate address detection, so they work at once.
//! Everything is removed on drop, also when the test fails.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{datapath::DEFAULT_PIN_ROOT, process::Process, wait};

pub const NODE_CLIENT_IP: &str = "198.18.1.1";
pub const NODE_BROKER_IP: &str = "198.18.2.1";

pub const NODE_CLIENT_IP6: &str = "2001:2:0:1::1";
pub const NODE_BROKER_IP6: &str = "2001:2:0:2::1";

/// The i-th client IPv6 address (i from 0).
pub fn client_ip6(i: usize) -> String {
    format!("2001:2:0:1::{:x}", 2 + i)
}

/// The i-th broker IPv6 address (i from 0).
pub fn broker_ip6(i: usize) -> String {
    format!("2001:2:0:2::{:x}", 2 + i)
}

/// The i-th client address (i from 0).
pub fn client_ip(i: usize) -> String {
    format!("198.18.1.{}", 2 + i)
}

/// The i-th broker address (i from 0).
pub fn broker_ip(i: usize) -> String {
    format!("198.18.2.{}", 2 + i)
}

/// Moves the calling thread into network namespace `ns`; threads it creates afterwards
/// (e.g. librdkafka's) inherit it.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: valid fd of a network namespace; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that has joined network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(ns)?;
                Ok(f())
            })
            .join()
            .expect("netns thread panicked")
    })
}

/// Runs `f` in network namespace `ns` when given, else on this thread.
pub fn maybe_in<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    match ns {
        Some(ns) => in_netns(ns, f),
        None => Ok(f()),
    }
}

/// Runs `program args` in namespace `ns` (ip netns exec); its stdout, or an error with
/// its stderr.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A kernel SNMP counter of namespace `ns` (e.g. TcpInCsumErrors), from nstat.
pub fn snmp_counter(ns: &str, name: &str) -> anyhow::Result<u64> {
    let out = run_in(ns, "nstat", &["-asz", name])?;
    out.lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(name)).then(|| cols.next()?.parse().ok())?
        })
        .with_context(|| format!("{name} not in nstat output: {out}"))
}

/// Adds `cidr` (e.g. `198.18.2.200/24`) to interface `dev` of namespace `ns`.
pub fn add_address(ns: &str, cidr: &str, dev: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "addr", "add", cidr, "dev", dev])
}

/// Runs `ip ARGS`; a failure carries the command and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Client, node and broker namespaces joined by two veth pairs.
pub struct Topology {
    pub client: String,
    pub node: String,
    pub broker: String,
    children: Vec<Process>,
}

impl Topology {
    pub fn new(client_ips: usize, broker_ips: usize) -> anyhow::Result<Self> {
        Self::build(client_ips, broker_ips, true)
    }

    /// Without checksum offload on the client and broker links: every TCP segment then
    /// carries a full software checksum that the receiving stack verifies, so a checksum
    /// the TC program got wrong shows up as a dropped segment and in TcpInCsumErrors.
    /// (With offload, veth hands segments over unverified, and GSO packets larger than the
    /// MTU reach the program: the path the other tests exercise.)
    pub fn without_checksum_offload(client_ips: usize, broker_ips: usize) -> anyhow::Result<Self> {
        Self::build(client_ips, broker_ips, false)
    }

    fn build(client_ips: usize, broker_ips: usize, offload: bool) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "kpsc{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let topo = Self {
            client: format!("{prefix}c"),
            node: format!("{prefix}n"),
            broker: format!("{prefix}b"),
            children: Vec::new(),
        };
        for ns in [&topo.client, &topo.node, &topo.broker] {
            ip(&["netns", "add", ns])?;
            crate::cleanup::resource_created(ns, remove_namespace);
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // Link-local addresses too are usable at once (the veths are created below).
            for key in ["all", "default"] {
                topo.sysctl(ns, &format!("net.ipv6.conf.{key}.accept_dad"), "0")?;
            }
        }
        let (c, n, b) = (&topo.client, &topo.node, &topo.broker);
        ip(&[
            "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "n0", "netns", n,
        ])?;
        ip(&[
            "link", "add", "b0", "netns", b, "type", "veth", "peer", "name", "n1", "netns", n,
        ])?;
        for i in 0..client_ips {
            add_address(c, &format!("{}/24", client_ip(i)), "c0")?;
        }
        add_address(n, &format!("{NODE_CLIENT_IP}/24"), "n0")?;
        add_address(n, &format!("{NODE_BROKER_IP}/24"), "n1")?;
        for i in 0..broker_ips {
            add_address(b, &format!("{}/24", broker_ip(i)), "b0")?;
        }
        let mut v6: Vec<(&str, &str, String)> = vec![
            (n, "n0", NODE_CLIENT_IP6.to_owned()),
            (n, "n1", NODE_BROKER_IP6.to_owned()),
        ];
        v6.extend((0..client_ips).map(|i| (c.as_str(), "c0", client_ip6(i))));
        v6.extend((0..broker_ips).map(|i| (b.as_str(), "b0", broker_ip6(i))));
        for (ns, dev, addr) in &v6 {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
        }
        for (ns, dev) in [(c, "c0"), (n, "n0"), (n, "n1"), (b, "b0")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        if !offload {
            for (ns, dev) in [(c, "c0"), (b, "b0")] {
                topo.run(ns, "ethtool", &["-K", dev, "tx", "off", "rx", "off"])?;
            }
        }
        topo.sysctl(&topo.node, "net.ipv4.ip_forward", "1")?;
        topo.sysctl(&topo.node, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(topo)
    }

    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let status = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ])
            .status()?;
        anyhow::ensure!(status.success(), "sysctl {key}={value} in {ns}");
        Ok(())
    }

    /// A kernel SNMP counter of namespace `ns` (e.g. TcpInCsumErrors).
    pub fn counter(&self, ns: &str, name: &str) -> anyhow::Result<u64> {
        snmp_counter(ns, name)
    }

    /// Lets the client and broker hosts receive what XDP on the node redirects to them: a
    /// veth delivers a redirected XDP frame only when its peer runs NAPI, i.e. has GRO on
    /// (or an XDP program of its own); otherwise the frame is dropped silently.
    pub fn enable_xdp_delivery(&self) -> anyhow::Result<()> {
        for (ns, dev) in [(&self.client, "c0"), (&self.broker, "b0")] {
            self.run(ns, "ethtool", &["-K", dev, "gro", "on"])?;
        }
        Ok(())
    }

    /// Steers the receive processing of `devs` in `ns` to `cpu` (RPS): packets a veth
    /// peer sends are otherwise processed on the sending CPU. sysfs shows a namespace's
    /// devices only when mounted inside it, hence `ip netns exec` (which does that).
    pub fn steer_receive(&self, ns: &str, devs: &[&str], cpu: usize) -> anyhow::Result<()> {
        let mask = format!("{:x}", 1u64 << cpu);
        for dev in devs {
            let script = format!(
                "for q in /sys/class/net/{dev}/queues/rx-*/rps_cpus; do echo {mask} > $q; done"
            );
            self.run(ns, "sh", &["-c", &script])?;
        }
        Ok(())
    }

    /// The sum of `dev`'s `ethtool -S` counters in `ns` whose names end with `suffix`
    /// (veth counts XDP verdicts per queue, e.g. `rx_queue_0_xdp_redirect`).
    pub fn nic_counter(&self, ns: &str, dev: &str, suffix: &str) -> anyhow::Result<u64> {
        let out = self.run(ns, "ethtool", &["-S", dev])?;
        let mut found = false;
        let mut total = 0;
        for line in out.lines() {
            let Some((name, value)) = line.trim().split_once(':') else {
                continue;
            };
            if name.trim().ends_with(suffix) {
                found = true;
                total += value.trim().parse::<u64>().unwrap_or(0);
            }
        }
        anyhow::ensure!(found, "no counter *{suffix} in ethtool -S {dev}: {out}");
        Ok(total)
    }

    /// `ip netns exec <ns> <program> <args>`, output captured.
    pub fn run(&self, ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run_in(ns, program, args)
    }

    /// Starts a process in namespace `ns` (ip netns exec); it is killed when the topology
    /// is dropped.
    pub fn spawn(
        &mut self,
        ns: &str,
        program: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let child = Process::spawn(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            Duration::ZERO,
        )
        .with_context(|| format!("starting {} in {ns}", program.display()))?;
        self.children.push(child);
        Ok(())
    }

    /// Routes between client and broker hosts through the node (the "direct" path of the
    /// benchmark: the node only routes).
    pub fn add_routes(&self) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.client,
            "route",
            "add",
            "198.18.2.0/24",
            "via",
            NODE_CLIENT_IP,
        ])?;
        ip(&[
            "-n",
            &self.broker,
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            NODE_BROKER_IP,
        ])
    }
}

/// Waits until `host:port` accepts connections from namespace `ns`.
pub fn wait_listening(ns: &str, host: &str, port: u16, timeout: Duration) -> anyhow::Result<()> {
    in_netns(ns, || {
        wait::wait_listening(&format!("{host}:{port}"), timeout)
    })?
    .with_context(|| format!("in namespace {ns}"))
}

/// Deletes a namespace and the portmap pins named after it: pins of a kpscd that could
/// not clean up (killed by a failing test or an interrupted run), as users of a topology
/// take the node namespace's name as the portmap instance.
pub fn remove_namespace(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
    let pins = std::path::Path::new(DEFAULT_PIN_ROOT).join(ns);
    if pins.exists() {
        let _ = std::fs::remove_dir_all(&pins);
    }
    crate::cleanup::resource_removed(ns);
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The processes first: they live in the namespaces.
        self.children.clear();
        for ns in [&self.client, &self.node, &self.broker] {
            remove_namespace(ns);
        }
    }
}
