"""``lambdalake ingest --skip TOPIC/PARTITION@OFFSET``: an operator passes the one record
batch ingest is stopped at, exactly.

On a real Apache Kafka broker, a batch of an aborted transaction gets a flipped byte in the
broker's own segment file: its CRC fails inside an aborted transaction's range, which
ingest never passes by itself. The skip writes one quarantine row for it and moves the
master and quarantine positions past it, and nothing more; a skip anywhere ingest is not
stopped is refused with one line and writes nothing. A speed worker stopped at the same
batch passes it once the skip is committed (it reads the skip from the lake), within
seconds and without a batch run, and never without one.
"""

from __future__ import annotations

import json
import struct
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
from kafka import KafkaProducer
from kafka.record.memory_records import MemoryRecordsBuilder

from batch.ingest import run_ingest
from batch.ingest_lake import master_rows, open_tables
from batch.ingest_lake import quarantine_rows as rejected_to_rows
from lambdalake.contract.events import REJECTED_SCHEMA
from lambdalake.contract.lake import QUARANTINE, Lake
from lambdalake.contract.manifest import ingest_positions
from lambdalake.contract.validation import validate
from lambdalake.kafka.columnar import UndecodableBatch
from lambdalake.kafka.skips import OperatorSkips
from lambdalake.ops.broker import EmbeddedBroker
from lambdalake.settings import TOPICS, Settings
from speed.kafka_clients import KafkaPythonClient
from tests.ingest_stream import (
    ROOT,
    ingest_cmd,
    ingest_env,
    master_keys,
    order_event,
    quarantine_rows,
    table_versions,
    true_ends,
)
from tests.test_producer_conformance import corrupt_batch, send_batch
from tests.test_speed_worker import covers, offsets_of, status_file, wait_until, worker_thread


def abort_a_batch(bootstrap: str, first: int, n: int) -> int:
    """``n`` orders on orders/0 in one transactional batch, then abort; its base offset."""
    txn = KafkaProducer(bootstrap_servers=bootstrap, transactional_id="skip-test", linger_ms=50)
    txn.init_transactions()
    txn.begin_transaction()
    futures = [
        txn.send(
            "orders",
            value=json.dumps({**order_event(i), "event_id": f"aborted-{i}"}).encode(),
            partition=0,
        )
        for i in range(first, first + n)
    ]
    txn.flush()
    base = futures[0].get(timeout=10).offset
    txn.abort_transaction()
    txn.close()
    return base


def ingest(
    broker: EmbeddedBroker, lake: str, tmp: Path, *extra: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ingest_cmd(broker.bootstrap, lake), *extra],
        env=ingest_env(
            LAMBDALAKE_HOME=str(tmp / "home"),
            LAMBDALAKE_BROKER_WAIT_SECONDS="3",
            LAMBDALAKE_LOG_LEVEL="CRITICAL",
        ),
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr.decode())
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lambdalake: error: "), lines
    return lines[0]


def order_ids(lake: Lake) -> list[str]:
    return sorted(event_id for _, event_id in master_keys(lake, "orders"))


def test_skip_passes_a_crc_failure_inside_an_aborted_transaction_exactly(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)  # e-0 .. e-9 at offsets 0-9
    stuck_at = abort_a_batch(fresh_broker.bootstrap, 100, 10)  # its abort marker follows it
    send_batch(producer, 10, 10)  # e-10 .. e-19 after the marker: they confirm its extent
    corrupt_batch(fresh_broker, "orders", 0, stuck_at, "flip")

    lake_uri = str(tmp_path / "lake")
    lake = Lake(lake_uri)
    err = one_error_line(ingest(fresh_broker, lake_uri, tmp_path, "--until-end"))
    assert f"orders/0 offset {stuck_at}: " in err and "aborted transaction" in err, err
    assert ingest_positions(lake.master("orders"), "orders")[0] == stuck_at
    assert order_ids(lake) == sorted(f"e-{i}" for i in range(10))

    # Anywhere but the committed position is refused with one line, and writes nothing.
    before = table_versions(lake)
    for wrong in (stuck_at - 1, stuck_at + 1):
        err = one_error_line(
            ingest(fresh_broker, lake_uri, tmp_path, "--skip", f"orders/0@{wrong}")
        )
        assert f"orders/0@{wrong}" in err and f"is {stuck_at}, not {wrong}" in err, err
    assert table_versions(lake) == before

    done = ingest(fresh_broker, lake_uri, tmp_path, "--skip", f"orders/0@{stuck_at}")
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["orders"] == {"written": 0, "quarantined": 1}
    [row] = quarantine_rows(lake)
    assert (row["_topic"], row["_partition"], row["_offset"]) == ("orders", 0, stuck_at)
    assert row["reason"] == "skipped_by_operator:crc_in_aborted_transaction"
    assert struct.unpack_from(">q", row["raw"])[0] == stuck_at  # the whole batch, header first
    # Past the one batch (10 records): the abort marker after it is read as usual.
    past = stuck_at + 10
    assert ingest_positions(lake.master("orders"), "orders")[0] == past
    assert ingest_positions(lake.table(QUARANTINE), "orders")[0] == past
    assert order_ids(lake) == sorted(f"e-{i}" for i in range(10))

    # A second skip at the old offset is refused: the position has moved.
    err = one_error_line(ingest(fresh_broker, lake_uri, tmp_path, "--skip", f"orders/0@{stuck_at}"))
    assert f"is {past}, not {stuck_at}" in err, err

    send_batch(producer, 20, 10)
    producer.close()
    done = ingest(fresh_broker, lake_uri, tmp_path, "--until-end")
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["orders"] == {"written": 20, "quarantined": 0}
    assert order_ids(lake) == sorted(f"e-{i}" for i in range(30))  # each once, none aborted
    assert len(quarantine_rows(lake)) == 1
    ends = true_ends(fresh_broker.bootstrap)
    assert ingest_positions(lake.master("orders"), "orders") == ends["orders"]


def test_skip_refuses_a_batch_ingest_reads_by_itself(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """At the committed position but not stopped there: an operator cannot skip data
    that would have been read fine."""
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)
    producer.close()
    lake_uri = str(tmp_path / "lake")

    err = one_error_line(ingest(fresh_broker, lake_uri, tmp_path, "--skip", "orders/0@0"))
    assert "orders/0@0" in err and "not stopped there" in err, err
    err = one_error_line(ingest(fresh_broker, lake_uri, tmp_path, "--skip", "orders/1@0"))
    assert "end of the log" in err, err
    lake = Lake(lake_uri)
    assert quarantine_rows(lake) == []
    assert ingest_positions(lake.master("orders"), "orders") == {}  # nothing committed

    done = ingest(fresh_broker, lake_uri, tmp_path, "--until-end")
    assert done.returncode == 0, done.stderr.decode()
    assert order_ids(lake) == sorted(f"e-{i}" for i in range(10))


def test_a_continuous_ingest_stopped_at_the_batch_goes_on_after_the_skip(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """The ingest that is stopped does not need a restart: it sees the skip committed
    and resumes from the tables."""
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)
    stuck_at = abort_a_batch(fresh_broker.bootstrap, 100, 10)
    send_batch(producer, 10, 10)
    corrupt_batch(fresh_broker, "orders", 0, stuck_at, "flip")

    settings = settings_for(fresh_broker)
    lake = Lake(settings.lake_uri)
    stop = threading.Event()
    result: dict = {}
    continuous = threading.Thread(
        target=lambda: result.update(run_ingest(settings, until_end=False, stop=stop))
    )
    continuous.start()
    try:
        deadline = time.monotonic() + 60
        while ingest_positions(lake.master("orders"), "orders").get(0) != stuck_at:
            assert time.monotonic() < deadline, "ingest did not stop at the batch"
            time.sleep(0.2)
        done = ingest(fresh_broker, settings.lake_uri, tmp_path, "--skip", f"orders/0@{stuck_at}")
        assert done.returncode == 0, done.stderr.decode()
        send_batch(producer, 20, 10)
        producer.close()
        deadline = time.monotonic() + 90  # the stopped ingest retries 1 s, 2 s, 4 s ... apart
        while order_ids(lake) != sorted(f"e-{i}" for i in range(30)):
            assert time.monotonic() < deadline, order_ids(lake)
            assert continuous.is_alive()
            time.sleep(0.5)
    finally:
        stop.set()
        continuous.join(timeout=60)
    assert result["orders"] == {"written": 30, "quarantined": 0}
    assert len(quarantine_rows(lake)) == 1
    assert (
        ingest_positions(lake.master("orders"), "orders")
        == true_ends(fresh_broker.bootstrap)["orders"]
    )


# --- the speed layer ---------------------------------------------------------------------------


def stuck_ingest(broker: EmbeddedBroker, lake_uri: str, tmp: Path) -> int:
    """e-0 .. e-9, an aborted batch of 10 with a flipped byte, then e-10 .. e-19 on
    orders/0; ingest stopped at the aborted batch (everything before it committed).
    Returns the batch's offset."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)
    stuck_at = abort_a_batch(broker.bootstrap, 100, 10)
    send_batch(producer, 10, 10)
    producer.close()
    corrupt_batch(broker, "orders", 0, stuck_at, "flip")
    err = one_error_line(ingest(broker, lake_uri, tmp, "--until-end"))
    assert f"orders/0 offset {stuck_at}: " in err, err
    assert ingest_positions(Lake(lake_uri).master("orders"), "orders")[0] == stuck_at
    return stuck_at


def stopped_at(settings: Settings, offset: int) -> dict | None:
    """The worker's status once it is stopped at orders/0 ``offset``, else None."""
    status = status_file(settings, (0, 1))
    return status if says_stopped_at(status, offset) else None


def says_stopped_at(status: dict, offset: int) -> bool:
    at = offsets_of(status).get("orders", {}).get(0)
    return (
        bool(status.get("halted"))
        and f"orders/0 offset {offset}" in status["halted"]
        and (at == offset)
    )


def held_orders(settings: Settings) -> dict[tuple[int, int], str]:
    """The orders the (stopped) worker holds: (partition, offset) -> event_id."""
    con = duckdb.connect(str(settings.speed_state_dir / "worker-0-of-1.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT _partition, _offset, event_id FROM held_orders").fetchall()
    finally:
        con.close()
    return {(p, o): event_id for p, o, event_id in rows}


def master_orders(lake: Lake) -> dict[tuple[int, int], str]:
    return {(p, o): event_id for (_, p, o), event_id in master_keys(lake, "orders")}


def test_a_speed_worker_stopped_at_the_batch_passes_it_once_the_operator_skips_it(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """No batch run: the worker reads the skip from the lake, moves to where ingest's skip
    moved (right after the batch), counts none of its events, says so in its status, and
    then holds exactly the valid events ingest wrote."""
    settings = settings_for(fresh_broker)
    lake = Lake(settings.lake_uri)
    stuck_at = stuck_ingest(fresh_broker, settings.lake_uri, tmp_path)
    with worker_thread(settings):
        status = wait_until(lambda: stopped_at(settings, stuck_at), 60, "the worker to stop")
        assert status["since_start"]["skipped_by_operator"] == 0

        done = ingest(fresh_broker, settings.lake_uri, tmp_path, "--skip", f"orders/0@{stuck_at}")
        assert done.returncode == 0, done.stderr.decode()
        skipped = time.monotonic()
        ends = true_ends(fresh_broker.bootstrap)
        status = wait_until(
            lambda: covers(s := status_file(settings, (0, 1)), ends) and s, 30, "the worker to pass"
        )
        passed_in = time.monotonic() - skipped
        print(f"the speed worker passed the skipped batch {passed_in:.1f} s after the skip")
        assert passed_in < 15, passed_in  # looks at most 5 s apart; status written each second
        assert status["halted"] is None
        assert status["since_start"]["skipped_by_operator"] == 1
        assert status["since_start"]["poisoned_batches"] == 0
        last = status["last_skipped_by_operator"]
        assert (last["topic"], last["partition"], last["offsets"], last["reason"]) == (
            "orders",
            0,
            f"{stuck_at}-{stuck_at + 9}",
            "skipped_by_operator:crc_in_aborted_transaction",
        )
        assert sum(status["invalid"].values()) == 0  # the batch's events are not counted

        producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
        send_batch(producer, 20, 10)
        producer.close()
        done = ingest(fresh_broker, settings.lake_uri, tmp_path, "--until-end")
        assert done.returncode == 0, done.stderr.decode()
        ends = true_ends(fresh_broker.bootstrap)
        status = wait_until(
            lambda: covers(s := status_file(settings, (0, 1)), ends) and s, 30, "the worker"
        )
    # Exactly once: the speed layer holds what a recompute over master would count (no run
    # yet, so all of it), at ingest's positions; nothing of the skipped batch.
    held = held_orders(settings)
    assert held == master_orders(lake)
    assert sorted(held.values()) == sorted(f"e-{i}" for i in range(30))
    assert offsets_of(status)["orders"] == ingest_positions(lake.master("orders"), "orders")
    assert offsets_of(status)["orders"] == ends["orders"]


def test_a_speed_worker_does_not_pass_a_stopped_at_batch_without_a_skip(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """Ingest is stopped at the batch too and nobody skipped it: the worker keeps asking
    the lake (at 0, 1, 3, 7 s ...) and stays where it is, holding only what came before."""
    settings = settings_for(fresh_broker)
    stuck_at = stuck_ingest(fresh_broker, settings.lake_uri, tmp_path)
    with worker_thread(settings):
        wait_until(lambda: stopped_at(settings, stuck_at), 60, "the worker to stop")
        # Several looks at the lake and several reads of the batch; the status says
        # "halted" at every one of them (it is written each second), never "not halted"
        # between two retries.
        not_stopped = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            status = status_file(settings, (0, 1))
            if not says_stopped_at(status, stuck_at):
                not_stopped.append(status)
            time.sleep(0.1)
    assert not not_stopped, not_stopped[0]
    assert status["since_start"]["skipped_by_operator"] == 0
    assert status["last_skipped_by_operator"] is None
    assert sorted(held_orders(settings).values()) == sorted(f"e-{i}" for i in range(10))


def test_a_poll_that_returns_before_reaching_the_batch_again_keeps_the_stop(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """After the backoff the client reads the batch again; a poll that returns before its
    fetch gets there (a short timeout, a busy machine) raises nothing, and must not end
    the stop: it ends only when the partition reads past the batch (or is moved)."""
    settings = settings_for(fresh_broker)
    stuck_at = stuck_ingest(fresh_broker, settings.lake_uri, tmp_path)
    client = KafkaPythonClient(settings)
    try:
        client.start([("orders", 0)], {("orders", 0): 0})
        deadline = time.monotonic() + 30
        while client.halted_at is None:
            assert time.monotonic() < deadline, "the client did not stop at the batch"
            client.poll(0.5, 1000)
        assert client.halted_at.offset == stuck_at
        for _ in range(200):  # polls of a millisecond, across several backoffs
            client.poll(0.001, 1000)
            assert client.halted_at is not None and client.halted_at.offset == stuck_at
            assert client.halted and f"orders/0 offset {stuck_at}" in client.halted
            time.sleep(0.02)
        client.seek(("orders", 0), stuck_at + 10)  # a seek of the partition ends the stop
        assert client.halted is None and client.halted_at is None
    finally:
        client.close()


def test_a_speed_worker_that_reaches_the_batch_after_the_skip_passes_it_at_once(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """The usual order when the worker was down or behind: the skip is already in the lake
    when the worker gets to the batch; its first look finds it."""
    settings = settings_for(fresh_broker)
    lake = Lake(settings.lake_uri)
    stuck_at = stuck_ingest(fresh_broker, settings.lake_uri, tmp_path)
    done = ingest(
        fresh_broker, settings.lake_uri, tmp_path, "--skip", f"orders/0@{stuck_at}", "--until-end"
    )
    assert done.returncode == 0, done.stderr.decode()
    ends = true_ends(fresh_broker.bootstrap)
    with worker_thread(settings):
        status = wait_until(
            lambda: covers(s := status_file(settings, (0, 1)), ends) and s, 30, "the worker"
        )
    assert status["since_start"]["skipped_by_operator"] == 1
    assert held_orders(settings) == master_orders(lake)
    assert sorted(held_orders(settings).values()) == sorted(f"e-{i}" for i in range(20))


# --- what the speed layer finds in the lake (no broker) ----------------------------------------


def _batch(base_offset: int, n: int) -> bytes:
    """A v2 record batch of ``n`` records at ``base_offset``, as a broker stores it."""
    b = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20, offset=0)
    for i in range(n):
        b.append(timestamp=1, key=None, value=b"v%d" % i, headers=[])
    b.close()
    data = bytearray(b.buffer())
    struct.pack_into(">q", data, 0, base_offset)
    return bytes(data)


def _commit(lake: Lake, ends: dict[int, int], rejected: list[tuple[int, int, bytes, str]]) -> None:
    """An ingest commit on orders: ``rejected`` (partition, offset, raw, reason) to
    quarantine, then the positions ``ends`` in both tables, as ingest commits them."""
    masters, quarantine = open_tables(lake, list(TOPICS))
    positions = {t: {p: 0 for p in range(4)} for t in TOPICS}
    positions["orders"].update(ends)
    table = pa.table(
        {
            "_partition": pa.array([r[0] for r in rejected], pa.int32()),
            "_offset": pa.array([r[1] for r in rejected], pa.int64()),
            "raw": pa.array([r[2] for r in rejected], pa.binary()),
            "reason": pa.array([r[3] for r in rejected], pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )
    now = datetime.now(UTC)
    rows = rejected_to_rows(table, "orders", now, quarantine.positions.get("orders", {}))
    if rows.num_rows:
        quarantine.append(rows, positions)
    valid = validate("orders", [], [], [], max_event_bytes=1 << 20).valid
    masters["orders"].append(master_rows(valid, "orders", now), {"orders": positions["orders"]})


def test_the_skip_a_stopped_consumer_finds_is_exactly_the_one_ingest_committed(
    tmp_path: Path,
) -> None:
    """Only a ``skipped_by_operator`` row at the offset the consumer stands at, with ingest's
    positions past the batch its header describes, and the consumer's own read of the batch
    agreeing where it ends, is a skip to take; it moves the consumer to right after it."""
    raw = _batch(10, 10)  # offsets 10-19
    halt = UndecodableBatch(
        "orders",
        0,
        10,
        "failed its CRC",
        kind="crc_in_aborted_transaction",
        raw=raw,
        next_offset=20,
    )
    lake = Lake(str(tmp_path / "lake"))
    skips = OperatorSkips(lake)
    assert skips.find(halt) is None  # no lake yet

    _commit(lake, {0: 10}, [(0, 3, b"{", "bad_json")])  # ingest stopped at 10 as well
    assert skips.find(halt) is None

    # Ingest passed offset 10 by itself (no skip row): that is no skip for this consumer.
    other = Lake(str(tmp_path / "other"))
    _commit(other, {0: 25}, [(0, 10, raw, "undecodable_batch:crc")])
    assert OperatorSkips(other).find(halt) is None

    _commit(lake, {0: 20}, [(0, 10, raw, "skipped_by_operator:crc_in_aborted_transaction")])
    skip = skips.find(halt)
    assert skip is not None and skip.by_operator
    assert (skip.topic, skip.partition, skip.offset, skip.next_offset) == ("orders", 0, 10, 20)
    assert skip.quarantine_reason == "skipped_by_operator:crc_in_aborted_transaction"

    def stopped(partition: int, offset: int, next_offset: int | None) -> UndecodableBatch:
        return UndecodableBatch("orders", partition, offset, "x", raw=raw, next_offset=next_offset)

    assert OperatorSkips(lake).find(stopped(0, 10, 20)) is not None
    assert OperatorSkips(lake).find(stopped(1, 10, 20)) is None  # another partition
    assert OperatorSkips(lake).find(stopped(0, 11, 20)) is None  # stopped elsewhere
    assert OperatorSkips(lake).find(stopped(0, 10, 19)) is None  # read as another extent
    assert OperatorSkips(lake).find(stopped(0, 10, None)) is None  # extent unknown here
