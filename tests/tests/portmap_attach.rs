//! `kpscd portmap --attach tc|xdp`: the flow cases that matter run under both hooks, in
//! namespaces with real TCP stacks and tansu brokers. Under XDP the test also reads the
//! node veths' XDP counters, so a pass that silently fell back to TC fails it, and the
//! client's data arriving proves the redirected frames were delivered (a redirect into a
//! veth whose peer cannot receive XDP frames drops them without an error). A one-armed
//! node covers XDP_TX, the send back out of the receiving interface.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use kpsc_tests::{
    TansuHost,
    datapath::{FlowState, PinnedMaps},
    kpscd_bin,
    netns::{NODE_CLIENT_IP, client_ip, in_netns},
    portmap::{
        Attach, BROKER_PORT, FIRST_PORT, cluster_id, connect_bound,
        every_mapped_source_port_connects, mapping_on, pins, portmap_args, produce_one,
        start_portmap,
    },
};

/// XDP verdicts the node's veth took so far, summed over both interfaces.
fn xdp_redirects(topo: &kpsc_tests::netns::Topology) -> u64 {
    ["n0", "n1"]
        .iter()
        .map(|dev| {
            topo.nic_counter(&topo.node, dev, "xdp_redirect")
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .sum()
}

/// Connect, transfer (64 produce requests of 16 KiB each, so full-size segments both
/// ways), read back through the broker's metadata, close with FINs both ways: the flow
/// is counted, ends closed, and no segment arrived with a bad checksum. Under XDP, the
/// node's veths redirected at least one frame per request and response.
fn connect_transfer_close(attach: Attach) {
    let mut topo = attach.topology(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let args = portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &attach.args());
    let kpscd = start_portmap(&topo, &args);
    let redirects_before = xdp_redirects(&topo);
    let value = vec![0x5au8; 16 * 1024];
    const REQUESTS: u64 = 64;
    let src_port = in_netns(&topo.client, || {
        let mut conn = connect_bound(&client_ip(0), 0, FIRST_PORT, Duration::from_secs(3))?;
        for _ in 0..REQUESTS {
            produce_one(&mut conn, "attach", &value)?;
        }
        anyhow::ensure!(cluster_id(&mut conn)? == "cluster-0", "wrong broker");
        let port = conn.stream().local_addr()?.port();
        conn.stream().shutdown(std::net::Shutdown::Write)?;
        // The broker closes its side on our FIN: read to EOF.
        let mut rest = Vec::new();
        std::io::Read::read_to_end(conn.stream(), &mut rest)?;
        anyhow::Ok(port)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("{attach:?}: {e:#}\nlog:\n{}", kpscd.log()));

    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    assert_eq!(stats.new_flows, 1, "{attach:?}: {stats:?}");
    assert_eq!(stats.dropped(), 0, "{attach:?}: {stats:?}");
    assert!(
        stats.bytes_in >= REQUESTS * value.len() as u64,
        "{attach:?}: {stats:?}"
    );
    let flow = maps
        .flows()
        .into_iter()
        .find(|(k, _)| u16::from_be(k.src_port) == src_port)
        .unwrap_or_else(|| panic!("{attach:?}: no flow from port {src_port}"));
    assert_eq!(
        maps.flow_state(&flow.1),
        FlowState::Closed,
        "{attach:?}: {flow:?}"
    );
    for ns in [&topo.client, &topo.broker] {
        assert_eq!(
            topo.counter(ns, "TcpInCsumErrors").unwrap(),
            0,
            "{attach:?}"
        );
    }
    let redirected = xdp_redirects(&topo) - redirects_before;
    match attach {
        Attach::Xdp => assert!(
            redirected >= 2 * REQUESTS,
            "XDP redirected only {redirected} frames: {stats:?}"
        ),
        Attach::Tc => assert_eq!(redirected, 0, "no XDP program under --attach tc"),
    }
}

/// About 2 s.
#[test]
fn tc_connect_transfer_close() {
    connect_transfer_close(Attach::Tc);
}

/// About 2 s.
#[test]
fn xdp_connect_transfer_close() {
    connect_transfer_close(Attach::Xdp);
}

/// Replies to translated source ports that equal mapped ports, under XDP (the TC runs
/// are in portmap_flows.rs). About 3 s each.
#[test]
fn xdp_clients_on_mapped_source_ports_connect_to_a_wildcard_listener() {
    every_mapped_source_port_connects("0.0.0.0", Attach::Xdp);
}

#[test]
fn xdp_clients_on_mapped_source_ports_connect_to_a_specific_listener() {
    every_mapped_source_port_connects(NODE_CLIENT_IP, Attach::Xdp);
}

/// Whether `dev` in `ns` has an XDP program attached (`ip link` prints `prog/xdp`).
fn has_xdp(topo: &kpsc_tests::netns::Topology, dev: &str) -> bool {
    topo.run(&topo.node, "ip", &["-d", "link", "show", dev])
        .unwrap()
        .contains("prog/xdp")
}

/// XDP goes away with the process, even on SIGKILL (bpf links), and the next start
/// attaches again and translates. About 3 s.
#[test]
fn xdp_leaves_nothing_attached_after_sigkill_and_restarts() {
    let mut topo = Attach::Xdp.topology(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let args = portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &Attach::Xdp.args());
    let kpscd = start_portmap(&topo, &args);
    assert!(has_xdp(&topo, "n0") && has_xdp(&topo, "n1"));
    // SAFETY: a plain kill(2) of the kpscd this test started.
    unsafe { libc::kill(kpscd.pid() as i32, libc::SIGKILL) };
    kpsc_tests::eventually(Duration::from_secs(5), || {
        anyhow::ensure!(!has_xdp(&topo, "n0") && !has_xdp(&topo, "n1"));
        Ok(())
    })
    .expect("XDP still attached after SIGKILL");
    drop(kpscd);
    let kpscd = start_portmap(&topo, &args);
    assert!(has_xdp(&topo, "n0"), "{}", kpscd.log());
    let id = in_netns(&topo.client, || {
        let mut conn = connect_bound(&client_ip(0), 0, FIRST_PORT, Duration::from_secs(3))?;
        cluster_id(&mut conn)
    })
    .unwrap()
    .unwrap();
    assert_eq!(id, "cluster-0");
}

/// The one-armed node (client and broker on one segment, reached through the node's
/// single interface; see `one_armed`): rdkafka produces 300 records through portmap under
/// `--attach xdp` and consumes every one back, in order. The node's veth counters show
/// XDP sent the frames back out of the interface they came in on (XDP_TX), with no
/// transmit error and no DEVMAP redirect, and no segment arrived with a bad checksum.
/// About 2 s.
#[test]
fn xdp_tx_on_a_one_armed_node_carries_produce_and_consume() {
    use kpsc_tests::{
        netns::{broker_ip, client_ip},
        one_armed::make_one_armed,
        portmap::{connect_to, node_nic_counter, portmap_command, produce_and_consume},
    };

    let mut topo = Attach::Xdp.topology(1, 1).unwrap();
    let _switch = make_one_armed(&topo).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    // The client reaches the broker only through the node: no route between subnets.
    let direct = in_netns(&topo.client, || {
        connect_to(
            format!("{}:0", client_ip(0)).parse().unwrap(),
            format!("{}:{BROKER_PORT}", broker_ip(0)).parse().unwrap(),
            Duration::from_millis(500),
        )
    });
    assert!(
        direct.unwrap().is_err(),
        "the client reached the broker directly"
    );
    let args = portmap_command(
        &topo.node,
        "n0",
        &[mapping_on(0, "0.0.0.0")],
        &Attach::Xdp.args(),
    );
    let kpscd = start_portmap(&topo, &args);
    let counter = |suffix: &str| node_nic_counter(&topo, &["n0"], suffix);
    let (tx_before, redirect_before) = (counter("xdp_tx"), counter("xdp_redirect"));
    const N: usize = 300;
    let got = produce_and_consume(
        &topo.client,
        &format!("{NODE_CLIENT_IP}:{FIRST_PORT}"),
        "one-armed",
        N,
    );
    assert_eq!(got.len(), N, "kpscd log:\n{}", kpscd.log());
    for (i, v) in got.iter().enumerate() {
        assert!(v.starts_with(&format!("message-{i}-")), "{i}: {v}");
    }
    let stats = PinnedMaps::open(&pins(&topo)).unwrap().stats(FIRST_PORT);
    let sent_back = counter("xdp_tx") - tx_before;
    eprintln!("XDP_TX: {sent_back} frames; {stats:?}");
    assert!(stats.new_flows >= 2, "{stats:?}");
    assert_eq!(stats.dropped(), 0, "{stats:?}");
    // XDP carried most frames both ways; TC what XDP passed up (e.g. the first SYN-ACK,
    // before the node knew the client's MAC).
    assert!(
        2 * sent_back >= stats.packets_in + stats.packets_out,
        "XDP sent back only {sent_back} frames: {stats:?}"
    );
    assert_eq!(counter("xdp_tx_errors"), 0);
    assert_eq!(counter("xdp_redirect") - redirect_before, 0);
    for ns in [&topo.client, &topo.broker] {
        assert_eq!(topo.counter(ns, "TcpInCsumErrors").unwrap(), 0, "{ns}");
    }
}

/// An interface whose driver has no native XDP (a bridge): `--attach xdp` fails at start
/// naming the interface and the driver, and leaves nothing pinned. About 1 s.
#[test]
fn xdp_on_a_driver_without_native_xdp_is_a_clear_error() {
    let topo = Attach::Tc.topology(1, 1).unwrap();
    topo.run(&topo.node, "ip", &["link", "add", "xb0", "type", "bridge"])
        .unwrap();
    topo.run(&topo.node, "ip", &["link", "set", "xb0", "up"])
        .unwrap();
    let mut args = portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &Attach::Xdp.args());
    let at = args.iter().position(|a| a == "n0,n1").unwrap();
    args[at] = "xb0".into();
    args.push("--http-disable".into());
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.node])
        .arg(kpscd_bin())
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("interface xb0") && stderr.contains("driver bridge"),
        "{stderr}"
    );
    // The failed start cleaned up after itself (the TC attachment went with its link).
    assert!(!pins(&topo).exists(), "pins left behind: {stderr}");
}

/// Packets of mirred's action counter on the node's n0 ingress filter.
fn mirrored_packets(topo: &kpsc_tests::netns::Topology) -> u64 {
    let out = topo
        .run(
            &topo.node,
            "tc",
            &["-s", "filter", "show", "dev", "n0", "ingress"],
        )
        .unwrap();
    let sent = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Sent "))
        .unwrap_or_else(|| panic!("no action statistics in:\n{out}"));
    // "356 bytes 5 pkt (dropped 0, ...)"
    sent.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable statistics: {sent}"))
}

/// A packet that is not ours continues to whatever is attached after the program (tcx
/// returns it as TC_ACT_UNSPEC, "next"): a clsact filter behind it (u32 with a mirred
/// mirror, whose action counts packets) sees the client's SYNs to a port portmap does not
/// map, and none of a mapped flow's packets, which the program redirected. With TC_ACT_OK
/// the chain ended at portmap and the filter saw nothing. About 2 s.
#[test]
fn packets_that_are_not_ours_reach_the_next_tc_program() {
    let mut topo = Attach::Tc.topology(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let _kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &Attach::Tc.args()),
    );
    let node = topo.node.clone();
    let ip = |args: &[&str]| topo.run(&node, "ip", args).unwrap();
    ip(&["link", "add", "m0", "type", "veth", "peer", "name", "m1"]);
    ip(&["link", "set", "m0", "up"]);
    ip(&["link", "set", "m1", "up"]);
    topo.run(&node, "tc", &["qdisc", "add", "dev", "n0", "clsact"])
        .unwrap();
    topo.run(
        &node,
        "tc",
        &[
            "filter", "add", "dev", "n0", "ingress", "protocol", "ip", "u32", "match", "ip",
            "protocol", "6", "0xff", "action", "mirred", "egress", "mirror", "dev", "m0",
        ],
    )
    .unwrap();
    // A mapped flow: every one of its client packets is redirected by the program.
    let before = mirrored_packets(&topo);
    in_netns(&topo.client, || {
        let mut conn = connect_bound(&client_ip(0), 0, FIRST_PORT, Duration::from_secs(3))?;
        anyhow::ensure!(cluster_id(&mut conn)? == "cluster-0", "wrong broker");
        anyhow::Ok(())
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        mirrored_packets(&topo),
        before,
        "a translated packet went on"
    );
    // Not ours: SYNs to an unmapped port (the node's stack answers with RST).
    const SYNS: u64 = 5;
    in_netns(&topo.client, || {
        for _ in 0..SYNS {
            let refused = connect_bound(&client_ip(0), 0, 9, Duration::from_secs(3));
            assert!(refused.is_err(), "port 9 accepted");
        }
    })
    .unwrap();
    let seen = mirrored_packets(&topo) - before;
    assert!(seen >= SYNS, "the next filter saw {seen} of {SYNS} SYNs");
}
