//! `kpscd portmap` over IPv6, in namespaces with real TCP stacks and tansu brokers
//! listening and advertising on IPv6 (2001:2::/48): end to end with rdkafka under both
//! hooks, clients on mapped source ports, `--allow-source` with IPv6 and IPv4 prefixes in
//! one list next to an IPv4 mapping, extension headers before TCP, SIGKILL, the refusal of
//! mappings between families, and a SYN flood against the per-/64 SYN budget.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use kpsc_tests::{
    RawClient, create_topic,
    datapath::PinnedMaps,
    kpscd_bin,
    netns::{NODE_CLIENT_IP6, Topology, in_netns},
    portmap::{
        Attach, FIRST_PORT, Family, cluster_id, connect_family,
        every_mapped_source_port_connects_over, pins, portmap_args, produce_and_consume,
        start_portmap,
    },
};

const V6: Family = Family::V6;

/// One IPv6 tansu broker behind `[::]:FIRST_PORT`, under `attach`, every segment carrying
/// a software checksum the receiving stack verifies (for XDP also what its veths need).
fn one_v6_broker(attach: Attach) -> (Topology, kpsc_tests::Kpscd) {
    one_v6_broker_with(attach, &[])
}

/// [`one_v6_broker`] with `extra` kpscd arguments.
fn one_v6_broker_with(attach: Attach, extra: &[&str]) -> (Topology, kpsc_tests::Kpscd) {
    let mut topo = match attach {
        Attach::Tc => Topology::without_checksum_offload(1, 1).unwrap(),
        Attach::Xdp => attach.topology(1, 1).unwrap(),
    };
    V6.start_broker(&mut topo, 0).unwrap();
    let mut args = attach.args().to_vec();
    args.extend_from_slice(extra);
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[V6.mapping_on(0, V6.any())], &args),
    );
    (topo, kpscd)
}

/// XDP redirects the node's veths counted so far.
fn xdp_redirects(topo: &Topology) -> u64 {
    ["n0", "n1"]
        .iter()
        .map(|dev| topo.nic_counter(&topo.node, dev, "xdp_redirect").unwrap())
        .sum()
}

/// rdkafka over IPv6 end to end: every record comes back in order, no segment arrived
/// with a bad checksum (the TCP pseudo-header holds the 128-bit addresses), the kernel
/// counted the flows with their IPv6 tuples, and `kpscctl maps` prints them bracketed.
fn end_to_end(attach: Attach) {
    let (topo, kpscd) = one_v6_broker(attach);
    let redirects_before = xdp_redirects(&topo);
    const N: usize = 200;
    let bootstrap = V6.endpoint(NODE_CLIENT_IP6, FIRST_PORT);
    let got = produce_and_consume(&topo.client, &bootstrap, "v6", N);
    assert_eq!(got.len(), N, "{attach:?}: kpscd log:\n{}", kpscd.log());
    for (i, v) in got.iter().enumerate() {
        assert!(v.starts_with(&format!("message-{i}-")), "{v}");
    }
    for ns in [&topo.client, &topo.broker] {
        assert_eq!(topo.counter(ns, "TcpInCsumErrors").unwrap(), 0, "{ns}");
    }
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    assert!(stats.new_flows >= 2, "{attach:?}: {stats:?}");
    assert!(stats.bytes_in > (N * 200) as u64, "{attach:?}: {stats:?}");
    assert_eq!(stats.dropped(), 0, "{attach:?}: {stats:?}");
    let client: IpAddr = V6.client(0).parse().unwrap();
    let broker: IpAddr = V6.broker(0).parse().unwrap();
    assert!(
        maps.flows().iter().all(|(k, f)| {
            kpsc_common::ip_addr(&k.src_ip) == client
                && kpsc_common::ip_addr(&f.translated.dst_ip) == broker
        }),
        "{:?}",
        maps.flows()
    );
    let ctl = kpsc_tests::portmap::kpscctl_maps_json(&topo.node);
    assert_eq!(
        ctl["ports"][0]["broker"],
        format!("[{}]:{}", V6.broker(0), kpsc_tests::portmap::BROKER_PORT),
        "{ctl}"
    );
    let first = &ctl["flows"][0]["client"];
    assert!(
        first
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("[{}]:", V6.client(0)))),
        "{ctl}"
    );
    let redirected = xdp_redirects(&topo) - redirects_before;
    match attach {
        // XDP carried most frames; TC what XDP passed up (e.g. before a neighbour resolved).
        Attach::Xdp => assert!(
            2 * redirected >= stats.packets_in + stats.packets_out,
            "XDP redirected only {redirected}: {stats:?}"
        ),
        Attach::Tc => assert_eq!(redirected, 0),
    }
}

/// About 4 s.
#[test]
fn tc_ipv6_produce_and_consume_end_to_end() {
    end_to_end(Attach::Tc);
}

/// About 4 s.
#[test]
fn xdp_ipv6_produce_and_consume_end_to_end() {
    end_to_end(Attach::Xdp);
}

/// Every mapped port as source port, to every mapped port, over IPv6 (with checksum
/// offload on under TC: the GSO and CHECKSUM_PARTIAL path). About 3 s each.
#[test]
fn tc_ipv6_clients_on_mapped_source_ports_connect_to_a_wildcard_listener() {
    every_mapped_source_port_connects_over(V6, V6.any(), Attach::Tc);
}

#[test]
fn tc_ipv6_clients_on_mapped_source_ports_connect_to_a_specific_listener() {
    every_mapped_source_port_connects_over(V6, NODE_CLIENT_IP6, Attach::Tc);
}

#[test]
fn xdp_ipv6_clients_on_mapped_source_ports_connect_to_a_wildcard_listener() {
    every_mapped_source_port_connects_over(V6, V6.any(), Attach::Xdp);
}

/// The cluster id behind `[node]:port` for a client at `src` of `family`, or the error.
fn reaches(topo: &Topology, family: Family, src: &str, port: u16) -> anyhow::Result<String> {
    in_netns(&topo.client, || {
        let mut conn = connect_family(family, src, 0, port, Duration::from_secs(2))?;
        cluster_id(&mut conn)
    })?
}

/// One list with an IPv6 and an IPv4 prefix, in front of an IPv6 and an IPv4 mapping:
/// each family's clients inside their prefix connect, the others' SYNs are dropped and
/// counted, and a mapped port answers only its own family. About 8 s (two connects time
/// out).
#[test]
fn allow_source_with_ipv6_and_ipv4_prefixes() {
    let mut topo = Topology::new(3, 2).unwrap();
    V6.start_broker(&mut topo, 0).unwrap();
    Family::V4.start_broker(&mut topo, 1).unwrap();
    let v4_port = FIRST_PORT + 1;
    // ::4/126 holds client 2 (::4), not clients 0 and 1 (::2, ::3).
    let args = portmap_args(
        &topo,
        &[
            V6.mapping_on(0, V6.any()),
            Family::V4.mapping_on(1, "0.0.0.0"),
        ],
        &[
            "--allow-source",
            "2001:2:0:1::4/126",
            "--allow-source",
            &format!("{}/32", Family::V4.client(1)),
        ],
    );
    let kpscd = start_portmap(&topo, &args);
    assert_eq!(
        reaches(&topo, V6, &V6.client(2), FIRST_PORT).unwrap(),
        "cluster-0"
    );
    let denied = reaches(&topo, V6, &V6.client(0), FIRST_PORT);
    assert!(denied.is_err(), "{denied:?}");
    assert_eq!(
        reaches(&topo, Family::V4, &Family::V4.client(1), v4_port).unwrap(),
        "cluster-1"
    );
    let denied = reaches(&topo, Family::V4, &Family::V4.client(0), v4_port);
    assert!(denied.is_err(), "{denied:?}");
    // The IPv4 port does not answer IPv6 clients, nor the IPv6 port IPv4 ones: the
    // packets are not the program's, and no process listens on the node.
    assert!(reaches(&topo, V6, &V6.client(2), v4_port).is_err());
    assert!(reaches(&topo, Family::V4, &Family::V4.client(1), FIRST_PORT).is_err());
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let (v6, v4) = (maps.stats(FIRST_PORT), maps.stats(v4_port));
    assert!(v6.drop_source_denied >= 1, "{v6:?}");
    assert!(v4.drop_source_denied >= 1, "{v4:?}");
    assert_eq!((v6.new_flows, v4.new_flows), (1, 1), "{v6:?} {v4:?}");
    let metric = kpscd.metric("kpsc_portmap_drops_total", "reason=\"source_denied\"");
    assert!(metric >= 2.0, "source_denied = {metric}\n{}", kpscd.log());
}

/// IPV6_DSTOPTS: a Destination Options header (one PadN option, 8 bytes) before TCP on
/// every segment the client sends.
const DSTOPTS: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];

/// A client whose every segment carries a Destination Options header before TCP: the
/// program walks it and translates as usual (were it passed to the node's stack, the
/// SYN would meet no listener and be refused). About 2 s each.
fn extension_headers_are_walked(attach: Attach) {
    let (topo, kpscd) = one_v6_broker(attach);
    let id = in_netns(&topo.client, || {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
        // SAFETY: a valid socket and an 8-byte buffer that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_DSTOPTS,
                DSTOPTS.as_ptr().cast(),
                DSTOPTS.len() as libc::socklen_t,
            )
        };
        anyhow::ensure!(rc == 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        let remote: SocketAddr = V6.endpoint(NODE_CLIENT_IP6, FIRST_PORT).parse()?;
        socket.connect_timeout(&remote.into(), Duration::from_secs(3))?;
        let mut conn = RawClient::from_stream(socket.into())?;
        cluster_id(&mut conn)
    })
    .unwrap();
    assert_eq!(
        id.unwrap_or_else(|e| panic!("{attach:?}: {e:#}\n{}", kpscd.log())),
        "cluster-0"
    );
    let stats = PinnedMaps::open(&pins(&topo)).unwrap().stats(FIRST_PORT);
    assert_eq!(stats.new_flows, 1, "{stats:?}");
    assert_eq!(topo.counter(&topo.broker, "TcpInCsumErrors").unwrap(), 0);
}

#[test]
fn tc_ipv6_extension_headers_before_tcp_are_walked() {
    extension_headers_are_walked(Attach::Tc);
}

#[test]
fn xdp_ipv6_extension_headers_before_tcp_are_walked() {
    extension_headers_are_walked(Attach::Xdp);
}

/// SIGKILL under XDP with an IPv6 mapping: nothing stays attached (bpf links), and the
/// next start reuses the pins and translates IPv6 again. About 3 s.
#[test]
fn ipv6_sigkill_leaves_nothing_attached_and_restarts() {
    let (topo, kpscd) = one_v6_broker(Attach::Xdp);
    let attached = |dev: &str| {
        topo.run(&topo.node, "ip", &["-d", "link", "show", dev])
            .unwrap()
            .contains("prog/xdp")
    };
    assert!(attached("n0") && attached("n1"));
    kpscd.signal(libc::SIGKILL);
    kpsc_tests::eventually(Duration::from_secs(5), || {
        anyhow::ensure!(!attached("n0") && !attached("n1"));
        let tcx = in_netns(&topo.node, || {
            ["n0", "n1"]
                .iter()
                .map(|dev| {
                    let (_, programs) =
                        SchedClassifier::query_tcx(dev, TcAttachType::Ingress).unwrap();
                    programs.len()
                })
                .sum::<usize>()
        })?;
        anyhow::ensure!(tcx == 0, "{tcx} tcx programs left");
        Ok(())
    })
    .expect("still attached after SIGKILL");
    drop(kpscd);
    let args = portmap_args(&topo, &[V6.mapping_on(0, V6.any())], &Attach::Xdp.args());
    let kpscd = start_portmap(&topo, &args);
    let id = reaches(&topo, V6, &V6.client(0), FIRST_PORT);
    assert_eq!(
        id.unwrap_or_else(|e| panic!("{e:#}\n{}", kpscd.log())),
        "cluster-0"
    );
}

/// The IPv6 flood's sources: even packets from distinct addresses inside ONE /64
/// (2001:2:0:ff00::/64), odd ones each from a /64 of its own (2001:2:0:1000::/64 on). None
/// is in the client's or the broker's /64, so the node has no route back to them.
fn v6_flood_source(i: u32) -> std::net::Ipv6Addr {
    let (one_64, own_64) = (
        0x2001_0002_0000_ff00u128 << 64,
        0x2001_0002_0000_1000u128 << 64,
    );
    if i.is_multiple_of(2) {
        // Scattered over the /64's 64 host bits (odd multiplier: distinct per i).
        std::net::Ipv6Addr::from(
            one_64 | u128::from((u64::from(i / 2) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        )
    } else {
        std::net::Ipv6Addr::from(own_64 + (u128::from(i / 2) << 64) + 1)
    }
}

/// A SYN flood over IPv6 against a small `--syn-rate-per-source`, while a long-lived IPv6
/// connection produces and new IPv6 clients connect (during and after, as the IPv4 flood
/// test): the SYN budget belongs to a source's /64, so 10,000 addresses inside one /64
/// share one budget (all but RATE per second dropped, `source_limit`), while 10,000
/// sources in as many /64s each open their half-open flow. No spoofed source ends up
/// established. Under XDP, XDP itself sent or dropped every flood SYN.
fn ipv6_syn_flood(attach: Attach) {
    use kpsc_tests::{
        flood::{clients_connect_after_flood, flood_while_streaming},
        portmap::XdpVerdicts,
        syn_flood,
    };

    const RATE: u64 = 20;
    const SYNS: u32 = 20_000;
    const ONE_64: u64 = SYNS as u64 / 2;
    const OWN_64S: u64 = SYNS as u64 / 2;
    let (topo, kpscd) = one_v6_broker_with(attach, &["--syn-rate-per-source", &RATE.to_string()]);
    let bootstrap = V6.endpoint(NODE_CLIENT_IP6, FIRST_PORT);
    let topic = "v6-flood";
    in_netns(&topo.client, || create_topic(&bootstrap, topic, 1))
        .unwrap()
        .unwrap();
    let mut stream = in_netns(&topo.client, || RawClient::connect(&bootstrap))
        .unwrap()
        .unwrap();
    kpsc_tests::portmap::produce_one(&mut stream, topic, b"before the flood").unwrap();
    let xdp_before = XdpVerdicts::read(&topo, "n0");
    // Under XDP a veth drops what overflows its receive ring before the program runs,
    // counted as the sending end's tx_dropped: SYNs the program never saw.
    let ring_drops = || -> u64 {
        topo.run(
            &topo.client,
            "cat",
            &["/sys/class/net/c0/statistics/tx_dropped"],
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    };
    let ring_drops_before = ring_drops();
    let node: std::net::Ipv6Addr = NODE_CLIENT_IP6.parse().unwrap();
    let run = flood_while_streaming(&topo.client, &mut stream, &bootstrap, topic, || {
        syn_flood::flood(
            node,
            FIRST_PORT,
            SYNS,
            Duration::from_secs(3),
            v6_flood_source,
        )
    });
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    let xdp = XdpVerdicts::read(&topo, "n0").since(xdp_before);
    let lost = ring_drops() - ring_drops_before;
    eprintln!("{attach:?}: {stats:?}; XDP on n0: {xdp:?}; lost in the veth ring: {lost}");
    assert_eq!(run.sent, SYNS);
    // The /64's budget: RATE per window of a second; a window opens at the first SYN a
    // second after the last one opened, so a flood of `took` opens floor(took) + 1 or
    // fewer, at least floor(took). One window more is allowed for two CPUs counting at
    // once (the budget is approximate by design).
    // SYNs lost in the veth ring (XDP only) were neither opened nor dropped by the
    // program: up to `lost` of the one /64's SYNs look accepted below.
    let whole_seconds = run.took.as_secs();
    let from_one_64 = ONE_64
        .checked_sub(stats.drop_source_limit)
        .unwrap_or_else(|| {
            panic!("more SYNs dropped for their source than the one /64 sent: {stats:?}")
        });
    assert!(
        from_one_64 >= RATE * whole_seconds.max(1)
            && from_one_64.saturating_sub(lost) <= RATE * (whole_seconds + 2),
        "{attach:?}: the one /64 opened {from_one_64} half-open flows (up to {lost} of them \
         lost in the veth ring instead) in {:?} at --syn-rate-per-source {RATE}: {stats:?}",
        run.took
    );
    // Every SYN from a /64 of its own opened its flow (with the one /64's and the real
    // clients'); every flood SYN was either a half-open flow or a budget drop, unless the
    // veth ring lost it.
    assert!(
        stats.embryos + lost >= OWN_64S + from_one_64.saturating_sub(lost),
        "{stats:?}"
    );
    assert!(
        stats.embryos + stats.drop_source_limit + lost >= u64::from(SYNS),
        "{stats:?}, {lost} lost in the veth ring"
    );
    assert!(
        lost < u64::from(SYNS) / 20,
        "{lost} SYNs lost in the veth ring"
    );
    let client: IpAddr = V6.client(0).parse().unwrap();
    let spoofed: Vec<_> = maps
        .flows()
        .into_iter()
        .filter(|(k, _)| kpsc_common::ip_addr(&k.src_ip) != client)
        .collect();
    assert!(
        spoofed.is_empty(),
        "spoofed sources established: {spoofed:?}"
    );
    // Under XDP, every SYN the program counted was sent or dropped by XDP itself.
    match attach {
        Attach::Xdp => assert!(
            xdp.done >= stats.embryos + stats.drop_source_limit && xdp.passed <= 1_000,
            "XDP did not take the flood: {xdp:?}, {stats:?}"
        ),
        Attach::Tc => assert_eq!(xdp.done + xdp.passed, 0, "XDP under --attach tc"),
    }
    clients_connect_after_flood(&topo.client, &mut stream, &bootstrap, topic);
    assert!(kpscd.alive(), "log:\n{}", kpscd.log());
}

/// About 5 s.
#[test]
fn tc_ipv6_syn_flood_budgets_each_source_64() {
    ipv6_syn_flood(Attach::Tc);
}

/// About 5 s.
#[test]
fn xdp_ipv6_syn_flood_budgets_each_source_64() {
    ipv6_syn_flood(Attach::Xdp);
}

/// A mapping between families (NAT46/NAT64) is a configuration error naming the flag.
#[test]
fn mappings_between_ip_families_are_refused() {
    for mapping in [
        "198.18.2.2:39092,[::]:9093,x:9093",
        "[2001:2:0:2::2]:39092,0.0.0.0:9093,x:9093",
        "[2001:2:0:2::2]:39092,198.18.1.1:9093,x:9093",
    ] {
        let out = Command::new(kpscd_bin())
            .args([
                "portmap",
                "--bootstrap-server-mapping",
                mapping,
                "--interface",
                "lo",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{mapping}: {stderr}");
        assert!(
            stderr.contains("--bootstrap-server-mapping") && stderr.contains("IPv4 and IPv6"),
            "{mapping}: {stderr}"
        );
    }
}
