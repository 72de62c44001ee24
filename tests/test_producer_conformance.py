"""Producer conformance: whatever a real producer sends, ingest and the speed layer read
exactly what a reference ``read_committed`` kafka-python consumer reads.

Real producers compress (gzip, lz4, zstd, snappy), write transactions that commit
and abort, add headers and null keys, send oversized and broken events; a broker's
log can also hold a corrupt batch. For each, the offset -> event mapping that
ingest (master + quarantine) and a speed worker (held events + invalid counts)
end up with is compared with the reference consumer's, on a real Apache Kafka
broker, and the positions both reach equal the end of the log.

Corrupt batches are made the way they happen: the broker's own segment file is
changed under it (a flipped byte, a codec the payload does not match, an
unknown codec), so the broker serves them as it would after a disk fault or a
broken producer.
"""

from __future__ import annotations

import json
import struct
import subprocess
import threading
import time
from pathlib import Path

import duckdb
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.record.default_records import DefaultRecordBase
from kafka.record.util import calc_crc32c

from batch.ingest import run_ingest
from lambdalake.contract.events import KEY_BY_TOPIC
from lambdalake.contract.lake import Lake
from lambdalake.contract.manifest import ingest_positions
from lambdalake.ops.broker import EmbeddedBroker
from lambdalake.settings import TOPICS
from tests.ingest_stream import (
    ingest_cmd,
    ingest_env,
    master_keys,
    order_event,
    quarantine_rows,
    review_event,
    true_ends,
)
from tests.test_speed_worker import covers, status_file, worker_thread

ROOT = Path(__file__).resolve().parents[1]
Key = tuple[str, int, int]  # topic, partition, offset
ID_FIELD = KEY_BY_TOPIC
CODECS = ("gzip", "lz4", "zstd", "snappy", None)
MAX_EVENT_BYTES = 4096


# --- the reference -------------------------------------------------------------------------------


def reference_read(bootstrap: str) -> tuple[dict[Key, bytes | None], dict[str, dict[int, int]]]:
    """What kafka-python's own ``read_committed`` consumer (its own record decoder) reads:
    every (topic, partition, offset) with its value, and the position it ends at."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    try:
        tps = [
            TopicPartition(t, p) for t in TOPICS for p in sorted(consumer.partitions_for_topic(t))
        ]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)  # the last stable offsets, for read_committed
        got: dict[Key, bytes | None] = {}
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, "the reference consumer did not reach the end"
            for tp, records in consumer.poll(timeout_ms=200).items():
                for r in records:
                    got[(tp.topic, tp.partition, r.offset)] = r.value
        positions = {t: {} for t in TOPICS}
        for tp in tps:
            positions[tp.topic][tp.partition] = consumer.position(tp)
        return got, positions
    finally:
        consumer.close()


def event_ids(read: dict[Key, bytes | None], max_bytes: int = MAX_EVENT_BYTES) -> dict[Key, str]:
    """The valid events of a reference read: key -> event id (invalid ones left out)."""
    out = {}
    for key, value in read.items():
        try:
            event = json.loads(value or b"")
        except ValueError:
            continue
        if len(value or b"") <= max_bytes and isinstance(event, dict):
            out[key] = event[ID_FIELD[key[0]]]
    return out


# --- what the producers send ---------------------------------------------------------------------


def produce_everything(bootstrap: str) -> dict[str, set[str]]:
    """Plain producers with each codec, transactions that commit and abort (one left
    open while plain events go to the same partitions), headers, null keys, an oversized
    event and broken JSON. Returns the ids sent in committed and aborted transactions."""
    n = 0
    for codec in CODECS:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            compression_type=codec,
            linger_ms=20,
            max_request_size=1 << 21,
        )
        for _ in range(40):
            event = {**order_event(n), "event_id": f"{codec}-o-{n}"}
            headers = [("source", codec.encode() if codec else b"none")] if n % 3 == 0 else None
            key = None if n % 4 == 0 else event["sku"].encode()  # type: ignore[union-attr]
            producer.send("orders", key=key, value=json.dumps(event).encode(), headers=headers)
            n += 1
        for _ in range(10):
            review = {**review_event(n), "review_id": f"{codec}-r-{n}"}
            producer.send("reviews", value=json.dumps(review).encode(), partition=n % 4)
            n += 1
        producer.flush()
        producer.close()

    big = {**order_event(n), "event_id": "oversized", "store_id": "s" * 2 * MAX_EVENT_BYTES}
    plain = KafkaProducer(bootstrap_servers=bootstrap, compression_type="zstd", linger_ms=5)
    plain.send("orders", value=json.dumps(big).encode(), partition=1)
    plain.send("orders", value=b"{not json", partition=2)
    plain.flush()

    ids: dict[str, set[str]] = {"committed": set(), "aborted": set()}
    txn = KafkaProducer(
        bootstrap_servers=bootstrap, transactional_id="conformance", compression_type="lz4"
    )
    txn.init_transactions()
    for round_, outcome in enumerate(["committed", "aborted", "committed", "aborted"]):
        txn.begin_transaction()
        for i in range(15):
            event_id = f"txn{round_}-o-{i}"
            ids[outcome].add(event_id)
            txn.send(
                "orders",
                value=json.dumps({**order_event(i), "event_id": event_id}).encode(),
                partition=i % 4,
            )
        review_id = f"txn{round_}-r"
        ids[outcome].add(review_id)
        txn.send(
            "reviews",
            value=json.dumps({**review_event(round_), "review_id": review_id}).encode(),
            partition=0,
        )
        txn.flush()
        # Plain events interleaved with the open transaction, in the same partitions.
        for i in range(4):
            event = {**order_event(i), "event_id": f"between-{round_}-{i}"}
            plain.send("orders", value=json.dumps(event).encode(), partition=i)
        plain.flush()
        if outcome == "committed":
            txn.commit_transaction()
        else:
            txn.abort_transaction()
    txn.close()
    plain.close()
    return ids


# --- what ingest and the speed layer hold ----------------------------------------------------------


def ingested(lake: Lake) -> tuple[dict[Key, str], set[Key], list[dict]]:
    master = {key: event_id for t in TOPICS for key, event_id in master_keys(lake, t)}
    rows = quarantine_rows(lake)
    quarantined = {(r["_topic"], r["_partition"], r["_offset"]) for r in rows}
    return master, quarantined, rows


def speed_held(settings, ends: dict[str, dict[int, int]]) -> tuple[dict[Key, str], dict]:
    """Run a speed worker until it reaches ``ends``; the events it then holds."""
    with worker_thread(settings):
        deadline = time.monotonic() + 60
        while not covers(status_file(settings, (0, 1)), ends):
            assert time.monotonic() < deadline, status_file(settings, (0, 1))
            time.sleep(0.2)
        status = status_file(settings, (0, 1))
    con = duckdb.connect(str(settings.speed_state_dir / "worker-0-of-1.duckdb"), read_only=True)
    try:
        held = {}
        for topic in TOPICS:
            rows = con.execute(
                f"SELECT _partition, _offset, {ID_FIELD[topic]} FROM held_{topic}"
            ).fetchall()
            held.update({(topic, p, o): i for p, o, i in rows})
    finally:
        con.close()
    return held, status


# --- the tests -------------------------------------------------------------------------------------


def test_ingest_and_speed_read_exactly_what_a_read_committed_consumer_reads(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    ids = produce_everything(fresh_broker.bootstrap)
    reference, ends = reference_read(fresh_broker.bootstrap)
    assert ends == true_ends(fresh_broker.bootstrap)  # every transaction is closed
    valid = event_ids(reference)
    assert not ids["aborted"] & set(valid.values())  # the reference drops aborted ones
    assert ids["committed"] <= set(valid.values())

    settings = settings_for(fresh_broker, max_event_bytes=MAX_EVENT_BYTES)
    summary = run_ingest(settings, until_end=True, stop=threading.Event())
    lake = Lake(settings.lake_uri)
    master, quarantined, rows = ingested(lake)
    assert master == valid
    assert quarantined == set(reference) - set(valid)
    assert sorted(r["reason"].split(":")[0] for r in rows) == ["bad_json", "oversize"]
    assert summary["orders"]["written"] + summary["reviews"]["written"] == len(valid)
    for topic in TOPICS:  # past the last transaction marker too
        positions = ingest_positions(lake.master(topic), topic)
        # A topic nothing was sent to (products, stores here) has nothing committed.
        assert positions == ends[topic] or (not positions and not any(ends[topic].values()))

    held, _ = speed_held(settings, ends)
    assert held == valid


# --- poison batches --------------------------------------------------------------------------------


def _segment(broker: EmbeddedBroker, topic: str, partition: int) -> Path:
    (log,) = sorted((broker.data_dir / f"{topic}-{partition}").glob("*.log"))
    return log


def _batch_span(data: bytes | bytearray, base_offset: int) -> tuple[int, int]:
    """Start and end (bytes) of the record batch with ``base_offset`` in a segment."""
    pos = 0
    while pos + 12 <= len(data):
        base, length = struct.unpack_from(">qi", data, pos)
        end = pos + DefaultRecordBase.AFTER_LEN_OFFSET + length
        if base == base_offset:
            return pos, end
        pos = end
    raise AssertionError(f"no batch at offset {base_offset}")


def corrupt_batch(
    broker: EmbeddedBroker, topic: str, partition: int, base_offset: int, how: str
) -> None:
    """Change the batch at ``base_offset`` in the broker's segment file, in place."""
    path = _segment(broker, topic, partition)
    data = bytearray(path.read_bytes())
    start, end = _batch_span(data, base_offset)
    attrs_at = start + DefaultRecordBase.ATTRIBUTES_OFFSET
    if how == "flip":  # a byte of the last record's value: the CRC no longer matches
        data[end - 3] ^= 0xFF
    else:  # a codec the payload is not in, or none that exists; the CRC made to match
        codec = {"lz4_mismatch": 3, "unknown_codec": 6}[how]
        attrs = struct.unpack_from(">h", data, attrs_at)[0]
        struct.pack_into(">h", data, attrs_at, (attrs & ~0x07) | codec)
        crc = calc_crc32c(memoryview(data)[attrs_at:end])
        struct.pack_into(">I", data, start + DefaultRecordBase.CRC_OFFSET, crc)
    with path.open("r+b") as f:
        f.seek(start)
        f.write(data[start:end])


def send_batch(producer: KafkaProducer, first: int, n: int, partition: int = 0) -> int:
    """``n`` orders in one record batch; its base offset."""
    futures = [
        producer.send(
            "orders",
            value=json.dumps({**order_event(i), "event_id": f"e-{i}"}).encode(),
            partition=partition,
        )
        for i in range(first, first + n)
    ]
    producer.flush()
    return futures[0].get(timeout=10).offset


@pytest.mark.parametrize("how", ["lz4_mismatch", "unknown_codec", "flip"])
def test_a_poison_batch_is_quarantined_and_passed_by_ingest_and_speed(
    fresh_broker: EmbeddedBroker, settings_for, how: str
) -> None:
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)
    poison_at = send_batch(producer, 10, 10)
    send_batch(producer, 20, 10)
    producer.close()
    corrupt_batch(fresh_broker, "orders", 0, poison_at, how)

    settings = settings_for(fresh_broker)
    summary = run_ingest(settings, until_end=True, stop=threading.Event())
    lake = Lake(settings.lake_uri)
    master, _, rows = ingested(lake)
    assert sorted(master.values()) == sorted(f"e-{i}" for i in [*range(10), *range(20, 30)])
    expected_reason = {
        "lz4_mismatch": "undecodable_batch:decompression",
        "unknown_codec": "undecodable_batch:unsupported_codec",
        "flip": "undecodable_batch:crc",
    }[how]
    assert [(r["_partition"], r["_offset"], r["reason"]) for r in rows] == [
        (0, poison_at, expected_reason)
    ]
    assert struct.unpack_from(">q", rows[0]["raw"])[0] == poison_at  # the whole batch, header first
    assert summary["orders"] == {"written": 20, "quarantined": 1}
    ends = true_ends(fresh_broker.bootstrap)
    assert ingest_positions(lake.master("orders"), "orders") == ends["orders"]

    held, status = speed_held(settings, ends)
    assert held == master
    assert status["since_start"]["poisoned_batches"] == 1  # the operator sees it was passed
    assert status["halted"] is None


def test_a_corrupt_last_batch_stops_ingest_with_one_line_then_passes_once_confirmed(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """A CRC failure in the last batch of a partition: its extent (the CRC does not cover
    the base offset) cannot be confirmed, so ingest stops there, commits everything
    before it and says so in one line; once a later batch confirms where it ends, it is
    quarantined and passed."""
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)
    poison_at = send_batch(producer, 10, 10)
    corrupt_batch(fresh_broker, "orders", 0, poison_at, "flip")

    settings = settings_for(fresh_broker, broker_wait_seconds=3)
    env = ingest_env(
        LAMBDALAKE_HOME=str(tmp_path / "home"),
        LAMBDALAKE_BROKER_WAIT_SECONDS="3",
        LAMBDALAKE_LOG_LEVEL="CRITICAL",
    )
    started = time.monotonic()
    proc = subprocess.run(
        [*ingest_cmd(fresh_broker.bootstrap, settings.lake_uri), "--until-end"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1, proc.stderr.decode()
    assert err[0].startswith(f"lambdalake: error: orders/0 offset {poison_at}: "), err
    assert "CRC" in err[0]
    assert time.monotonic() - started < 60
    lake = Lake(settings.lake_uri)
    assert ingest_positions(lake.master("orders"), "orders")[0] == poison_at  # all before it

    send_batch(producer, 20, 10)  # now a batch follows it and confirms its extent
    producer.close()
    summary = run_ingest(settings, until_end=True, stop=threading.Event())
    assert summary["orders"] == {"written": 10, "quarantined": 1}
    assert (
        ingest_positions(lake.master("orders"), "orders")
        == true_ends(fresh_broker.bootstrap)["orders"]
    )


def corrupt_last_batch(broker: EmbeddedBroker) -> int:
    """Two batches on orders/0, the last one's CRC broken (nothing after it confirms its
    extent); returns its base offset."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
    send_batch(producer, 0, 10)
    poison_at = send_batch(producer, 10, 10)
    producer.close()
    corrupt_batch(broker, "orders", 0, poison_at, "flip")
    return poison_at


def test_the_speed_client_stops_at_an_unconfirmed_batch_without_reconnecting(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    from speed.kafka_clients import KafkaPythonClient

    poison_at = corrupt_last_batch(fresh_broker)

    client = KafkaPythonClient(settings_for(fresh_broker))
    try:
        client.start([("orders", 0)], {("orders", 0): 0})
        consumer = client.consumer
        offsets: list[int] = []
        deadline = time.monotonic() + 10
        while client.halted is None and time.monotonic() < deadline:
            for chunk in client.poll(0.2, 1000):
                offsets.extend(chunk.offsets)
        assert offsets == list(range(10))
        assert client.halted and f"orders/0 offset {poison_at}" in client.halted
        polls_started = time.monotonic()
        while time.monotonic() - polls_started < 3:  # backing off: nothing, no reconnect
            assert client.poll(0.1, 1000) == []
        assert client.consumer is consumer
        assert consumer.position(TopicPartition("orders", 0)) == poison_at
    finally:
        client.close()


def test_the_speed_status_says_why_polling_stopped(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    """A halted partition is visible to the operator in the worker's status file."""
    poison_at = corrupt_last_batch(fresh_broker)

    settings = settings_for(fresh_broker)
    with worker_thread(settings):
        deadline = time.monotonic() + 60
        status: dict = {}
        while not (status.get("halted") and covers(status, {"orders": {0: poison_at}})):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
            try:
                status = status_file(settings, (0, 1))
            except FileNotFoundError:  # not written yet
                continue
    assert f"orders/0 offset {poison_at}" in status["halted"]
    assert status["since_start"]["poisoned_batches"] == 0  # halted, not passed


def test_a_batch_larger_than_the_fetch_sizes_is_read_whole(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    """One 10 MiB record batch (the topic allows it): larger than the speed consumer's
    per-partition fetch size (8 MiB). The broker still returns it whole (KIP-74), and
    ingest and the speed layer read every event in it."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=fresh_broker.bootstrap)
    admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, "reviews", {"max.message.bytes": str(32 << 20)})]
    )
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=fresh_broker.bootstrap,
        batch_size=16 << 20,
        linger_ms=5_000,
        max_request_size=32 << 20,
    )
    text = "a long review " * 1_400  # ~20 KB, under the 20,000-character limit
    futures = [
        producer.send(
            "reviews",
            value=json.dumps({**review_event(i), "text": text[:19_900]}).encode(),
            partition=0,
        )
        for i in range(500)
    ]
    producer.flush()
    producer.close()
    offsets = [f.get(timeout=30).offset for f in futures]
    assert offsets == list(range(500))
    segment = _segment(fresh_broker, "reviews", 0).read_bytes()
    assert struct.unpack_from(">qi", segment)[1] > 8 << 20  # one batch, over 8 MiB

    reference, ends = reference_read(fresh_broker.bootstrap)
    settings = settings_for(fresh_broker)
    valid = event_ids(reference, settings.max_event_bytes)
    assert len(valid) == 500
    run_ingest(settings, until_end=True, stop=threading.Event())
    master, quarantined, _ = ingested(Lake(settings.lake_uri))
    assert master == valid and not quarantined
    held, _ = speed_held(settings, ends)
    assert held == valid
