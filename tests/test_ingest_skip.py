"""``lambdalake ingest --skip TOPIC/PARTITION@OFFSET``: an operator passes the one record
batch ingest is stopped at, exactly.

On a real Apache Kafka broker, a batch of an aborted transaction gets a flipped byte in the
broker's own segment file: its CRC fails inside an aborted transaction's range, which
ingest never passes by itself. The skip writes one quarantine row for it and moves the
master and quarantine positions past it, and nothing more; a skip anywhere ingest is not
stopped is refused with one line and writes nothing.
"""

from __future__ import annotations

import json
import struct
import subprocess
import threading
import time
from pathlib import Path

from kafka import KafkaProducer

from batch.ingest import run_ingest
from lambdalake.contract.lake import QUARANTINE, Lake
from lambdalake.contract.manifest import ingest_positions
from lambdalake.ops.broker import EmbeddedBroker
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
