//! `kpscd proxy --bulk-transfer sockmap` when a peer reads slowly. What the kernel
//! redirects toward a socket waits on that socket's psock backlog, which no socket buffer
//! bounds, and the sender's TCP window stays open meanwhile: without a limit, a client
//! that stops reading makes kpscd's node hold every response its broker sends. kpscd
//! holds the stream past a cap, and TCP's backpressure reaches the broker again, as on the
//! userspace path. The same the other way, for a broker that stops reading requests (a
//! fault-injecting relay in front of librdkafka's mock). Needs root.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use kafka_protocol::messages::{FetchResponse, MetadataResponse, ProduceResponse};
use kpsc_tests::{
    Kpscd, MockCluster, free_port_base,
    kernel_path::{KernelCounters, kernel_counters, kernel_response_counters},
    proxy_args,
    raw_pipeline::{CLIENT_ID, Req, TOPIC, decode, read_frame, record_values, value},
    response_delay_shim::{HoldPlan, proxy_behind_shim},
};

/// Fetches of one 1 MiB batch (or Produce requests of one), pipelined on one connection.
const FETCHES: usize = 30;
const BATCH: usize = 1 << 20;
/// kpscd's cap on a direction's redirect backlog (BACKLOG_CAP).
const CAP: usize = 4 << 20;
/// What the kernel may redirect toward a peer that reads nothing: the cap, kpscd's socket
/// send buffer (4 MiB at most by default), the frame under way when the cap was crossed
/// and what arrived before kpscd looked: far below the 30 MiB sent.
const BOUND: usize = CAP + (4 << 20) + 2 * BATCH + (4 << 20);
/// Between two requests: at most a frame arrives per PACE, and kpscd looks each time a
/// request is reported, so it sees the cap crossed before much more comes, even on a busy
/// machine. (A burst of responses after the last report is not bounded by the cap yet: see
/// BACKLOG_CAP.)
const PACE: Duration = Duration::from_millis(10);

/// What the kernel redirected toward a peer that read nothing stayed within BOUND, and
/// was something; kpscd counted the hold on the direction toward `peer`.
fn assert_held_back(kpscd: &Kpscd, held: KernelCounters, peer: &str) {
    let direction = match peer {
        "client" => "to_client",
        _ => "from_client",
    };
    let holds = kpscd.metric(
        "kpsc_kernel_backlog_holds_total",
        &format!("direction=\"{direction}\""),
    );
    assert!(holds >= 1.0, "no hold counted {direction}");
    eprintln!("while the {peer} read nothing: {held:?}");
    assert!(
        held.redirected_bytes <= BOUND as f64,
        "the kernel redirected {} bytes toward a {peer} that read nothing (bound {BOUND})",
        held.redirected_bytes
    );
    assert!(
        held.redirected_bytes >= BATCH as f64,
        "the kernel carried nothing: {held:?}"
    );
}

/// A client socket that buffers little, so what piles up does so on kpscd's side.
fn small_buffered_client(addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

#[test]
fn a_client_that_stops_reading_holds_back_the_broker_not_kpscds_memory() {
    let cluster = MockCluster::led_by_broker_1(TOPIC, 1).unwrap();
    let base = free_port_base(20);
    let args = proxy_args(&cluster, base, &["--bulk-transfer", "sockmap"]);
    let kpscd = Kpscd::start(&args).unwrap();
    let addr = format!("127.0.1.1:{base}");
    let batch = value("slow-reader", BATCH);
    let mut producer = TcpStream::connect(&addr).unwrap();
    let produce = Req::Produce {
        version: 7,
        acks: 1,
        partition: 0,
        value: batch.clone(),
    };
    producer.write_all(&produce.frame(1)).unwrap();
    let produced: ProduceResponse = decode(&read_frame(&mut producer).unwrap(), 1, 7).unwrap();
    assert_eq!(produced.responses[0].partition_responses[0].error_code, 0);

    // 30 Fetches of the batch, then nothing read for a while: the broker answers every
    // one at once, 30 MiB.
    let mut client = small_buffered_client(&addr);
    client.set_nodelay(true).unwrap();
    for id in 0..FETCHES {
        // A write each, a moment apart: a segment each, which the kernel carries (many
        // requests in one segment go to kpscd, and so do their responses).
        client
            .write_all(&Req::Fetch { partition: 0 }.frame(id as i32))
            .unwrap();
        std::thread::sleep(PACE);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_held_back(&kpscd, kernel_response_counters(&kpscd), "client");

    // Every response still arrives whole and in order, the rest by kpscd or the kernel.
    for id in 0..FETCHES as i32 {
        let raw = read_frame(&mut client).unwrap_or_else(|e| panic!("response {id}: {e:#}"));
        let fetched: FetchResponse = decode(&raw, id, 11).unwrap();
        let partition = &fetched.responses[0].partitions[0];
        assert_eq!(partition.error_code, 0, "response {id}");
        let values = record_values(partition.records.as_ref()).unwrap();
        assert_eq!(values.len(), 1, "response {id}");
        assert!(
            values[0] == batch,
            "response {id}: the batch came back changed"
        );
    }
    let done = kernel_response_counters(&kpscd);
    eprintln!("after reading everything: {done:?}");
    assert!(
        done.passed_frames >= 1.0,
        "kpscd never took the stream: {done:?}"
    );
}

#[test]
fn a_broker_that_stops_reading_holds_back_the_client_not_kpscds_memory() {
    let cluster = MockCluster::led_by_broker_1(TOPIC, 1).unwrap();
    let plan = HoldPlan::stall_reading(CLIENT_ID, Duration::from_secs(4));
    let (shim, kpscd, base) =
        proxy_behind_shim(&cluster, plan, &["--bulk-transfer", "sockmap"]).unwrap();
    let mut client = TcpStream::connect(format!("127.0.1.1:{base}")).unwrap();
    client.set_nodelay(true).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The first request; then the relay reads nothing for 4 s.
    client.write_all(&Req::Metadata.frame(0)).unwrap();
    let _: MetadataResponse = decode(&read_frame(&mut client).unwrap(), 0, 12).unwrap();

    // 30 MiB of Produce requests, a write each (a segment each, which the kernel
    // carries), from a thread of their own: once TCP pushes back, a write blocks.
    let batch = value("slow-broker", BATCH);
    let writer = {
        let (mut stream, batch) = (client.try_clone().unwrap(), batch.clone());
        std::thread::spawn(move || {
            for id in 1..=FETCHES as i32 {
                let produce = Req::Produce {
                    version: 7,
                    acks: 1,
                    partition: 0,
                    value: batch.clone(),
                };
                stream.write_all(&produce.frame(id)).unwrap();
                std::thread::sleep(PACE);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2500));
    assert_held_back(&kpscd, kernel_counters(&kpscd), "broker");

    // Every request reaches the broker whole and in order: each response is next.
    writer.join().unwrap();
    for id in 1..=FETCHES as i32 {
        let raw = read_frame(&mut client).unwrap_or_else(|e| panic!("response {id}: {e:#}"));
        let produced: ProduceResponse = decode(&raw, id, 7).unwrap();
        let partition = &produced.responses[0].partition_responses[0];
        assert_eq!(partition.error_code, 0, "response {id}");
        assert_eq!(partition.base_offset, i64::from(id - 1), "response {id}");
    }
    let done = kernel_counters(&kpscd);
    eprintln!("after every response: {done:?}");
    assert!(
        done.passed_frames >= 1.0,
        "kpscd never took the stream: {done:?}"
    );
    assert!(shim.errors().is_empty(), "{:?}", shim.errors());
}
