//! `--bulk-transfer uring` beyond the proxy suite (which `cargo xtask test` also runs under
//! it): frames up to 16 MiB, a client that pauses in the middle of a frame (a kernel
//! worker must not wait on it), and the refusal where a seccomp filter forbids io_uring,
//! as a container runtime's default profile does.

use std::{
    io::Write,
    net::TcpStream,
    os::unix::process::CommandExt,
    process::Command,
    time::{Duration, Instant},
};

use kafka_protocol::messages::ProduceResponse;
use kpsc_tests::{
    Kpscd, MockCluster, RawClient, free_port_base, kpscd_bin, proxy_args,
    raw_pipeline::{Req, TOPIC, consume_all, decode, produce_request, read_frame, value},
    run_with_timeout,
};

fn cluster() -> MockCluster {
    MockCluster::led_by_broker_1(TOPIC, 4).unwrap()
}

fn start(cluster: &MockCluster, extra: &[&str]) -> (Kpscd, u16) {
    let base = free_port_base(20);
    let mut args = vec!["--bulk-transfer", "uring"];
    args.extend_from_slice(extra);
    (
        Kpscd::start(&proxy_args(cluster, base, &args)).unwrap(),
        base,
    )
}

/// What kpscd reads itself of a frame at most before the ring takes over (its header
/// buffer).
const READ_AHEAD: usize = 8 << 10;

/// Produce requests of 64 KiB, 1 MiB and 16 MiB record batches, each answered before the
/// next, then read back equal; the ring spliced all but the head of each, both ways.
#[test]
fn frames_of_64_kib_1_mib_and_16_mib_are_spliced_by_the_ring() {
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &["--max-frame-size", "33554432"]);
    let addr = format!("127.0.1.1:{base}");
    let mut client = RawClient::connect(&addr).unwrap();
    client
        .stream()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sizes = [64 << 10, 1 << 20, 16 << 20];
    // One partition each: librdkafka's mock keeps at most 5 MiB per partition, but always
    // the latest batch.
    let values: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&size| value(&format!("large-{size}-"), size))
        .collect();
    for (partition, v) in values.iter().enumerate() {
        let (r, _): (ProduceResponse, _) = client
            .call(
                kafka_protocol::messages::ApiKey::Produce,
                7,
                &produce_request(1, partition as i32, v),
            )
            .unwrap();
        let p = &r.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, 0), "{} bytes", v.len());
    }
    let consumed = consume_all(&addr, &vec![1; sizes.len()]);
    for (got, want) in consumed.iter().zip(&values) {
        assert!(
            got.len() == 1 && got[0] == *want,
            "{} bytes came back different",
            want.len()
        );
    }
    let payload: usize = sizes.iter().sum();
    let spliced = kpscd.metric("kpsc_spliced_bytes_total", "");
    // Each batch once in a Produce request and once in a Fetch response.
    let least = 2 * (payload - sizes.len() * READ_AHEAD);
    assert!(
        spliced >= least as f64,
        "spliced {spliced} bytes, expected at least {least}"
    );
    assert_eq!(kpscd.metric("kpsc_connection_errors_total", ""), 0.0);
}

/// The kernel functions a thread of `pid` waits in while it waits on a socket.
fn threads_waiting_on_a_socket(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let name = std::fs::read_to_string(t.join("comm")).ok()?;
            let wchan = std::fs::read_to_string(t.join("wchan")).ok()?;
            ["wait_woken", "sk_wait_data", "sk_stream_wait_memory"]
                .contains(&wchan.trim())
                .then(|| format!("{} in {wchan}", name.trim()))
        })
        .collect()
}

/// A client that stops for 300 ms three times in the middle of a 1 MiB Produce frame is
/// served, and while it pauses no thread of kpscd waits on its socket: the span came back
/// to its task after the sockets' 10 ms timeout and waits in tokio's reactor. (With no
/// timeout on the sockets, an io-wq worker sleeps in the splice for the whole pause.)
#[test]
fn a_client_pausing_mid_frame_is_served_and_holds_no_kernel_worker() {
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &[]);
    let addr = format!("127.0.1.1:{base}");
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let record = value("paused-", 1 << 20);
    let frame = Req::Produce {
        version: 7,
        acks: 1,
        partition: 0,
        value: record.clone(),
    }
    .frame(41);
    // The ring thread's own wait reads as a kernel function name: were wchan unreadable
    // here ("0" or empty), the check below could not fail.
    let ring_wait = std::fs::read_dir(format!("/proc/{}/task", kpscd.pid()))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?.path();
            (std::fs::read_to_string(t.join("comm")).ok()?.trim() == "kpsc-uring")
                .then(|| std::fs::read_to_string(t.join("wchan")).unwrap_or_default())
        })
        .collect::<Vec<_>>();
    assert!(
        ring_wait
            .iter()
            .any(|w| !w.trim().is_empty() && w.trim() != "0"),
        "wchan is not readable: {ring_wait:?}"
    );
    let mut waiting = std::collections::BTreeSet::new();
    for (i, piece) in frame.chunks(frame.len() / 4 + 1).enumerate() {
        stream.write_all(piece).unwrap();
        if i < 3 {
            std::thread::sleep(Duration::from_millis(100));
            // The kernel worker has had 10 times its timeout to give up.
            let deadline = Instant::now() + Duration::from_millis(200);
            while Instant::now() < deadline {
                waiting.extend(threads_waiting_on_a_socket(kpscd.pid()));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let response: ProduceResponse = decode(&read_frame(&mut stream).unwrap(), 41, 7).unwrap();
    let p = &response.responses[0].partition_responses[0];
    assert_eq!((p.error_code, p.base_offset), (0, 0));
    assert!(
        waiting.is_empty(),
        "kpscd threads waited on a socket while the client paused: {waiting:?}"
    );
    let consumed = consume_all(&addr, &[1]);
    assert!(consumed[0] == [record], "the record came back different");
    assert!(
        kpscd.metric("kpsc_spliced_bytes_total", "") >= (1 << 20) as f64 - 2.0 * READ_AHEAD as f64
    );
    assert_eq!(kpscd.metric("kpsc_connection_errors_total", ""), 0.0);
}

/// A seccomp filter that fails io_uring_setup with EPERM, as Docker's default profile
/// does: `--bulk-transfer uring` must stop at start and say why and which flag, not
/// serve with a path it does not have.
#[test]
fn where_seccomp_forbids_io_uring_kpscd_refuses_to_start_and_says_why() {
    let cluster = MockCluster::new(1).unwrap();
    let base = free_port_base(20);
    let mut cmd = Command::new(kpscd_bin());
    cmd.arg("proxy")
        .args(proxy_args(&cluster, base, &["--bulk-transfer", "uring"]));
    // SAFETY: between fork and exec only async-signal-safe calls (prctl).
    unsafe { cmd.pre_exec(forbid_io_uring_setup) };
    let out = run_with_timeout(&mut cmd, b"", Duration::from_secs(20)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kpscd served without io_uring: {stderr}"
    );
    assert!(
        stderr.contains("--bulk-transfer uring") && stderr.contains("io_uring"),
        "the error must name the flag and io_uring: {stderr}"
    );
    eprintln!("{}: {stderr}", out.status);
}

/// Installs a seccomp filter on the calling (forked) process: io_uring_setup fails with
/// EPERM, every other call is allowed.
fn forbid_io_uring_setup() -> std::io::Result<()> {
    const SECCOMP_DATA_NR: u32 = 0;
    let filter = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_DATA_NR,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a filter program that outlives the call (the kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
