//! Client certificates and certificate rotation on kpscd's TLS listeners.
//! - `--proxy-listener-ca-chain-cert-file` + `--proxy-listener-tls-required-client-subject`:
//!   confluent-kafka (librdkafka, OpenSSL) with the right certificate produces and
//!   consumes; a client without a certificate, with the wrong subject, or with a
//!   certificate from another CA is refused at the handshake, counted by reason, and the
//!   refusals of one source are logged once (rate limited).
//! - Rotation: certificate and key replaced on disk, SIGHUP: a new connection gets the new
//!   certificate, an established one keeps working; a broken file is logged at ERROR and
//!   the previous certificate stays; a change without SIGHUP is picked up by the poll.

use std::{process::Command, time::Duration};

use kpsc_tests::{
    Kpscd, MockCluster, Pki, TlsClient, cert_der, confluent_produce_and_consume, eventually,
    free_port_base, proxy_args,
};

fn cluster() -> MockCluster {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("secure", 3).unwrap();
    for p in 0..3 {
        cluster.set_leader("secure", p, p + 1).unwrap();
    }
    cluster
}

fn listener_flags(pki: &Pki, cert: &str, key: &str) -> Vec<String> {
    vec![
        "--proxy-listener-tls-enable".into(),
        "--proxy-listener-cert-file".into(),
        pki.path(cert),
        "--proxy-listener-key-file".into(),
        pki.path(key),
    ]
}

fn start(cluster: &MockCluster, base: u16, flags: &[String]) -> Kpscd {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Kpscd::start(&proxy_args(cluster, base, &flags)).unwrap()
}

/// Whether a rustls client presenting `cert` is refused (at the handshake, or at its first
/// request: with TLS 1.3 the server judges the client's certificate after the client
/// finished its side).
fn refused(base: u16, pki: &Pki, cert: Option<&str>) -> bool {
    TlsClient::connect(&format!("127.0.1.1:{base}"), "127.0.1.1", pki, cert)
        .and_then(|mut c| c.api_versions(1))
        .is_err()
}

#[test]
fn client_certificates_are_required_and_their_subject_checked() {
    let pki = Pki::new();
    pki.client("changefeed", "changefeed", true);
    pki.client("intruder", "intruder", true);
    pki.client("stranger", "changefeed", false);
    let cluster = cluster();
    let base = free_port_base(20);
    let mut flags = listener_flags(&pki, "server.pem", "server.key");
    flags.extend([
        "--proxy-listener-ca-chain-cert-file".into(),
        pki.path("ca.pem"),
        "--proxy-listener-tls-required-client-subject".into(),
        "s:/CN=[changefeed]/O=[kpsc tests]".into(),
    ]);
    let kpscd = start(&cluster, base, &flags);

    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("changefeed.pem"),
        pki.path("changefeed.key"),
    );
    confluent_produce_and_consume(
        &format!("127.0.1.1:{base}"),
        "secure",
        100,
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", &ca),
            ("ssl.certificate.location", &cert),
            ("ssl.key.location", &key),
            ("ssl.endpoint.identification.algorithm", "https"),
        ],
    );
    assert!(!refused(base, &pki, Some("changefeed")));

    for (cert, reason) in [
        (None, "tls_client_cert_missing"),
        (Some("intruder"), "tls_client_subject"),
        (Some("stranger"), "tls_client_cert_invalid"),
    ] {
        assert!(refused(base, &pki, cert), "{cert:?} was let in");
        let filter = format!("reason=\"{reason}\"");
        eventually(Duration::from_secs(5), || {
            let n = kpscd.metric("kpsc_connections_rejected_total", &filter);
            anyhow::ensure!(n >= 1.0, "{reason}: {n}");
            Ok(())
        })
        .unwrap();
    }
    // Three refusals of one source within a minute: one WARN line.
    let log = kpscd.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused before reaching a broker"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("tls_client_cert_missing"),
        "{}",
        warned[0]
    );
    assert!(kpscd.alive());

    // A subject without a CA to check certificates against is a configuration error.
    let mut flags = listener_flags(&pki, "server.pem", "server.key");
    flags.extend([
        "--proxy-listener-tls-required-client-subject".into(),
        "s:/CN=[changefeed]".into(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let out = Command::new(kpsc_tests::kpscd_bin())
        .arg("proxy")
        .args(proxy_args(&cluster, free_port_base(20), &flags))
        .arg("--http-disable")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--proxy-listener-tls-required-client-subject"),
        "{stderr}"
    );
}

/// Replaces `live.pem`/`live.key` with `name`'s pair, each file by rename as tools do.
fn install(pki: &Pki, name: &str) {
    for ext in ["key", "pem"] {
        let tmp = pki.path(&format!("live.{ext}.tmp"));
        std::fs::copy(pki.path(&format!("{name}.{ext}")), &tmp).unwrap();
        std::fs::rename(&tmp, pki.path(&format!("live.{ext}"))).unwrap();
    }
}

fn served_cert(base: u16, pki: &Pki) -> anyhow::Result<Vec<u8>> {
    let mut client = TlsClient::connect(&format!("127.0.1.1:{base}"), "127.0.1.1", pki, None)?;
    client.api_versions(1)?;
    Ok(client.server_cert())
}

fn sighup(kpscd: &Kpscd) {
    // SAFETY: kill(2) on the kpscd this test started.
    assert_eq!(unsafe { libc::kill(kpscd.pid() as i32, libc::SIGHUP) }, 0);
}

#[test]
fn the_listener_certificate_is_rotated_without_a_restart() {
    let pki = Pki::new();
    install(&pki, "server");
    let (first, second) = (
        cert_der(&pki.path("server.pem")),
        cert_der(&pki.path("other.pem")),
    );
    let cluster = cluster();
    let base = free_port_base(20);
    let kpscd = start(
        &cluster,
        base,
        &listener_flags(&pki, "live.pem", "live.key"),
    );
    let mut established =
        TlsClient::connect(&format!("127.0.1.1:{base}"), "127.0.1.1", &pki, None).unwrap();
    established.api_versions(1).unwrap();
    assert_eq!(established.server_cert(), first);

    // New pair, SIGHUP: new connections get it; the established one keeps working.
    install(&pki, "other");
    sighup(&kpscd);
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(
            served_cert(base, &pki)? == second,
            "still the old certificate"
        );
        Ok(())
    })
    .unwrap();
    eventually(Duration::from_secs(5), || {
        let log = kpscd.log();
        anyhow::ensure!(
            log.lines()
                .any(|l| l.contains("listener certificate reloaded") && l.contains("SIGHUP")),
            "no reload on SIGHUP logged"
        );
        Ok(())
    })
    .unwrap();
    established.api_versions(2).unwrap();
    assert_eq!(established.server_cert(), first);

    // A broken certificate file: ERROR, and the previous certificate stays in use.
    std::fs::write(pki.path("live.pem"), "not a certificate\n").unwrap();
    sighup(&kpscd);
    eventually(Duration::from_secs(5), || {
        let log = kpscd.log();
        anyhow::ensure!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains("listener certificate not reloaded")
                && l.contains("no PEM certificate")),
            "no ERROR for the broken file"
        );
        Ok(())
    })
    .unwrap();
    assert_eq!(served_cert(base, &pki).unwrap(), second);

    // No SIGHUP: the files' change is noticed by the poll (every 2 s).
    install(&pki, "server");
    eventually(Duration::from_secs(10), || {
        anyhow::ensure!(served_cert(base, &pki)? == first, "change not picked up");
        Ok(())
    })
    .unwrap();
    established.api_versions(3).unwrap();
    assert!(kpscd.alive());
}
