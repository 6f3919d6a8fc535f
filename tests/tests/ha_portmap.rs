//! Two `kpscd portmap` nodes behind a passthrough L4 load balancer (nftables `numgen`
//! DNAT on a VIP, conntrack pinning each flow to its node: kpsc_tests::passthrough_lb),
//! the way a cloud's internal passthrough load balancer fronts them, each host in its own
//! network namespace (kpsc_tests::ha). Two tansu brokers advertise VIP:9093 and VIP:9094;
//! both nodes run the same port map on their one interface, send towards the brokers
//! from their own address and back towards the clients through the load balancer.
//!
//! A node "dies" as a crashed VM does: its link goes down (nothing reaches it, nothing
//! leaves it), then its kpscd is SIGKILLed (the program goes with the process). The
//! test's health checker, like a cloud's, takes it out of the rule after failed `/ready`
//! checks, which only stops new flows going there. About 11 s for both tests.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use kpsc_tests::{
    Kpscd, Process, RawClient, create_topic,
    datapath::{DEFAULT_PIN_ROOT, PinnedMaps, pin_dir},
    eventually,
    ha::{self, CLIENT_IP, HaTopology, VIP, map_rows},
    netns::{self, ip},
    passthrough_lb::{HealthCheck, PassthroughLb, detection_bound},
    portmap::{BROKER_PORT, FIRST_PORT, connect_to, portmap_command, produce_keyed},
    soak::{
        ConsumerLedger, ProducerLedger, SoakConfig, consume, lock, produce, stall_after, tally,
    },
    start_tansu_in,
};

const BROKERS: usize = 2;
/// rdkafka's changefeed goes to broker 0 (port 9093), the raw streams to broker 1 (9094),
/// so each node's flow table tells whose connections it carries.
const CHANGEFEED: &str = "changefeed";
const STREAMS: &str = "streams";
/// How long a client waits for an answer before it gives the connection up: the only way
/// a client behind a passthrough balancer learns that its node died.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// One record per stream every PACE.
const PACE: Duration = Duration::from_millis(10);

fn port(i: usize) -> u16 {
    FIRST_PORT + i as u16
}

fn vip(i: usize) -> SocketAddr {
    format!("{VIP}:{}", port(i)).parse().unwrap()
}

/// The same mapping on every node: broker i behind VIP:port(i).
fn mappings() -> Vec<String> {
    (0..BROKERS)
        .map(|i| {
            format!(
                "{}:{},0.0.0.0:{},{VIP}:{}",
                ha::BROKER_IP,
                BROKER_PORT + i as u16,
                port(i),
                port(i)
            )
        })
        .collect()
}

fn start_node(topo: &HaTopology, node: usize, instance: &str) -> anyhow::Result<Kpscd> {
    let admin = format!("{}:{}", ha::instance_ip(node), ha::ADMIN_PORT).parse()?;
    let args = portmap_command(instance, "e0", &mappings(), &[]);
    Kpscd::spawn_at(&args, Some(&topo.instances[node]), admin, &[])
}

fn pins(topo: &HaTopology, node: usize) -> PinnedMaps {
    PinnedMaps::open(&pin_dir(
        std::path::Path::new(DEFAULT_PIN_ROOT),
        &topo.instances[node],
    ))
    .unwrap()
}

/// Client source ports of `node`'s flows (half-open ones included) to `port`.
fn client_ports(topo: &HaTopology, node: usize, port: u16) -> Vec<u16> {
    let maps = pins(topo, node);
    maps.flows()
        .into_iter()
        .map(|(k, _)| k)
        .chain(maps.embryos().into_iter().map(|(k, _)| k))
        .filter(|k| u16::from_be(k.dst_port) == port)
        .map(|k| u16::from_be(k.src_port))
        .collect()
}

/// The node carrying the connection from client port `local`.
fn node_of(topo: &HaTopology, local: u16) -> anyhow::Result<usize> {
    eventually(Duration::from_secs(2), || {
        (0..2)
            .find(|&n| client_ports(topo, n, port(1)).contains(&local))
            .ok_or_else(|| anyhow::anyhow!("no node has a flow from client port {local}"))
    })
}

/// What one raw producer connection saw besides its acknowledgements (in the ledger):
/// errors and the connections it used.
#[derive(Default)]
struct StreamLog {
    errors: Vec<(Instant, String)>,
    /// Client source port of every connection it used, and when it was opened.
    connections: Vec<(u16, Instant)>,
}

fn connect_stream() -> anyhow::Result<(RawClient, u16)> {
    let mut conn = connect_to(
        format!("{CLIENT_IP}:0").parse()?,
        vip(1),
        Duration::from_secs(1),
    )?;
    conn.stream().set_read_timeout(Some(REQUEST_TIMEOUT))?;
    conn.stream().set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let local = conn.stream().local_addr()?.port();
    Ok((conn, local))
}

/// A long-lived producer connection (key `k<key>`, records `<key>:<seq>:`, acks=1) that
/// keeps producing until `stop`; on an error (REQUEST_TIMEOUT without an answer) it
/// reconnects through the VIP and sends the unacknowledged record again.
fn stream(
    key: usize,
    first: (RawClient, u16),
    acks: &ProducerLedger,
    stop: &AtomicBool,
    client_ns: &str,
) -> anyhow::Result<StreamLog> {
    netns::enter(client_ns)?;
    let mut log = StreamLog::default();
    log.connections.push((first.1, Instant::now()));
    let mut conn = Some(first.0);
    let mut seq = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect_stream() {
                Ok((c, local)) => {
                    log.connections.push((local, Instant::now()));
                    conn.insert(c)
                }
                Err(e) => {
                    log.errors.push((Instant::now(), format!("connect: {e:#}")));
                    std::thread::sleep(PACE);
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let value = format!("{key}:{seq}:");
        match produce_keyed(
            c,
            STREAMS,
            Some(format!("k{key}").as_bytes()),
            value.as_bytes(),
        ) {
            Ok(()) => {
                let mut acks = lock(&acks.0);
                acks.acked[key].insert(seq, sent);
                acks.ack_times
                    .entry(key as i32)
                    .or_default()
                    .push(Instant::now());
                seq += 1;
            }
            Err(e) => {
                log.errors.push((Instant::now(), format!("{e:#}")));
                conn = None;
            }
        }
        std::thread::sleep(PACE);
    }
    Ok(log)
}

/// Sets the flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The longest wait between two acknowledgements from `from` on (the first gap starts
/// at `from`).
fn longest_gap(acked_at: &[Instant], from: Instant) -> Duration {
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for &t in acked_at.iter().filter(|t| **t >= from) {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest
}

/// The HA topology with two node namespaces, clients routed via the balancer, and one
/// tansu broker per mapped port advertising VIP:port.
fn two_nodes_and_brokers() -> (HaTopology, Vec<Process>) {
    let topo = HaTopology::new(2).unwrap();
    topo.route_clients_via_lb().unwrap();
    let brokers = (0..BROKERS)
        .map(|i| {
            start_tansu_in(
                &topo.broker,
                &format!("{}:{}", ha::BROKER_IP, BROKER_PORT + i as u16),
                &format!("{VIP}:{}", port(i)),
                &format!("cluster-{i}"),
            )
            .unwrap()
        })
        .collect();
    (topo, brokers)
}

#[test]
fn portmap_nodes_behind_a_passthrough_balancer_survive_a_node_crash() {
    let (topo, _brokers) = two_nodes_and_brokers();
    let mut nodes: Vec<Option<Kpscd>> = (0..2)
        .map(|n| Some(start_node(&topo, n, &topo.instances[n]).unwrap()))
        .collect();
    for node in nodes.iter().flatten() {
        node.wait_ready(Duration::from_secs(20)).unwrap();
    }

    // Same configuration: the same map on both nodes, in /maps and in the kernel; only
    // the source address towards the brokers is each node's own.
    let map = map_rows(nodes[0].as_ref().unwrap());
    assert_eq!(map.len(), BROKERS, "{map:?}");
    assert_eq!(map, map_rows(nodes[1].as_ref().unwrap()));
    for i in 0..BROKERS {
        let advertised = format!("{VIP}:{}", port(i));
        assert!(map.iter().any(|(_, _, a, _)| *a == advertised), "{map:?}");
    }
    type KernelRow = (u16, std::net::IpAddr, u16, std::net::IpAddr);
    let kernel = |n: usize| -> Vec<KernelRow> {
        pins(&topo, n)
            .targets()
            .into_iter()
            .map(|(p, t)| {
                (
                    p,
                    kpsc_common::ip_addr(&t.broker_ip),
                    t.broker_port,
                    kpsc_common::ip_addr(&t.snat_ip),
                )
            })
            .collect()
    };
    let (k0, k1) = (kernel(0), kernel(1));
    assert_eq!(k0.len(), BROKERS, "{k0:?}");
    for (n, rows) in [(0, &k0), (1, &k1)] {
        for row in rows {
            assert_eq!(row.3.to_string(), ha::instance_ip(n), "node {n}: {rows:?}");
        }
    }
    let without_snat = |rows: &[KernelRow]| -> Vec<(u16, std::net::IpAddr, u16)> {
        rows.iter().map(|r| (r.0, r.1, r.2)).collect()
    };
    assert_eq!(without_snat(&k0), without_snat(&k1));

    let backends: Vec<(String, SocketAddr)> = (0..2)
        .map(|n| {
            let addr = ha::instance_ip(n);
            let admin = format!("{addr}:{}", ha::ADMIN_PORT).parse().unwrap();
            (addr, admin)
        })
        .collect();
    let lb = PassthroughLb::start(
        &topo,
        &(0..BROKERS).map(port).collect::<Vec<_>>(),
        &backends.iter().map(|b| b.0.clone()).collect::<Vec<_>>(),
    )
    .unwrap();
    let health = HealthCheck::start(&topo, lb, backends);
    let changefeed = vip(0).to_string();
    netns::in_netns(&topo.client, || {
        create_topic(&changefeed, CHANGEFEED, 3)?;
        create_topic(&vip(1).to_string(), STREAMS, 1)
    })
    .unwrap()
    .unwrap();

    // One raw stream per node: numgen inc alternates, so a few connections suffice.
    let mut first: [Option<(RawClient, u16)>; 2] = [None, None];
    netns::in_netns(&topo.client, || {
        for _ in 0..6 {
            let (conn, local) = connect_stream()?;
            let n = node_of(&topo, local)?;
            if first[n].is_none() {
                first[n] = Some((conn, local));
            }
            if first.iter().all(Option::is_some) {
                break;
            }
        }
        anyhow::Ok(())
    })
    .unwrap()
    .unwrap();
    let [Some(on0), Some(on1)] = first else {
        panic!("the balancer did not spread 6 connections over both nodes");
    };

    let config = SoakConfig {
        rate: 300,
        keys: 20,
        partitions: 3,
        // The changefeed's own request timeout is what ends a flow to a dead node.
        producer_config: vec![
            (
                "request.timeout.ms".into(),
                REQUEST_TIMEOUT.as_millis().to_string(),
            ),
            (
                "socket.timeout.ms".into(),
                REQUEST_TIMEOUT.as_millis().to_string(),
            ),
        ],
        ..SoakConfig::short()
    };
    let acks = ProducerLedger::new(config.keys);
    let stream_acks = ProducerLedger::new(2);
    let stop = AtomicBool::new(false);
    let new_flows = |n: usize| -> u64 {
        let maps = pins(&topo, n);
        (0..BROKERS).map(|i| maps.stats(port(i)).new_flows).sum()
    };
    let (victim, killed_at, taken_out_after, logs) = std::thread::scope(|s| {
        // A failed assertion below must still stop the clients, or the scope never ends.
        let _stop_clients = StopOnDrop(&stop);
        let bytes_before: Vec<u64> = (0..2)
            .map(|n| pins(&topo, n).stats(port(0)).bytes_in)
            .collect();
        let producer = s.spawn(|| {
            netns::enter(&topo.client)?;
            produce(&changefeed, CHANGEFEED, &config, acks.clone(), &stop)
        });
        // Stream n starts on node n and writes key n. One after the other: when two
        // connections wrote the first records of the new partition at once, tansu (0.6,
        // PyPI build) acknowledged both and a consumer from the beginning started at
        // offset 1, without the first (3 of 7 runs; a broker race, not the balancer's).
        let streams: Vec<_> = [on0, on1]
            .into_iter()
            .enumerate()
            .map(|(key, first)| {
                let (stream_acks, stop, ns) = (&stream_acks, &stop, &topo.client);
                let handle = s.spawn(move || stream(key, first, stream_acks, stop, ns));
                eventually(Duration::from_secs(10), || {
                    anyhow::ensure!(!lock(&stream_acks.0).acked[key].is_empty());
                    Ok(())
                })
                .unwrap_or_else(|_| panic!("stream {key}: no first acknowledgement"));
                handle
            })
            .collect();
        std::thread::sleep(Duration::from_secs(3));
        let acked = lock(&acks.0).latencies_us.len();
        assert!(acked > 300, "only {acked} changefeed records acknowledged");
        for n in 0..2 {
            let acked = lock(&stream_acks.0).acked[n].len();
            assert!(acked > 50, "stream {n}: only {acked} acknowledged");
            assert!(new_flows(n) > 0, "node {n} got no flow");
        }
        // The node carrying the changefeed's records dies (rdkafka also keeps an idle
        // bootstrap connection, which may sit on the other node).
        let changefeed_bytes: Vec<u64> = (0..2)
            .map(|n| pins(&topo, n).stats(port(0)).bytes_in - bytes_before[n])
            .collect();
        let victim = usize::from(changefeed_bytes[1] > changefeed_bytes[0]);
        let survivor = 1 - victim;
        let survivor_flows = new_flows(survivor);
        eprintln!("changefeed bytes per node {changefeed_bytes:?}: node {victim} dies");

        // The crash: nothing in or out first, then the process (and its program) goes.
        // Timed from when the link is down: what is acknowledged later came another way.
        ip(&["-n", &topo.instances[victim], "link", "set", "e0", "down"]).unwrap();
        let killed_at = Instant::now();
        nodes[victim].as_ref().unwrap().signal(libc::SIGKILL);
        let out = eventually(detection_bound() + Duration::from_secs(2), || {
            health
                .taken_out()
                .first()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("node {victim} still in the balancer"))
        })
        .unwrap();
        assert_eq!(
            out.backend, victim,
            "the health check took out the survivor"
        );
        let taken_out_after = out.at - killed_at;

        // The dead node's clients come back through the survivor.
        let acked_after_kill = |key: i32| {
            lock(&stream_acks.0)
                .ack_times
                .get(&key)
                .is_some_and(|t| t.last().is_some_and(|t| *t > killed_at))
        };
        eventually(REQUEST_TIMEOUT + Duration::from_secs(10), || {
            anyhow::ensure!(acked_after_kill(victim as i32), "stream {victim} not back");
            let after = lock(&acks.0)
                .ack_times
                .values()
                .filter(|t| t.last().is_some_and(|t| *t > killed_at))
                .count();
            anyhow::ensure!(after == 3, "{after} of 3 changefeed partitions back");
            Ok(())
        })
        .unwrap();
        assert!(
            new_flows(survivor) > survivor_flows,
            "no reconnection reached node {survivor}: {survivor_flows} -> {} new flows, \
             {:?} {:?}",
            new_flows(survivor),
            pins(&topo, survivor).stats(port(0)),
            pins(&topo, survivor).stats(port(1)),
        );
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let sent = producer.join().unwrap().unwrap();
        let logs: Vec<StreamLog> = streams
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        eprintln!("changefeed: {sent} sent");
        (victim, killed_at, taken_out_after, logs)
    });
    health.stop().unwrap();
    let survivor = 1 - victim;
    let stopped_at = Instant::now();

    // The survivor's stream: same connection throughout, no error, no stall.
    let stream_times = lock(&stream_acks.0).ack_times.clone();
    let survivor_gap = longest_gap(&stream_times[&(survivor as i32)], killed_at);
    let victim_stall = longest_gap(&stream_times[&(victim as i32)], killed_at);
    let (changefeed_stall, _) = stall_after(&lock(&acks.0), killed_at, stopped_at);
    eprintln!(
        "node {victim} killed: out of the balancer after {taken_out_after:?}; longest wait \
         for an acknowledgement after the kill: stream on the dead node {victim_stall:?} \
         ({} reconnections), stream on the survivor {survivor_gap:?}, changefeed \
         {changefeed_stall:?}",
        logs[victim].connections.len() - 1
    );
    assert!(
        logs[survivor].errors.is_empty(),
        "survivor's stream: {:?}",
        logs[survivor].errors
    );
    assert_eq!(
        logs[survivor].connections.len(),
        1,
        "survivor's stream reconnected"
    );
    assert!(
        survivor_gap < Duration::from_secs(1),
        "survivor's stream stalled {survivor_gap:?}"
    );
    // The dead node's stream noticed (its request timed out) and came back.
    assert!(
        !logs[victim].errors.is_empty(),
        "dead node's stream saw nothing"
    );
    assert!(logs[victim].connections.len() >= 2);
    assert!(
        victim_stall >= REQUEST_TIMEOUT / 2,
        "dead node's stream stalled only {victim_stall:?}"
    );
    let bound = REQUEST_TIMEOUT * 2 + detection_bound() + Duration::from_secs(3);
    assert!(
        victim_stall < bound,
        "dead node's stream stalled {victim_stall:?}"
    );
    assert!(
        changefeed_stall < bound,
        "changefeed stalled {changefeed_stall:?}"
    );
    let failed: usize = lock(&acks.0).failed.iter().map(|f| f.len()).sum();
    assert_eq!(failed, 0, "deliveries failed: {:?}", lock(&acks.0).errors);

    // Everything acknowledged is there, once per key sequence, in order, read through the
    // VIP (now the survivor only).
    let streams_config = SoakConfig {
        keys: 2,
        partitions: 1,
        ..SoakConfig::short()
    };
    for (bootstrap, topic, config, ledger) in [
        (changefeed.clone(), CHANGEFEED, &config, &acks),
        (vip(1).to_string(), STREAMS, &streams_config, &stream_acks),
    ] {
        let reads = ConsumerLedger::new(config.keys);
        let want: usize = lock(&ledger.0).acked.iter().map(|a| a.len()).sum();
        let done = AtomicBool::new(true);
        netns::in_netns(&topo.client, || {
            consume(&bootstrap, topic, config, &reads, &done, || want)
        })
        .unwrap()
        .unwrap();
        let verdict = tally(&lock(&ledger.0), &lock(&reads.0));
        eprintln!(
            "{topic}: acknowledged {want}, read {}: {verdict:?}",
            reads.distinct()
        );
        assert!(want > 0);
        assert_eq!(verdict.lost, 0, "{topic}: records lost");
        assert_eq!(verdict.reordered, 0, "{topic}: records reordered");
        assert_eq!(lock(&reads.0).malformed, 0, "{topic}");
    }
    assert!(nodes[survivor].as_ref().unwrap().alive());
    nodes[victim] = None;
}

/// Two nodes' daemons on one host share bpffs (it belongs to the mount namespace, not the
/// network namespace): the same `--instance` would pin both into one directory. The
/// second is refused (exit 2, naming the flag) and the first keeps its maps; a crash
/// leaves no lock behind, so a restart under the same name works. About 4 s (the second
/// daemon waits 3 s for a holder that might be exiting).
#[test]
fn two_portmap_daemons_on_one_host_need_their_own_instance_names() {
    let (topo, _brokers) = two_nodes_and_brokers();
    let shared = &topo.instances[0];
    let first = start_node(&topo, 0, shared).unwrap();
    first.wait_ready(Duration::from_secs(20)).unwrap();

    let mut second = start_node(&topo, 1, shared).unwrap();
    let code = second.wait_exit(Duration::from_secs(20)).unwrap();
    let log = second.log();
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("--instance"), "{log}");
    // The first one is untouched: still ready, its maps still pinned and filled.
    first.wait_ready(Duration::from_secs(1)).unwrap();
    assert_eq!(pins(&topo, 0).targets().len(), BROKERS);

    // Its own name: both run side by side.
    let other = start_node(&topo, 1, &topo.instances[1]).unwrap();
    other.wait_ready(Duration::from_secs(20)).unwrap();

    // A crash releases the name: the restart reuses the pins as an earlier run's.
    first.signal(libc::SIGKILL);
    drop(first);
    let restarted = start_node(&topo, 0, shared).unwrap();
    restarted.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(
        restarted.log().contains("reusing pinned maps"),
        "{}",
        restarted.log()
    );
    assert!(other.alive());
}
