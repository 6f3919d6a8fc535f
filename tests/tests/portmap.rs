//! `kpscd portmap` in real network namespaces: client host -> proxy node (the TC program)
//! -> broker host, with real tansu brokers advertising the node's address and port, as the
//! TiDB Cloud guide prescribes, and real clients (rdkafka, raw Kafka requests).

use std::{
    collections::HashSet,
    net::{SocketAddr, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, MetadataRequest, MetadataResponse};
use kpsc_tests::{
    Kpscd, RawClient, TansuHost, create_topic,
    datapath::{FlowState, PinnedMaps},
    eventually, kpscd_bin,
    netns::{NODE_CLIENT_IP, Topology, broker_ip, client_ip, in_netns},
    portmap::{
        BROKER_PORT, FIRST_PORT, kpscctl_maps, mapping, pins, portmap_args, reload, start_portmap,
    },
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};

/// Three tansu brokers, each advertising the node's address and its own mapped port.
fn three_brokers() -> Topology {
    let mut topo = Topology::without_checksum_offload(1, 3).unwrap();
    for i in 0..3 {
        topo.start_advertising_node(i, BROKER_PORT, FIRST_PORT + i as u16)
            .unwrap();
    }
    topo
}

/// TCP sockets of the node's own stack that involve `port`.
fn node_sockets(topo: &Topology, port: u16) -> String {
    topo.run(
        &topo.node,
        "ss",
        &["-Htan", &format!("( sport = :{port} or dport = :{port} )")],
    )
    .unwrap()
}

#[test]
fn messages_flow_through_each_broker_port_in_the_kernel_only() {
    let topo = three_brokers();
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &(0..3).map(mapping).collect::<Vec<_>>(), &[]),
    );
    const N: usize = 300;
    for i in 0..3 {
        let port = FIRST_PORT + i as u16;
        let bootstrap = format!("{NODE_CLIENT_IP}:{port}");
        let topic = format!("topic-{i}");
        let (consumed, sockets_during) = in_netns(&topo.client, || {
            create_topic(&bootstrap, &topic, 1).unwrap();
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("acks", "all")
                .set("linger.ms", "5")
                .create()
                .unwrap();
            for n in 0..N {
                let value = format!("broker-{i}-message-{n}-{}", "x".repeat(200));
                producer
                    .send(
                        BaseRecord::to(&topic)
                            .partition(0)
                            .key(&n.to_string())
                            .payload(&value),
                    )
                    .unwrap();
                producer.poll(Duration::ZERO);
            }
            producer.flush(Duration::from_secs(30)).unwrap();
            // While the producer's connection is open: the node's TCP stack has no socket
            // for it, so no process on the node (kpscd included) could see its bytes.
            let sockets = node_sockets(&topo, port);

            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "unused")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Beginning)
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while got.len() < N && Instant::now() < deadline {
                if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                    let m = m.unwrap();
                    got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
                }
            }
            (got, sockets)
        })
        .unwrap();
        assert_eq!(
            consumed.len(),
            N,
            "port {port}: kpscd log:\n{}",
            kpscd.log()
        );
        for (n, v) in consumed.iter().enumerate() {
            assert!(v.starts_with(&format!("broker-{i}-message-{n}-")), "{v}");
        }
        assert!(
            sockets_during.trim().is_empty(),
            "node stack saw the flow: {sockets_during}"
        );

        let maps = PinnedMaps::open(&pins(&topo)).unwrap();
        let stats = maps.stats(port);
        let payload = (N * 230) as u64;
        assert!(stats.bytes_in > payload, "port {port}: {stats:?}");
        assert!(stats.bytes_out > payload, "port {port}: {stats:?}");
        assert!(stats.new_flows >= 2, "{stats:?}");
        assert_eq!(
            stats.drop_no_route + stats.drop_rewrite + stats.drop_no_port,
            0,
            "{stats:?}"
        );
    }
    // Every segment was checksummed in software and verified on arrival: none was bad.
    for ns in [&topo.client, &topo.broker] {
        assert_eq!(topo.counter(ns, "TcpInCsumErrors").unwrap(), 0, "{ns}");
        let segments = topo.counter(ns, "TcpInSegs").unwrap();
        assert!(segments > 50, "{ns}: only {segments} segments");
    }
    // The admin endpoint reports the same kernel counters.
    let (_, metrics) = kpscd.get("/metrics").unwrap();
    assert!(
        metrics.contains("kpsc_portmap_bytes_total{listen_port=\"9093\""),
        "{metrics}"
    );
}

/// An ApiVersions round trip on an open connection.
fn api_versions_ok(conn: &mut RawClient) -> anyhow::Result<()> {
    let (r, _): (kafka_protocol::messages::ApiVersionsResponse, _) =
        conn.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
    anyhow::ensure!(r.error_code == 0, "error {}", r.error_code);
    Ok(())
}

#[test]
fn clients_reusing_one_source_port_do_not_collide() {
    const CLIENTS: usize = 16;
    // No offload: the replacement source ports' checksums are verified by real stacks.
    let mut topo = Topology::without_checksum_offload(CLIENTS, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let _kpscd = start_portmap(&topo, &portmap_args(&topo, &[mapping(0)], &[]));
    // Every client address connects from source port 40000 to the same node port.
    let mut conns: Vec<RawClient> = in_netns(&topo.client, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (0..CLIENTS)
            .map(|i| {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_reuseaddr(true).unwrap();
                let local: SocketAddr = format!("{}:40000", client_ip(i)).parse().unwrap();
                socket.bind(local).unwrap();
                let remote: SocketAddr = format!("{NODE_CLIENT_IP}:{FIRST_PORT}").parse().unwrap();
                let stream = rt
                    .block_on(socket.connect(remote))
                    .unwrap()
                    .into_std()
                    .unwrap();
                stream.set_nonblocking(false).unwrap();
                RawClient::from_stream(stream).unwrap()
            })
            .collect()
    })
    .unwrap();
    // All requests out first, then all answers: the flows are open at the same time.
    let ids: Vec<i32> = conns
        .iter_mut()
        .map(|c| {
            c.send(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())
                .unwrap()
        })
        .collect();
    for (c, id) in conns.iter_mut().zip(ids) {
        let (r, _): (kafka_protocol::messages::ApiVersionsResponse, _) = c.recv(id, 0).unwrap();
        assert_eq!(r.error_code, 0);
    }
    let flows = PinnedMaps::open(&pins(&topo)).unwrap().flows();
    let ours: Vec<_> = flows
        .iter()
        .filter(|(k, _)| u16::from_be(k.src_port) == 40000)
        .collect();
    assert_eq!(ours.len(), CLIENTS, "{flows:?}");
    let translated: HashSet<_> = ours.iter().map(|(_, f)| f.translated).collect();
    assert_eq!(
        translated.len(),
        CLIENTS,
        "two flows share a translated tuple"
    );
    // Still usable after the check.
    for c in &mut conns {
        api_versions_ok(c).unwrap();
    }

    // The operator's view, straight from the pins (no daemon involved).
    let pins_dir = pins(&topo);
    let kpscctl = |extra: &[&str]| kpscctl_maps(&topo.node, extra);
    let table = kpscctl(&[]);
    assert!(table.contains(&pins_dir.display().to_string()), "{table}");
    let port_line = table
        .lines()
        .find(|l| l.starts_with(&FIRST_PORT.to_string()))
        .unwrap();
    assert!(
        port_line.contains(&format!("{}:{BROKER_PORT}", broker_ip(0))),
        "{table}"
    );
    assert!(
        port_line.split_whitespace().nth(3) == Some(&CLIENTS.to_string()),
        "{CLIENTS} live flows expected: {table}"
    );
    assert_eq!(table.matches(" open").count(), CLIENTS, "{table}");
    let json: serde_json::Value = serde_json::from_str(&kpscctl(&["--json"])).unwrap();
    assert_eq!(json["flows"].as_array().unwrap().len(), CLIENTS);
    assert_eq!(json["ports"][0]["listen_port"], FIRST_PORT);

    // Closed connections are marked closed by the program (FIN both ways).
    drop(conns);
    eventually(Duration::from_secs(5), || {
        let maps = PinnedMaps::open(&pins_dir)?;
        let states: Vec<_> = maps
            .flows()
            .iter()
            .filter(|(k, _)| u16::from_be(k.src_port) == 40000)
            .map(|(_, f)| maps.flow_state(f))
            .collect();
        anyhow::ensure!(
            states.len() == CLIENTS && states.iter().all(|s| *s == FlowState::Closed),
            "{states:?}"
        );
        Ok(())
    })
    .unwrap();
}

fn cluster_id(conn: &mut RawClient) -> String {
    let (r, _): (MetadataResponse, _) = conn
        .call(
            ApiKey::Metadata,
            4,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    r.cluster_id.map(|c| c.to_string()).unwrap_or_default()
}

#[test]
fn reload_keeps_established_flows_and_sends_new_ones_to_the_new_broker() {
    let mut topo = Topology::new(1, 2).unwrap();
    for (i, id) in ["cluster-a", "cluster-b"].iter().enumerate() {
        topo.start_tansu(
            &format!("{}:{BROKER_PORT}", broker_ip(i)),
            &format!("{NODE_CLIENT_IP}:{FIRST_PORT}"),
            id,
        )
        .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("kpsc-reload-{}", topo.node));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portmap.toml");
    let write = |broker: usize| {
        std::fs::write(
            &config,
            format!(
                "bootstrap_server_mapping = [\"{}:{BROKER_PORT},0.0.0.0:{FIRST_PORT},{NODE_CLIENT_IP}:{FIRST_PORT}\"]\n",
                broker_ip(broker)
            ),
        )
        .unwrap()
    };
    write(0);
    let args = portmap_args(&topo, &[], &["--config", config.to_str().unwrap()]);
    let kpscd = start_portmap(&topo, &args);
    let addr = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let mut old = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap();
    assert_eq!(cluster_id(&mut old), "cluster-a");

    write(1);
    reload(&kpscd);
    let mut new = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap_or_else(|e| {
            let maps = PinnedMaps::open(&pins(&topo)).unwrap();
            panic!(
                "{e:#}; targets {:?} flows {:?} log:\n{}",
                maps.targets(),
                maps.flows(),
                kpscd.log()
            )
        });
    assert_eq!(
        cluster_id(&mut new),
        "cluster-b",
        "new flows follow the new map"
    );
    assert_eq!(
        cluster_id(&mut old),
        "cluster-a",
        "the established flow kept its broker"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Counters of every port ever mapped used to stay in the kernel's stats map, until over
/// reloads it was full: then adding a port failed after the old ports were already gone,
/// and the reload's error ended the daemon. Now stale counters go, and a map update the
/// kernel refuses leaves the old map serving.
#[test]
fn reload_with_a_full_counters_map_keeps_serving() {
    use aya::{
        maps::{Map, MapData, PerCpuHashMap, PerCpuValues},
        util::nr_cpus,
    };
    use kpsc_common::{PortmapStats, portmap::STATS_MAP};

    let mut topo = Topology::new(1, 2).unwrap();
    for (i, id) in ["cluster-a", "cluster-b"].iter().enumerate() {
        let port = FIRST_PORT + i as u16;
        topo.start_tansu(
            &format!("{}:{BROKER_PORT}", broker_ip(i)),
            &format!("{NODE_CLIENT_IP}:{port}"),
            id,
        )
        .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("kpsc-full-stats-{}", topo.node));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portmap.toml");
    let write = |brokers: usize| {
        let mappings: Vec<String> = (0..brokers)
            .map(|i| format!("\"{}\"", mapping(i)))
            .collect();
        std::fs::write(
            &config,
            format!("bootstrap_server_mapping = [{}]\n", mappings.join(", ")),
        )
        .unwrap()
    };
    write(1);
    let args = portmap_args(&topo, &[], &["--config", config.to_str().unwrap()]);
    let kpscd = start_portmap(&topo, &args);

    // Fill the counters map with ports no mapping uses, as years of reloads would.
    let data = MapData::from_pin(pins(&topo).join(STATS_MAP)).unwrap();
    let mut stats: PerCpuHashMap<MapData, u32, PortmapStats> =
        PerCpuHashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let cpus = nr_cpus().unwrap();
    let mut filled = 0;
    for port in 20_000u32.. {
        let zero = PerCpuValues::try_from(vec![PortmapStats::default(); cpus]).unwrap();
        if stats.insert(port, zero, 0).is_err() {
            break;
        }
        filled += 1;
    }
    assert!(filled > 1000, "the counters map took only {filled} entries");

    write(2);
    reload(&kpscd);
    assert!(kpscd.alive(), "log:\n{}", kpscd.log());
    let addr = format!("{NODE_CLIENT_IP}:{}", FIRST_PORT + 1);
    let mut new = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap();
    assert_eq!(cluster_id(&mut new), "cluster-b", "the added port serves");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unmapped_traffic_passes_untouched() {
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let _kpscd = start_portmap(&topo, &portmap_args(&topo, &[mapping(0)], &[]));
    let before = PinnedMaps::open(&pins(&topo)).unwrap().stats(FIRST_PORT);

    // ICMP to the node.
    topo.run(
        &topo.client,
        "ping",
        &["-c", "2", "-W", "2", NODE_CLIENT_IP],
    )
    .unwrap();
    // TCP to another port of the node, served by the node's own stack.
    let listener = in_netns(&topo.node, || {
        std::net::TcpListener::bind((NODE_CLIENT_IP, 7777))
    })
    .unwrap()
    .unwrap();
    let accepted = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut s, b"node says hi").unwrap();
    });
    let text = in_netns(&topo.client, || {
        let mut s = TcpStream::connect((NODE_CLIENT_IP, 7777)).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        text
    })
    .unwrap();
    accepted.join().unwrap();
    assert_eq!(text, "node says hi");
    // UDP to the mapped port number itself: not TCP, not translated.
    let udp = in_netns(&topo.node, || UdpSocket::bind((NODE_CLIENT_IP, FIRST_PORT)))
        .unwrap()
        .unwrap();
    in_netns(&topo.client, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"datagram", (NODE_CLIENT_IP, FIRST_PORT))
            .unwrap();
    })
    .unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"datagram");
    // A TCP connection to the broker's own port on the node address: not mapped.
    let refused = in_netns(&topo.client, || {
        TcpStream::connect((NODE_CLIENT_IP, BROKER_PORT))
    })
    .unwrap();
    assert!(
        refused.is_err(),
        "the node's stack should refuse an unmapped port"
    );

    let after = PinnedMaps::open(&pins(&topo)).unwrap().stats(FIRST_PORT);
    assert_eq!(
        before, after,
        "the mapped port's counters moved for unmapped traffic"
    );
}

fn attachments(topo: &Topology) -> Vec<(String, usize)> {
    in_netns(&topo.node, || {
        ["n0", "n1"]
            .iter()
            .map(|iface| {
                let (_, programs) =
                    SchedClassifier::query_tcx(iface, TcAttachType::Ingress).unwrap();
                let ours = programs
                    .iter()
                    .filter(|p| p.name_as_str() == Some(kpsc_common::portmap::PROGRAM))
                    .count();
                (iface.to_string(), ours)
            })
            .collect()
    })
    .unwrap()
}

#[test]
fn sigkill_then_restart_leaves_one_attachment_and_working_traffic() {
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let args = portmap_args(&topo, &[mapping(0)], &[]);
    let addr = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let first = start_portmap(&topo, &args);
    let mut conn = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap();
    api_versions_ok(&mut conn).unwrap();
    Command::new("kill")
        .args(["-KILL", &first.pid().to_string()])
        .status()
        .unwrap();
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(!first.alive());
        Ok(())
    })
    .unwrap();
    assert!(
        pins(&topo).exists(),
        "pins survive a crash (kpscctl can still read them)"
    );

    let grace = Duration::from_secs(2);
    let mut with_grace = args.clone();
    with_grace.extend(["--shutdown-grace".to_owned(), "2s".to_owned()]);
    let mut second = start_portmap(&topo, &with_grace);
    assert_eq!(attachments(&topo), vec![("n0".into(), 1), ("n1".into(), 1)]);
    // The flow tracked before the crash still works: its translation was in the pins.
    api_versions_ok(&mut conn).unwrap();
    let mut fresh = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap();
    api_versions_ok(&mut fresh).unwrap();

    // A stop a load balancer can follow: unready at once, still translating (old flows
    // and new ones) for the grace, then detached.
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &second.pid().to_string()])
        .status()
        .unwrap();
    eventually(Duration::from_millis(500), || {
        let (status, body) = second.get("/ready")?;
        anyhow::ensure!(
            status == 503 && body.contains("shutting down"),
            "{status} {body}"
        );
        Ok(())
    })
    .unwrap();
    api_versions_ok(&mut fresh).unwrap();
    let mut during = in_netns(&topo.client, || RawClient::connect(&addr))
        .unwrap()
        .unwrap();
    api_versions_ok(&mut during).unwrap();
    assert_eq!(attachments(&topo), vec![("n0".into(), 1), ("n1".into(), 1)]);
    assert_eq!(second.wait_exit(Duration::from_secs(10)).unwrap(), 0);
    assert!(signalled.elapsed() >= grace, "{:?}", signalled.elapsed());
    assert_eq!(attachments(&topo), vec![("n0".into(), 0), ("n1".into(), 0)]);
    assert!(!pins(&topo).exists(), "a clean stop removes the pins");
}

#[test]
fn advertised_listener_mismatch_is_reported() {
    let mut topo = Topology::new(1, 1).unwrap();
    // The classic mistake: the broker still advertises its internal address.
    topo.start_tansu(
        &format!("{}:{BROKER_PORT}", broker_ip(0)),
        &format!("{}:{BROKER_PORT}", broker_ip(0)),
        "c",
    )
    .unwrap();
    let kpscd =
        Kpscd::spawn_mode(&portmap_args(&topo, &[mapping(0)], &[]), Some(&topo.node)).unwrap();
    eventually(Duration::from_secs(15), || {
        let (status, body) = kpscd.get("/ready")?;
        anyhow::ensure!(
            status == 503 && body.contains("advertises"),
            "{status} {body}"
        );
        Ok(())
    })
    .unwrap();
    let log = kpscd.log();
    assert!(
        log.contains("advertised listener mismatch")
            && log.contains(&format!("{}:{BROKER_PORT}", broker_ip(0))),
        "{log}"
    );
}

#[test]
fn missing_privileges_and_bad_flags_are_named() {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(kpscd_bin())
        .args([
            "portmap",
            "--bootstrap-server-mapping",
            "198.18.2.2:1,0.0.0.0:9093,x:9093",
            "--interface",
            "lo",
            "--http-disable",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("CAP_BPF")
            && stderr.contains("CAP_PERFMON")
            && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );

    for (args, flag) in [
        (
            vec!["portmap", "--bootstrap-server-mapping", "a:1,0.0.0.0:2,b:2"],
            "--interface",
        ),
        (
            vec![
                "portmap",
                "--bootstrap-server-mapping",
                "a:1,0.0.0.0:2",
                "--interface",
                "lo",
            ],
            "--bootstrap-server-mapping",
        ),
        (
            vec![
                "portmap",
                "--bootstrap-server-mapping",
                "a:1,0.0.0.0:2,b:2",
                "--interface",
                "lo",
                "--dynamic-sequential-min-port",
                "9000",
            ],
            "--dynamic-sequential-min-port",
        ),
    ] {
        let out = Command::new(kpscd_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
