"""Ingest: Kafka to the master Delta tables, exactly once, whatever crashes in between.

A stream of valid events, invalid ones (bad JSON, missing and mistyped fields,
out-of-range values, oversize messages, tombstones) and redeliveries (the same
event sent again) is produced to a broker of the module's own while
``lambdalake ingest`` runs as a subprocess and is killed with SIGKILL at
random moments; ``ingest --until-end`` then finishes the job. The lake must
hold exactly one master row per valid (topic, partition, offset), one
quarantine row per invalid one, nothing else, and positions equal to the true
end offsets.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest
from deltalake import DeltaTable
from kafka import KafkaProducer, TopicPartition

from batch.ingest import run_ingest
from batch.ingest_kafka import decode_batch_records
from lambdalake.broker import EmbeddedBroker, free_port
from lambdalake.kafka import end_offsets
from lambdalake.lake import QUARANTINE, Lake
from lambdalake.manifest import ingest_positions
from lambdalake.settings import TOPICS, Settings

ROOT = Path(__file__).resolve().parents[1]
MAX_EVENT_BYTES = 2048  # small, so oversize messages are cheap to produce

Key = tuple[str, int, int]  # topic, partition, offset


# --- the stream ---------------------------------------------------------------------------


def order_event(i: int) -> dict[str, object]:
    return {
        "event_id": f"o-{i}",
        "event_time": f"2025-01-{1 + i // 1000:02d}T{i % 24:02d}:{i % 60:02d}:00+00:00",
        "store_id": f"store-{i % 3}",
        "sku": f"sku-{i % 17}",
        "quantity": (i % 5) - 2 or 1,
        "unit_price": round(1 + (i % 100) / 7, 2),
        "currency": "USD",
    }


def review_event(i: int) -> dict[str, object]:
    event: dict[str, object] = {
        "review_id": f"r-{i}",
        "event_time": 1_735_689_600_000 + i * 61_000,  # epoch milliseconds
        "sku": f"sku-{i % 17}",
        "rating": 1 + i % 5,
        "text": f"review text number {i}",
    }
    # The optional fields, sometimes absent.
    if i % 3 == 0:
        event["title"] = f"title {i}"
    if i % 2:
        event["customer_id"] = f"c-{i % 11}"
    return event


INVALID_ORDERS: list[bytes | None] = [
    b"{not json",
    json.dumps({**order_event(0), "quantity": 0}).encode(),  # out of range
    json.dumps({k: v for k, v in order_event(0).items() if k != "sku"}).encode(),  # missing
    json.dumps({**order_event(0), "quantity": "three"}).encode(),  # wrong type
    b"[1, 2, 3]",  # not an object
    None,  # tombstone
    json.dumps({**order_event(0), "store_id": "x" * 3000}).encode(),  # oversize
]
INVALID_REVIEWS: list[bytes | None] = [
    b"\xff\xfe not utf-8",
    json.dumps({**review_event(0), "rating": 6}).encode(),
    json.dumps({k: v for k, v in review_event(0).items() if k != "text"}).encode(),
]


@dataclass
class Stream:
    """What was produced: every message's value by (topic, partition, offset)."""

    valid: dict[Key, bytes] = field(default_factory=dict)
    invalid: dict[Key, bytes | None] = field(default_factory=dict)
    redeliveries: int = 0


def produce_stream(
    bootstrap: str, n: int, *, seed: int, rate: float | None = None, stream: Stream | None = None
) -> Stream:
    """Produce ``n`` messages (about 85 % orders), 4 % invalid and 3 % redeliveries."""
    rng = random.Random(seed)
    stream = stream or Stream()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    pending = []
    sent_valid: list[tuple[str, bytes]] = []
    started = time.monotonic()
    for i in range(n):
        topic = "orders" if rng.random() < 0.85 else "reviews"
        roll = rng.random()
        if roll < 0.04:
            value = rng.choice(INVALID_ORDERS if topic == "orders" else INVALID_REVIEWS)
            valid = False
        elif roll < 0.07 and sent_valid:
            topic, value = rng.choice(sent_valid)  # a redelivery: same bytes, same id
            valid = True
            stream.redeliveries += 1
        else:
            event = order_event(i) if topic == "orders" else review_event(i)
            value = json.dumps(event).encode()
            valid = True
            sent_valid.append((topic, value))
        key = f"k-{rng.randrange(64)}".encode()
        pending.append((topic, value, valid, producer.send(topic, key=key, value=value)))
        if rate and i % 200 == 199:
            producer.flush()
            ahead = (i + 1) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush()
    producer.close()
    for topic, value, valid, future in pending:
        meta = future.get(timeout=30)
        target = stream.valid if valid else stream.invalid
        target[(topic, meta.partition, meta.offset)] = value
    return stream


# --- running ingest -----------------------------------------------------------------------


def ingest_cmd(bootstrap: str, lake: str, *extra: str) -> list[str]:
    cli = [sys.executable, "-m", "lambdalake.cli", "ingest"]
    return [*cli, "--bootstrap", bootstrap, "--lake", lake, *extra]


def ingest_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "LAMBDALAKE_LOG_LEVEL": "INFO",
        "LAMBDALAKE_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.update(extra)
    return env


def run_until_end(bootstrap: str, lake: str, log: Path) -> dict[str, dict[str, int]]:
    with open(log, "ab") as err:
        done = subprocess.run(
            [*ingest_cmd(bootstrap, lake), "--until-end"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=ingest_env(),
            timeout=180,
            check=False,
        )
    assert done.returncode == 0, log.read_text()[-3000:]
    last = done.stdout.decode().strip().splitlines()[-1]
    return json.loads(last)


def true_ends(bootstrap: str) -> dict[str, dict[int, int]]:
    tps = [TopicPartition(t, p) for t in TOPICS for p in range(4)]
    ends = end_offsets(bootstrap, tps)
    return {t: {p: ends[TopicPartition(t, p)] for p in range(4)} for t in TOPICS}


def master_keys(lake: Lake, topic: str) -> list[tuple[Key, str]]:
    rows = DeltaTable(lake.master(topic)).to_pyarrow_table().to_pylist()
    id_field = "event_id" if topic == "orders" else "review_id"
    return [((r["_topic"], r["_partition"], r["_offset"]), r[id_field]) for r in rows]


def quarantine_rows(lake: Lake) -> list[dict[str, object]]:
    return DeltaTable(lake.table(QUARANTINE)).to_pyarrow_table().to_pylist()


def table_versions(lake: Lake) -> dict[str, int]:
    uris = [lake.master(t) for t in TOPICS] + [lake.table(QUARANTINE)]
    return {u: DeltaTable(u).version() for u in uris}


def assert_exactly_once(lake: Lake, stream: Stream) -> None:
    """Master holds each valid message once, quarantine each invalid one once."""
    for topic in TOPICS:
        rows = master_keys(lake, topic)
        keys = [k for k, _ in rows]
        duplicated = [k for k, n in Counter(keys).items() if n > 1]
        assert not duplicated, f"{topic}: rows written twice: {duplicated[:5]}"
        expected = {k for k in stream.valid if k[0] == topic}
        assert set(keys) == expected, (
            f"{topic}: missing {sorted(expected - set(keys))[:5]}, "
            f"unexpected {sorted(set(keys) - expected)[:5]}"
        )
        id_field = "event_id" if topic == "orders" else "review_id"
        for key, event_id in rows:
            assert json.loads(stream.valid[key])[id_field] == event_id
    q = quarantine_rows(lake)
    q_keys = [(r["_topic"], r["_partition"], r["_offset"]) for r in q]
    assert len(q_keys) == len(set(q_keys)), "quarantine rows written twice"
    assert set(q_keys) == set(stream.invalid)
    for r in q:
        key = (r["_topic"], r["_partition"], r["_offset"])
        assert r["raw"] == stream.invalid[key]
        assert r["reason"]


# --- the lake after crashes (shared by the tests that read it) -------------------------------


@dataclass
class CrashedLake:
    broker: EmbeddedBroker
    lake: Lake
    stream: Stream
    final_summary: dict[str, dict[str, int]]
    kills: int
    kills_after_commit: int
    logs: Path


def _wait_for_line(path: Path, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def crashed_lake(tmp_path_factory: pytest.TempPathFactory):
    """Ingest a ~24k-message stream while killing ingest with SIGKILL 12 times."""
    tmp = tmp_path_factory.mktemp("crash")
    broker = EmbeddedBroker.start(port=0, partitions=4, log_dir=tmp / "broker")
    lake = Lake(str(tmp / "lake"))
    rng = random.Random(7)
    stream = Stream()
    producer = threading.Thread(
        target=produce_stream,
        args=(broker.bootstrap, 24_000),
        kwargs={"seed": 3, "rate": 1_000.0, "stream": stream},
    )
    producer.start()
    env = ingest_env(LAMBDALAKE_INGEST_BATCH_SIZE="400", LAMBDALAKE_INGEST_BATCH_SECONDS="0.2")
    kills = kills_after_commit = 0
    try:
        for attempt in range(12):
            log = tmp / f"ingest-{attempt}.log"
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    ingest_cmd(broker.bootstrap, lake.root),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                )
            # Most kills land between and inside commits; a few during start-up.
            if attempt % 4 == 3:
                time.sleep(rng.uniform(0.2, 1.5))
            elif _wait_for_line(log, "ingest.batch", timeout=20):
                time.sleep(rng.uniform(0.0, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            kills_after_commit += "ingest.batch" in log.read_text(errors="replace")
        producer.join(timeout=120)
        assert not producer.is_alive()
        summary = run_until_end(broker.bootstrap, lake.root, tmp / "final.log")
        yield CrashedLake(broker, lake, stream, summary, kills, kills_after_commit, tmp)
    finally:
        broker.stop()


def test_exactly_once_under_repeated_sigkill(crashed_lake: CrashedLake) -> None:
    c = crashed_lake
    assert c.kills >= 10
    assert c.kills_after_commit >= 6, "the kills should interrupt ingest mid-stream"
    assert len(c.stream.valid) + len(c.stream.invalid) == 24_000
    assert c.stream.redeliveries > 100 and len(c.stream.invalid) > 300
    assert_exactly_once(c.lake, c.stream)
    ends = true_ends(c.broker.bootstrap)
    for topic in TOPICS:
        assert ingest_positions(c.lake.master(topic), topic) == ends[topic]
        assert sum(ends[topic].values()) == sum(
            k[0] == topic for k in [*c.stream.valid, *c.stream.invalid]
        )


def test_second_until_end_writes_nothing(crashed_lake: CrashedLake) -> None:
    c = crashed_lake
    before = table_versions(c.lake)
    summary = run_until_end(c.broker.bootstrap, c.lake.root, c.logs / "again.log")
    assert summary == {t: {"written": 0, "quarantined": 0} for t in TOPICS}
    assert table_versions(c.lake) == before


def test_master_reads_the_same_in_duckdb_and_spark(
    fresh_broker: EmbeddedBroker, settings_for, spark
) -> None:
    stream = produce_stream(fresh_broker.bootstrap, 3_000, seed=9)
    settings = settings_for(fresh_broker, ingest_batch_size=1_000)
    run_ingest(settings, until_end=True, stop=threading.Event())
    lake = Lake(settings.lake_uri)
    for topic in TOPICS:
        root = lake.master(topic)
        dt = DeltaTable(root)
        columns = [f.name for f in dt.schema().to_arrow()]
        # Times as epoch microseconds and dates as text: the same in both engines.
        as_us = {"event_time", "_ingested_at"}

        con = duckdb.connect()
        con.execute("SET TimeZone='UTC'")
        con.register("master", dt.to_pyarrow_dataset())
        duck_exprs = [
            f"epoch_us({n}) AS {n}"
            if n in as_us
            else f"CAST({n} AS VARCHAR) AS {n}"
            if n == "event_date"
            else n
            for n in columns
        ]
        duck = con.execute(
            f"SELECT {', '.join(duck_exprs)} FROM master ORDER BY _partition, _offset"
        ).to_arrow_table()
        con.close()

        # Spark reads the files delta-rs lists for the pinned version; event_date
        # comes from the partition directories.
        files = DeltaTable(root, version=dt.version()).file_uris()
        df = spark.read.option("basePath", root).parquet(*files)
        assert dict(df.dtypes)["event_date"] == "date"
        spark_exprs = [
            f"unix_micros({n}) AS {n}"
            if n in as_us
            else f"CAST({n} AS STRING) AS {n}"
            if n == "event_date"
            else n
            for n in columns
        ]
        rows = df.selectExpr(*spark_exprs).orderBy("_partition", "_offset").toArrow()

        expected = sum(k[0] == topic for k in stream.valid)
        assert duck.num_rows == rows.num_rows == expected > 0
        for name in columns:
            assert duck.column(name).to_pylist() == rows.column(name).to_pylist(), name


def test_maintenance_compacts_without_changing_content(crashed_lake: CrashedLake) -> None:
    from batch.maintenance import compact

    c = crashed_lake
    settings = Settings(_env_file=None, lake_uri=c.lake.root)  # type: ignore[call-arg]

    def snapshot() -> dict[str, object]:
        out: dict[str, object] = {}
        for topic in TOPICS:
            dt = DeltaTable(c.lake.master(topic))
            out[topic] = Counter(map(repr, dt.to_pyarrow_table().to_pylist()))
            out[f"{topic}-positions"] = ingest_positions(c.lake.master(topic), topic)
            out[f"{topic}-quarantine-positions"] = ingest_positions(c.lake.table(QUARANTINE), topic)
        out["quarantine"] = Counter(map(repr, quarantine_rows(c.lake)))
        return out

    before = snapshot()
    files_before = len(DeltaTable(c.lake.master("orders")).file_uris())
    stats = compact(settings, retention_hours=168)
    assert snapshot() == before
    assert set(stats) >= {"master/orders", "master/reviews", "quarantine"}
    files_after = len(DeltaTable(c.lake.master("orders")).file_uris())
    assert stats["master/orders"]["files_before"] == files_before
    assert stats["master/orders"]["files_after"] == files_after
    assert files_after < files_before / 5, (files_before, files_after)
    # Ingest resumes on a compacted, checkpointed table as before.
    summary = run_until_end(c.broker.bootstrap, c.lake.root, c.logs / "after-compact.log")
    assert summary == {t: {"written": 0, "quarantined": 0} for t in TOPICS}
    with pytest.raises(ValueError, match="retention"):
        compact(settings, retention_hours=1)


def test_replay_after_a_crash_between_quarantine_and_master_commits(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    """The crash window the kills only hit by chance: quarantine committed, master not."""
    stream = produce_stream(fresh_broker.bootstrap, 3_000, seed=21)
    settings = settings_for(fresh_broker, ingest_batch_size=300, max_event_bytes=MAX_EVENT_BYTES)
    first = run_ingest(settings, until_end=True, stop=threading.Event())
    lake = Lake(settings.lake_uri)
    assert_exactly_once(lake, stream)
    # Undo master/orders' last three commits as a crash before them would have:
    # the commit files never appeared (their data files stay behind as orphans).
    log_dir = Path(lake.master("orders")) / "_delta_log"
    commits = sorted(log_dir.glob("*.json"))
    assert len(commits) > 4 and not list(log_dir.glob("*.checkpoint.parquet"))
    for path in commits[-3:]:
        path.unlink()
    lost = {k for k in stream.valid if k[0] == "orders"} - {
        k for k, _ in master_keys(lake, "orders")
    }
    q_orders = ingest_positions(lake.table(QUARANTINE), "orders")
    m_orders = ingest_positions(lake.master("orders"), "orders")
    assert lost and any(q_orders[p] > m_orders[p] for p in m_orders)

    again = run_ingest(settings, until_end=True, stop=threading.Event())
    assert again["orders"] == {"written": len(lost), "quarantined": 0}
    assert again["reviews"] == {"written": 0, "quarantined": 0}
    assert first["orders"]["quarantined"] == sum(k[0] == "orders" for k in stream.invalid)
    assert_exactly_once(lake, stream)


def test_two_ingests_at_once_never_duplicate(fresh_broker: EmbeddedBroker, tmp_path) -> None:
    stream = produce_stream(fresh_broker.bootstrap, 4_000, seed=17)
    lake = Lake(str(tmp_path / "lake"))
    env = ingest_env(LAMBDALAKE_INGEST_BATCH_SIZE="300")
    procs = []
    for i in range(2):
        with open(tmp_path / f"ingest-{i}.log", "wb") as err:
            procs.append(
                subprocess.Popen(
                    [*ingest_cmd(fresh_broker.bootstrap, lake.root), "--until-end"],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                )
            )
    codes = [p.wait(timeout=120) for p in procs]
    logs = [(tmp_path / f"ingest-{i}.log").read_text() for i in range(2)]
    assert 0 in codes, logs
    for code, text in zip(codes, logs, strict=True):
        # A loser stops with the reason; it never writes a row twice.
        assert code == 0 or "another ingest committed" in text, text[-2000:]
    summary = run_until_end(fresh_broker.bootstrap, lake.root, tmp_path / "final.log")
    assert_exactly_once(lake, stream)
    assert sum(s["written"] for s in summary.values()) <= len(stream.valid)


# --- shutdown and an absent broker -----------------------------------------------------------


def test_sigterm_in_continuous_mode_exits_cleanly(fresh_broker: EmbeddedBroker, tmp_path) -> None:
    stream = Stream()
    total = 8_000
    producer = threading.Thread(
        target=produce_stream,
        args=(fresh_broker.bootstrap, total),
        kwargs={"seed": 11, "rate": 800.0, "stream": stream},
    )
    producer.start()
    lake = Lake(str(tmp_path / "lake"))
    log = tmp_path / "ingest.log"
    env = ingest_env(LAMBDALAKE_INGEST_BATCH_SIZE="200", LAMBDALAKE_INGEST_BATCH_SECONDS="0.1")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ingest_cmd(fresh_broker.bootstrap, lake.root),
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    try:
        assert _wait_for_line(log, "ingest.batch", timeout=30), log.read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        producer.join(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert "stopped=True" in log.read_text()
    # Stopped mid-stream, and what was committed is a whole prefix of each partition
    # (every valid message below the committed position, nothing else), as summarised.
    positions = {t: ingest_positions(lake.master(t), t) for t in TOPICS}
    assert 0 < sum(sum(ps.values()) for ps in positions.values()) < total
    for topic in TOPICS:
        keys = sorted(k for k, _ in master_keys(lake, topic))
        expected = sorted(
            k for k in stream.valid if k[0] == topic and k[2] < positions[topic].get(k[1], 0)
        )
        assert keys == expected
        assert summary[topic]["written"] == len(keys)
    q = {(r["_topic"], r["_partition"], r["_offset"]) for r in quarantine_rows(lake)}
    assert q == {k for k in stream.invalid if k[2] < positions[k[0]].get(k[1], 0)}
    assert sum(s["quarantined"] for s in summary.values()) == len(q)


def test_until_end_gives_up_on_an_absent_broker_with_a_clear_error(tmp_path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, kafka_bootstrap=f"127.0.0.1:{free_port()}", lake_uri=str(tmp_path / "lake")
    )
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="unreachable"):
        run_ingest(settings, until_end=True, stop=threading.Event(), broker_timeout_s=3)
    assert time.monotonic() - started < 20
    assert not (tmp_path / "lake").exists(), "nothing may be written without a broker"


def test_continuous_ingest_waits_for_a_late_broker(tmp_path) -> None:
    port = free_port()
    lake = Lake(str(tmp_path / "lake"))
    log = tmp_path / "ingest.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ingest_cmd(f"127.0.0.1:{port}", lake.root),
            stdout=subprocess.PIPE,
            stderr=err,
            env=ingest_env(LAMBDALAKE_INGEST_BATCH_SECONDS="0.2"),
        )
    broker = None
    try:
        assert _wait_for_line(log, "attempt=2", timeout=40), log.read_text()
        text = log.read_text()
        assert "ingest.broker_unreachable" in text and "delay_s=" in text
        broker = EmbeddedBroker.start(port=port, partitions=4, log_dir=tmp_path / "broker")
        stream = produce_stream(broker.bootstrap, 500, seed=5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            positions = {t: ingest_positions(lake.master(t), t) for t in TOPICS}
            if all(
                sum(positions[t].values())
                == sum(k[0] == t for k in [*stream.valid, *stream.invalid])
                for t in TOPICS
            ):
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, log.read_text()[-3000:]
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert sum(s["written"] for s in summary.values()) == len(stream.valid)
        assert_exactly_once(lake, stream)
    finally:
        if proc.poll() is None:
            proc.kill()
        if broker is not None:
            broker.stop()


# --- the columnar record decoder --------------------------------------------------------------


@pytest.mark.parametrize("compression", [0, 1])  # none, gzip
def test_columnar_decoder_matches_kafka_python(compression: int) -> None:
    from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

    rng = random.Random(compression)
    builder = MemoryRecordsBuilder(
        magic=2, compression_type=compression, batch_size=1 << 24, offset=1000
    )
    for i in range(700):
        key = None if i % 5 == 0 else f"key-{i}".encode()
        value = None if i % 97 == 0 else rng.randbytes(rng.choice([0, 3, 100, 200, 5000]))
        headers = [("h", b"v" * (i % 4))] if i % 3 == 0 else []
        builder.append(
            timestamp=1_700_000_000_000 + i * 1000, key=key, value=value, headers=headers
        )
    builder.close()
    data = bytes(builder.buffer())
    expected = [
        (r.offset, r.value) for batch in iter(MemoryRecords(data).next_batch, None) for r in batch
    ]
    batch = MemoryRecords(data).next_batch()
    batch._maybe_uncompress()
    got = decode_batch_records(batch._buffer, batch._pos, batch.records_count, batch.base_offset)
    assert got == expected


def test_committer_never_commits_past_a_failed_batch() -> None:
    from batch.ingest import Committer, MicroBatch

    committed: list[int] = []

    def commit(batch: MicroBatch) -> int:
        n = batch.end["orders"][0]
        if n == 2:
            raise OSError("disk full")
        committed.append(n)
        return 1

    committer = Committer(commit)
    for n in range(1, 5):
        try:
            committer.submit(MicroBatch(start={"orders": {0: n - 1}}, end={"orders": {0: n}}))
        except OSError:
            break
    with pytest.raises(OSError, match="disk full"):
        committer.close()
    assert committed == [1]
