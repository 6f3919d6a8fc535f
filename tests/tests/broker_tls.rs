//! TLS towards the brokers (`--tls-enable`): each of librdkafka's three mock brokers sits
//! behind stunnel (OpenSSL; a certificate for the broker's IP from
//! a CA made here, client certificates required) and advertises stunnel's address, as a
//! TLS-only cluster does. A plaintext rdkafka client produces and consumes through kpscd,
//! which speaks TLS to every broker for client traffic and for its own discovery; a wrong
//! CA keeps kpscd unready with the reason on `/ready` and fails client connections with
//! the broker named; `--tls-insecure-skip-verify` connects anyway and warns.

use std::{net::IpAddr, time::Duration};

use kpsc_tests::{
    Kpscd, MockCluster, Pki, RawClient, TlsFront, eventually, free_port_base, produce_acked,
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

const TOPIC: &str = "secure";

/// The mock cluster behind one stunnel TLS front per broker (127.0.2.<id>), advertising
/// the fronts; stunnel asks clients for a certificate from `ca.pem`.
fn cluster_behind_tls(pki: &Pki) -> (MockCluster, Vec<TlsFront>) {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(TOPIC, 3).unwrap();
    for p in 0..3 {
        cluster.set_leader(TOPIC, p, p + 1).unwrap();
    }
    let ips: Vec<IpAddr> = (1..=3u8).map(|i| [127, 0, 2, i].into()).collect();
    pki.server("broker", &ips);
    pki.client("kpscd", "kpscd", true);
    let fronts = (1..=3)
        .map(|id| {
            let host = format!("127.0.2.{id}");
            let front = TlsFront::start(
                &host,
                &cluster.broker_addr(id),
                pki,
                "broker",
                Some("ca.pem"),
            )
            .unwrap();
            cluster.set_advertised(id, &host, front.port).unwrap();
            front
        })
        .collect();
    (cluster, fronts)
}

/// Broker 1 (at its TLS front) static on `base`, the others dynamic at base + 10 + id.
fn args(front_1: u16, base: u16, tls: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--bootstrap-server-mapping",
        &format!("127.0.2.1:{front_1},0.0.0.0:{base},127.0.1.1:{base}"),
        "--dynamic-sequential-min-port",
        &(base + 10).to_string(),
        "--dynamic-advertised-listener",
        "127.0.1.<broker_id>",
        "--default-listener-ip",
        "0.0.0.0",
        "--metadata-refresh-interval",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(tls.iter().cloned());
    args
}

fn tls_flags(pki: &Pki, ca: &str) -> Vec<String> {
    vec![
        "--tls-enable".into(),
        "--tls-ca-chain-cert-file".into(),
        pki.path(ca),
        "--tls-client-cert-file".into(),
        pki.path("kpscd.pem"),
        "--tls-client-key-file".into(),
        pki.path("kpscd.key"),
    ]
}

/// Produces `n` messages over the three partitions through `bootstrap` (every one must be
/// acknowledged) and reads them back.
fn produce_and_consume(bootstrap: &str, n: usize) {
    assert_eq!(
        produce_acked(bootstrap, TOPIC, n),
        n,
        "not every message was acked"
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "broker-tls")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..3 {
        assignment
            .add_partition_offset(TOPIC, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got < n && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            assert!(m.payload().is_some_and(|p| p.starts_with(b"m")));
            got += 1;
        }
    }
    assert_eq!(got, n, "consumed {got} of {n} messages through kpscd");
}

#[test]
fn produce_and_consume_through_brokers_behind_tls() {
    let pki = Pki::new();
    let (_cluster, fronts) = cluster_behind_tls(&pki);
    let base = free_port_base(20);
    // Ready means discovery (ApiVersions + Metadata) went over TLS with kpscd's client
    // certificate, and every broker's listener is bound.
    let kpscd = Kpscd::start(&args(fronts[0].port, base, &tls_flags(&pki, "ca.pem"))).unwrap();
    produce_and_consume(&format!("127.0.1.1:{base}"), 300);
    for port in [base, base + 12, base + 13] {
        assert!(
            kpscd.metric("kpsc_connections_total", &format!("listen_port=\"{port}\"")) >= 1.0,
            "no client connection on {port}"
        );
    }
    assert_eq!(
        kpscd.metric("kpsc_connection_errors_total", "broker_tls"),
        0.0
    );
    let log = kpscd.log();
    assert!(
        log.contains("broker connections use the copy mover"),
        "{log}"
    );
    // Every dynamic entry is a TLS front: what the brokers advertise.
    let maps = kpscd.maps().unwrap().to_string();
    for front in &fronts {
        assert!(maps.contains(&format!(":{}", front.port)), "{maps}");
    }
}

#[test]
fn a_wrong_ca_is_refused_with_the_reason_and_insecure_skip_verify_warns() {
    let pki = Pki::new();
    let (_cluster, fronts) = cluster_behind_tls(&pki);
    let base = free_port_base(20);
    let kpscd = Kpscd::spawn(&args(
        fronts[0].port,
        base,
        &tls_flags(&pki, "other-ca.pem"),
    ))
    .unwrap();
    // Discovery fails: /ready says why (rustls: the issuer is unknown).
    let body = eventually(Duration::from_secs(10), || {
        let (status, body) = kpscd.get("/ready")?;
        anyhow::ensure!(
            status == 503 && body.contains("TLS handshake"),
            "{status} {body}"
        );
        Ok(body)
    })
    .unwrap();
    assert!(body.contains("UnknownIssuer"), "{body}");
    assert!(
        body.contains(&format!("127.0.2.1:{}", fronts[0].port)),
        "{body}"
    );
    // A client on the static listener: that one connection fails, named and counted.
    let mut client = RawClient::connect(&format!("127.0.0.1:{base}")).unwrap();
    client
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(client.api_versions().is_err());
    eventually(Duration::from_secs(5), || {
        let failed = kpscd.metric(
            "kpsc_connection_errors_total",
            "reason=\"broker_tls_handshake\"",
        );
        anyhow::ensure!(failed >= 1.0, "broker_tls_handshake = {failed}");
        Ok(())
    })
    .unwrap();
    let log = kpscd.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("TLS handshake with broker 127.0.2.1")
            && l.contains("UnknownIssuer")),
        "{log}"
    );
    assert!(kpscd.alive());
    drop(kpscd);

    // Without verification the same cluster is reachable, and kpscd says it loudly.
    let mut insecure = tls_flags(&pki, "other-ca.pem");
    insecure.drain(1..3);
    insecure.push("--tls-insecure-skip-verify".into());
    let kpscd = Kpscd::start(&args(fronts[0].port, base, &insecure)).unwrap();
    let mut client = RawClient::connect(&format!("127.0.0.1:{base}")).unwrap();
    client.api_versions().unwrap();
    let log = kpscd.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("broker certificates are NOT verified")),
        "{log}"
    );
}
