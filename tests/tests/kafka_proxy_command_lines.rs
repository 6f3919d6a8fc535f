//! kafka-proxy command lines that kpscd used to refuse: every broker mapped statically
//! with no dynamic-listener flag, `--dial-address-mapping` for brokers that advertise a
//! name the proxy node cannot dial, and `--dynamic-broker-id-offset` keeping the
//! deterministic port range tight. Real client (rdkafka) against librdkafka's mock cluster.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use kpsc_tests::{Kpscd, MockCluster, eventually, free_port_base, kpscd_bin, produce_acked};
use rdkafka::{
    ClientConfig,
    producer::{BaseProducer, Producer as _},
};

fn cluster() -> MockCluster {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    for p in 0..3 {
        cluster.set_leader("t", p, p + 1).unwrap();
    }
    cluster
}

/// The brokers advertise 127.0.0.2:900<id>, where nothing listens (the mock listens on
/// 127.0.0.1): only `--dial-address-mapping` lets kpscd reach them. Each is mapped
/// statically and no dynamic-listener flag is given: kafka-proxy's command line for a
/// fixed cluster. A broker that joins later is unmapped: refused, logged and counted, and responses
/// naming it are not forwarded.
#[test]
fn all_static_mapping_with_dial_address_mapping_starts_and_refuses_a_new_broker() {
    let cluster = cluster();
    let base = free_port_base(10);
    let mut args = vec!["--metadata-refresh-interval".to_owned(), "1s".to_owned()];
    for id in 1..=3 {
        cluster
            .set_advertised(id, "127.0.0.2", 9000 + id as u16)
            .unwrap();
        let port = base + id as u16;
        args.push("--bootstrap-server-mapping".into());
        args.push(format!("127.0.0.2:{},127.0.1.{id}:{port}", 9000 + id));
        args.push("--dial-address-mapping".into());
        args.push(format!(
            "127.0.0.2:{},{}",
            9000 + id,
            cluster.broker_addr(id)
        ));
    }
    let kpscd = Kpscd::start(&args).unwrap();
    let maps = kpscd.maps().unwrap();
    let node_ids: Vec<i64> = maps
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|row| row["node_id"].as_i64())
        .collect();
    assert_eq!(node_ids.len(), 3, "{maps}");
    assert_eq!(
        produce_acked(&format!("127.0.1.1:{}", base + 1), "t", 300),
        300
    );

    cluster.add_broker(4).unwrap();
    eventually(Duration::from_secs(10), || {
        let refused = kpscd.metric("kpsc_brokers_refused_total", "reason=\"unmapped\"");
        anyhow::ensure!(refused >= 1.0, "broker 4 not refused yet ({refused})");
        Ok(())
    })
    .unwrap();
    let log = kpscd.log();
    assert!(
        log.lines().any(|l| l.contains("broker cannot be served")
            && l.contains("broker id 4")
            && l.contains("--dynamic-sequential-min-port")),
        "{log}"
    );
    // As for any broker kpscd cannot map: a response naming it is never forwarded (its
    // connection is closed and counted), and the daemon keeps running.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.1.2:{}", base + 2))
        .set("log_level", "0")
        .create()
        .unwrap();
    assert!(
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(3))
            .is_err()
    );
    assert!(kpscd.metric("kpsc_connection_errors_total", "reason=\"unmapped_broker\"") >= 1.0);
    assert!(kpscd.alive());
}

/// Port = min + id - offset: brokers 2 and 3 get the first two ports of the range. An
/// offset that leaves a broker below the range is a start-up error naming the flag.
#[test]
fn broker_id_offset_keeps_the_port_range_tight() {
    let cluster = cluster();
    let base = free_port_base(30);
    let args = |offset: &str| -> Vec<String> {
        [
            "--bootstrap-server-mapping",
            &format!(
                "{},0.0.0.0:{},127.0.1.1:{}",
                cluster.broker_addr(1),
                base + 20,
                base + 20
            ),
            "--dynamic-sequential-min-port",
            &base.to_string(),
            "--dynamic-sequential-max-ports",
            "2",
            "--dynamic-broker-id-offset",
            offset,
            "--dynamic-advertised-listener",
            "127.0.1.<broker_id>",
            "--default-listener-ip",
            "0.0.0.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let kpscd = Kpscd::start(&args("2")).unwrap();
    let maps = kpscd.maps().unwrap();
    let mut dynamic: Vec<(i64, String)> = maps
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["origin"] == "dynamic")
        .map(|row| {
            (
                row["node_id"].as_i64().unwrap(),
                row["listen"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    dynamic.sort();
    assert_eq!(
        dynamic,
        vec![
            (2, format!("0.0.0.0:{base}")),
            (3, format!("0.0.0.0:{}", base + 1))
        ]
    );
    assert_eq!(
        produce_acked(&format!("127.0.1.1:{}", base + 20), "t", 30),
        30
    );
    drop(kpscd);

    let out = Command::new(kpscd_bin())
        .arg("proxy")
        .args(args("3"))
        .arg("--http-disable")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("broker id 2") && stderr.contains("--dynamic-broker-id-offset 3"),
        "{stderr}"
    );
}
