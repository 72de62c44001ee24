"""Files per ingest commit: one micro-batch over many event dates, appended to a master table.

Appends ``--rows`` order rows over ``--dates`` days to a fresh ``master/orders``-shaped
table through ingest's own writer (``batch.ingest_lake.PositionedTable.append``), for
dates in time order (a backfill) and interleaved at random, with the per-commit bound
(``--max-dates``, ingest's default 256) and without it (one commit, as before the bound).
Each case runs in a child process of its own, so its peak RSS is its own; prints commits,
files per commit (most and total), seconds and the growth of peak RSS.

    .venv/bin/python bench/ingest_files.py --rows 50000 --dates 3000
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rows(n: int, dates: int, order: str, seed: int):  # -> pa.Table
    import pyarrow as pa

    from lambdalake.contract.lake import MASTER_ORDERS_SCHEMA

    rnd = random.Random(seed)
    base = date(2018, 1, 1)
    days = [base + timedelta(days=rnd.randrange(dates)) for _ in range(n)]
    if order == "in time order":
        days.sort()
    now = datetime.now(UTC)
    return pa.Table.from_pydict(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "event_time": [datetime(d.year, d.month, d.day, tzinfo=UTC) for d in days],
            "store_id": ["S001"] * n,
            "sku": [f"SKU-{i % 500:05d}" for i in range(n)],
            "quantity": [1] * n,
            "unit_price": [9.99] * n,
            "currency": ["USD"] * n,
            "event_date": days,
            "_topic": ["orders"] * n,
            "_partition": [i % 4 for i in range(n)],
            "_offset": [i // 4 for i in range(n)],
            "_ingested_at": [now] * n,
        },
        schema=MASTER_ORDERS_SCHEMA,
    )


def case(
    n: int, dates: int, order: str, max_dates: int, seed: int, out: multiprocessing.Queue
) -> None:
    from batch.ingest_lake import PositionedTable
    from lambdalake.contract.lake import MASTER_ORDERS_SCHEMA, MASTER_PARTITION_BY

    table = rows(n, dates, order, seed)
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "orders")
        master = PositionedTable.open(
            uri,
            MASTER_ORDERS_SCHEMA,
            ["orders"],
            partition_by=MASTER_PARTITION_BY["orders"],
            storage_options=None,
            max_dates_per_commit=max_dates,
        )
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        version = master.append(table, {"orders": {p: n // 4 + 1 for p in range(4)}})
        seconds = time.monotonic() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        files = []
        for v in range(1, version + 1):
            log = (Path(uri) / "_delta_log" / f"{v:020d}.json").read_text()
            files.append(sum('"add"' in line for line in log.splitlines()))
    out.put((len(files), max(files), sum(files), round(seconds, 1), round(rss / 1024)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dates", type=int, default=3_000)
    ap.add_argument("--max-dates", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    print(f"{args.rows} rows over {args.dates} days, one micro-batch")
    print(
        f"{'dates':<16} {'bound':>8} {'commits':>8} {'files/commit':>13} {'files':>7} "
        f"{'seconds':>8} {'+peak RSS MiB':>14}"
    )
    for order in ("in time order", "at random"):
        for bound in (10**9, args.max_dates):
            queue = ctx.Queue()
            child = ctx.Process(
                target=case, args=(args.rows, args.dates, order, bound, args.seed, queue)
            )
            child.start()
            commits, most, total, seconds, rss = queue.get()
            child.join()
            label = "none" if bound == 10**9 else str(bound)
            print(
                f"{order:<16} {label:>8} {commits:>8} {most:>13} {total:>7} {seconds:>8} {rss:>14}"
            )


if __name__ == "__main__":
    main()
