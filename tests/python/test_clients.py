"""Python Kafka clients through the real kpscd in front of librdkafka's mock cluster.

Clients: confluent-kafka 2.16 (bundled librdkafka 2.16) and kafka-python 3.0; the
command-line clients (kcat, kpscctl) are tested from Rust (tests/tests). Brokers really
listen on 127.0.0.1; kpscd advertises broker N as 127.0.1.N, so a client that ever sees
127.0.0.1 or a real broker port got a leaked address.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient

from conftest import NUM_BROKERS, REAL_HOST, LeakWatch

# kafka-python 3.0 loads its schemas with the deprecated importlib.resources API.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(read_text|open_text) is deprecated:DeprecationWarning")

BROKER_IDS = list(range(1, NUM_BROKERS + 1))
LEADERS = [1, 2, 3]  # partition p of every test topic is led by broker p+1


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def brokers_of(md) -> dict[int, tuple[str, int]]:
    return {b.id: (b.host, b.port) for b in md.brokers.values()}


def pump(clients, seconds: float) -> None:
    """Serve callbacks (stats, logs, delivery reports) for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for c in clients:
            c.poll(0.05)


# ---------------------------------------------------------------------------------------
# confluent-kafka helpers
# ---------------------------------------------------------------------------------------


class Delivered:
    """Delivery reports of one producer: value -> (partition, offset), plus errors."""

    def __init__(self):
        self.ok: dict[bytes, tuple[int, int]] = {}
        self.order: list[bytes] = []  # produce order
        self.errors: list[tuple[bytes, KafkaError]] = []
        self.reports = 0

    def cb(self, err, msg) -> None:
        self.reports += 1
        if err is not None:
            self.errors.append((msg.value(), err))
        else:
            assert msg.value() not in self.ok, f"two delivery reports for {msg.value()!r}"
            self.ok[msg.value()] = (msg.partition(), msg.offset())


def producer_conf(bootstrap: str, **extra) -> dict:
    conf = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 60000,
        "retry.backoff.ms": 100,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
    }
    conf.update(extra)
    return conf


def produce_range(producer: Producer, delivered: Delivered, topic: str, start: int, count: int,
                  tag: str, partitions: int = NUM_BROKERS, payload: int = 100) -> None:
    filler = b"x" * payload
    for i in range(start, start + count):
        value = f"{tag}-{i:06d}-".encode() + filler
        delivered.order.append(value)
        while True:
            try:
                producer.produce(topic, value=value, key=f"k{i}".encode(),
                                 partition=i % partitions, on_delivery=delivered.cb)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)


def consume_all(watch: LeakWatch, bootstrap: str, topic: str, expected: int,
                timeout: float = 60.0, linger: float = 1.0) -> dict[int, list[tuple[int, bytes]]]:
    """Consumes ``topic`` with a fresh consumer group until ``expected`` messages arrived
    (or ``timeout``), then ``linger`` seconds more to catch duplicates.
    Returns partition -> [(offset, value)] in consumption order."""
    consumer = Consumer(watch.conf({
        "bootstrap.servers": bootstrap,
        "group.id": unique("kpsc-group"),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
    }))
    got: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    count = 0
    errors = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        stop_at = None
        while time.monotonic() < deadline:
            if stop_at is None and count >= expected:
                stop_at = time.monotonic() + linger
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            for m in consumer.consume(num_messages=1000, timeout=0.2):
                if m.error():
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        errors.append(m.error())
                    continue
                got[m.partition()].append((m.offset(), m.value()))
                count += 1
        # Serve the last stats/logs.
        pump([consumer], 0.3)
    finally:
        consumer.close()
    assert not errors, f"consumer errors: {errors[:5]}"
    assert count == expected, (f"consumed {count} messages, expected {expected} "
                               f"(per partition: { {p: len(v) for p, v in got.items()} })")
    return got


def assert_roundtrip(delivered: Delivered, consumed: dict[int, list[tuple[int, bytes]]],
                     partitions: int = NUM_BROKERS) -> None:
    """Everything produced was delivered and consumed exactly once, with the delivered
    partition/offset, and each partition in produce order."""
    assert not delivered.errors, f"{len(delivered.errors)} delivery errors, first: " \
                                 f"{delivered.errors[:3]}"
    assert len(delivered.ok) == len(delivered.order), (
        f"{len(delivered.ok)} of {len(delivered.order)} messages acknowledged")
    # Produce order per partition (produce_range sends message i to partition i % n).
    expected: dict[int, list[bytes]] = defaultdict(list)
    for v in delivered.order:
        expected[delivered.ok[v][0]].append(v)
    for p in range(partitions):
        offsets = [delivered.ok[v][1] for v in expected[p]]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), (
            f"partition {p}: acknowledged offsets not increasing in produce order")
        values = [v for _, v in consumed.get(p, [])]
        assert len(values) == len(expected[p]), (
            f"partition {p}: consumed {len(values)}, produced {len(expected[p])}")
        assert values == expected[p], f"partition {p}: content or order differs"
        got_offsets = [o for o, _ in consumed[p]]
        assert got_offsets == offsets, f"partition {p}: consumed offsets differ from acks"
    assert set(consumed) <= set(range(partitions)), f"unexpected partitions {set(consumed)}"


# ---------------------------------------------------------------------------------------
# 1. Bootstrap through each kpsc port
# ---------------------------------------------------------------------------------------


def test_confluent_bootstrap_through_each_port(mock_cluster, kpscd):
    topic = unique("kpsc-meta")
    mock_cluster.create_topic(topic, 3, leaders=LEADERS)
    watch = LeakWatch(mock_cluster, kpscd, debug="broker,metadata,protocol")
    expected = kpscd.expected_brokers()
    advertised = kpscd.advertised_strs()

    for via in BROKER_IDS:
        bootstrap = kpscd.bootstrap(via)
        admin = AdminClient(watch.conf({"bootstrap.servers": bootstrap}))
        producer = Producer(watch.conf({"bootstrap.servers": bootstrap}))
        for name, client in (("AdminClient", admin), ("Producer", producer)):
            md = client.list_topics(timeout=10)
            assert brokers_of(md) == expected, f"{name} via {bootstrap}"
            assert md.orig_broker_name.split("/")[0] in advertised, md.orig_broker_name
            assert REAL_HOST not in str(md.orig_broker_name)
            assert topic in md.topics, f"{name} via {bootstrap}: {sorted(md.topics)}"
            leaders = {p: pm.leader for p, pm in md.topics[topic].partitions.items()}
            assert leaders == {0: 1, 1: 2, 2: 3}
        md = producer.list_topics(topic, timeout=10)
        assert brokers_of(md) == expected
        # Let librdkafka connect to every broker it learned and emit stats/logs.
        producer.produce(topic, value=b"hello", partition=0)
        producer.produce(topic, value=b"hello", partition=1)
        producer.produce(topic, value=b"hello", partition=2)
        assert producer.flush(15) == 0
        pump([admin, producer], 1.0)

    watch.assert_clean()
    names = watch.broker_names_in_stats()
    for b, (host, port) in expected.items():
        assert f"{host}:{port}/{b}" in names, f"broker {b} missing from stats: {sorted(names)}"
    # The versions kafka-proxy 0.4.3 chokes on: the mock's Metadata v12/v13 carry an extra
    # trailing byte.
    metadata_versions = watch.sent_versions("Metadata")
    assert metadata_versions and max(metadata_versions) >= 12, metadata_versions

    assert kpscd.metric("kpsc_rewrites_total", api="Metadata") > 0
    kpscd.assert_healthy_metrics()


# ---------------------------------------------------------------------------------------
# 2. 3,000 messages produced and consumed, both bulk policies
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bulk_policy", ["cap", "rewrite"])
def test_confluent_produce_consume_3000(mock_cluster, kpscd_factory, bulk_policy):
    kp = kpscd_factory(bulk_policy=bulk_policy)
    topic = unique(f"kpsc-pc-{bulk_policy}")
    mock_cluster.create_topic(topic, 3, leaders=LEADERS)
    watch = LeakWatch(mock_cluster, kp, debug="broker,metadata,protocol")

    delivered = Delivered()
    producer = Producer(watch.conf(producer_conf(kp.bootstrap(1))))
    produce_range(producer, delivered, topic, 0, 3000, bulk_policy)
    assert producer.flush(60) == 0, "messages left undelivered"
    pump([producer], 0.3)

    consumed = consume_all(watch, kp.bootstrap(1), topic, 3000)
    assert_roundtrip(delivered, consumed)
    watch.assert_clean()

    produce_v, fetch_v = watch.sent_versions("Produce"), watch.sent_versions("Fetch")
    assert produce_v and fetch_v, (produce_v, fetch_v)
    if bulk_policy == "cap":
        # KIP-951 node_endpoints appear in Produce v10+/Fetch v16+; cap keeps clients below.
        assert max(produce_v) <= 9 and max(fetch_v) <= 15, (produce_v, fetch_v)
        assert kp.metric("kpsc_api_version_caps_total", api="Produce") > 0
        assert kp.metric("kpsc_api_version_caps_total", api="Fetch") > 0
    else:
        # The mock offers Produce v10 / Fetch v16 and librdkafka 2.16 uses them.
        assert max(produce_v) >= 10 and max(fetch_v) >= 16, (produce_v, fetch_v)
    assert kp.metric("kpsc_requests_total", api="Produce") > 0
    assert kp.metric("kpsc_requests_total", api="Fetch") > 0
    kp.assert_healthy_metrics()


# ---------------------------------------------------------------------------------------
# 3. A broker goes down and comes back mid-stream
# ---------------------------------------------------------------------------------------


def test_confluent_broker_down_up_no_loss(mock_cluster, kpscd):
    topic = unique("kpsc-outage")
    mock_cluster.create_topic(topic, 3, leaders=LEADERS)
    watch = LeakWatch(mock_cluster, kpscd, debug="broker,metadata")
    delivered = Delivered()
    producer = Producer(watch.conf(producer_conf(kpscd.bootstrap(1))))

    produce_range(producer, delivered, topic, 0, 300, "before")
    assert producer.flush(30) == 0

    mock_cluster.broker_down(2)
    try:
        produce_range(producer, delivered, topic, 300, 300, "during")
        pump([producer], 2.0)
        # Partition 1 (broker 2) cannot be written while broker 2 is down: its messages wait.
        pending = len(producer)
        during_p1 = [v for v in delivered.order[300:] if v not in delivered.ok]
        assert pending > 0 and during_p1, "broker 2 outage had no effect on the producer"
    finally:
        mock_cluster.broker_up(2)

    produce_range(producer, delivered, topic, 600, 300, "after")
    remaining = producer.flush(60)
    pump([producer], 0.3)
    assert remaining == 0, f"{remaining} messages still undelivered 60 s after broker 2 came back"
    assert delivered.reports == 900

    consumed = consume_all(watch, kpscd.bootstrap(1), topic, 900)
    assert_roundtrip(delivered, consumed)
    watch.assert_clean()
    kpscd.assert_healthy_metrics()


# ---------------------------------------------------------------------------------------
# 4. kafka-python 3.0
# ---------------------------------------------------------------------------------------


class _KafkaLogs(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad log format is not our concern
            pass


def test_kafka_python_produce_consume(mock_cluster, kpscd):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    topic = unique("kpsc-kpy")
    mock_cluster.create_topic(topic, 3, leaders=LEADERS)
    expected = kpscd.expected_brokers()
    logs = _KafkaLogs()
    kafka_logger = logging.getLogger("kafka")
    old_level = kafka_logger.level
    kafka_logger.addHandler(logs)
    kafka_logger.setLevel(logging.DEBUG)
    common = dict(bootstrap_servers=kpscd.bootstrap(1), api_version=(2, 3),
                  reconnect_backoff_ms=100)
    producer = consumer = admin = None
    try:
        producer = KafkaProducer(acks="all", linger_ms=5, **common)
        values = [f"kpy-{i:05d}".encode() for i in range(500)]
        futures = [producer.send(topic, key=f"k{i}".encode(), value=v, partition=i % 3)
                   for i, v in enumerate(values)]
        producer.flush(timeout=30)
        metas = [f.get(timeout=30) for f in futures]
        acked = defaultdict(list)
        for v, m in zip(values, metas):
            acked[m.partition].append((m.offset, v))

        seen = {(b.node_id, b.host, b.port) for b in producer._metadata.brokers()}
        assert seen == {(b, h, p) for b, (h, p) in expected.items()}, seen

        admin = KafkaAdminClient(**common)
        cluster = admin.describe_cluster()
        described = {(b.get("broker_id", b.get("node_id")), b["host"], b["port"])
                     for b in cluster["brokers"]}
        assert described == {(b, h, p) for b, (h, p) in expected.items()}, cluster

        consumer = KafkaConsumer(topic, group_id=unique("kpsc-kpy-group"),
                                 auto_offset_reset="earliest", enable_auto_commit=True, **common)
        got = defaultdict(list)
        count = 0
        deadline = time.monotonic() + 60
        while count < 500 and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500, max_records=500).items():
                for r in records:
                    got[tp.partition].append((r.offset, r.value))
                    count += 1
        # Any duplicate would show up now.
        for tp, records in consumer.poll(timeout_ms=1000).items():
            for r in records:
                got[tp.partition].append((r.offset, r.value))
                count += 1
        assert count == 500, f"consumed {count} of 500"
        for p in range(3):
            assert got[p] == acked[p], f"partition {p}: consumed records differ from acks"

        # The group coordinator (FindCoordinator response) is advertised too.
        cluster_md = consumer._client.cluster
        coordinators = list(getattr(cluster_md, "_coordinator_brokers", {}).values())
        assert coordinators, "kafka-python recorded no group coordinator"
        for c in coordinators:
            assert (c.host, c.port) in expected.values(), c
        known = {(b.node_id, b.host, b.port) for b in cluster_md.brokers()}
        assert known == {(b, h, p) for b, (h, p) in expected.items()}, known
    finally:
        for close in (consumer and consumer.close, producer and (lambda: producer.close(timeout=5)),
                      admin and admin.close):
            if close:
                try:
                    close()
                except Exception:  # noqa: BLE001 - cleanup only
                    pass
        kafka_logger.removeHandler(logs)
        kafka_logger.setLevel(old_level)

    # kafka-python logs each socket's local address too ("laddr=('127.0.0.1', 48296)": Linux
    # picks 127.0.0.1 as the source for 127.0.1.x); that is the client, not a broker.
    lines = [re.sub(r"laddr=\('[^']*', \d+\)", "laddr=<local>", line) for line in logs.lines]
    leaked = [line for line in lines if REAL_HOST in line]
    assert not leaked, f"kafka-python logged {REAL_HOST}: {leaked[:5]}"
    for line in lines:
        for port in mock_cluster.real_ports:
            assert not re.search(rf"(:|', ){port}(?!\d)", line), f"real port {port}: {line}"
    assert any("127.0.1.2" in line for line in lines), "no kafka-python log names broker 2"
    kpscd.assert_healthy_metrics()
