//! Flow tracking of `kpscd portmap` against what real networks send: clients on any
//! source port (a cloud endpoint's NAT picks them at random, mapped port numbers included)
//! and a SYN flood from spoofed sources while a long-lived connection streams. Real
//! kernels in namespaces, real tansu brokers.

use std::{net::SocketAddr, time::Duration};

use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
use kpsc_tests::{
    RawClient, TansuHost,
    netns::{NODE_CLIENT_IP, Topology, client_ip, in_netns},
    portmap::{BROKER_PORT, FIRST_PORT, mapping_on, portmap_args, start_portmap},
};

const BROKERS: usize = 3;

/// Connects from `client_ip(0):src_port` to the node's `port`, within `timeout`.
fn connect_from(src_port: u16, port: u16, timeout: Duration) -> anyhow::Result<RawClient> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Earlier connections from this source port linger in TIME_WAIT (other destinations).
    socket.set_reuseaddr(true)?;
    socket.bind(format!("{}:{src_port}", client_ip(0)).parse()?)?;
    let remote: SocketAddr = format!("{NODE_CLIENT_IP}:{port}").parse()?;
    // into_std deregisters from the runtime's reactor: inside the runtime.
    let stream = rt.block_on(async {
        tokio::time::timeout(timeout, socket.connect(remote))
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out after {timeout:?}"))??
            .into_std()
            .map_err(anyhow::Error::from)
    })?;
    stream.set_nonblocking(false)?;
    RawClient::from_stream(stream)
}

/// The cluster id the broker behind a connection reports (tansu broker i: `cluster-i`).
fn cluster_id(conn: &mut RawClient) -> anyhow::Result<String> {
    let (r, _): (MetadataResponse, _) = conn.call(
        ApiKey::Metadata,
        4,
        &MetadataRequest::default().with_topics(Some(vec![])),
    )?;
    Ok(r.cluster_id.map(|c| c.to_string()).unwrap_or_default())
}

/// From every mapped port as source port, to every mapped port: each connection reaches
/// the broker of its destination port. A broker's reply to a translated source port that
/// equals a mapped port used to be taken for a client packet to that port and dropped.
fn every_mapped_source_port_connects(listen_host: &str) {
    let mut topo = Topology::new(1, BROKERS).unwrap();
    for i in 0..BROKERS {
        topo.start_advertising_node(i, BROKER_PORT, FIRST_PORT + i as u16)
            .unwrap();
    }
    let mappings: Vec<String> = (0..BROKERS).map(|i| mapping_on(i, listen_host)).collect();
    let kpscd = start_portmap(&topo, &portmap_args(&topo, &mappings, &[]));
    let ports: Vec<u16> = (0..BROKERS).map(|i| FIRST_PORT + i as u16).collect();
    let mut failures = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        for &src_port in &ports {
            let got = in_netns(&topo.client, || {
                let mut conn = connect_from(src_port, port, Duration::from_secs(3))?;
                cluster_id(&mut conn)
            })
            .unwrap()
            .map_err(|e| format!("{e:#}"));
            match got {
                Ok(id) if id == format!("cluster-{i}") => {}
                other => failures.push(format!("{src_port} -> {port}: {other:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "listen {listen_host}: {failures:#?}\nkpscd log:\n{}",
        kpscd.log()
    );
}

#[test]
fn clients_on_mapped_source_ports_connect_to_a_wildcard_listener() {
    every_mapped_source_port_connects("0.0.0.0");
}

#[test]
fn clients_on_mapped_source_ports_connect_to_a_specific_listener() {
    every_mapped_source_port_connects(NODE_CLIENT_IP);
}

/// A new connection that must be up within 5 s (a SYN lost to a full table would
/// otherwise wait for the kernel's two-minute connect timeout).
fn connect_within(addr: &str) -> anyhow::Result<RawClient> {
    let addr: SocketAddr = addr.parse()?;
    RawClient::from_stream(std::net::TcpStream::connect_timeout(
        &addr,
        Duration::from_secs(5),
    )?)
}

/// A one-record batch (Kafka record batch v2, uncompressed).
fn record_batch(value: &[u8]) -> bytes::Bytes {
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: 0,
        key: None,
        value: Some(bytes::Bytes::copy_from_slice(value)),
        headers: Default::default(),
    };
    let mut batch = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut batch,
        [record].iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    batch.freeze()
}

/// Produces one record on `conn` (acks=1) and checks the broker took it.
fn produce_one(conn: &mut RawClient, topic: &str, value: &[u8]) -> anyhow::Result<()> {
    use kafka_protocol::{
        messages::{
            ProduceRequest, ProduceResponse, TopicName,
            produce_request::{PartitionProduceData, TopicProduceData},
        },
        protocol::StrBytes,
    };
    let request = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(record_batch(value))),
                ]),
        ]);
    let (r, _): (ProduceResponse, _) = conn.call(ApiKey::Produce, 7, &request)?;
    let code = r
        .responses
        .first()
        .and_then(|t| t.partition_responses.first())
        .map(|p| p.error_code);
    anyhow::ensure!(code == Some(0), "produce answered {code:?}");
    Ok(())
}

/// 100,000 spoofed SYNs at the mapped port (half from 50,000 addresses, half from two, as
/// a flood from a few hosts looks) while one connection keeps producing through portmap:
/// that connection never errs and keeps its flow, and new clients connect during and after
/// the flood. Before half-open flows had their own table, the flood's SYNs took every
/// translated tuple (new clients locked out) or evicted the open connection.
#[test]
fn syn_flood_neither_breaks_open_connections_nor_locks_new_clients_out() {
    use kpsc_tests::{datapath::PinnedMaps, portmap::pins, syn_flood};
    use rdkafka::{
        ClientConfig,
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
    };
    use std::{
        net::Ipv4Addr,
        sync::atomic::{AtomicBool, AtomicU32, Ordering},
        time::Instant,
    };

    const SYNS: u32 = 100_000;
    const FLOOD_TIME: Duration = Duration::from_secs(6);
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &[]),
    );
    let bootstrap = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let topic = "flood";
    in_netns(&topo.client, || {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let created = rt
            .block_on(admin.create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            ))
            .unwrap();
        assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    })
    .unwrap();
    let mut stream = in_netns(&topo.client, || RawClient::connect(&bootstrap))
        .unwrap()
        .unwrap();
    produce_one(&mut stream, topic, b"before the flood").unwrap();
    let flows_before = PinnedMaps::open(&pins(&topo)).unwrap().flows();
    let node = Ipv4Addr::new(198, 18, 1, 1);

    let flooding = AtomicBool::new(true);
    let produced_during = AtomicU32::new(0);
    let (sent, flood_took, during, stream_result) = std::thread::scope(|s| {
        let streamer = s.spawn(|| -> anyhow::Result<()> {
            let mut n = 0u64;
            while flooding.load(Ordering::Relaxed) {
                n += 1;
                produce_one(&mut stream, topic, format!("during {n}").as_bytes())?;
                produced_during.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        let connector = s.spawn(|| {
            kpsc_tests::netns::enter(&topo.client).unwrap();
            let mut results = Vec::new();
            while flooding.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = connect_within(&bootstrap).and_then(|mut c| c.api_versions());
                results.push((
                    started.elapsed(),
                    r.map(|_| ()).map_err(|e| format!("{e:#}")),
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
            results
        });
        let flooder = s.spawn(|| {
            kpsc_tests::netns::enter(&topo.client).unwrap();
            let started = Instant::now();
            let sent = syn_flood::flood(
                node,
                FIRST_PORT,
                SYNS,
                FLOOD_TIME,
                syn_flood::few_and_many_sources,
            )
            .unwrap();
            (sent, started.elapsed())
        });
        let (sent, took) = flooder.join().unwrap();
        flooding.store(false, Ordering::Relaxed);
        (
            sent,
            took,
            connector.join().unwrap(),
            streamer.join().unwrap(),
        )
    });
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    eprintln!(
        "flood: {sent} SYNs in {flood_took:?}; produced during it: {}; new connections \
         during it: {} (slowest {:?}); counters: {stats:?}; half-open now: {}",
        produced_during.load(Ordering::Relaxed),
        during.len(),
        during.iter().map(|(t, _)| *t).max(),
        maps.embryos().len()
    );
    stream_result.unwrap_or_else(|e| panic!("the open connection failed: {e:#}"));
    assert_eq!(sent, SYNS);
    assert!(produced_during.load(Ordering::Relaxed) > 0);
    let failed: Vec<_> = during.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        !during.is_empty() && failed.is_empty(),
        "new connections during the flood failed: {failed:?}"
    );
    // The flood went through the half-open table and the budgets, not the open flow.
    assert!(stats.embryos > 10_000, "{stats:?}");
    assert!(stats.drop_source_limit > 0, "{stats:?}");
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
        flows_after.len() <= flows_before.len() + during.len() + 1,
        "spoofed SYNs entered the established table: {} flows",
        flows_after.len()
    );

    // After the flood: the stream goes on and new clients connect at once.
    produce_one(&mut stream, topic, b"after the flood").unwrap();
    for i in 0..20 {
        in_netns(&topo.client, || {
            let mut c = connect_within(&bootstrap)?;
            c.api_versions()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("new connection {i} after the flood: {e:#}"));
    }
    assert!(kpscd.alive(), "log:\n{}", kpscd.log());
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
/// that held a tuple no flow used.
#[test]
fn the_same_syn_on_two_cpus_leaves_one_flow_and_no_orphans() {
    use kpsc_tests::{datapath::PinnedMaps, portmap::pins, syn_flood::SynSender};
    use std::{collections::HashMap, net::Ipv4Addr, sync::Barrier};

    const FLOWS: u32 = 2_000;
    assert!(
        std::thread::available_parallelism().unwrap().get() >= 2,
        "needs two CPUs to race"
    );
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let _kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &[]),
    );
    let node = Ipv4Addr::new(198, 18, 1, 1);
    let source = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for cpu in 0..2 {
            let (barrier, topo) = (&barrier, &topo);
            s.spawn(move || {
                pin_to_cpu(cpu);
                kpsc_tests::netns::enter(&topo.client).unwrap();
                let sender = SynSender::new().unwrap();
                for i in 0..FLOWS {
                    barrier.wait();
                    sender
                        .send(source(i), 40_000 + i as u16, node, FIRST_PORT, i)
                        .unwrap();
                }
            });
        }
    });
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let ours = |client: &kpsc_common::FlowKey| {
        let ip = Ipv4Addr::from(client.src_ip.to_ne_bytes());
        ip >= source(0) && ip < source(FLOWS)
    };
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

/// A spoofed source never sees the broker's SYN-ACK, so its ACKs can only guess the
/// acknowledgement number: 200 spoofed handshakes with 5 guesses each leave no established
/// flow, and every guess is counted. Before, the SYN alone created the flow that carries
/// traffic, so spoofed SYNs filled that table.
#[test]
fn spoofed_handshakes_never_reach_the_established_table() {
    use kpsc_tests::{
        datapath::PinnedMaps,
        portmap::pins,
        syn_flood::{ACK, SynSender},
    };
    use std::net::Ipv4Addr;

    const SOURCES: u32 = 200;
    const GUESSES: u32 = 5;
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let _kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &[]),
    );
    let node = (Ipv4Addr::new(198, 18, 1, 1), FIRST_PORT);
    let source = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    in_netns(&topo.client, || {
        let sender = SynSender::new().unwrap();
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
        .filter(|(k, _)| Ipv4Addr::from(k.src_ip.to_ne_bytes()) >= source(0))
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
        connect_within(&format!("{NODE_CLIENT_IP}:{FIRST_PORT}"))
    })
    .unwrap()
    .unwrap();
    conn.api_versions().unwrap();
    assert_eq!(maps.stats(FIRST_PORT).new_flows, 1);
}
