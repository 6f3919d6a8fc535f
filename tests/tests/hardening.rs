//! What trying to break `kpscd proxy` found, each as an operator would meet it, against a
//! real broker (librdkafka's mock) and the real binary: signals at the wrong time, a client
//! that resets mid-frame, a broker that ends its stream mid-response, a response too large
//! to rewrite within the memory budget.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use kafka_protocol::messages::{
    ApiKey, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
};
use kpsc_tests::{
    Kpscd, MockCluster, RawClient, eventually, expect_closed, free_port_base,
    kernel_path::kernel_response_counters,
    proxy_args,
    raw_pipeline::{CLIENT_ID, Req, TOPIC, decode, read_frame, value},
    request_body,
    response_delay_shim::{HoldPlan, proxy_behind_shim},
};

fn start(cluster: &MockCluster, extra: &[&str]) -> (Kpscd, u16) {
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(cluster, base, extra)).unwrap();
    (kpscd, base)
}

fn signal(kpscd: &Kpscd, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &kpscd.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A small Metadata round trip through kpscd on a fresh connection.
fn assert_serving(kpscd: &Kpscd, base: u16) {
    assert!(kpscd.alive(), "kpscd died; log:\n{}", kpscd.log());
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    let (response, _): (MetadataResponse, _) = client
        .call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    assert_eq!(response.brokers.len(), 3);
}

/// SIGHUP used to end proxy mode (exit 129: no handler); and after SIGTERM an operator
/// who signals again should not have to wait for the shutdown timeout.
#[test]
fn sighup_is_survived_and_a_second_signal_stops_at_once() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    let (mut kpscd, base) = start(&cluster, &["--shutdown-timeout", "60s"]);

    signal(&kpscd, "HUP");
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(kpscd.log().contains("SIGHUP"), "SIGHUP not logged");
        Ok(())
    })
    .unwrap();
    assert_serving(&kpscd, base);

    // A request the broker answers only after 30 s keeps the shutdown waiting.
    let mut waiting = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    cluster.set_rtt(1, Duration::from_secs(30)).unwrap();
    waiting
        .send(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    signal(&kpscd, "TERM");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        kpscd.alive(),
        "the first SIGTERM waits for the request in flight"
    );
    let second = Instant::now();
    signal(&kpscd, "INT");
    let code = kpscd.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(code, 0, "log:\n{}", kpscd.log());
    assert!(
        second.elapsed() < Duration::from_secs(10),
        "the second signal stops at once"
    );
    // The harness's own SIGTERM may be the one that arrives second.
    assert!(kpscd.log().contains("stopping now"), "{}", kpscd.log());
}

/// The labels of kpscd's counted connection errors: `reason="..."` of every non-zero
/// series.
fn error_reasons(kpscd: &Kpscd) -> Vec<String> {
    let (_, text) = kpscd.get("/metrics").unwrap();
    text.lines()
        .filter(|l| l.starts_with("kpsc_connection_errors_total{") && !l.ends_with(" 0"))
        .filter_map(|l| Some(l.split("reason=\"").nth(1)?.split('"').next()?.to_owned()))
        .collect()
}

/// Waits until kpscd counted an error blamed on `blamed` ("client" or "broker") and
/// checks it blamed none on the other side.
fn assert_blamed_on(kpscd: &Kpscd, transfer: &str, blamed: &str) {
    let other = if blamed == "client" {
        "broker"
    } else {
        "client"
    };
    eventually(Duration::from_secs(5), || {
        let n = kpscd.metric(
            "kpsc_connection_errors_total",
            &format!("reason=\"{blamed}_"),
        );
        anyhow::ensure!(n >= 1.0, "not counted yet");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{transfer}: {e:#}; log:\n{}", kpscd.log()));
    assert_eq!(
        kpscd.metric(
            "kpsc_connection_errors_total",
            &format!("reason=\"{other}_")
        ),
        0.0,
        "{transfer}: blamed on the {other} as well"
    );
}

/// The first 100 KiB of a 512 KiB Produce request on a new connection to `addr`.
fn start_of_a_large_produce(addr: &str) -> TcpStream {
    let produce = ProduceRequest::default().with_acks(1).with_timeout_ms(1000);
    let body = request_body(ApiKey::Produce, 7, 1, "mid-frame", &produce).unwrap();
    let declared = 512 * 1024i32;
    // One write: the head in the first segment, where the kernel path can read it.
    let mut start = declared.to_be_bytes().to_vec();
    start.extend_from_slice(&body);
    start.resize(start.len() + 100 * 1024, 0);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&start).unwrap();
    // Long enough for kpscd (or the kernel, under sockmap) to pass it on.
    std::thread::sleep(Duration::from_millis(200));
    stream
}

/// Under sockmap, the start of the frame went through the kernel.
fn assert_kernel_carried(kpscd: &Kpscd, transfer: &str) {
    if transfer == "sockmap" {
        let frames = kpscd.metric("kpsc_kernel_redirected_frames_total", "from_client");
        assert!(frames >= 1.0, "the kernel carried no frame");
    }
}

/// A client that resets its connection in the middle of a large Produce request is the
/// client's doing: it used to be counted as a broker I/O error. The same error whichever
/// way kpscd moves the request (under sockmap the kernel was carrying it).
#[test]
fn a_client_reset_mid_frame_is_blamed_on_the_client() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    let mut reasons = Vec::new();
    for transfer in ["copy", "splice", "sockmap", "uring"] {
        let (kpscd, base) = start(&cluster, &["--bulk-transfer", transfer]);
        let stream = start_of_a_large_produce(&format!("127.0.1.1:{base}"));
        // SO_LINGER 0: close sends RST, as a crashed or killed client does.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket this test owns, with a correctly sized value.
        let set = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        drop(stream);
        assert_blamed_on(&kpscd, transfer, "client");
        assert_kernel_carried(&kpscd, transfer);
        reasons.push((transfer, error_reasons(&kpscd)));
        assert_serving(&kpscd, base);
    }
    eprintln!("{reasons:?}");
    assert!(reasons.windows(2).all(|w| w[0].1 == w[1].1), "{reasons:?}");
}

/// A broker that goes down while a client is in the middle of a large Produce request to
/// it: the client's connection is closed and the broker is blamed, with the same error
/// whichever way kpscd moves the request.
#[test]
fn a_broker_dying_mid_frame_closes_the_connection_and_is_blamed_on_the_broker() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    let mut reasons = Vec::new();
    for transfer in ["copy", "splice", "sockmap", "uring"] {
        let (kpscd, base) = start(&cluster, &["--bulk-transfer", transfer]);
        // Broker 3 (a dynamic port), so kpscd keeps its view of the cluster through 1.
        let mut stream = start_of_a_large_produce(&format!("127.0.1.3:{}", base + 13));
        // The mock closes its connections when a broker goes down.
        cluster.broker_down(3).unwrap();
        expect_closed(&mut stream);
        assert_blamed_on(&kpscd, transfer, "broker");
        assert_kernel_carried(&kpscd, transfer);
        reasons.push((transfer, error_reasons(&kpscd)));
        cluster.broker_up(3).unwrap();
        assert_serving(&kpscd, base);
    }
    eprintln!("{reasons:?}");
    assert!(reasons.windows(2).all(|w| w[0].1 == w[1].1), "{reasons:?}");
}

/// A client that half-closes in the middle of a large Produce request ends its stream
/// mid-frame: the connection is closed and the client is blamed, the same whichever way
/// kpscd moves the request (under sockmap the kernel was carrying it, and the FIN comes
/// in a packet of its own).
#[test]
fn a_client_fin_mid_frame_closes_the_connection_and_is_blamed_on_the_client() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    let mut reasons = Vec::new();
    for transfer in ["copy", "splice", "sockmap", "uring"] {
        let (kpscd, base) = start(&cluster, &["--bulk-transfer", transfer]);
        let mut stream = start_of_a_large_produce(&format!("127.0.1.1:{base}"));
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        eprintln!("{transfer}: half-closed mid-frame");
        expect_closed(&mut stream);
        eventually(Duration::from_secs(5), || {
            let truncated = kpscd.metric("kpsc_connection_errors_total", "client_truncated");
            anyhow::ensure!(truncated >= 1.0, "not counted yet");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{transfer}: {e:#}; log:\n{}", kpscd.log()));
        assert_kernel_carried(&kpscd, transfer);
        reasons.push((transfer, error_reasons(&kpscd)));
        assert_serving(&kpscd, base);
    }
    eprintln!("{reasons:?}");
    assert!(reasons.windows(2).all(|w| w[0].1 == w[1].1), "{reasons:?}");
}

/// Bytes a client reads until its connection ends (FIN or reset), at most 10 s.
fn read_until_closed(stream: &mut TcpStream) -> usize {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut received = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return received,
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return received,
            Err(e) => panic!("the connection stayed open after {received} bytes: {e}"),
        }
    }
}

/// A broker that ends its stream in the middle of a large response (a Fetch of a 600 KiB
/// batch that a fault-injecting relay cuts after 100 KiB, as a broker dying mid-write
/// leaves it): the client's connection is closed before a whole response reached it, and
/// the broker is blamed, the same whichever way kpscd moves the response (under sockmap
/// the kernel was carrying it, under splice and uring a span was).
#[test]
fn a_broker_ending_its_stream_mid_response_closes_the_connection_and_is_blamed_on_the_broker() {
    const KEEP: usize = 100 << 10;
    let mut reasons = Vec::new();
    for transfer in ["copy", "splice", "sockmap", "uring"] {
        let cluster = MockCluster::led_by_broker_1(TOPIC, 1).unwrap();
        let plan = HoldPlan::cut(CLIENT_ID, ApiKey::Fetch, KEEP);
        let (shim, kpscd, base) =
            proxy_behind_shim(&cluster, plan, &["--bulk-transfer", transfer]).unwrap();
        let addr = format!("127.0.1.1:{base}");
        let mut producer = TcpStream::connect(&addr).unwrap();
        let batch = Req::Produce {
            version: 7,
            acks: 1,
            partition: 0,
            value: value("cut", 600 << 10),
        };
        producer.write_all(&batch.frame(1)).unwrap();
        let produced: ProduceResponse = decode(&read_frame(&mut producer).unwrap(), 1, 7).unwrap();
        assert_eq!(produced.responses[0].partition_responses[0].error_code, 0);
        let redirected_before = kernel_response_counters(&kpscd).redirected_bytes;

        let mut fetcher = TcpStream::connect(&addr).unwrap();
        fetcher
            .write_all(&Req::Fetch { partition: 0 }.frame(2))
            .unwrap();
        let received = read_until_closed(&mut fetcher);
        assert_eq!(shim.cuts(), 1, "{transfer}: the relay cut no response");
        assert!(
            received <= KEEP,
            "{transfer}: the client got {received} bytes, more than the broker sent"
        );
        assert_blamed_on(&kpscd, transfer, "broker");
        // What the broker sent reached the client up to the cut: past kpscd's 8 KiB
        // read-ahead that is a span under splice and uring, and under sockmap the kernel's.
        assert!(
            received >= KEEP / 2,
            "{transfer}: the client got only {received} of the {KEEP} bytes sent"
        );
        let redirected = kernel_response_counters(&kpscd).redirected_bytes - redirected_before;
        if transfer == "sockmap" {
            assert!(
                redirected >= (KEEP / 2) as f64,
                "the kernel carried only {redirected} bytes of the response"
            );
        }
        eprintln!("{transfer}: client got {received} bytes, the kernel carried {redirected}");
        reasons.push((transfer, error_reasons(&kpscd)));
        assert_serving(&kpscd, base);
    }
    eprintln!("{reasons:?}");
    assert!(reasons.windows(2).all(|w| w[0].1 == w[1].1), "{reasons:?}");
}

/// Rewriting a response takes several times its size; every connection shares one budget
/// for it, and a response that could never fit closes only its own connection.
#[test]
fn a_response_too_large_for_the_rewrite_budget_closes_only_its_connection() {
    let cluster = MockCluster::new(3).unwrap();
    // Few topics with many partitions: the mock takes a while per topic created.
    for i in 0..20 {
        cluster
            .create_topic(&format!("topic-{i:04}"), 1200)
            .unwrap();
    }
    let (kpscd, base) = start(&cluster, &["--rewrite-memory-budget", "1MiB"]);
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    // Every topic (24,000 partitions): a response of about 700 KiB, whose rewrite needs
    // twice that.
    client
        .send(
            ApiKey::Metadata,
            1,
            &MetadataRequest::default().with_topics(None),
        )
        .unwrap();
    assert!(
        client.recv_raw().is_err(),
        "the oversized rewrite must close the connection, not be answered"
    );
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(
            kpscd.metric("kpsc_connection_errors_total", "rewrite_budget") >= 1.0,
            "not counted"
        );
        Ok(())
    })
    .unwrap();
    assert!(
        kpscd.log().contains("--rewrite-memory-budget"),
        "the log names the flag:\n{}",
        kpscd.log()
    );
    assert_serving(&kpscd, base);
}
