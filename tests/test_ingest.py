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
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
from deltalake import DeltaTable
from kafka import KafkaProducer, TopicPartition

from batch.ingest import run_ingest
from lambdalake.contract.lake import QUARANTINE, Lake
from lambdalake.contract.manifest import ingest_positions
from lambdalake.kafka.columnar import decode_batch_records
from lambdalake.ops.broker import EmbeddedBroker, free_port
from lambdalake.settings import TOPICS, Settings
from tests.ingest_stream import (
    MAX_EVENT_BYTES,
    Stream,
    assert_exactly_once,
    ingest_cmd,
    ingest_env,
    master_keys,
    order_event,
    produce_stream,
    quarantine_rows,
    run_until_end,
    table_versions,
    true_ends,
    wait_for_line,
)

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


@pytest.fixture(scope="module")
def crashed_lake(tmp_path_factory: pytest.TempPathFactory):
    """Ingest a 24k-message stream while killing ingest with SIGKILL 10 times."""
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
        for attempt in range(10):
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
            elif wait_for_line(log, "ingest.batch", timeout=20):
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
        duck = con.sql(
            f"SELECT {', '.join(duck_exprs)} FROM master ORDER BY _partition, _offset"
        ).to_arrow_table()
        con.close()

        # Spark reads the files delta-rs lists for the pinned version; event_date
        # comes from the partition directories.
        files = DeltaTable(root, version=dt.version()).file_uris()
        df = spark.read.option("basePath", root).parquet(*files)
        if "event_date" in columns:  # reference data has no time (nor partitions)
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


def test_two_ingests_at_once_never_duplicate(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path
) -> None:
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
    # Whoever loses a commit reads the tables again and goes on: both finish.
    assert codes == [0, 0], [text[-2000:] for text in logs]
    assert_exactly_once(lake, stream)


def test_a_rival_commit_mid_run_is_survived_exactly_once(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path
) -> None:
    """Deterministic form of the race above: a second ingest drains the topics between
    the first one's open and its first commit. The first loses that commit, reads the
    tables again (now at the end) and stops there, having written nothing twice."""
    from batch.ingest import Ingest

    stream = produce_stream(fresh_broker.bootstrap, 2_000, seed=23)
    lake = Lake(str(tmp_path / "lake"))
    settings = settings_for(
        fresh_broker, lake_uri=lake.root, max_event_bytes=MAX_EVENT_BYTES, ingest_batch_size=500
    )

    class Rivalled(Ingest):
        rival_ran = False

        def commit(self, batch):  # type: ignore[no-untyped-def]
            if not self.rival_ran:
                self.rival_ran = True
                run_ingest(settings, until_end=True, stop=threading.Event())
            return super().commit(batch)

    ingest = Rivalled(settings, stop=threading.Event(), broker_timeout_s=30.0)
    try:
        assert ingest.connect(until_end=True)
        ingest.run(until_end=True)
    finally:
        ingest.close()
    assert ingest.resyncs == 1
    assert ingest.result() == {t: {"written": 0, "quarantined": 0} for t in TOPICS}
    assert_exactly_once(lake, stream)


def test_transaction_markers_count_as_consumed(fresh_broker: EmbeddedBroker, settings_for) -> None:
    """Transactional producers leave commit markers in the log: no rows, but offsets.

    (Aborted transactions are not checked here: Tansu does not filter them for
    read_committed consumers, kafka-python's own consumer included.)
    """
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, transactional_id="t-1")
    producer.init_transactions()
    for txn in range(3):
        producer.begin_transaction()
        for i in range(50):
            event = {**order_event(i), "event_id": f"txn-{txn}-{i}"}
            producer.send("orders", value=json.dumps(event).encode(), partition=0)
        producer.commit_transaction()
    producer.close()
    end = true_ends(fresh_broker.bootstrap)["orders"][0]
    assert end > 150  # the records and a marker per transaction

    settings = settings_for(fresh_broker)
    summary = run_ingest(settings, until_end=True, stop=threading.Event())
    lake = Lake(settings.lake_uri)
    ids = {event_id for _, event_id in master_keys(lake, "orders")}
    assert ids == {f"txn-{t}-{i}" for t in range(3) for i in range(50)}
    assert summary["orders"] == {"written": 150, "quarantined": 0}
    assert ingest_positions(lake.master("orders"), "orders")[0] == end


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
        assert wait_for_line(log, "ingest.batch", timeout=30), log.read_text()
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


def test_continuous_ingest_outlives_quiet_topics(fresh_broker: EmbeddedBroker, tmp_path) -> None:
    """Quiet topics (a live generator at a real shop's rate sends an event every few seconds)
    are not an end: after the idle probe finds the broker, ingest goes on consuming."""
    from batch.ingest import IDLE_PROBE_S

    lake = Lake(str(tmp_path / "lake"))
    log = tmp_path / "ingest.log"

    def written() -> int:
        return sum(sum(ingest_positions(lake.master(t), t).values()) for t in TOPICS)

    def wait_written(n: int) -> None:
        deadline = time.monotonic() + 60
        while written() < n:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)

    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ingest_cmd(fresh_broker.bootstrap, lake.root),
            stdout=subprocess.PIPE,
            stderr=err,
            env=ingest_env(LAMBDALAKE_INGEST_BATCH_SECONDS="0.2"),
        )
    try:
        first = produce_stream(fresh_broker.bootstrap, 50, seed=21)
        wait_written(50)
        time.sleep(2 * IDLE_PROBE_S + 2)  # quiet for longer than the idle probe, twice
        assert proc.poll() is None, "ingest ended on quiet topics:\n" + log.read_text()[-3000:]
        second = produce_stream(fresh_broker.bootstrap, 50, seed=22)
        wait_written(100)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, log.read_text()[-3000:]
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert sum(s["written"] for s in summary.values()) == len(first.valid) + len(second.valid)
    finally:
        if proc.poll() is None:
            proc.kill()


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
        assert wait_for_line(log, "attempt=2", timeout=40), log.read_text()
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


@pytest.mark.parametrize("compression", [0, 1, 2, 3, 4])  # none, gzip, snappy, lz4, zstd
def test_columnar_decoder_matches_kafka_python(compression: int) -> None:
    from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

    rng = random.Random(compression)
    builder = MemoryRecordsBuilder(
        magic=2, compression_type=compression, batch_size=1 << 24, offset=1000
    )
    # Enough records for three-byte offset deltas; keys, values and headers of every
    # size class (absent, empty, one-, two- and three-byte varint lengths).
    for i in range(9_000):
        key = None if i % 5 == 0 else f"key-{i}".encode() * (1 + (i % 40 == 1) * 20)
        size = rng.choice([0, 3, 100, 200, 5000]) if i % 500 else 20_000
        value = None if i % 97 == 0 else rng.randbytes(size)
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
    got = decode_batch_records(
        bytes(batch._buffer), batch._pos, batch.records_count, batch.base_offset
    )
    assert got == expected


@pytest.mark.parametrize("magic", [1, 2])  # legacy message sets, record batches
def test_columnar_partition_records_take_like_kafka_python(magic: int) -> None:
    """Same records, same positions as kafka-python's PartitionRecords, whatever the take sizes."""
    from kafka.consumer.fetcher import Fetcher
    from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

    from lambdalake.kafka.columnar import ColumnarPartitionRecords

    data = b""
    for base in range(0, 600, 100):  # six batches of 100 records
        builder = MemoryRecordsBuilder(
            magic=magic, compression_type=0, batch_size=1 << 24, offset=base
        )
        for i in range(base, base + 100):
            builder.append(timestamp=1_700_000_000_000 + i, key=None, value=f"v{i}".encode())
        builder.close()
        data += bytes(builder.buffer())
    tp = TopicPartition("orders", 0)
    for fetch_offset in (0, 150):  # a fetch may start inside a batch
        for sizes in ([1, 7, 100, 1000], [600], [99, 1, 250]):
            ours = ColumnarPartitionRecords(fetch_offset, tp, MemoryRecords(data))
            theirs = Fetcher.PartitionRecords(fetch_offset, tp, MemoryRecords(data))
            for n in [*sizes, 5, 1000, 1000]:
                if not theirs:  # kafka-python's fetcher takes only from undrained records
                    break
                got = ours.take(n)
                expected = [(r.offset, r.value) for r in theirs.take(n)]
                assert got == expected
                assert ours.next_fetch_offset == theirs.next_fetch_offset
            assert not ours and not theirs  # both drained


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


@pytest.mark.parametrize("rival", ["append", "create"])
def test_a_rival_commit_fails_ours_with_the_reason(tmp_path, rival: str) -> None:
    """Whatever the conflict delta-rs reports (a rival's positions transaction, or a
    rival creating the same empty table at the same moment, which reads as "Metadata
    changed"), our commit fails with the reason and writes nothing."""
    import pyarrow as pa

    from batch.ingest_lake import ConcurrentIngestError, PositionedTable
    from lambdalake.contract.lake import QUARANTINE_SCHEMA

    uri = str(tmp_path / "quarantine")
    ours = PositionedTable.open(
        uri, QUARANTINE_SCHEMA, ["orders"], partition_by=None, storage_options=None
    )
    empty = pa.Table.from_batches([], schema=QUARANTINE_SCHEMA)
    if rival == "append":
        theirs = PositionedTable.open(
            uri, QUARANTINE_SCHEMA, ["orders"], partition_by=None, storage_options=None
        )
        theirs.append(empty, {"orders": {0: 5}})
    else:  # a metadata commit, as a rival creating the table just after ours makes
        DeltaTable(uri).alter.set_table_properties({"delta.appendOnly": "false"})
    with pytest.raises(ConcurrentIngestError, match="another ingest committed"):
        ours.append(empty, {"orders": {0: 3}})
    assert ingest_positions(uri, "orders") == ({0: 5} if rival == "append" else {})


def test_the_reloaded_table_still_sees_a_rival_commit(tmp_path) -> None:
    """Ingest reloads its table object every few commits (to bound its memory), pinned at
    its own last version: a rival's commit after that still stops it."""
    import pyarrow as pa

    from batch.ingest_lake import ConcurrentIngestError, PositionedTable
    from lambdalake.contract.lake import QUARANTINE_SCHEMA

    uri = str(tmp_path / "quarantine")
    empty = pa.Table.from_batches([], schema=QUARANTINE_SCHEMA)
    ours = PositionedTable.open(
        uri, QUARANTINE_SCHEMA, ["orders"], partition_by=None, storage_options=None
    )
    ours.reload_every = 1
    before = ours.table
    ours.append(empty, {"orders": {0: 1}})
    assert ours.table is not before and ours.version() == 1  # reloaded, at its own version
    theirs = PositionedTable.open(
        uri, QUARANTINE_SCHEMA, ["orders"], partition_by=None, storage_options=None
    )
    theirs.append(empty, {"orders": {0: 5}})
    with pytest.raises(ConcurrentIngestError):
        ours.append(empty, {"orders": {0: 3}})
    assert ingest_positions(uri, "orders") == {0: 5}
