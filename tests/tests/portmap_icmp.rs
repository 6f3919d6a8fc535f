//! Path MTU discovery across `kpscd portmap`: ICMP errors about translated flows
//! ("fragmentation needed", "packet too big") are translated to the flow's other side.
//!
//! Five namespaces with real TCP stacks, a tansu broker and rdkafka clients, a router on
//! each side of the node; every interface has MTU 1500 except the one router interface a
//! test narrows to 1280, and routers forward with DF (Linux TCP sets it):
//!
//! ```text
//!  client        router C          node (kpscd)          router B         broker
//!  c0 .3.2 ---- r0 .3.1 | r1 .1.254 ---- n0 .1.1 | n1 .2.1 ---- s0 .2.254 | s1 .4.1 ---- b0 .4.2
//!  (198.18.x.y; IPv6 2001:2:0:x::y alike)
//! ```
//!
//! Without the translation the router's error goes to a node address with no socket for
//! that tuple, and the sender's large segments vanish: the produce (or fetch) never
//! completes.

use std::{
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use kpsc_common::portmap::{ICMP_MAP, SNAT_MAP};
use kpsc_testkit::cleanup;
use kpsc_tests::{
    Kpscd, Process, TansuHost, create_topic, eventually,
    netns::{Topology, in_netns, ip, remove_namespace},
    portmap::{
        Attach, BROKER_PORT, FIRST_PORT, cluster_id, connect_from, connect_to, mapping, pins,
        portmap_args, portmap_command, start_portmap,
    },
    start_tansu_in,
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

/// The record that does not fit the narrow link in one segment.
const RECORD_BYTES: usize = 200 * 1024;
/// The narrow link's MTU (IPv6's minimum, so both families use it).
const NARROW_MTU: &str = "1280";
/// How long a produce or fetch may take: seconds when PMTU discovery works; without
/// it, TCP retransmits the too-large segments until this runs out.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// Address `host` on link `net` (3: client, 1: node's client side, 2: node's broker
    /// side, 4: broker), without prefix length.
    fn addr(self, net: u8, host: u8) -> String {
        match self {
            Family::V4 => format!("198.18.{net}.{host}"),
            Family::V6 => format!("2001:2:0:{net}::{host:x}"),
        }
    }

    fn prefix(self, net: u8) -> String {
        match self {
            Family::V4 => format!("198.18.{net}.0/24"),
            Family::V6 => format!("2001:2:0:{net}::/64"),
        }
    }

    fn with_len(self, addr: &str) -> String {
        match self {
            Family::V4 => format!("{addr}/24"),
            Family::V6 => format!("{addr}/64"),
        }
    }

    fn endpoint(self, host: &str, port: u16) -> String {
        match self {
            Family::V4 => format!("{host}:{port}"),
            Family::V6 => format!("[{host}]:{port}"),
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn node(self) -> String {
        self.addr(1, 1)
    }

    fn snat(self) -> String {
        self.addr(2, 1)
    }

    fn broker(self) -> String {
        self.addr(4, 2)
    }
}

/// Client, router C, node, router B and broker namespaces, removed on drop.
struct RoutedPath {
    client: String,
    router_c: String,
    node: String,
    router_b: String,
    broker: String,
    tansu: Vec<Process>,
}

/// `ip netns exec <ns> <program> <args>`, output captured.
fn run(ns: &str, program: &str, args: &[&str]) -> String {
    kpsc_tests::netns::run_in(ns, program, args).unwrap()
}

impl RoutedPath {
    fn new() -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "kpsc{}i{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let path = Self {
            client: format!("{prefix}c"),
            router_c: format!("{prefix}r"),
            node: format!("{prefix}n"),
            router_b: format!("{prefix}s"),
            broker: format!("{prefix}b"),
            tansu: Vec::new(),
        };
        for ns in path.namespaces() {
            ip(&["netns", "add", ns])?;
            cleanup::resource_created(ns, remove_namespace);
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            for key in ["all", "default"] {
                run(
                    ns,
                    "sysctl",
                    &["-qw", &format!("net.ipv6.conf.{key}.accept_dad=0")],
                );
            }
        }
        // (namespace, device, link, host) for both ends of every link.
        let links = [
            ((&path.client, "c0", 3, 2), (&path.router_c, "r0", 3, 1)),
            ((&path.router_c, "r1", 1, 254), (&path.node, "n0", 1, 1)),
            ((&path.node, "n1", 2, 1), (&path.router_b, "s0", 2, 254)),
            ((&path.router_b, "s1", 4, 1), (&path.broker, "b0", 4, 2)),
        ];
        for (a, b) in links {
            ip(&[
                "link", "add", a.1, "netns", a.0, "type", "veth", "peer", "name", b.1, "netns", b.0,
            ])?;
            for (ns, dev, net, host) in [a, b] {
                for family in [Family::V4, Family::V6] {
                    let addr = family.with_len(&family.addr(net, host));
                    let mut args = vec!["-n", ns, "addr", "add", &addr, "dev", dev];
                    if family == Family::V6 {
                        args.push("nodad");
                    }
                    ip(&args)?;
                }
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
        }
        for ns in [&path.router_c, &path.node, &path.router_b] {
            run(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            run(ns, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        for family in [Family::V4, Family::V6] {
            let f = family.flag();
            ip(&[
                f,
                "-n",
                &path.client,
                "route",
                "add",
                "default",
                "via",
                &family.addr(3, 1),
            ])?;
            ip(&[
                f,
                "-n",
                &path.broker,
                "route",
                "add",
                "default",
                "via",
                &family.addr(4, 1),
            ])?;
            ip(&[
                f,
                "-n",
                &path.node,
                "route",
                "add",
                &family.prefix(3),
                "via",
                &family.addr(1, 254),
            ])?;
            ip(&[
                f,
                "-n",
                &path.node,
                "route",
                "add",
                &family.prefix(4),
                "via",
                &family.addr(2, 254),
            ])?;
        }
        Ok(path)
    }

    fn namespaces(&self) -> [&String; 5] {
        [
            &self.client,
            &self.router_c,
            &self.node,
            &self.router_b,
            &self.broker,
        ]
    }

    /// What `--attach xdp` on the node needs from the routers' node-facing veths, as
    /// `Attach::topology` does for the hosts: GRO on, so frames XDP redirects into them
    /// are delivered, and full checksums on what they send to the node.
    fn deliver_xdp_redirects(&self) {
        for (ns, dev) in [(&self.router_c, "r1"), (&self.router_b, "s0")] {
            run(
                ns,
                "ethtool",
                &["-K", dev, "gro", "on", "tx", "off", "rx", "off"],
            );
        }
    }

    /// Narrows `dev` in `ns` to NARROW_MTU.
    fn narrow(&self, ns: &str, dev: &str) {
        ip(&["-n", ns, "link", "set", dev, "mtu", NARROW_MTU]).unwrap();
    }

    /// The path MTU `ns`'s route cache holds towards `to`, if it learned one.
    fn learned_mtu(&self, ns: &str, family: Family, to: &str) -> Option<u32> {
        let route = run(ns, "ip", &[family.flag(), "route", "get", to]);
        let mut words = route.split_whitespace();
        words.find(|w| *w == "mtu")?;
        words.next()?.parse().ok()
    }
}

impl Drop for RoutedPath {
    fn drop(&mut self) {
        self.tansu.clear();
        for ns in self.namespaces() {
            remove_namespace(ns);
        }
    }
}

/// A tansu broker on the broker host and `kpscd portmap` serving it on the node's
/// FIRST_PORT, every node address, under `attach`.
fn broker_behind_portmap(family: Family, attach: Attach) -> (RoutedPath, Kpscd) {
    let mut path = RoutedPath::new().unwrap();
    if attach == Attach::Xdp {
        path.deliver_xdp_redirects();
    }
    let advertised = family.endpoint(&family.node(), FIRST_PORT);
    let tansu = start_tansu_in(
        &path.broker,
        &family.endpoint(&family.broker(), BROKER_PORT),
        &advertised,
        "cluster-icmp",
    )
    .unwrap();
    path.tansu.push(tansu);
    let any = match family {
        Family::V4 => "0.0.0.0",
        Family::V6 => "::",
    };
    let mapping = format!(
        "{},{},{advertised}",
        family.endpoint(&family.broker(), BROKER_PORT),
        family.endpoint(any, FIRST_PORT)
    );
    let args = portmap_command(&path.node, "n0,n1", &[mapping], &attach.args());
    let kpscd = Kpscd::spawn_mode(&args, Some(&path.node)).unwrap();
    kpscd.wait_ready(Duration::from_secs(20)).unwrap();
    (path, kpscd)
}

fn bootstrap(family: Family) -> String {
    family.endpoint(&family.node(), FIRST_PORT)
}

/// Produces one RECORD_BYTES record (acks=all) from the client host; Err unless the
/// broker acknowledged it within TRANSFER_TIMEOUT.
fn produce_large(path: &RoutedPath, family: Family, topic: &str) -> anyhow::Result<()> {
    let bootstrap = bootstrap(family);
    in_netns(&path.client, || {
        create_topic(&bootstrap, topic, 1)?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                TRANSFER_TIMEOUT.as_millis().to_string(),
            )
            .create()?;
        let value = vec![b'p'; RECORD_BYTES];
        let record = FutureRecord::<(), _>::to(topic)
            .partition(0)
            .payload(&value);
        let delivered = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(producer.send(record, Timeout::Never));
        delivered.map_err(|(e, _)| anyhow::anyhow!("not acknowledged: {e}"))?;
        Ok(())
    })?
}

/// Fetches the record back from the client host on a new connection; Err when it does
/// not arrive within TRANSFER_TIMEOUT.
fn fetch_large(path: &RoutedPath, family: Family, topic: &str) -> anyhow::Result<()> {
    let bootstrap = bootstrap(family);
    in_netns(&path.client, || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "unused")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let len = m?.payload().map_or(0, <[u8]>::len);
                anyhow::ensure!(len == RECORD_BYTES, "fetched {len} bytes");
                return Ok(());
            }
        }
        anyhow::bail!("no record within {TRANSFER_TIMEOUT:?}")
    })?
}

/// `kpscctl maps --json`'s ICMP counters.
fn icmp_counters(path: &RoutedPath) -> serde_json::Value {
    kpsc_tests::portmap::kpscctl_maps_json(&path.node)["icmp_errors"].clone()
}

/// The receiving host's ICMP counters: errors arrived, none with a bad checksum.
fn assert_icmp_received(ns: &str, family: Family) {
    let (received, bad) = match family {
        Family::V4 => ("IcmpInDestUnreachs", "IcmpInCsumErrors"),
        Family::V6 => ("Icmp6InPktTooBigs", "Icmp6InCsumErrors"),
    };
    let counter = |name: &str| kpsc_tests::netns::snmp_counter(ns, name).unwrap();
    assert!(counter(received) >= 1, "{ns}: no {received}");
    assert_eq!(counter(bad), 0, "{ns}: {bad}");
}

/// After a transfer through a narrowed link: it completed, the sender (`learner`, in its
/// namespace) learned MTU 1280 towards the node's address `towards`, it received the
/// errors with right checksums, and kpscd counted them in `direction` (kpscctl and
/// /metrics) and dropped none. Returns kpscctl's ICMP counters.
fn assert_path_mtu_learned(
    path: &RoutedPath,
    kpscd: &Kpscd,
    family: Family,
    (transfer, started): (anyhow::Result<()>, Instant),
    (learner, towards): (&str, &str),
    direction: &str,
) -> serde_json::Value {
    assert!(
        transfer.is_ok(),
        "{family:?}: {transfer:?} after {:?}\nkpscd log:\n{}",
        started.elapsed(),
        kpscd.log()
    );
    let mtu = path.learned_mtu(learner, family, towards);
    assert_eq!(mtu, Some(1280), "{family:?}: {learner}'s route cache");
    assert_icmp_received(learner, family);
    let icmp = icmp_counters(path);
    assert!(icmp[direction].as_u64() >= Some(1), "{icmp}");
    assert_eq!(icmp["dropped"], 0, "{icmp}");
    let label = format!("direction=\"{direction}\"");
    let metric = kpscd.metric("kpsc_portmap_icmp_errors_total", &label);
    assert!(metric >= 1.0, "{direction} = {metric}");
    icmp
}

/// A router between node and broker narrows its broker-side link: its errors go to the
/// node's SNAT address, are translated to the client, which learns the path MTU towards
/// the node's listen address, and the large produce completes.
fn produce_through_narrow_broker_side_link(family: Family, attach: Attach) {
    let (path, kpscd) = broker_behind_portmap(family, attach);
    path.narrow(&path.router_b, "s1");
    let started = Instant::now();
    let produced = produce_large(&path, family, "pmtu-produce");
    let icmp = assert_path_mtu_learned(
        &path,
        &kpscd,
        family,
        (produced, started),
        (&path.client, &family.node()),
        "to_client",
    );
    let table = kpsc_tests::portmap::kpscctl_maps(&path.node, &[]);
    let line = format!(
        "ICMP errors about flows translated: {} to clients",
        icmp["to_client"]
    );
    assert!(table.contains(&line), "{table}");
    // Nothing about the broker-side network reached the client: the error came from the
    // node's listen address.
    assert!(
        path.learned_mtu(&path.client, family, &family.addr(2, 254))
            .is_none()
    );
}

/// A router between client and node narrows its client-side link after the record is
/// in: the fetch's large segments from the broker fail there, the errors go to the node's
/// listen address, are translated to the broker, which learns the path MTU towards the
/// node's SNAT address, and the fetch completes.
fn fetch_through_narrow_client_side_link(family: Family) {
    let (path, kpscd) = broker_behind_portmap(family, Attach::Tc);
    produce_large(&path, family, "pmtu-fetch").unwrap();
    path.narrow(&path.router_c, "r0");
    let started = Instant::now();
    let fetched = fetch_large(&path, family, "pmtu-fetch");
    assert_path_mtu_learned(
        &path,
        &kpscd,
        family,
        (fetched, started),
        (&path.broker, &family.snat()),
        "to_broker",
    );
}

/// About 3 s each when PMTU discovery works (15 s to fail without it).
#[test]
fn ipv4_produce_through_a_narrow_link_behind_the_node() {
    produce_through_narrow_broker_side_link(Family::V4, Attach::Tc);
}

#[test]
fn ipv6_produce_through_a_narrow_link_behind_the_node() {
    produce_through_narrow_broker_side_link(Family::V6, Attach::Tc);
}

/// Under `--attach xdp`, XDP passes the error up and TC translates it. About 2 s.
#[test]
fn xdp_ipv4_produce_through_a_narrow_link_behind_the_node() {
    produce_through_narrow_broker_side_link(Family::V4, Attach::Xdp);
}

#[test]
fn ipv4_fetch_through_a_narrow_link_before_the_node() {
    fetch_through_narrow_client_side_link(Family::V4);
}

#[test]
fn ipv6_fetch_through_a_narrow_link_before_the_node() {
    fetch_through_narrow_client_side_link(Family::V6);
}

/// A handshake the broker side refuses: router B holds a "prohibit" route to the broker
/// and answers the translated SYN with a destination unreachable (administratively
/// prohibited) to the node's SNAT address. The error belongs to a half-open flow and
/// reaches the client, whose connect fails with it instead of timing out: on the first
/// SYN's error, or on the retransmitted SYN's (1 s later) when the first error arrived
/// while `connect` still held the socket (the client's stack drops it then, counted as
/// TcpExtLockDroppedIcmps: the translation is that fast).
fn refused_handshake_fails_fast(family: Family) {
    let (path, kpscd) = broker_behind_portmap(family, Attach::Tc);
    let host = match family {
        Family::V4 => format!("{}/32", family.broker()),
        Family::V6 => format!("{}/128", family.broker()),
    };
    ip(&[
        family.flag(),
        "-n",
        &path.router_b,
        "route",
        "add",
        "prohibit",
        &host,
    ])
    .unwrap();
    let timeout = Duration::from_secs(5);
    let started = Instant::now();
    let connected = in_netns(&path.client, || {
        connect_to(
            family.endpoint(&family.addr(3, 2), 0).parse().unwrap(),
            bootstrap(family).parse().unwrap(),
            timeout,
        )
        .map(drop)
    })
    .unwrap();
    let elapsed = started.elapsed();
    let error = format!(
        "{:#}",
        connected.expect_err("connected through a prohibit route")
    );
    assert!(
        elapsed < Duration::from_millis(2500) && !error.contains("timed out"),
        "{family:?}: {error} after {elapsed:?}\nkpscd log:\n{}",
        kpscd.log()
    );
    let icmp = icmp_counters(&path);
    assert!(icmp["to_client"].as_u64() >= Some(1), "{icmp}");
}

/// About 1-2 s each (5 s to fail without the translation).
#[test]
fn ipv4_refused_handshake_reaches_the_client() {
    refused_handshake_fails_fast(Family::V4);
}

#[test]
fn ipv6_refused_handshake_reaches_the_client() {
    refused_handshake_fails_fast(Family::V6);
}

/// Pins left by the version before the ICMP counter and `--snat-address` (SIGKILL, then
/// those two maps' pins removed) are still reused: the flow open across the restart keeps
/// its translation, and the new maps are created next to the old ones. About 3 s.
#[test]
fn pins_without_the_icmp_and_snat_maps_are_reused() {
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let args = portmap_args(&topo, &[mapping(0)], &[]);
    let first = start_portmap(&topo, &args);
    let mut conn = in_netns(&topo.client, || {
        connect_from(0, FIRST_PORT, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    assert_eq!(cluster_id(&mut conn).unwrap(), "cluster-0");
    first.signal(libc::SIGKILL);
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(!first.alive());
        Ok(())
    })
    .unwrap();
    drop(first);
    let new_pins = [ICMP_MAP, SNAT_MAP].map(|name| pins(&topo).join(name));
    for pin in &new_pins {
        std::fs::remove_file(pin).unwrap();
    }
    let second = start_portmap(&topo, &args);
    assert!(
        second.log().contains("reusing pinned maps"),
        "{}",
        second.log()
    );
    for pin in &new_pins {
        assert!(pin.exists(), "{} not created", pin.display());
    }
    assert_eq!(
        cluster_id(&mut conn).unwrap_or_else(|e| panic!("{e:#}\n{}", second.log())),
        "cluster-0"
    );
}

/// TCP checksums seen on the client's interface: of the client's segments to the node
/// (by sequence number: a retransmission carries other timestamps, so another checksum),
/// and of the segments quoted in the ICMP errors it received.
#[derive(Default)]
struct Checksums {
    sent: std::collections::HashMap<u32, Vec<u16>>,
    quoted: Vec<(u32, u16)>,
}

/// Records `Checksums` from every frame on `dev` in `ns` (an AF_PACKET socket) until
/// `stop` is set.
fn capture_checksums(ns: &str, dev: &str, stop: &AtomicBool) -> anyhow::Result<Checksums> {
    kpsc_tests::netns::enter(ns)?;
    // SAFETY: plain socket calls on a descriptor this function owns (closed by OwnedFd);
    // buffers outlive the calls and their lengths are passed.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    anyhow::ensure!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just opened, owned from here on.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: see above.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no {dev} in {ns}");
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: see above.
    unsafe {
        anyhow::ensure!(
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) == 0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let mut seen = Checksums::default();
    let mut frame = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: see above.
        let n = unsafe { libc::recv(raw, frame.as_mut_ptr().cast(), frame.len(), 0) };
        if n > 0 {
            record_checksums(&frame[..n as usize], &mut seen);
        }
    }
    Ok(seen)
}

/// One Ethernet frame: an IPv4 TCP segment from the client to the node's FIRST_PORT, or
/// an ICMPv4 "fragmentation needed" quoting one.
fn record_checksums(frame: &[u8], seen: &mut Checksums) {
    let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    if u16_at(frame, 12) != Some(0x0800) || frame.len() < 34 {
        return;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    match ip[9] {
        6 if u16_at(ip, ihl + 2) == Some(FIRST_PORT) => {
            if let (Some(seq), Some(csum)) = (u32_at(ip, ihl + 4), u16_at(ip, ihl + 16)) {
                seen.sent.entry(seq).or_default().push(csum);
            }
        }
        1 if ip.get(ihl..ihl + 2) == Some(&[3, 4]) => {
            let inner = &ip[ihl + 8..];
            let Some(first) = inner.first() else { return };
            let inner_ihl = usize::from(first & 0x0f) * 4;
            if let (Some(seq), Some(csum)) =
                (u32_at(inner, inner_ihl + 4), u16_at(inner, inner_ihl + 16))
            {
                seen.quoted.push((seq, csum));
            }
        }
        _ => {}
    }
}

/// The TCP checksum quoted in a translated error is the client's own: the node changed it
/// on the way to the broker for the new addresses and ports, and the translation of the
/// error changes it back. The client sends full checksums here (offload off), so the
/// quoted one is comparable. About 1 s.
#[test]
fn ipv4_quoted_tcp_checksum_comes_back_as_the_client_sent_it() {
    let (path, kpscd) = broker_behind_portmap(Family::V4, Attach::Tc);
    run(&path.client, "ethtool", &["-K", "c0", "tx", "off"]);
    path.narrow(&path.router_b, "s1");
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|scope| {
        let capture = scope.spawn(|| capture_checksums(&path.client, "c0", &stop));
        // The capture socket is bound within a few milliseconds; the produce's large
        // segments come after the topic is created.
        let produced = produce_large(&path, Family::V4, "pmtu-checksum");
        stop.store(true, Ordering::SeqCst);
        produced.unwrap_or_else(|e| panic!("{e:#}\n{}", kpscd.log()));
        capture.join().unwrap().unwrap()
    });
    let matched: Vec<(u32, u16, &Vec<u16>)> = seen
        .quoted
        .iter()
        .filter_map(|(seq, quoted)| Some((*seq, *quoted, seen.sent.get(seq)?)))
        .collect();
    assert!(
        !matched.is_empty(),
        "no quoted segment matched a sent one: {} quoted, {} sent",
        seen.quoted.len(),
        seen.sent.len()
    );
    for (seq, quoted, sent) in matched {
        assert!(
            sent.contains(&quoted),
            "segment {seq}: quoted {quoted:#06x}, sent {sent:x?}"
        );
    }
}
