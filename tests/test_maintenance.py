"""Maintenance: compaction, checkpoint and vacuum change no table's content or positions."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from batch.ingest import run_ingest
from batch.maintenance import compact
from lambdalake.contract.lake import QUARANTINE, RUNS, VIEW_DAILY_SALES, Lake
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord, ingest_positions
from lambdalake.ops.broker import EmbeddedBroker
from lambdalake.settings import TOPICS, Settings
from tests.ingest_stream import (
    assert_exactly_once,
    master_keys,
    produce_stream,
    quarantine_rows,
)


def lake_content(lake: Lake) -> dict[str, object]:
    """Every row (as a multiset) and every ingest position of the lake's tables."""
    out: dict[str, object] = {}
    for name in ("master/orders", "master/reviews", QUARANTINE, VIEW_DAILY_SALES, RUNS):
        rows = DeltaTable(lake.table(name)).to_pyarrow_table().to_pylist()
        out[name] = Counter(repr(sorted(r.items())) for r in rows)
    for topic in TOPICS:
        out[f"positions/{topic}"] = ingest_positions(lake.master(topic), topic)
        out[f"quarantine-positions/{topic}"] = ingest_positions(lake.table(QUARANTINE), topic)
    return out


def file_count(uri: str) -> int:
    return len(DeltaTable(uri).file_uris())


def write_small_commits(lake: Lake) -> None:
    """A views table and a runs table with many one-row commits, as batch runs leave them."""
    for day in range(1, 16):
        row = pa.table(
            {
                "date": pa.array([datetime(2025, 1, day, tzinfo=UTC).date()], pa.date32()),
                "sku": ["sku-1"],
                "units": pa.array([day], pa.int64()),
            }
        )
        write_deltalake(lake.table(VIEW_DAILY_SALES), row, mode="append")
        run = RunRecord(run_id=f"run-{day}", status="published", started_at=datetime.now(UTC))
        write_deltalake(
            lake.table(RUNS), pa.Table.from_pylist([run.to_row()], RUNS_SCHEMA), mode="append"
        )


def test_compact_keeps_content_and_positions_and_merges_small_files(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    stream = produce_stream(fresh_broker.bootstrap, 4_000, seed=31)
    # Tiny micro-batches: many commits, many small files.
    settings = settings_for(fresh_broker, ingest_batch_size=100, max_event_bytes=2048)
    run_ingest(settings, until_end=True, stop=threading.Event())
    lake = Lake(settings.lake_uri)
    write_small_commits(lake)
    before = lake_content(lake)
    files_before = {t: file_count(lake.table(t)) for t in ("master/orders", VIEW_DAILY_SALES)}
    versions_before = DeltaTable(lake.master("orders")).version()

    stats = compact(settings, retention_hours=168)

    assert lake_content(lake) == before
    assert set(stats) == {"master/orders", "master/reviews", QUARANTINE, VIEW_DAILY_SALES, RUNS}
    for table, n in files_before.items():
        assert stats[table]["files_before"] == n
        assert stats[table]["files_after"] == file_count(lake.table(table)) < n / 5
    orders = DeltaTable(lake.master("orders"))
    assert orders.version() == versions_before + 1  # one compaction commit
    log_dir = Path(lake.master("orders")) / "_delta_log"
    assert any(p.name.endswith(".checkpoint.parquet") for p in log_dir.iterdir())

    # Ingest resumes on the compacted, checkpointed tables: new messages once, old ones never.
    more = produce_stream(fresh_broker.bootstrap, 1_000, seed=32)
    again = run_ingest(settings, until_end=True, stop=threading.Event())
    assert sum(s["written"] for s in again.values()) == len(more.valid)
    stream.valid.update(more.valid)
    stream.invalid.update(more.invalid)
    assert_exactly_once(lake, stream)
    assert sum(len(master_keys(lake, t)) for t in TOPICS) == len(stream.valid)
    assert len(quarantine_rows(lake)) == len(stream.invalid)


def test_compact_command_prints_stats_and_refuses_unsafe_retention(tmp_path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    write_small_commits(lake)
    cmd = [sys.executable, "-m", "lambdalake.cli", "maintenance", "compact", "--lake", lake.root]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(stats) == {VIEW_DAILY_SALES, RUNS}  # only the tables that exist
    assert stats[VIEW_DAILY_SALES]["files_before"] == 15
    assert stats[VIEW_DAILY_SALES]["files_after"] == 1

    refused = subprocess.run(
        [*cmd, "--retention-hours", "1"], capture_output=True, text=True, check=False, timeout=120
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("lambdalake: error: ")
    assert "retention" in refused.stderr


@pytest.mark.parametrize("engine", ["spark", "delta-rs"])
def test_each_engine_compacts_and_vacuums_without_changing_content_or_positions(
    request, tmp_path, engine: str
) -> None:
    import os

    from batch.synthetic import SalesSpec, synthetic_orders, write_master

    lake = Lake(str(tmp_path / "lake"))
    spec = SalesSpec(days=6, skus=3, stores=2, seed=41)
    write_master(lake, "orders", synthetic_orders(spec), partitions=spec.partitions, commits=8)
    write_small_commits(lake)
    # A file a failed run left behind, unreferenced for longer than the retention.
    orphan = Path(lake.table(VIEW_DAILY_SALES)) / "failed-run" / "part-0.parquet"
    orphan.parent.mkdir()
    orphan.write_bytes(b"PAR1")
    old = datetime.now(UTC).timestamp() - 200 * 3600
    os.utime(orphan, (old, old))
    tables = ("master/orders", VIEW_DAILY_SALES, RUNS)
    before = {t: Counter(repr(sorted(r.items())) for r in DeltaTable(lake.table(t))
                         .to_pyarrow_table().to_pylist()) for t in tables}  # fmt: skip
    positions = ingest_positions(lake.master("orders"), "orders")
    files_before = {t: file_count(lake.table(t)) for t in tables}
    settings = Settings(_env_file=None, lake_uri=lake.root)  # type: ignore[call-arg]

    spark = request.getfixturevalue("spark") if engine == "spark" else None
    stats = compact(settings, retention_hours=168, engine=engine, spark=spark)

    assert set(stats) == set(tables)
    for t in tables:
        rows = DeltaTable(lake.table(t)).to_pyarrow_table().to_pylist()
        assert Counter(repr(sorted(r.items())) for r in rows) == before[t]
        assert stats[t]["files_before"] == files_before[t]
        assert stats[t]["files_after"] == file_count(lake.table(t)) < files_before[t]
        protocol = DeltaTable(lake.table(t)).protocol()
        assert not protocol.reader_features and not protocol.writer_features
    assert ingest_positions(lake.master("orders"), "orders") == positions
    assert not orphan.exists() and stats[VIEW_DAILY_SALES]["files_vacuumed"] >= 1
    log_dir = Path(lake.master("orders")) / "_delta_log"
    assert any(p.name.endswith(".checkpoint.parquet") for p in log_dir.iterdir())
    # delta-rs (ingest) appends on top of Spark's compaction and checkpoint.
    more = synthetic_orders(SalesSpec(days=2, skus=1, stores=1, seed=42))
    write_master(lake, "orders", more, partitions=spec.partitions)
    assert DeltaTable(lake.master("orders")).to_pyarrow_table().num_rows == (
        sum(before["master/orders"].values()) + more.num_rows
    )


def test_compact_command_refuses_an_unknown_engine(tmp_path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    write_small_commits(lake)
    cmd = [sys.executable, "-m", "lambdalake.cli", "maintenance", "compact", "--lake", lake.root]
    done = subprocess.run(
        [*cmd, "--engine", "duckdb"], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("lambdalake: error: --engine must be")
