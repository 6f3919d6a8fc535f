//! The Python client the TLS and SASL tests drive: confluent-kafka (librdkafka 2.16,
//! OpenSSL) from the test venv, producing `count` messages (acks=all) to partitions 0..3
//! of a topic and reading them back, with whatever librdkafka settings the test needs
//! (`security.protocol`, certificates, SASL).

use std::process::{Command, Stdio};

use crate::pki::python;

const SCRIPT: &str = r#"
import json, sys
from confluent_kafka import Consumer, Producer, TopicPartition
bootstrap, topic, n, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
conf = {"bootstrap.servers": bootstrap, **extra}
acked = []
p = Producer({**conf, "acks": "all", "message.timeout.ms": 20000})
for i in range(n):
    p.produce(topic, value=f"m{i}".encode(), partition=i % 3,
              on_delivery=lambda err, msg: err is None and acked.append(msg))
    p.poll(0)
p.flush(30)
c = Consumer({**conf, "group.id": "kpsc-tests", "enable.auto.commit": False})
c.assign([TopicPartition(topic, q, 0) for q in range(3)])
got = 0
for _ in range(300):
    m = c.poll(0.1)
    if m is not None and m.error() is None:
        got += 1
    if got == n:
        break
c.close()
print(f"acked={len(acked)} consumed={got}")
"#;

/// Produces `count` messages through `bootstrap` to `topic` and reads them back, with
/// `conf` added to the client's settings; panics unless every message was acknowledged
/// and consumed.
pub fn confluent_produce_and_consume(
    bootstrap: &str,
    topic: &str,
    count: usize,
    conf: &[(&str, &str)],
) {
    let conf: serde_json::Map<String, serde_json::Value> = conf
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let out = Command::new(python())
        .args(["-c", SCRIPT, bootstrap, topic, &count.to_string()])
        .arg(serde_json::Value::Object(conf).to_string())
        .stdin(Stdio::null())
        .output()
        .expect("running the confluent-kafka client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("acked={count} consumed={count}")),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
