//! kpsc-bench as an operator runs it: interrupted in the middle of a namespace run, it
//! removes the namespaces, BPF pins and proxies it started, as at a normal end; its
//! sockmap ceiling probe forwards with every byte in the kernel; and its splice and
//! io_uring relay probes carry every workload's requests and responses. Runs as root,
//! like the other namespace tests.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use kpsc_tests::{datapath::DEFAULT_PIN_ROOT, eventually, kpsc_bench_bin};

fn namespaces_named(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// kpscd processes whose parent is `parent`.
fn kpscd_children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.contains("(kpscd)")
                    && stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                        == Some(parent)
            })
        })
        .collect()
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn interrupted_benchmark_removes_its_namespaces_pins_and_proxies() {
    let out = std::env::temp_dir().join(format!("kpsc-bench-interrupt-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let log = out.join("stderr.log");
    let mut bench = Command::new(kpsc_bench_bin())
        .args([
            "--topology",
            "netns",
            "--workloads",
            "produce",
            "--acks",
            "1",
            "--batch-bytes",
            "65536",
            "--repetitions",
            "1",
            "--duration",
            "60s",
            "--warmup",
            "0s",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        // A file, not a pipe: proxies left running would hold a pipe open forever.
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting kpsc-bench");
    // Its namespaces are named after its PID (see kpsc_testkit::netns::Topology).
    let prefix = format!("kpsc{}x", bench.id() % 100_000);
    let node_ns = format!("{prefix}0n");
    let pins = Path::new(DEFAULT_PIN_ROOT).join(&node_ns);
    // Measuring: namespaces up, portmap attached and pinned, the proxies running.
    let proxies = eventually(Duration::from_secs(60), || {
        ensure!(namespaces_named(&prefix).len() == 3, "namespaces not up");
        ensure!(pins.exists(), "portmap not pinned yet");
        let proxies = kpscd_children_of(bench.id());
        // The default targets' kpscd: proxy (copy), splice, uring and portmap.
        ensure!(proxies.len() == 4, "{} proxies running", proxies.len());
        Ok(proxies)
    })
    .expect("kpsc-bench never got to measuring");

    // SAFETY: signalling the child this test started, by PID.
    unsafe { libc::kill(bench.id() as i32, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), || {
        bench
            .try_wait()?
            .context("kpsc-bench still running after SIGINT")
    })
    .unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("interrupted"), "stderr: {stderr}");
    assert_eq!(namespaces_named(&prefix), Vec::<String>::new());
    assert!(!pins.exists(), "{} left behind", pins.display());
    eventually(Duration::from_secs(5), || {
        let left: Vec<_> = proxies.iter().filter(|&&p| running(p)).collect();
        ensure!(left.is_empty(), "proxies still running: {left:?}");
        Ok(())
    })
    .context("the proxies outlived the benchmark")
    .unwrap();
    let _ = std::fs::remove_dir_all(&out);
}

/// The `sockmap-ceiling` target measures the kernel path only if the kernel really carries
/// the bytes: every produce and fetch request answered (--quick checks each response and
/// that acks=0 requests all reached the sink), the probe's counters showing bytes
/// redirected socket to socket and none handed to userspace.
#[test]
fn sockmap_ceiling_probe_forwards_every_byte_in_the_kernel() {
    let out = std::env::temp_dir().join(format!("kpsc-bench-ceiling-{}", std::process::id()));
    let output = Command::new(kpsc_bench_bin())
        .args([
            "--quick",
            "--topology",
            "netns",
            "--targets",
            "direct,sockmap-ceiling",
            "--workloads",
            "produce,fetch,small",
            "--duration",
            "1s",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("starting kpsc-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kpsc-bench failed: {stderr}");
    let results = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path().join("results.md"))
        .next()
        .expect("a results folder");
    let results = std::fs::read_to_string(results).unwrap();
    let counts: Vec<(u64, u64)> = results
        .lines()
        .filter_map(|l| l.split_once("sockmap-ceiling: redirected_bytes="))
        .map(|(_, rest)| {
            let (redirected, passed) = rest.split_once(" passed_bytes=").unwrap();
            (redirected.parse().unwrap(), passed.trim().parse().unwrap())
        })
        .collect();
    assert!(
        !counts.is_empty(),
        "no probe counters in the report: {results}"
    );
    let (redirected, passed) = *counts.last().unwrap();
    // 1 s of each of four workloads at well over 10 MB/s.
    assert!(
        redirected > 40_000_000,
        "kernel redirected {redirected} bytes: {results}"
    );
    assert_eq!(passed, 0, "bytes reached userspace: {results}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The relay ceiling targets (`kpsc-relay-ceiling`) as the benchmark runs them, in the
/// namespace topology: every produce, fetch and small request answered through each
/// (--quick checks each response), and each probe's own count showing the bytes went
/// through it. About 10 s.
#[test]
fn relay_ceiling_probes_carry_every_workload() {
    let out = std::env::temp_dir().join(format!("kpsc-bench-relays-{}", std::process::id()));
    let probes = [
        "splice-ceiling",
        "uring-ceiling",
        "uring-sqpoll-ceiling",
        "uring-recv-send-ceiling",
    ];
    let output = Command::new(kpsc_bench_bin())
        .args([
            "--quick",
            "--topology",
            "netns",
            "--targets",
            &format!("direct,{}", probes.join(",")),
            "--workloads",
            "produce,fetch,small",
            "--batch-bytes",
            "65536",
            "--duration",
            "1s",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("starting kpsc-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kpsc-bench failed: {stderr}");
    let results = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path().join("results.md"))
        .next()
        .expect("a results folder");
    let results = std::fs::read_to_string(results).unwrap();
    for probe in probes {
        let relayed: Vec<u64> = results
            .lines()
            .filter_map(|l| l.split_once(&format!("{probe}: relayed_bytes=")))
            .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .collect();
        // 1 s of each throughput workload at well over 10 MB/s.
        assert!(
            relayed.last().is_some_and(|&n| n > 30_000_000),
            "{probe} relayed {relayed:?}: {results}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
