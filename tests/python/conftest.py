"""Fixtures for kpsc's Python client integration tests.

Everything here is real software:
- ``MockCluster``: librdkafka's mock Kafka cluster (from the librdkafka bundled in the
  confluent-kafka wheel), driven through ctypes. Brokers 1..3 listen on 127.0.0.1:<random>.
- ``Kpscd``: the real ``kpscd`` binary (``$KPSCD_BIN``), started as an operator would, with
  broker N advertised as 127.0.1.N. Any ``127.0.0.1`` or real broker port a client sees
  is a leak.
- ``LeakWatch``: collects librdkafka debug logs and statistics of every confluent-kafka
  client a test creates and checks that no real broker address ever shows up in them.
"""

from __future__ import annotations

import ctypes
import glob
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

KPSCD_BIN = Path(os.environ.get("KPSCD_BIN") or "/work/main/target/release/kpscd")

REAL_HOST = "127.0.0.1"
NUM_BROKERS = 3
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------
# librdkafka mock cluster through ctypes
# ---------------------------------------------------------------------------------------


def _load_librdkafka() -> ctypes.CDLL:
    import confluent_kafka

    site = Path(confluent_kafka.__file__).resolve().parent.parent
    candidates = sorted(glob.glob(str(site / "confluent_kafka.libs" / "librdkafka*.so*")))
    if not candidates:
        raise RuntimeError(f"no librdkafka shared library under {site / 'confluent_kafka.libs'}")
    lib = ctypes.CDLL(candidates[0])
    vp, cp, i32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32
    sigs = {
        "rd_kafka_conf_new": ([], vp),
        "rd_kafka_conf_set": ([vp, cp, cp, cp, ctypes.c_size_t], ctypes.c_int),
        "rd_kafka_conf_destroy": ([vp], None),
        "rd_kafka_new": ([ctypes.c_int, vp, cp, ctypes.c_size_t], vp),
        "rd_kafka_destroy": ([vp], None),
        "rd_kafka_version_str": ([], cp),
        "rd_kafka_err2str": ([ctypes.c_int], cp),
        "rd_kafka_mock_cluster_new": ([vp, ctypes.c_int], vp),
        "rd_kafka_mock_cluster_destroy": ([vp], None),
        "rd_kafka_mock_cluster_bootstraps": ([vp], cp),
        "rd_kafka_mock_topic_create": ([vp, cp, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        "rd_kafka_mock_partition_set_leader": ([vp, cp, i32, i32], ctypes.c_int),
        "rd_kafka_mock_group_initial_rebalance_delay_ms": ([vp, i32], None),
        "rd_kafka_mock_broker_set_down": ([vp, i32], ctypes.c_int),
        "rd_kafka_mock_broker_set_up": ([vp, i32], ctypes.c_int),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


_LIB: ctypes.CDLL | None = None


def librdkafka() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _load_librdkafka()
    return _LIB


class MockCluster:
    """librdkafka's mock cluster: brokers 1..n on 127.0.0.1:<random port>."""

    def __init__(self, num_brokers: int = NUM_BROKERS):
        lib = librdkafka()
        self._lib = lib
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        # The mock's own client has no bootstrap servers; keep its warning out of the logs.
        if lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr)) != 0:
            lib.rd_kafka_conf_destroy(conf)
            raise RuntimeError(f"rd_kafka_conf_set: {errstr.value.decode()}")
        self._rk = lib.rd_kafka_new(0, conf, errstr, len(errstr))  # RD_KAFKA_PRODUCER
        if not self._rk:
            lib.rd_kafka_conf_destroy(conf)
            raise RuntimeError(f"rd_kafka_new: {errstr.value.decode()}")
        self._mc = lib.rd_kafka_mock_cluster_new(self._rk, num_brokers)
        if not self._mc:
            lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("rd_kafka_mock_cluster_new returned NULL")
        self.bootstraps = lib.rd_kafka_mock_cluster_bootstraps(self._mc).decode()
        addrs = self.bootstraps.split(",")
        assert len(addrs) == num_brokers, self.bootstraps
        # Index 0 is broker id 1.
        self.brokers = {i + 1: a for i, a in enumerate(addrs)}
        self.real_ports = {int(a.rsplit(":", 1)[1]) for a in addrs}
        for a in addrs:
            assert a.startswith(REAL_HOST + ":"), a
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._mc, 0)

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"mock cluster: {what}: {self._lib.rd_kafka_err2str(err).decode()}")

    def create_topic(self, topic: str, partitions: int, replication: int = NUM_BROKERS,
                     leaders: list[int] | None = None) -> None:
        self._check(self._lib.rd_kafka_mock_topic_create(self._mc, topic.encode(), partitions,
                                                         replication), f"create {topic}")
        for p, leader in enumerate(leaders or []):
            self.set_leader(topic, p, leader)

    def set_leader(self, topic: str, partition: int, broker_id: int) -> None:
        self._check(self._lib.rd_kafka_mock_partition_set_leader(self._mc, topic.encode(),
                                                                 partition, broker_id),
                    f"set leader {topic}[{partition}]={broker_id}")

    def broker_down(self, broker_id: int) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._mc, broker_id),
                    f"broker {broker_id} down")

    def broker_up(self, broker_id: int) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._mc, broker_id),
                    f"broker {broker_id} up")

    def destroy(self) -> None:
        if self._mc:
            self._lib.rd_kafka_mock_cluster_destroy(self._mc)
            self._mc = None
        if self._rk:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None


# ---------------------------------------------------------------------------------------
# Free ports
# ---------------------------------------------------------------------------------------

_USED_BASES: set[int] = set()


def _port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Ports:
    """kpscd's ports: broker 1 on BASE, broker N>1 on BASE+10+N, admin on BASE+20."""

    def __init__(self, base: int):
        self.base = base
        self.dynamic_min = base + 10
        self.admin_port = base + 20
        self.admin = f"127.0.0.1:{self.admin_port}"

    def listen_port(self, broker_id: int) -> int:
        return self.base if broker_id == 1 else self.dynamic_min + broker_id

    def all(self) -> list[int]:
        return [self.base] + [self.dynamic_min + i for i in range(1, NUM_BROKERS + 1)] + [
            self.admin_port]


def pick_ports() -> Ports:
    # Stay below the ephemeral range (32768+) so outgoing connections can never take them.
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(30000, 32700, 25)
        if base in _USED_BASES:
            continue
        ports = Ports(base)
        if all(_port_free(p) for p in ports.all()):
            _USED_BASES.add(base)
            return ports
    raise RuntimeError("no free port range in 30000-32768")


# ---------------------------------------------------------------------------------------
# kpscd
# ---------------------------------------------------------------------------------------

_METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


class Kpscd:
    """One running kpscd process in proxy mode in front of a MockCluster."""

    def __init__(self, mock: MockCluster, ports: Ports, bulk_policy: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        if not KPSCD_BIN.is_file():
            pytest.fail(f"kpscd binary not found at {KPSCD_BIN} (set KPSCD_BIN)")
        self.mock = mock
        self.ports = ports
        self.admin = ports.admin
        self.bulk_policy = bulk_policy
        self.args = [
            str(KPSCD_BIN), "proxy",
            "--bootstrap-server-mapping",
            f"{mock.brokers[1]},0.0.0.0:{ports.base},127.0.1.1:{ports.base}",
            "--dynamic-sequential-min-port", str(ports.dynamic_min),
            "--dynamic-advertised-listener", "127.0.1.<broker_id>",
            "--default-listener-ip", "0.0.0.0",
            "--metadata-refresh-interval", "1s",
            "--http-listen-address", self.admin,
            # No load balancer to wait for: stop at once (the default grace is 5 s).
            "--shutdown-grace", "0s",
        ]
        if bulk_policy:
            self.args += ["--bulk-policy", bulk_policy]
        self.args += list(extra_args)
        # `cargo xtask test` runs this suite again with requests carried by the kernel.
        suite_transfer = os.environ.get("KPSC_TEST_BULK_TRANSFER")
        if suite_transfer and not any(a.startswith("--bulk-transfer") for a in self.args):
            self.args += ["--bulk-transfer", suite_transfer]
        self._stderr = tempfile.NamedTemporaryFile(prefix="kpscd-stderr-", suffix=".log",
                                                   delete=False)
        self._stdout = tempfile.NamedTemporaryFile(prefix="kpscd-stdout-", suffix=".log",
                                                   delete=False)
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._stdout,
                                     stderr=self._stderr, start_new_session=True)
        self.pid = self.proc.pid
        self.returncode: int | None = None

    # -- addresses ------------------------------------------------------------------------

    def advertised(self, broker_id: int) -> tuple[str, int]:
        return (f"127.0.1.{broker_id}", self.ports.listen_port(broker_id))

    def expected_brokers(self) -> dict[int, tuple[str, int]]:
        return {b: self.advertised(b) for b in range(1, NUM_BROKERS + 1)}

    def advertised_strs(self) -> set[str]:
        return {f"{h}:{p}" for h, p in self.expected_brokers().values()}

    def bootstrap(self, broker_id: int = 1) -> str:
        h, p = self.advertised(broker_id)
        return f"{h}:{p}"

    # -- lifecycle ------------------------------------------------------------------------

    def stderr_text(self) -> str:
        try:
            return Path(self._stderr.name).read_text(errors="replace")
        except OSError as e:
            return f"<cannot read kpscd stderr: {e}>"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                raise AssertionError(
                    f"kpscd exited with {rc} before becoming ready; args={self.args}\n"
                    f"stderr:\n{self.stderr_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read().decode(errors='replace').strip()}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError(f"kpscd not ready after {timeout}s (last: {last})\n"
                             f"stderr:\n{self.stderr_text()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Returns the exit code (negative if
        killed by a signal). Idempotent."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
                self.returncode = -signal.SIGKILL
                self._close_files()
                return self.returncode
        self.returncode = self.proc.returncode
        self._close_files()
        return self.returncode

    def _close_files(self) -> None:
        for f in (self._stdout, self._stderr):
            try:
                f.close()
            except OSError:
                pass

    def cleanup_files(self) -> None:
        for f in (self._stdout, self._stderr):
            try:
                os.unlink(f.name)
            except OSError:
                pass

    # -- admin endpoint -------------------------------------------------------------------

    def http_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as r:
            assert r.status == 200, f"GET {path}: HTTP {r.status}"
            return r.read().decode()

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        return parse_metrics(self.http_get("/metrics"))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of every sample of ``name`` whose labels include ``labels``."""
        return sum(v for n, ls, v in self.metrics()
                   if n == name and all(ls.get(k) == val for k, val in labels.items()))

    def metric_by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, ls, v in self.metrics():
            if n == name:
                out[ls.get(label, "")] = out.get(ls.get(label, ""), 0.0) + v
        return out

    def assert_healthy_metrics(self) -> None:
        """No decode failures for any api."""
        failures = {k: v for k, v in self.metric_by_label("kpsc_decode_failures_total", "api")
                    .items() if v}
        assert not failures, f"kpscd decode failures: {failures}\n{self.stderr_text()[-4000:]}"


# ---------------------------------------------------------------------------------------
# Leak watch for confluent-kafka clients
# ---------------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


class LeakWatch:
    """Wires librdkafka debug logs and statistics of every client to collectors, then
    checks no real broker address ever appeared in them."""

    _count = 0

    def __init__(self, mock: MockCluster, kpscd: Kpscd, debug: str = "broker,metadata,protocol"):
        LeakWatch._count += 1
        self.mock = mock
        self.kpscd = kpscd
        self.debug = debug
        self.logs: list[str] = []
        self.stats: list[str] = []
        self.logger = logging.getLogger(f"kpsc.test.rdkafka.{LeakWatch._count}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(_ListHandler(self.logs))

    def conf(self, conf: dict) -> dict:
        c = dict(conf)
        c.setdefault("statistics.interval.ms", 200)
        c["stats_cb"] = self.stats.append
        c["debug"] = self.debug
        c["logger"] = self.logger
        return c

    def broker_names_in_stats(self) -> set[str]:
        names: set[str] = set()
        for s in self.stats:
            for key, b in json.loads(s).get("brokers", {}).items():
                names.add(key)
                names.add(b.get("name", ""))
                if b.get("nodename"):
                    names.add("nodename=" + b["nodename"])
        names.discard("")
        return names

    def assert_clean(self) -> None:
        assert self.stats, "librdkafka emitted no statistics"
        assert self.logs, "librdkafka emitted no debug logs"
        leaked_logs = [line for line in self.logs if REAL_HOST in line]
        assert not leaked_logs, (f"{len(leaked_logs)} librdkafka debug lines mention "
                                 f"{REAL_HOST}, first: {leaked_logs[:5]}")
        leaked_stats = [s for s in self.stats if REAL_HOST in s]
        assert not leaked_stats, f"librdkafka stats mention {REAL_HOST}: {leaked_stats[0][:2000]}"
        advertised = self.kpscd.advertised_strs()
        bad = []
        for name in self.broker_names_in_stats():
            # "host:port/id", "host:port/bootstrap", "nodename=host:port", or logical
            # broker names without an address ("GroupCoordinator", ":0/internal").
            addr = name.removeprefix("nodename=").split("/", 1)[0]
            if ":" not in addr or addr.startswith(":"):
                continue
            if addr not in advertised:
                bad.append(name)
        assert not bad, f"librdkafka stats name non-advertised brokers: {bad} " \
                        f"(advertised: {sorted(advertised)})"
        # A real broker port behind any IPv4 address ("127.0.1.2:<real port>" would be a
        # half-rewritten address).
        for line in self.logs:
            for host, port in re.findall(r"(\d+\.\d+\.\d+\.\d+):(\d+)", line):
                if int(port) in self.mock.real_ports:
                    raise AssertionError(f"librdkafka debug line names a real broker port "
                                         f"({host}:{port}): {line}")

    def sent_versions(self, api: str) -> set[int]:
        """Versions of ``<api>Request``s the client sent (from 'protocol' debug)."""
        pat = re.compile(r"Sent " + re.escape(api) + r"Request \(v(\d+),")
        return {int(m.group(1)) for line in self.logs for m in [pat.search(line)] if m}


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------

_KPSCDS = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for k in item.stash.get(_KPSCDS, []):
            text = k.stderr_text()
            if len(text) > 20000:
                text = "...(truncated)...\n" + text[-20000:]
            rep.sections.append((f"kpscd stderr (pid {k.pid}, {rep.when})", text))


@pytest.fixture
def mock_cluster():
    mc = MockCluster(NUM_BROKERS)
    yield mc
    mc.destroy()


@pytest.fixture
def free_ports():
    """Returns a function giving a fresh, currently free set of kpscd ports."""
    return pick_ports


@pytest.fixture
def kpscd_factory(request, mock_cluster, free_ports):
    """Starts kpscd processes in front of ``mock_cluster``; stops them (by PID) at teardown
    and requires a clean exit (code 0, no panic)."""
    started: list[Kpscd] = []
    request.node.stash[_KPSCDS] = started

    def start(bulk_policy: str | None = None, extra_args: tuple[str, ...] = ()) -> Kpscd:
        k = Kpscd(mock_cluster, free_ports(), bulk_policy=bulk_policy, extra_args=extra_args)
        started.append(k)
        k.wait_ready()
        return k

    yield start

    problems = []
    for k in started:
        rc = k.stop()
        text = k.stderr_text()
        if rc != 0:
            problems.append(f"kpscd pid {k.pid} exited with {rc} after SIGTERM")
        if "panicked" in text:
            problems.append(f"kpscd pid {k.pid} panicked")
    if problems:
        details = "\n".join(f"--- kpscd pid {k.pid} stderr ---\n{k.stderr_text()[-8000:]}"
                            for k in started)
        for k in started:
            k.cleanup_files()
        pytest.fail("; ".join(problems) + "\n" + details, pytrace=False)
    for k in started:
        k.cleanup_files()


@pytest.fixture
def kpscd(kpscd_factory) -> Kpscd:
    return kpscd_factory()
