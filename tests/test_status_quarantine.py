"""Quarantine counts and the served run over a long uptime: each status read costs the
commits and files added since the last one, not every file the quarantine table ever got
nor every commit since its last checkpoint (real Delta tables, delta-rs)."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import deltalake
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from lambdalake.contract.lake import QUARANTINE, QUARANTINE_SCHEMA, RUNS, Lake
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord, latest_published_run
from lambdalake.ops.status import LatestRunReader, QuarantineCounter, quarantine_counts

REASONS = ("bad_json", "missing_field", "out_of_range")


def append_quarantined(
    lake: Lake, commit: int, n: int, mode: Literal["append", "overwrite"] = "append"
) -> list[tuple[str, str]]:
    """One ingest-like commit of ``n`` rejected events; returns their (topic, reason)."""
    rows = [("orders" if i % 3 else "reviews", REASONS[(commit + i) % 3]) for i in range(n)]
    cols: dict[str, pa.Array] = {}
    for f in QUARANTINE_SCHEMA:
        if f.name == "_topic":
            cols[f.name] = pa.array([t for t, _ in rows], f.type)
        elif f.name == "reason":
            cols[f.name] = pa.array([r for _, r in rows], f.type)
        elif f.name == "_partition":
            cols[f.name] = pa.array([0] * n, f.type)
        elif f.name == "_offset":
            cols[f.name] = pa.array(range(commit * 100, commit * 100 + n), f.type)
        elif f.name == "_ingested_at":
            cols[f.name] = pa.array([datetime.now(UTC)] * n, f.type)
        elif f.name == "raw":
            cols[f.name] = pa.array([b"{"] * n, f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    table = pa.table(cols, schema=QUARANTINE_SCHEMA)
    write_deltalake(lake.table(QUARANTINE), table, mode=mode)
    return rows


def expected(rows: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, reason), n in sorted(Counter(rows).items()):
        out.setdefault(topic, {})[reason] = n
    return out


def counted(
    tmp_path: Path, commits: int, per_commit: int = 3
) -> tuple[Lake, QuarantineCounter, list[tuple[str, str]]]:
    """A lake whose quarantine table has ``commits`` commits, and a counter that counted them."""
    lake = Lake(str(tmp_path / "lake"))
    counter = QuarantineCounter(lake)
    rows: list[tuple[str, str]] = []
    for commit in range(commits):
        rows += append_quarantined(lake, commit, per_commit)
    assert counter.counts() == expected(rows)
    return lake, counter, rows


def test_each_read_costs_only_the_files_added_since_the_last(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    counter = QuarantineCounter(lake)
    assert counter.counts() == {}
    rows: list[tuple[str, str]] = []
    for commit in range(60):
        rows += append_quarantined(lake, commit, 1 + commit % 4)
        assert counter.counts() == expected(rows)
        # One commit added one file: that file is all this read touched, however many
        # files the table holds by now (60 at the end).
        assert counter.files_read == 1, f"commit {commit}: read {counter.files_read} files"
    assert counter.counts() == expected(rows)
    assert counter.files_read == 0  # nothing new: no data file read
    # Five commits between two reads: five files.
    for commit in range(60, 65):
        rows += append_quarantined(lake, commit, 2)
    assert counter.counts() == expected(rows)
    assert counter.files_read == 5


def test_a_rewritten_table_is_counted_again_from_its_files(tmp_path: Path) -> None:
    lake, counter, rows = counted(tmp_path, 12)
    DeltaTable(lake.table(QUARANTINE)).optimize.compact()  # maintenance rewrites the files
    assert counter.counts() == expected(rows)  # not double-counted, nothing lost
    files = len(DeltaTable(lake.table(QUARANTINE)).file_uris())
    assert counter.files_read == files < 12
    rows += append_quarantined(lake, 12, 3)
    assert counter.counts() == expected(rows)
    assert counter.files_read == 1


def test_the_process_keeps_one_counter_per_lake_and_a_bounded_number(tmp_path: Path) -> None:
    lakes = [Lake(str(tmp_path / f"lake{i}")) for i in range(20)]
    for i, lake in enumerate(lakes):
        rows = append_quarantined(lake, i, 2 + i % 3)
        assert quarantine_counts(lake) == expected(rows)
    from lambdalake.ops import status

    assert len(status._COUNTERS) <= status._COUNTERS.most


class CountingOpens(DeltaTable):
    """``DeltaTable``, counting the times a table is opened afresh."""

    opened: ClassVar[list[str]] = []

    def __init__(self, table_uri: Any, *args: Any, **kwargs: Any) -> None:
        CountingOpens.opened.append(str(table_uri))
        super().__init__(table_uri, *args, **kwargs)


def test_a_counter_kept_up_to_date_reads_only_the_new_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening the table afresh reads every commit since its last checkpoint (up to 99),
    # each on a thread of delta-rs' pool; the counter opens it once and then reads each
    # new commit alone (update_incremental).
    monkeypatch.setattr(deltalake, "DeltaTable", CountingOpens)
    monkeypatch.setattr(CountingOpens, "opened", [])
    lake = Lake(str(tmp_path / "lake"))
    counter = QuarantineCounter(lake)
    rows = append_quarantined(lake, 0, 2)
    assert counter.counts() == expected(rows)
    table = counter._kept.table
    for commit in range(1, 61):
        rows += append_quarantined(lake, commit, 1 + commit % 4)
        assert counter.counts() == expected(rows)
        assert counter.files_read == 1
    assert counter._kept.table is table  # the same DeltaTable, brought up to date
    assert counter.opens == 1
    assert [u for u in CountingOpens.opened if u.endswith(QUARANTINE)] == [lake.table(QUARANTINE)]


def test_counts_follow_an_overwrite(tmp_path: Path) -> None:
    lake, counter, rows = counted(tmp_path, 5)
    rows = append_quarantined(lake, 5, 4, mode="overwrite")  # the old rows are gone
    assert counter.counts() == expected(rows)
    assert counter.files_read == 1
    rows += append_quarantined(lake, 6, 2)
    assert counter.counts() == expected(rows)
    assert counter.opens == 1


@pytest.mark.parametrize("commits_after", [0, 2, 8])
def test_counts_follow_a_table_deleted_and_created_again(
    tmp_path: Path, commits_after: int
) -> None:
    # Re-created with fewer commits than before (its log went backwards), or with more
    # (the kept table would take them for appends to the old one).
    lake, counter, rows = counted(tmp_path, 5)
    shutil.rmtree(lake.table(QUARANTINE))
    if not commits_after:
        assert counter.counts() == {}
    rows = []
    for commit in range(10, 10 + max(commits_after, 1)):
        rows += append_quarantined(lake, commit, 2)
    assert counter.counts() == expected(rows)
    rows += append_quarantined(lake, 30, 1)
    assert counter.counts() == expected(rows)
    assert counter.files_read == 1


def publish(lake: Lake, run_id: str, status: str, at: datetime) -> RunRecord:
    run = RunRecord(
        run_id=run_id,
        status=status,
        started_at=at,
        published_at=None if status == "running" else at,
        watermark={"orders": {0: 10}},
    )
    rows = pa.Table.from_pylist([run.to_row()], schema=RUNS_SCHEMA)
    write_deltalake(lake.table(RUNS), rows, mode="append")
    return run


def test_the_run_reader_follows_new_runs_and_withdrawals(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    reader = LatestRunReader(lake)
    assert reader.latest() is None  # no runs table yet
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    publish(lake, "r1", "running", t0)
    assert reader.latest() is None
    publish(lake, "r1", "published", t0 + timedelta(minutes=1))
    assert reader.latest().run_id == "r1"  # type: ignore[union-attr]
    reads = reader.reads
    assert reader.latest().run_id == "r1"  # type: ignore[union-attr]
    assert reader.reads == reads  # no new version: no rows read
    publish(lake, "r2", "published", t0 + timedelta(minutes=5))
    assert reader.latest().run_id == "r2"  # type: ignore[union-attr]
    # A failed row after r2's publication withdraws it: back to r1.
    publish(lake, "r2", "failed", t0 + timedelta(minutes=6))
    assert reader.latest().run_id == "r1"  # type: ignore[union-attr]
    assert reader.latest() == latest_published_run(lake.table(RUNS))
    assert reader._kept.opens == 1
    # Deleted and created again: what the new table says.
    shutil.rmtree(lake.table(RUNS))
    assert reader.latest() is None
    for i in range(6):
        publish(lake, f"n{i}", "published", t0 + timedelta(hours=1, minutes=i))
    assert reader.latest().run_id == "n5"  # type: ignore[union-attr]
