"""Quarantine counts over a long uptime: each status read costs the files added since the
last one, not every file the quarantine table ever got (a real Delta table, delta-rs)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from lambdalake.contract.lake import QUARANTINE, QUARANTINE_SCHEMA, Lake
from lambdalake.ops.status import QuarantineCounter, quarantine_counts

REASONS = ("bad_json", "missing_field", "out_of_range")


def append_quarantined(lake: Lake, commit: int, n: int) -> list[tuple[str, str]]:
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
    write_deltalake(lake.table(QUARANTINE), pa.table(cols, schema=QUARANTINE_SCHEMA), mode="append")
    return rows


def expected(rows: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, reason), n in sorted(Counter(rows).items()):
        out.setdefault(topic, {})[reason] = n
    return out


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
    lake = Lake(str(tmp_path / "lake"))
    counter = QuarantineCounter(lake)
    rows: list[tuple[str, str]] = []
    for commit in range(12):
        rows += append_quarantined(lake, commit, 3)
    assert counter.counts() == expected(rows)
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

    assert len(status._COUNTERS) <= status._COUNTERS_MAX
