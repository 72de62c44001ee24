"""What a long-running ingest keeps in memory per commit, and what compaction gives back.

Ingest keeps each master table open between commits (``batch.ingest_lake.PositionedTable``,
reloaded every 50 commits at its own version). delta-rs' state of an open table holds every
active file's metadata, so ingest's memory follows the table's file count: one or more
files per commit, until a compaction (``lambdalake maintenance compact``, daily in the
Airflow DAG) rewrites them into a few. This appends ``--commits`` small commits (orders of
one day, like a steady stream) through the product's own ``PositionedTable``, compacts the
table, appends as many again, compacts again, and prints the process's RSS after each
stage (after ``malloc_trim``, so freed memory is not counted), side by side.

    .venv/bin/python bench/ingest_state.py --commits 1500 --rows 200
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batch.ingest_lake import PositionedTable  # noqa: E402
from lambdalake.contract.lake import MASTER_PARTITION_BY, MASTER_SCHEMA_BY_TOPIC  # noqa: E402
from lambdalake.memory import trim  # noqa: E402


def rss_mib() -> float:
    """Resident set after giving malloc's free pages back (glibc; elsewhere as is)."""
    gc.collect()
    trim()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def orders(first_offset: int, n: int, day: date) -> pa.Table:
    at = datetime.combine(day, datetime.min.time(), UTC)
    offsets = list(range(first_offset, first_offset + n))
    return pa.table(
        {
            "event_id": [f"o-{o:012d}" for o in offsets],
            "event_time": [at + timedelta(seconds=o % 86_400) for o in offsets],
            "store_id": [f"S{o % 5:03d}" for o in offsets],
            "sku": [f"SKU-{o % 100:04d}" for o in offsets],
            "quantity": [1 + o % 3 for o in offsets],
            "unit_price": [9.99] * n,
            "currency": ["USD"] * n,
            "event_date": [day] * n,
            "_topic": ["orders"] * n,
            "_partition": [0] * n,
            "_offset": offsets,
            "_ingested_at": [at] * n,
        },
        schema=MASTER_SCHEMA_BY_TOPIC["orders"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=1500, help="commits per stage")
    ap.add_argument("--rows", type=int, default=200, help="orders per commit")
    ap.add_argument("--dir", help="where the table goes (default: a new temp dir)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="lambdalake-ingest-state-"))
    uri = str(root / "orders")
    table = PositionedTable.open(
        uri,
        MASTER_SCHEMA_BY_TOPIC["orders"],
        ["orders"],
        partition_by=MASTER_PARTITION_BY["orders"],
        storage_options=None,
    )
    stages: list[dict[str, float | int | str]] = []

    def stage(name: str, t0: float) -> None:
        from deltalake import DeltaTable

        files = len(DeltaTable(uri).file_uris())
        stages.append(
            {
                "stage": name,
                "rss_mib": round(rss_mib(), 1),
                "files": files,
                "s": round(time.monotonic() - t0, 1),
            }
        )
        print(
            f"{name:<28} RSS {stages[-1]['rss_mib']:>7.1f} MiB  files {files:>6}  {stages[-1]['s']} s",
            flush=True,
        )

    offset = 0
    day = date(2026, 12, 1)
    t0 = time.monotonic()
    for _ in range(100):  # warm-up: delta-rs' runtime, pools and caches, counted in no stage
        rows = orders(offset, args.rows, day)
        offset += args.rows
        table.append(rows, {"orders": {0: offset}})
    from deltalake import DeltaTable

    DeltaTable(uri).optimize.compact()
    stage("warmed up (100 commits, compacted)", t0)
    for rnd in (1, 2):
        t0 = time.monotonic()
        for i in range(args.commits):
            rows = orders(offset, args.rows, day)
            offset += args.rows
            table.append(rows, {"orders": {0: offset}})
            if (i + 1) % max(1, args.commits // 5) == 0:
                print(f"  round {rnd}: {i + 1}/{args.commits} commits", flush=True)
        stage(f"after {args.commits} commits ({rnd})", t0)
        t0 = time.monotonic()
        DeltaTable(uri).optimize.compact()  # what `lambdalake maintenance compact` does first
        # Ingest reloads its table every 50 commits: a few commits bring in the compacted state.
        for _ in range(50):
            rows = orders(offset, args.rows, day)
            offset += args.rows
            table.append(rows, {"orders": {0: offset}})
        stage(f"compacted, +50 commits ({rnd})", t0)
    grew = [s["rss_mib"] for s in stages]
    per_commit_kib = (float(grew[1]) - float(grew[0])) * 1024 / args.commits
    print(
        f"first {args.commits} commits: {per_commit_kib:.1f} KiB of RSS per commit; "
        f"second round after a compaction: {float(grew[3]) - float(grew[2]):+.1f} MiB"
    )
    print(json.dumps({"date": date.today().isoformat(), "args": vars(args), "stages": stages}))


if __name__ == "__main__":
    main()
