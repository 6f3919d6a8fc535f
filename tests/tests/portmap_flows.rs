//! Flow tracking of `kpscd portmap` against what real networks send: clients on any
//! source port (a cloud endpoint's NAT picks them at random, mapped port numbers included)
//! and a SYN flood from spoofed sources while a long-lived connection streams (the flood and
//! the two-CPU SYN race under both hooks). The tests of crafted segments (the two-CPU race,
//! spoofed handshakes, forged SYN-ACKs, forged RST/FIN) are one body generic over the
//! address family, run over IPv4 and IPv6. Real kernels in namespaces, real tansu brokers.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use kpsc_tests::{
    RawClient, TansuHost, create_topic,
    flood::connect_within,
    flow_ip::FlowIp,
    netns::{NODE_CLIENT_IP, Topology, in_netns},
    portmap::{
        Attach, BROKER_PORT, FIRST_PORT, every_mapped_source_port_connects, mapping_on,
        one_broker_behind_portmap_over, one_broker_behind_portmap_with, portmap_args, produce_one,
        resolve_node_from_client, start_portmap,
    },
};

#[test]
fn clients_on_mapped_source_ports_connect_to_a_wildcard_listener() {
    every_mapped_source_port_connects("0.0.0.0", Attach::Tc);
}

#[test]
fn clients_on_mapped_source_ports_connect_to_a_specific_listener() {
    every_mapped_source_port_connects(NODE_CLIENT_IP, Attach::Tc);
}

/// 100,000 spoofed SYNs at the mapped port (half from 50,000 addresses, half from two, as
/// a flood from a few hosts looks) while one connection keeps producing through portmap:
/// that connection never errs and keeps its flow, and new clients connect during and after
/// the flood. Before half-open flows had their own table, the flood's SYNs took every
/// translated tuple (new clients locked out) or evicted the open connection. Under XDP,
/// the node's client-side veth counters show XDP itself sent or dropped every flood SYN
/// (none was passed up to TC).
fn syn_flood_while_a_connection_streams(attach: Attach) {
    use kpsc_tests::{
        datapath::PinnedMaps,
        flood::{clients_connect_after_flood, flood_while_streaming},
        portmap::{XdpVerdicts, pins},
        syn_flood,
    };

    const SYNS: u32 = 100_000;
    const FLOOD_TIME: Duration = Duration::from_secs(6);
    let (topo, kpscd) = one_broker_behind_portmap_with(attach);
    let bootstrap = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let topic = "flood";
    in_netns(&topo.client, || {
        create_topic(&bootstrap, topic, 1).unwrap();
    })
    .unwrap();
    let mut stream = in_netns(&topo.client, || RawClient::connect(&bootstrap))
        .unwrap()
        .unwrap();
    produce_one(&mut stream, topic, b"before the flood").unwrap();
    let flows_before = PinnedMaps::open(&pins(&topo)).unwrap().flows();
    let node = Ipv4Addr::new(198, 18, 1, 1);
    let xdp_before = XdpVerdicts::read(&topo, "n0");

    let run = flood_while_streaming(&topo.client, &mut stream, &bootstrap, topic, || {
        syn_flood::flood(
            node,
            FIRST_PORT,
            SYNS,
            FLOOD_TIME,
            syn_flood::few_and_many_sources,
        )
    });
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    let xdp = XdpVerdicts::read(&topo, "n0").since(xdp_before);
    eprintln!(
        "{attach:?}: counters: {stats:?}; half-open now: {}; XDP on n0: {xdp:?}",
        maps.embryos().len()
    );
    assert_eq!(run.sent, SYNS);
    // The flood went through the half-open table and the budgets, not the open flow.
    assert!(stats.embryos > 10_000, "{stats:?}");
    assert!(stats.drop_source_limit > 0, "{stats:?}");
    assert_xdp_took_the_flood(attach, xdp, &stats);
    let flows_after = maps.flows();
    for (key, flow) in &flows_before {
        assert!(
            flows_after
                .iter()
                .any(|(k, f)| k == key && f.translated == flow.translated),
            "flow {key:?} lost its entry"
        );
    }
    assert!(
        flows_after.len() <= flows_before.len() + run.connects.len() + 1,
        "spoofed SYNs entered the established table: {} flows",
        flows_after.len()
    );

    clients_connect_after_flood(&topo.client, &mut stream, &bootstrap, topic);
    assert!(kpscd.alive(), "log:\n{}", kpscd.log());
}

/// Under XDP, every SYN the program counted (a half-open flow or a budget drop) was sent or
/// dropped by XDP itself, and next to nothing was passed up to TC; under TC, XDP saw
/// nothing. (A veth drops what overflows its ring before XDP runs; those SYNs are in
/// neither count.)
fn assert_xdp_took_the_flood(
    attach: Attach,
    xdp: kpsc_tests::portmap::XdpVerdicts,
    stats: &kpsc_common::PortmapStats,
) {
    match attach {
        Attach::Xdp => assert!(
            xdp.done >= stats.embryos + stats.drop_source_limit && xdp.passed <= 1_000,
            "XDP did not take the flood: {xdp:?}, {stats:?}"
        ),
        Attach::Tc => assert_eq!(xdp.done + xdp.passed, 0, "XDP under --attach tc"),
    }
}

/// About 7 s.
#[test]
fn syn_flood_neither_breaks_open_connections_nor_locks_new_clients_out() {
    syn_flood_while_a_connection_streams(Attach::Tc);
}

/// About 7 s.
#[test]
fn xdp_syn_flood_neither_breaks_open_connections_nor_locks_new_clients_out() {
    syn_flood_while_a_connection_streams(Attach::Xdp);
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET and sched_setaffinity get
    // valid pointers and the set's size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The same SYN sent on two CPUs at the same moment, for 2,000 flows: each flow ends up
/// with one client-side entry and exactly one reply-side entry pointing back at it, with
/// the same tuple. Before, the flow entry was written with BPF_ANY: the CPU that lost the
/// reply tuple took another one and overwrote the flow, leaving an orphaned reply entry
/// that held a tuple no flow used. Under TC each CPU handles what it sent (veth's backlog
/// is per CPU). XDP runs in the receiving veth's NAPI, one per queue: the client's veth
/// gets a transmit queue per CPU (XPS) and the node's a receive queue for each, and both
/// queues' XDP counters must show every flow's SYN.
fn same_syn_on_two_cpus<A: FlowIp>(attach: Attach) {
    use kpsc_tests::{
        datapath::PinnedMaps,
        portmap::{node_nic_counter, pins},
        syn_flood::RawSender,
    };
    use std::{collections::HashMap, sync::Barrier};

    const FLOWS: u32 = 2_000;
    let family = A::FAMILY;
    assert!(
        std::thread::available_parallelism().unwrap().get() >= 2,
        "needs two CPUs to race"
    );
    let mut topo = attach.topology(1, 1).unwrap();
    if attach == Attach::Xdp {
        // Before XDP is attached: veth refuses fewer receive queues than its XDP peer
        // sends on. One receive queue per transmit queue, and transmit queue i for CPU i.
        topo.run(&topo.node, "ethtool", &["-L", "n0", "rx", "2", "tx", "2"])
            .unwrap();
        topo.run(&topo.client, "ethtool", &["-L", "c0", "rx", "2", "tx", "2"])
            .unwrap();
        topo.run(
            &topo.client,
            "sh",
            &[
                "-c",
                "echo 1 > /sys/class/net/c0/queues/tx-0/xps_cpus && \
                 echo 2 > /sys/class/net/c0/queues/tx-1/xps_cpus",
            ],
        )
        .unwrap();
    }
    family.start_broker(&mut topo, 0).unwrap();
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[family.mapping_on(0, family.any())], &attach.args()),
    );
    // Resolves the node's address on the client first: SYNs queued behind that
    // resolution would all leave from the CPU that gets the answer.
    in_netns(&topo.client, || {
        connect_within(&family.endpoint(family.node(), FIRST_PORT))?.api_versions()
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("{attach:?} {family:?}: {e:#}\n{}", kpscd.log()));
    // Under TC the veth has one queue and no XDP counts.
    let per_queue = |q: usize| match attach {
        Attach::Xdp => node_nic_counter(&topo, &["n0"], &format!("rx_queue_{q}_xdp_packets")),
        Attach::Tc => 0,
    };
    let seen_before = [per_queue(0), per_queue(1)];
    let node = A::node();
    let source = A::spoofed;
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for cpu in 0..2 {
            let (barrier, topo) = (&barrier, &topo);
            s.spawn(move || {
                pin_to_cpu(cpu);
                kpsc_tests::netns::enter(&topo.client).unwrap();
                let sender = RawSender::<A>::new().unwrap();
                for i in 0..FLOWS {
                    barrier.wait();
                    sender
                        .send(source(i), 40_000 + i as u16, node, FIRST_PORT, i)
                        .unwrap();
                }
            });
        }
    });
    if attach == Attach::Xdp {
        let seen = [per_queue(0) - seen_before[0], per_queue(1) - seen_before[1]];
        eprintln!("XDP frames per receive queue of n0: {seen:?}");
        assert!(
            seen.iter().all(|&n| n >= u64::from(FLOWS)),
            "XDP saw {seen:?} frames on the node's two receive queues, {FLOWS} SYNs each"
        );
    }
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let ours = |client: &kpsc_common::FlowKey| A::is_spoofed_below(&client.src_ip, FLOWS);
    // Client side (half-open or, were any completed, established): client -> its tuple.
    let client_side: HashMap<_, _> = maps
        .embryos()
        .into_iter()
        .map(|(k, e)| (k, e.translated))
        .chain(maps.flows().into_iter().map(|(k, f)| (k, f.translated)))
        .filter(|(k, _)| ours(k))
        .collect();
    let reply_side: Vec<_> = maps
        .established_replies()
        .into_iter()
        .chain(maps.half_open_replies())
        .filter(|(_, back)| ours(&back.translated.reversed()))
        .collect();
    assert_eq!(client_side.len(), FLOWS as usize, "flows lost");
    let mut problems = Vec::new();
    for (reply_key, back) in &reply_side {
        let client = back.translated.reversed();
        match client_side.get(&client) {
            Some(t) if t.reversed() == *reply_key => {}
            other => problems.push(format!(
                "reply entry {reply_key:?} for {client:?}, whose flow uses {other:?}"
            )),
        }
    }
    assert!(
        problems.is_empty() && reply_side.len() == client_side.len(),
        "{} client-side entries, {} reply-side; orphans: {problems:#?}",
        client_side.len(),
        reply_side.len()
    );
}

/// About 1 s.
#[test]
fn the_same_syn_on_two_cpus_leaves_one_flow_and_no_orphans() {
    same_syn_on_two_cpus::<Ipv4Addr>(Attach::Tc);
}

/// About 1 s.
#[test]
fn xdp_the_same_syn_on_two_cpus_leaves_one_flow_and_no_orphans() {
    same_syn_on_two_cpus::<Ipv4Addr>(Attach::Xdp);
}

/// Spoofed sources one /64 each (the SYN budget is per /64). About 1 s.
#[test]
fn ipv6_the_same_syn_on_two_cpus_leaves_one_flow_and_no_orphans() {
    same_syn_on_two_cpus::<Ipv6Addr>(Attach::Tc);
}

/// About 1 s.
#[test]
fn xdp_ipv6_the_same_syn_on_two_cpus_leaves_one_flow_and_no_orphans() {
    same_syn_on_two_cpus::<Ipv6Addr>(Attach::Xdp);
}

/// A spoofed source never sees the broker's SYN-ACK, so its ACKs can only guess the
/// acknowledgement number: 200 spoofed handshakes with 5 guesses each leave no established
/// flow, and every guess is counted. Before, the SYN alone created the flow that carries
/// traffic, so spoofed SYNs filled that table.
fn spoofed_handshakes<A: FlowIp>() {
    use kpsc_tests::{
        datapath::PinnedMaps,
        portmap::pins,
        syn_flood::{ACK, RawSender},
    };

    const SOURCES: u32 = 200;
    const GUESSES: u32 = 5;
    let family = A::FAMILY;
    let (topo, _kpscd) = one_broker_behind_portmap_over(family, Attach::Tc);
    resolve_node_from_client(&topo, family).unwrap();
    let node = (A::node(), FIRST_PORT);
    let source = A::spoofed;
    in_netns(&topo.client, || {
        let sender = RawSender::<A>::new().unwrap();
        for i in 0..SOURCES {
            sender.send(source(i), 30_000, node.0, node.1, i).unwrap();
        }
        // The broker's SYN-ACKs come back through the node (and die there: no route to
        // the spoofed addresses) before the guesses go out.
        std::thread::sleep(Duration::from_millis(300));
        for g in 1..=GUESSES {
            for i in 0..SOURCES {
                let guess = g.wrapping_mul(0x9e37_79b9) ^ i;
                sender
                    .send_segment((source(i), 30_000), node, i + 1, guess, ACK)
                    .unwrap();
            }
        }
    })
    .unwrap();
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    let spoofed: Vec<_> = maps
        .flows()
        .into_iter()
        .filter(|(k, _)| A::of(&k.src_ip).and_then(A::spoofed_index).is_some())
        .collect();
    assert!(spoofed.is_empty(), "spoofed flows established: {spoofed:?}");
    assert_eq!(stats.embryos, u64::from(SOURCES), "{stats:?}");
    assert_eq!(
        stats.drop_handshake,
        u64::from(SOURCES * GUESSES),
        "{stats:?}"
    );
    assert_eq!(stats.new_flows, 0, "{stats:?}");
    // A real client completes its handshake as usual.
    let mut conn = in_netns(&topo.client, || {
        connect_within(&family.endpoint(family.node(), FIRST_PORT))
    })
    .unwrap()
    .unwrap();
    conn.api_versions().unwrap();
    assert_eq!(maps.stats(FIRST_PORT).new_flows, 1);
}

#[test]
fn spoofed_handshakes_never_reach_the_established_table() {
    spoofed_handshakes::<Ipv4Addr>();
}

/// About 1 s.
#[test]
fn ipv6_spoofed_handshakes_never_reach_the_established_table() {
    spoofed_handshakes::<Ipv6Addr>();
}

/// The half-open flows of the spoofed sources below `count`, by client tuple.
fn spoofed_embryos<A: FlowIp>(
    maps: &kpsc_tests::datapath::PinnedMaps,
    count: u32,
) -> std::collections::HashMap<kpsc_common::FlowKey, kpsc_common::Embryo> {
    maps.embryos()
        .into_iter()
        .filter(|(k, _)| A::is_spoofed_below(&k.src_ip, count))
        .collect()
}

/// An address and port from the kernel maps (port in network byte order).
fn addr<A: FlowIp>(ip: kpsc_common::Ip, port: u16) -> (A, u16) {
    let ip = A::of(&ip).unwrap_or_else(|| panic!("{:?} of the wrong family", ip));
    (ip, u16::from_be(port))
}

/// Forged SYN-ACKs from the broker's address, after the broker's own: one that
/// acknowledges the client's ISN (a forger who sent the SYN knows it) and one that does
/// not. Neither changes what the handshake expects: the spoofed client's ACK for the
/// forged SYN-ACK is dropped, and the ACK for the broker's real SYN-ACK (read from the
/// table, as a real client would see it) still completes the flow. Before, every SYN-ACK
/// on the tuple overwrote the expected ACK: a forger completed spoofed handshakes, and the
/// real client's ACK was dropped. Also: the ACK that completes a handshake with a FIN
/// leaves a flow marked FIN (before, the FIN was lost and the flow looked open for an
/// hour). About 3 s.
fn forged_syn_acks<A: FlowIp>() {
    use kpsc_tests::{
        datapath::PinnedMaps,
        portmap::pins,
        syn_flood::{ACK, FIN, RawSender, SYN},
    };

    const SOURCES: u32 = 20;
    const FORGED_SEQ: u32 = 0x5eed_0000;
    let isn = |i: u32| 7_000_000 + i * 1_000;
    let spoofed = A::spoofed;
    let (topo, kpscd) = one_broker_behind_portmap_over(A::FAMILY, Attach::Tc);
    resolve_node_from_client(&topo, A::FAMILY).unwrap();
    let node = (A::node(), FIRST_PORT);
    in_netns(&topo.client, || {
        let sender = RawSender::<A>::new().unwrap();
        for i in 0..SOURCES {
            sender
                .send(spoofed(i), 30_000, node.0, node.1, isn(i))
                .unwrap();
        }
    })
    .unwrap();
    // The broker's SYN-ACKs go through the node (and die there: no route back to the
    // spoofed addresses). Its first retransmission comes 1 s later: the forged SYN-ACKs
    // and the ACKs below go out before it.
    std::thread::sleep(Duration::from_millis(200));
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let real = spoofed_embryos::<A>(&maps, SOURCES);
    assert_eq!(real.len(), SOURCES as usize, "{real:?}");
    assert!(real.values().all(|e| e.synack == 1), "{real:?}");
    in_netns(&topo.broker, || {
        let sender = RawSender::<A>::new().unwrap();
        for (client, e) in &real {
            let t = e.translated;
            let from = addr::<A>(t.dst_ip, t.dst_port);
            let to = addr::<A>(t.src_ip, t.src_port);
            // Acknowledges the client's ISN, then a wrong one.
            let index = A::of(&client.src_ip)
                .and_then(A::spoofed_index)
                .expect("a spoofed source");
            sender
                .send_segment(from, to, FORGED_SEQ, isn(index).wrapping_add(1), SYN | ACK)
                .unwrap();
            sender
                .send_segment(from, to, FORGED_SEQ + 7, 12_345, SYN | ACK)
                .unwrap();
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let after = spoofed_embryos::<A>(&maps, SOURCES);
    for (client, e) in &real {
        assert_eq!(
            after.get(client).map(|a| a.expect_ack),
            Some(e.expect_ack),
            "a forged SYN-ACK changed what {client:?} must acknowledge"
        );
    }
    let ack = |guess: &(dyn Fn(&kpsc_common::Embryo) -> u32 + Sync), flags: u8| {
        in_netns(&topo.client, || {
            let sender = RawSender::<A>::new().unwrap();
            for i in 0..SOURCES {
                let client = kpsc_common::FlowKey {
                    src_ip: spoofed(i).bits(),
                    dst_ip: node.0.bits(),
                    src_port: 30_000u16.to_be(),
                    dst_port: node.1.to_be(),
                };
                // The first source completes its handshake with a FIN as well.
                let flags = if i == 0 { flags | FIN } else { flags };
                sender
                    .send_segment(
                        (spoofed(i), 30_000),
                        node,
                        isn(i) + 1,
                        guess(&real[&client]),
                        flags,
                    )
                    .unwrap();
            }
        })
        .unwrap()
    };
    ack(&|_| FORGED_SEQ + 1, ACK);
    ack(&|_| FORGED_SEQ + 8, ACK);
    std::thread::sleep(Duration::from_millis(100));
    let stats = maps.stats(FIRST_PORT);
    assert_eq!(
        stats.new_flows, 0,
        "forged SYN-ACKs completed handshakes: {stats:?}"
    );
    assert_eq!(stats.drop_handshake, u64::from(2 * SOURCES), "{stats:?}");
    ack(&|e| e.expect_ack, ACK);
    std::thread::sleep(Duration::from_millis(100));
    let stats = maps.stats(FIRST_PORT);
    assert_eq!(
        stats.new_flows,
        u64::from(SOURCES),
        "the real SYN-ACKs' ACKs must complete: {stats:?}\nlog:\n{}",
        kpscd.log()
    );
    let first = maps
        .flows()
        .into_iter()
        .find(|(k, _)| k.src_ip == spoofed(0).bits())
        .expect("the first source's flow");
    assert_eq!(first.1.fin, 1, "the FIN of the completing ACK: {first:?}");
}

#[test]
fn forged_syn_acks_neither_complete_spoofed_handshakes_nor_break_real_ones() {
    forged_syn_acks::<Ipv4Addr>();
}

/// About 3 s.
#[test]
fn ipv6_forged_syn_acks_neither_complete_spoofed_handshakes_nor_break_real_ones() {
    forged_syn_acks::<Ipv6Addr>();
}

/// The only established flow to `port` from the test client.
fn client_flow<A: FlowIp>(
    maps: &kpsc_tests::datapath::PinnedMaps,
    port: u16,
) -> (kpsc_common::FlowKey, kpsc_common::FlowNat) {
    let flows: Vec<_> = maps
        .flows()
        .into_iter()
        .filter(|(k, _)| u16::from_be(k.dst_port) == port && A::of(&k.src_ip) == Some(A::client(0)))
        .collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    flows[0]
}

/// RSTs and FINs forged with the client's tuple and a wrong sequence number, which the
/// broker's stack ignores, on a live connection: the connection goes on, so the flow is not
/// closed (userspace would remove it a minute later), and a forged SYN after them does not
/// retire it. Before, any RST marked the flow closed for good, and the next SYN on its
/// tuple replaced it at once, cutting the connection. About 2 s.
fn forged_rst_and_fin<A: FlowIp>() {
    use kpsc_tests::{
        datapath::{FlowState, PinnedMaps},
        portmap::pins,
        syn_flood::{ACK, FIN, RST, RawSender, SYN},
    };

    let family = A::FAMILY;
    let (topo, kpscd) = one_broker_behind_portmap_over(family, Attach::Tc);
    let bootstrap = family.endpoint(family.node(), FIRST_PORT);
    let mut conn = in_netns(&topo.client, || connect_within(&bootstrap))
        .unwrap()
        .unwrap();
    conn.api_versions().unwrap();
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let (key, flow) = client_flow::<A>(&maps, FIRST_PORT);
    let from = (A::client(0), u16::from_be(key.src_port));
    let node = (A::node(), FIRST_PORT);
    let forge = |seq: u32, flags: u8| {
        in_netns(&topo.client, || {
            RawSender::<A>::new()
                .unwrap()
                .send_segment(from, node, seq, 0, flags)
                .unwrap()
        })
        .unwrap()
    };
    for (what, flags) in [("RST", RST), ("FIN", FIN | ACK), ("RST+ACK", RST | ACK)] {
        forge(0x0bad_5eed, flags);
        std::thread::sleep(Duration::from_millis(50));
        conn.api_versions()
            .unwrap_or_else(|e| panic!("after a forged {what}: {e:#}"));
        let (_, now) = client_flow::<A>(&maps, FIRST_PORT);
        assert_ne!(
            maps.flow_state(&now),
            FlowState::Closed,
            "a forged {what} followed by traffic closed the flow: {now:?}"
        );
    }
    forge(0x0bad_5eed, SYN);
    std::thread::sleep(Duration::from_millis(50));
    conn.api_versions()
        .unwrap_or_else(|e| panic!("after a forged SYN: {e:#}"));
    let (_, now) = client_flow::<A>(&maps, FIRST_PORT);
    assert_eq!(now.translated, flow.translated, "the flow was replaced");
    assert_eq!(now.created_ns, flow.created_ns, "the flow was replaced");

    // A real close still closes: the client's RST is the last packet either way.
    {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a linger struct of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                conn.stream().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    // Closing with linger 0 sends a RST.
    drop(conn);
    std::thread::sleep(Duration::from_millis(100));
    let (_, last) = client_flow::<A>(&maps, FIRST_PORT);
    assert_eq!(
        maps.flow_state(&last),
        FlowState::Closed,
        "{last:?}\nlog:\n{}",
        kpscd.log()
    );
}

#[test]
fn forged_rst_and_fin_do_not_end_a_live_flow() {
    forged_rst_and_fin::<Ipv4Addr>();
}

/// About 2 s.
#[test]
fn ipv6_forged_rst_and_fin_do_not_end_a_live_flow() {
    forged_rst_and_fin::<Ipv6Addr>();
}

/// The node's ephemeral range decides which translated source ports are free. A range
/// that starts below 1024 still excludes its part above 1024 (before, it excluded nothing,
/// and translated flows took ports the node's own connections use), and a range that
/// leaves no port at all is refused at start with a clear error (before, every SYN was
/// dropped silently). About 3 s.
#[test]
fn the_node_ephemeral_range_is_clamped_and_a_range_leaving_no_port_is_refused() {
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let args = portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &[]);

    topo.sysctl(&topo.node, "net.ipv4.ip_local_port_range", "1024 65535")
        .unwrap();
    let mut refused = kpsc_tests::Kpscd::spawn_mode(&args, Some(&topo.node)).unwrap();
    let code = refused.wait_exit(Duration::from_secs(20)).unwrap();
    let log = refused.log();
    assert!(
        code != 0 && log.contains("ip_local_port_range") && log.contains("no source port"),
        "exit {code}, log:\n{log}"
    );
    drop(refused);

    topo.sysctl(&topo.node, "net.ipv4.ip_unprivileged_port_start", "500")
        .unwrap();
    topo.sysctl(&topo.node, "net.ipv4.ip_local_port_range", "500 64000")
        .unwrap();
    let _kpscd = start_portmap(&topo, &args);
    let bootstrap = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut c = in_netns(&topo.client, || connect_within(&bootstrap))
            .unwrap()
            .unwrap();
        c.api_versions().unwrap();
        conns.push(c);
    }
    let maps = kpsc_tests::datapath::PinnedMaps::open(&kpsc_tests::portmap::pins(&topo)).unwrap();
    let ports: Vec<u16> = maps
        .flows()
        .iter()
        .map(|(_, f)| u16::from_be(f.translated.src_port))
        .collect();
    assert_eq!(ports.len(), 20, "{ports:?}");
    assert!(
        ports.iter().all(|p| *p > 64_000),
        "translated ports inside the node's range 500-64000: {ports:?}"
    );
}

/// Two `kpscd portmap` instances on one node (two clusters, one unit each) do not know
/// each other's ports, so one may pick the other's mapped port as a translated source
/// port. Forced here: the node's ephemeral range leaves instance A the translated ports
/// 1024 and 1025, and instance B maps port 1024; B starts first, so its TC program sees
/// the broker's replies to A's flow on port 1024 first. Before, B dropped them as packets
/// of an unknown flow to its port (`no_flow`) and A's connection hung; now B passes them
/// on (counted as `unknown_flow`) and A translates them. About 3 s.
#[test]
fn another_instances_reply_to_one_of_our_mapped_ports_is_passed_on() {
    use kpsc_tests::{
        datapath::PinnedMaps,
        netns::{NODE_CLIENT_IP, broker_ip},
        portmap::portmap_command,
    };
    const B_PORT: u16 = 1024;
    let mut topo = Topology::new(1, 2).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    topo.start_advertising_node(1, BROKER_PORT, B_PORT).unwrap();
    topo.sysctl(&topo.node, "net.ipv4.ip_local_port_range", "1026 65535")
        .unwrap();
    let instance_b = format!("{}-b", topo.node);
    let b_mapping = format!(
        "{}:{BROKER_PORT},0.0.0.0:{B_PORT},{NODE_CLIENT_IP}:{B_PORT}",
        broker_ip(1)
    );
    let _b = start_portmap(
        &topo,
        &portmap_command(&instance_b, "n0,n1", &[b_mapping], &["--attach", "tc"]),
    );
    let _a = start_portmap(
        &topo,
        &portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &["--attach", "tc"]),
    );
    let bootstrap = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let mut conns: Vec<RawClient> = (0..2)
        .map(|i| {
            in_netns(&topo.client, || connect_within(&bootstrap))
                .unwrap()
                .unwrap_or_else(|e| panic!("connection {i} through instance A: {e:#}"))
        })
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.api_versions()
            .unwrap_or_else(|e| panic!("request on connection {i} through instance A: {e:#}"));
    }
    let a = PinnedMaps::open(&kpsc_tests::portmap::pins(&topo)).unwrap();
    let mut ports: Vec<u16> = a
        .flows()
        .iter()
        .map(|(_, f)| u16::from_be(f.translated.src_port))
        .collect();
    ports.sort();
    assert_eq!(ports, [B_PORT, B_PORT + 1], "A's translated ports");
    let b = PinnedMaps::open(&kpsc_tests::datapath::pin_dir(
        std::path::Path::new(kpsc_tests::datapath::DEFAULT_PIN_ROOT),
        &instance_b,
    ))
    .unwrap();
    let b_stats = b.stats(B_PORT);
    assert!(
        b_stats.unknown_flow > 0 && b_stats.dropped() == 0,
        "B should have passed A's replies on: {b_stats:?}"
    );
}
