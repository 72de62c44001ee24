"""The embedded broker (Apache Kafka, KRaft): starts on a free port, creates the topics,
round-trips messages, reports ends that agree with what is read (transaction markers
included), and keeps its log across a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from lambdalake.contract.lake import Lake
from lambdalake.contract.manifest import ingest_positions
from lambdalake.kafka.clients import end_offsets, topic_partitions
from lambdalake.ops import broker as broker_module
from lambdalake.ops.broker import EmbeddedBroker, free_port, new_cluster_id, uuid_to_kafka_id
from lambdalake.settings import TOPICS
from tests.ingest_stream import (
    assert_exactly_once,
    ingest_cmd,
    ingest_env,
    master_keys,
    produce_stream,
    run_until_end,
    true_ends,
    wait_for_line,
)


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka's tools read an id starting with '-' as an option, and formatting fails (one
    fresh broker in 64 did, in CI); the id is drawn again, as Kafka's own Uuid does."""
    import uuid

    dashed = uuid.UUID(bytes=bytes([0xF8]) + bytes(15))
    plain = uuid.UUID(bytes=bytes([0x10]) + bytes(15))
    assert uuid_to_kafka_id(dashed).startswith("-")
    draws = iter([dashed, dashed, plain])
    monkeypatch.setattr(broker_module.uuid, "uuid4", lambda: next(draws))
    assert new_cluster_id() == uuid_to_kafka_id(plain)


def test_topics_exist_with_configured_partitions(broker: EmbeddedBroker) -> None:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        assert topic_partitions(consumer, "orders") == [0, 1, 2, 3]
        assert topic_partitions(consumer, "reviews") == [0, 1, 2, 3]
    finally:
        consumer.close()


def test_the_broker_holds_its_whole_heap_from_the_start(broker: EmbeddedBroker) -> None:
    """Heap fixed at its bound and touched at start: the broker's memory is flat over weeks
    of uptime instead of growing towards -Xmx for hours (the soak, BENCHMARKS.md)."""
    import psutil

    cmd = psutil.Process(broker.process.pid).cmdline()
    xmx = next(a for a in cmd if a.startswith("-Xmx"))[4:]
    assert f"-Xms{xmx}" in cmd and "-XX:+AlwaysPreTouch" in cmd
    heap_bytes = int(xmx[:-1]) * {"m": 2**20, "g": 2**30}[xmx[-1].lower()]
    assert psutil.Process(broker.process.pid).memory_info().rss > heap_bytes


def test_produce_consume_round_trip_and_true_end_offsets(fresh_broker: EmbeddedBroker) -> None:
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5)
    sent = [f"message-{i}".encode() for i in range(5000)]
    for i, value in enumerate(sent):
        producer.send("orders", key=f"sku-{i % 7}".encode(), value=value)
    producer.flush()
    producer.close()

    tps = [TopicPartition("orders", p) for p in range(4)]
    ends = end_offsets(fresh_broker.bootstrap, tps)
    # The broker's ends (ListOffsets) sum to what was sent.
    assert sum(ends.values()) == len(sent)

    consumer = KafkaConsumer(bootstrap_servers=fresh_broker.bootstrap, enable_auto_commit=False)
    consumer.assign(tps)
    consumer.seek_to_beginning()
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < len(sent) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    consumer.close()
    assert sorted(got) == sorted(sent)


def test_broker_command_prints_ready_and_stops_on_sigterm(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lambdalake.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "LAMBDALAKE_HOME": str(tmp_path)},
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"broker ready on 127.0.0.1:{port}"
        consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}")
        assert topic_partitions(consumer, "orders") == [0, 1, 2, 3]
        consumer.close()
    finally:
        proc.terminate()
        rc = proc.wait(timeout=20)
    assert rc == 0


def test_port_in_use_is_a_clear_error(broker: EmbeddedBroker) -> None:
    try:
        EmbeddedBroker.start(port=broker.port, timeout=5)
    except Exception as exc:
        assert "broker" in str(exc).lower()
    else:  # pragma: no cover
        raise AssertionError("starting a second broker on a used port must fail")


# --- end offsets and transactions -------------------------------------------------------------


def _read_all(
    bootstrap: str, tp: TopicPartition, isolation: str, until: int, timeout: float = 30.0
) -> tuple[list[bytes], int]:
    """Read ``tp`` from the beginning until the consumer's position reaches ``until`` (or the
    time is up); returns the values read and the final position."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation,
        fetch_max_wait_ms=100,
    )
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while consumer.position(tp) < until and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(r.value for r in records)
        return got, consumer.position(tp)
    finally:
        consumer.close()


def test_end_offsets_count_transaction_markers_and_agree_with_what_is_read(
    fresh_broker: EmbeddedBroker,
) -> None:
    """The end is the high watermark: data records plus one control record per commit or
    abort. Both isolation levels read up to exactly that end, ``read_committed`` without
    the aborted records; an open transaction's records count in the end at once, and a
    ``read_committed`` reader stops before them until the transaction completes."""
    bootstrap = fresh_broker.bootstrap
    tp = TopicPartition("orders", 0)
    plain = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(10):
        plain.send("orders", value=f"plain-{i}".encode(), partition=0)
    plain.flush()
    plain.close()

    txn = KafkaProducer(bootstrap_servers=bootstrap, transactional_id="end-offsets-test")
    txn.init_transactions()

    def transaction(prefix: str, n: int, *, commit: bool) -> list[bytes]:
        txn.begin_transaction()
        values = [f"{prefix}-{i}".encode() for i in range(n)]
        for v in values:
            txn.send("orders", value=v, partition=0)
        txn.flush()  # in the log before the end (an abort would drop unsent records)
        if commit:
            txn.commit_transaction()
        else:
            txn.abort_transaction()
        return values

    committed = [f"plain-{i}".encode() for i in range(10)]
    committed += transaction("commit-a", 20, commit=True)
    aborted = transaction("abort", 15, commit=False)
    committed += transaction("commit-b", 5, commit=True)

    # 50 data records and 3 control records (commit, abort, commit).
    end = end_offsets(bootstrap, [tp])[tp]
    assert end == 50 + 3
    values, position = _read_all(bootstrap, tp, "read_committed", until=end)
    assert (values, position) == (committed, end)
    values, position = _read_all(bootstrap, tp, "read_uncommitted", until=end)
    assert sorted(values) == sorted(committed + aborted) and position == end
    # The other partitions are untouched.
    others = end_offsets(bootstrap, [TopicPartition("orders", p) for p in (1, 2, 3)])
    assert set(others.values()) == {0}

    # An open transaction: its records are in the end at once ...
    txn.begin_transaction()
    for i in range(4):
        txn.send("orders", value=f"open-{i}".encode(), partition=0)
    txn.flush()
    open_end = end_offsets(bootstrap, [tp])[tp]
    assert open_end == end + 4
    # ... a read_committed reader stops at the first open record ...
    values, position = _read_all(bootstrap, tp, "read_committed", until=open_end, timeout=3)
    assert (values, position) == (committed, end)
    # ... and reads them, and past the marker, once it commits.
    txn.commit_transaction()
    final = end_offsets(bootstrap, [tp])[tp]
    assert final == open_end + 1
    values, position = _read_all(bootstrap, tp, "read_committed", until=final)
    committed += [f"open-{i}".encode() for i in range(4)]
    assert (values, position) == (committed, final)

    # A log that ends with an aborted transaction: nothing more to read, yet the position
    # reaches the end (else `ingest --until-end` would wait for ever).
    transaction("abort-last", 6, commit=False)
    txn.close()
    last = end_offsets(bootstrap, [tp])[tp]
    assert last == final + 6 + 1
    values, position = _read_all(bootstrap, tp, "read_committed", until=last)
    assert (values, position) == (committed, last)


# --- a broker restart in the middle of a stream -----------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_on_the_same_log_loses_and_duplicates_nothing(tmp_path: Path, how: str) -> None:
    """Produce, ingest part of it with a continuous ingest, stop the broker (cleanly or by
    SIGKILL) while ingest runs, start it again on the same log directory and port, produce
    more, drain with ``--until-end``: every message once, at the offset it was given."""
    log_dir, port = tmp_path / "broker", free_port()
    broker = EmbeddedBroker.start(port=port, log_dir=log_dir)
    lake = Lake(str(tmp_path / "lake"))
    ingest_log = tmp_path / "ingest.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        stream = produce_stream(broker.bootstrap, 3_000, seed=21)
        before = true_ends(broker.bootstrap)
        with open(ingest_log, "wb") as err:
            proc = subprocess.Popen(
                ingest_cmd(broker.bootstrap, lake.root),
                stdout=subprocess.PIPE,
                stderr=err,
                env=ingest_env(
                    LAMBDALAKE_INGEST_BATCH_SIZE="300", LAMBDALAKE_INGEST_BATCH_SECONDS="0.1"
                ),
            )
        assert wait_for_line(ingest_log, "ingest.batch", timeout=60), ingest_log.read_text()
        if how == "sigkill":
            os.killpg(broker.process.pid, signal.SIGKILL)
        broker.stop()
        broker = EmbeddedBroker.start(port=port, log_dir=log_dir)
        # The log came back whole: same ends, same records at the same offsets.
        assert true_ends(broker.bootstrap) == before
        produce_stream(broker.bootstrap, 3_000, seed=22, stream=stream)
        assert len(stream.valid) + len(stream.invalid) == 6_000
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0, ingest_log.read_text()[-3000:]
        partial = {t: ingest_positions(lake.master(t), t) for t in TOPICS}
        assert sum(sum(p.values()) for p in partial.values()) > 0

        summary = run_until_end(broker.bootstrap, lake.root, tmp_path / "until-end.log")
        assert_exactly_once(lake, stream)
        ends = true_ends(broker.bootstrap)
        assert {t: ingest_positions(lake.master(t), t) for t in TOPICS} == ends
        assert sum(sum(e.values()) for e in ends.values()) == 6_000
        # The second run wrote exactly what the first had not.
        assert sum(s["written"] for s in summary.values()) == len(stream.valid) - sum(
            len(master_rows_below(lake, t, partial[t])) for t in TOPICS
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.stop()


def master_rows_below(lake: Lake, topic: str, positions: dict[int, int]) -> list[object]:
    """The master rows of ``topic`` below the given per-partition positions."""
    return [k for k, _ in master_keys(lake, topic) if k[2] < positions.get(k[1], 0)]


# --- no orphan JVMs -----------------------------------------------------------------------------


def _jvms_using(directory: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``directory`` (the broker's JVM)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                (
                    ln
                    for ln in (proc / "status").read_text().splitlines()
                    if ln.startswith("State:")
                ),
                "",
            )
        except OSError:
            continue
        if "java" in cmdline and str(directory) in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return pids


def test_the_broker_does_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL to ``lambdalake broker`` (no chance to clean up): the JVM goes too."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lambdalake.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "LAMBDALAKE_HOME": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"broker ready on 127.0.0.1:{port}"
        assert _jvms_using(tmp_path / "broker"), "the broker's JVM should be running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _jvms_using(tmp_path / "broker") and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _jvms_using(tmp_path / "broker")
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, "the broker's JVM outlived its parent"


def test_missing_jars_are_a_one_line_error_saying_make_install(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lambdalake.cli", "broker", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LAMBDALAKE_HOME": str(tmp_path), "LAMBDALAKE_KAFKA_JARS": "/nowhere"},
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lambdalake: error: ")
    assert "/nowhere" in lines[0] and "make install" in lines[0]
    assert not (tmp_path / "broker").exists()
