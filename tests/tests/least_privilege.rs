//! What a compromised or curious party gets from a running kpscd: `kpscd proxy` started
//! as root becomes `--user` once its listeners are bound (every thread, no capability
//! left) and still serves a real client through dynamic listeners bound afterwards;
//! without `--user` it says that root is unnecessary; `/maps`, which names the real
//! brokers, can live on its own address or nowhere.

use std::process::Command;

use kpsc_tests::{
    Kpscd, MockCluster, free_port_base, kpscctl_bin, kpscd_bin, produce_acked, proxy_args,
};

fn cluster() -> MockCluster {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    for p in 0..3 {
        cluster.set_leader("t", p, p + 1).unwrap();
    }
    cluster
}

/// (uids, gids, effective capabilities) of every thread of `pid`.
fn thread_credentials(pid: u32) -> Vec<(String, String, String)> {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|s| (field(&s, "Uid:"), field(&s, "Gid:"), field(&s, "CapEff:")))
        .collect()
}

#[test]
fn proxy_started_as_root_serves_as_nobody_with_no_capability() {
    assert!(
        nix_is_root(),
        "this test starts kpscd as root to watch it drop root; run the tests as root"
    );
    let cluster = cluster();
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(
        &cluster,
        base,
        &["--user", "nobody", "--group", "nogroup"],
    ))
    .unwrap();
    // Brokers 2 and 3 are served by dynamic listeners bound after the drop: the leaders of
    // partitions 1 and 2 are only reachable through them.
    assert_eq!(
        produce_acked(&format!("127.0.1.1:{base}"), "t", 300),
        300,
        "{}",
        kpscd.log()
    );
    let rows = kpscd.maps().unwrap();
    assert_eq!(
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["bound"] == true)
            .count(),
        3,
        "{rows}"
    );
    let threads = thread_credentials(kpscd.pid());
    assert!(threads.len() > 1, "{threads:?}");
    for (uids, gids, caps) in &threads {
        assert_eq!(uids, "65534 65534 65534 65534", "{threads:?}");
        assert_eq!(gids, "65534 65534 65534 65534", "{threads:?}");
        assert_eq!(caps, "0000000000000000", "{threads:?}");
    }
    let log = kpscd.log();
    assert!(
        log.contains("running as an unprivileged user") && log.contains("user=nobody"),
        "{log}"
    );
    assert!(!log.contains("running as root"), "{log}");
}

#[test]
fn root_without_user_is_warned_and_a_low_dynamic_port_is_refused_with_user() {
    let cluster = cluster();
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &[])).unwrap();
    let log = kpscd.log();
    assert!(
        log.contains("running as root") && log.contains("--user"),
        "{log}"
    );
    drop(kpscd);

    // Dynamic listeners are bound after the drop, so a port below 1024 could never be.
    let refused = Command::new(kpscd_bin())
        .args([
            "proxy",
            "--bootstrap-server-mapping",
            &format!("{},127.0.0.1:{base}", cluster.broker_addr(1)),
            "--dynamic-sequential-min-port",
            "900",
            "--user",
            "nobody",
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--dynamic-sequential-min-port") && stderr.contains("1024"),
        "{stderr}"
    );
    let unknown = Command::new(kpscd_bin())
        .args([
            "proxy",
            "--bootstrap-server-mapping",
            &format!("{},127.0.0.1:{base}", cluster.broker_addr(1)),
            "--user",
            "no-such-user-kpsc",
        ])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("--user") && stderr.contains("no-such-user-kpsc"),
        "{stderr}"
    );
}

#[test]
fn maps_is_served_on_its_own_address_or_not_at_all() {
    let cluster = cluster();
    let base = free_port_base(20);
    let maps_port = free_port_base(1);
    let maps_addr = format!("127.0.0.1:{maps_port}");
    let separate = Kpscd::start(&proxy_args(
        &cluster,
        base,
        &["--http-maps-listen-address", &maps_addr],
    ))
    .unwrap();
    let (status, _) = separate.get("/maps").unwrap();
    assert_eq!(status, 404, "/maps still on the admin endpoint");
    assert_eq!(separate.get("/ready").unwrap().0, 200);
    let admin = separate.admin.to_string();
    let wrong = Command::new(kpscctl_bin())
        .args(["maps", "--admin", &admin])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("--http-maps-listen-address"), "{stderr}");
    let right = Command::new(kpscctl_bin())
        .args(["maps", "--admin", &maps_addr])
        .output()
        .unwrap();
    assert!(right.status.success(), "{right:?}");
    let table = String::from_utf8_lossy(&right.stdout);
    assert!(table.contains(&cluster.broker_addr(1)), "{table}");
    // Only /maps there: the metrics and readiness stay on the admin address.
    let (status, _) = kpsc_tests::http_get(maps_addr.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 404);
    drop(separate);

    let disabled = Kpscd::start(&proxy_args(&cluster, base, &["--http-maps-disable"])).unwrap();
    assert_eq!(disabled.get("/maps").unwrap().0, 404);
    assert_eq!(disabled.get("/ready").unwrap().0, 200);
    drop(disabled);

    let both = Command::new(kpscd_bin())
        .args([
            "proxy",
            "--bootstrap-server-mapping",
            &format!("{},127.0.0.1:{base}", cluster.broker_addr(1)),
            "--http-maps-disable",
            "--http-maps-listen-address",
            &maps_addr,
        ])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("--http-maps-listen-address"));
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
