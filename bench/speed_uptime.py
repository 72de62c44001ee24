"""What a speed worker's long uptime costs: read cursors and RSS under queries, memory of
loading the ids a run counted. No broker needed (a real state, a real Flight endpoint,
real Delta master tables).

    .venv/bin/python bench/speed_uptime.py cursors --queries 4000
    .venv/bin/python bench/speed_uptime.py known-ids --ids 2000000
    .venv/bin/python bench/speed_uptime.py wal --batches 6000 --checkpoint 128MB 16MB
    .venv/bin/python bench/speed_uptime.py outage --seconds 120

``cursors``: a state with 5,000 orders behind a Flight endpoint; ``--queries`` sales
queries from 16 client threads (one in ten on a new connection, as clients come and
go); prints cursors open and RSS before and after. ``known-ids``: a master table of
``--ids`` orders ingested now, a run below all of them; prepares it as the run watcher
does (ids streamed to a file, or ``--in-memory`` as a table) and applies it to a fresh
state in this process; prints RSS after each phase and the peak, then the median and p99
time of committing ``--batches`` micro-batches of ``--per-batch`` new orders with those ids
known, the time to apply the next run (``--next-ids`` more ids, the micro-batches pruned)
and of one expiry of known ids. ``wal``: for each
``--checkpoint`` threshold in turn, a fresh state takes ``--batches`` micro-batches of
``--per-batch`` new orders (a worker's second of a steady stream); prints, every tenth of
the way, the write-ahead log's size, DuckDB's own memory figure and RSS, and at the end
the median and p99 time of a commit. ``outage``: a `lambdalake speed run` process started
against an address where nothing listens (a broker down for ``--seconds``); prints its
threads and open files every ``--every`` seconds, and the reconnect attempts its log
counts. One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cursors(queries: int) -> dict[str, object]:
    from lambdalake.contract.speed_protocol import SpeedQuery, connect, query_speed
    from lambdalake.contract.validation import validate
    from speed.server import SpeedFlightServer
    from speed.state import BatchInput, SpeedState

    state = SpeedState(Path(tempfile.mkdtemp()) / "w.duckdb", (0, 1))
    state.register_partitions([("orders", 0), ("reviews", 0)])
    n = 5000
    values = [
        json.dumps(
            {
                "event_id": f"e{o}",
                "event_time": f"2026-11-2{o % 3}T1{o % 10}:00:00Z",
                "store_id": f"s{o % 5}",
                "sku": f"k{o % 50}",
                "quantity": 2,
                "unit_price": 1.5,
            }
        ).encode()
        for o in range(n)
    ]
    v = validate("orders", values, [0] * n, list(range(n)))
    state.commit_batch(BatchInput(valid={"orders": v.valid}, ends={("orders", 0): n}))
    server = SpeedFlightServer(state, lambda: {}).start()
    client = connect(server.endpoint)
    q = SpeedQuery(view="sales", granularity="hour")
    for _ in range(50):
        query_speed(server.endpoint, q, client=client)
    before = (state.cursor_count, rss_mib())

    def one(i: int) -> None:
        c = connect(server.endpoint) if i % 10 == 0 else client
        try:
            query_speed(server.endpoint, q, client=c)
        finally:
            if c is not client:
                c.close()

    t0 = time.monotonic()
    rss_by_quarter = []
    with ThreadPoolExecutor(16) as pool:
        for quarter in range(4):
            list(pool.map(one, range(quarter * queries // 4, (quarter + 1) * queries // 4)))
            rss_by_quarter.append(round(rss_mib(), 1))
    out = {
        "queries": queries,
        "seconds": round(time.monotonic() - t0, 1),
        "cursors_before": before[0],
        "cursors_after": state.cursor_count,
        "rss_before_mib": round(before[1], 1),
        "rss_after_each_quarter_mib": rss_by_quarter,
    }
    client.close()
    server.stop()
    state.close()
    return out


def random_id(rng) -> str:
    """An id as real producers make them (a random UUID): no order a scan could use."""
    import uuid

    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def orders_batch(offset: int, n: int, start: datetime, rng=None):
    """A micro-batch of ``n`` new valid orders at offsets ``offset``.. of partition 0, their
    times spread over 30 days from ``start``; ids ``e<offset>``, or random with ``rng``."""
    from lambdalake.contract.validation import validate
    from speed.state import BatchInput

    values = [
        json.dumps(
            {
                "event_id": random_id(rng) if rng else f"e{o}",
                "event_time": (start + timedelta(seconds=(o * 97) % (30 * 86400))).isoformat(),
                "store_id": f"s{o % 3}",
                "sku": f"k{o % 20}",
                "quantity": 1 + o % 3,
                "unit_price": 2.5,
            }
        ).encode()
        for o in range(offset, offset + n)
    ]
    v = validate("orders", values, [0] * n, list(range(offset, offset + n)))
    return BatchInput(valid={"orders": v.valid}, ends={("orders", 0): offset + n})


def commit_times(state, batches: int, per_batch: int, offset: int) -> dict[str, float]:
    """Median and p99 ms of committing ``batches`` micro-batches of new orders."""
    import random
    import statistics

    start = datetime.now(UTC) - timedelta(days=31)  # the last of them a day ago
    rng = random.Random(f"micro-batches {offset}")  # not the master's ids
    seconds = []
    for b in range(batches):
        batch = orders_batch(offset + b * per_batch, per_batch, start, rng)
        t0 = time.perf_counter()
        state.commit_batch(batch)
        seconds.append(time.perf_counter() - t0)
    cuts = statistics.quantiles(seconds, n=100)
    return {
        "commit_ms_p50": round(statistics.median(seconds) * 1000, 2),
        "commit_ms_p99": round(cuts[98] * 1000, 2),
    }


def wal(batches: int, per_batch: int, threshold: str) -> dict[str, object]:
    import statistics

    from speed.state import SpeedState

    path = Path(tempfile.mkdtemp()) / "w.duckdb"
    state = SpeedState(path, (0, 1), checkpoint_threshold=threshold)
    state.register_partitions([("orders", 0), ("reviews", 0)])
    start = datetime.now(UTC) - timedelta(days=30)
    wal_path = path.with_name(path.name + ".wal")
    samples, commit_s = [], []
    offset = 0
    for b in range(batches):
        batch = orders_batch(offset, per_batch, start)
        offset += per_batch
        t0 = time.perf_counter()
        state.commit_batch(batch)
        commit_s.append(time.perf_counter() - t0)
        if (b + 1) % max(1, batches // 10) == 0:
            samples.append(
                {
                    "batches": b + 1,
                    "wal_mib": round(wal_path.stat().st_size / 2**20, 1)
                    if wal_path.exists()
                    else 0.0,
                    "duckdb_mib": round(state.counts()["duckdb_bytes"] / 2**20, 1),
                    "rss_mib": round(rss_mib(), 1),
                }
            )
    cuts = statistics.quantiles(commit_s, n=100)
    out = {
        "checkpoint": threshold,
        "batches": batches,
        "per_batch": per_batch,
        "commit_ms_p50": round(statistics.median(commit_s) * 1000, 2),
        "commit_ms_p99": round(cuts[98] * 1000, 2),
        "commit_ms_max": round(max(commit_s) * 1000, 1),
        "seconds": round(sum(commit_s), 1),
        "samples": samples,
    }
    state.close()
    return out


def make_master(lake: Path, ids: int) -> int:
    import random

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from lambdalake.contract.lake import MASTER_SCHEMA_BY_TOPIC, MASTER_TABLE_BY_TOPIC, Lake

    uri = Lake(str(lake)).table(MASTER_TABLE_BY_TOPIC["orders"])
    schema = MASTER_SCHEMA_BY_TOPIC["orders"]
    now = datetime.now(UTC)
    step = 250_000
    rng = random.Random(ids)
    for start in range(0, ids, step):
        n = min(step, ids - start)
        times = [now - timedelta(minutes=i % 2000) for i in range(n)]
        cols: dict[str, object] = {}
        for f in schema:
            if f.name == "event_id":
                cols[f.name] = pa.array([random_id(rng) for _ in range(n)])
            elif f.name == "_offset":
                cols[f.name] = pa.array(range(start, start + n), f.type)
            elif f.name == "_partition":
                cols[f.name] = pa.array([0] * n, f.type)
            elif f.name == "_ingested_at":
                cols[f.name] = pa.array([now] * n, f.type)
            elif f.name == "event_time":
                cols[f.name] = pa.array(times, f.type)
            elif f.name == "event_date":
                cols[f.name] = pa.array([t.date() for t in times], f.type)
            elif pa.types.is_string(f.type):
                cols[f.name] = pa.array(["x"] * n, f.type)
            elif pa.types.is_integer(f.type):
                cols[f.name] = pa.array([1] * n, f.type)
            elif pa.types.is_floating(f.type):
                cols[f.name] = pa.array([1.0] * n, f.type)
            else:
                cols[f.name] = pa.nulls(n, f.type)
        write_deltalake(
            uri, pa.table(cols, schema=schema), mode="append", partition_by=["event_date"]
        )
    return DeltaTable(uri).version()


def known_ids(
    ids: int, in_memory: bool, batches: int, per_batch: int, next_ids: int
) -> dict[str, object]:
    import random
    import subprocess

    import pyarrow as pa

    root = Path(tempfile.mkdtemp())
    # Written by another process, so this one's RSS is the worker's side only.
    made = subprocess.run(
        [sys.executable, __file__, "make-master", "--ids", str(ids), "--lake", str(root / "lake")],
        check=True,
        capture_output=True,
        text=True,
    )
    version = int(made.stdout.strip())

    from lambdalake.contract.manifest import RunRecord
    from lambdalake.settings import Settings
    from speed.runs import prepare_run
    from speed.state import RunApply, SpeedState

    settings = Settings(_env_file=None, lake_uri=str(root / "lake"), home=root / "home")  # type: ignore[call-arg]
    run = RunRecord(
        run_id="r1",
        status="published",
        started_at=datetime.now(UTC),
        master_versions={"master/orders": version},
        watermark={"orders": {0: ids}},
    )
    r0 = rss_mib()
    t0 = time.monotonic()
    prepared = prepare_run(
        settings,
        run,
        applied_watermark={},
        applied_master_versions={},
        applied_model_version=None,
        spill_dir=None if in_memory else root / "prepared",
    )
    t1, r1 = time.monotonic(), rss_mib()
    state = SpeedState(root / "w.duckdb", (0, 1))
    state.register_partitions([("orders", 0), ("reviews", 0)])
    state.apply_run(
        RunApply(
            run_id="r1",
            watermark=run.watermark,
            master_versions=run.master_versions,
            model_version=None,
            known_ids=prepared.known_ids,
            replace_known=prepared.replace_known,
        ),
        settings.dedup_hours,
    )
    prepared.discard()
    t2 = time.monotonic()
    known_first = state.counts()["rows"]["known_orders"]
    # The micro-batches that follow: new orders above the run's watermark.
    commits = commit_times(state, batches, per_batch, offset=ids)
    # The next run: the ids ingested since (--next-ids of them), added to the known ones,
    # and the held micro-batches pruned at its watermark.
    rng = random.Random("the next run")
    new_ids = pa.table(
        {
            "id": pa.array([random_id(rng) for _ in range(next_ids)], pa.string()),
            "seen_at": pa.array([datetime.now(UTC)] * next_ids, pa.timestamp("us", tz="UTC")),
        }
    )
    t3 = time.monotonic()
    state.apply_run(
        RunApply(
            run_id="r2",
            watermark={"orders": {0: ids + batches * per_batch}},
            master_versions=run.master_versions,
            model_version=None,
            known_ids={"orders": new_ids},
            replace_known=False,
        ),
        settings.dedup_hours,
    )
    t4 = time.monotonic()
    state.expire_known(settings.dedup_hours)
    out = {
        "ids": ids,
        "spilled": not in_memory,
        "rss_start_mib": round(r0),
        "rss_after_prepare_mib": round(r1),
        "rss_after_apply_mib": round(rss_mib()),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "prepare_s": round(t1 - t0, 2),
        "apply_s": round(t2 - t1, 2),
        "known": known_first,
        "per_batch": per_batch,
        **commits,
        "next_run_apply_s": round(t4 - t3, 2),
        "known_after_next_run": state.counts()["rows"]["known_orders"],
        "expire_known_s": round(time.monotonic() - t4, 3),
        "rss_end_mib": round(rss_mib()),
    }
    state.close()
    return out


def outage(seconds: float, every: float) -> dict[str, object]:
    """A speed worker's threads and open files while its broker stays unreachable."""
    import subprocess

    from lambdalake.ops.net import free_port

    work = Path(tempfile.mkdtemp(prefix="speed-outage-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LAMBDALAKE_HOME": str(work),
        "LAMBDALAKE_LAKE_URI": str(work / "lake"),
        "LAMBDALAKE_LOG_LEVEL": "INFO",
    }
    cmd = [sys.executable, "-m", "lambdalake.cli", "speed", "run"]
    cmd += ["--bootstrap", f"127.0.0.1:{free_port()}", "--query-port", str(free_port())]
    log_path = work / "speed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    samples = []
    started = time.monotonic()
    try:
        for k in range(1, int(seconds / every) + 1):
            time.sleep(max(0.0, started + k * every - time.monotonic()))
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited: {log_path.read_text()[-2000:]}")
            at = round(time.monotonic() - started)
            threads = len(os.listdir(f"/proc/{proc.pid}/task"))
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            attempts = log_path.read_text().count("speed.broker_unreachable")
            samples.append({"seconds": at, "threads": threads, "fds": fds, "attempts": attempts})
            print(
                f"  {at:>5} s  threads {threads:>3}  fds {fds:>3}  attempts {attempts}", flush=True
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    first, last = samples[0], samples[-1]
    attempts = max(last["attempts"] - first["attempts"], 1)
    return {
        "seconds": seconds,
        "samples": samples,
        "threads_per_attempt": (last["threads"] - first["threads"]) / attempts,
        "fds_per_attempt": (last["fds"] - first["fds"]) / attempts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cursors")
    c.add_argument("--queries", type=int, default=4000)
    k = sub.add_parser("known-ids")
    k.add_argument("--ids", type=int, default=2_000_000)
    k.add_argument("--in-memory", action="store_true", help="prepare into a table, not a file")
    k.add_argument("--batches", type=int, default=300, help="micro-batches timed after the run")
    k.add_argument("--per-batch", type=int, default=25)
    k.add_argument("--next-ids", type=int, default=100_000, help="new ids the next run counted")
    w = sub.add_parser("wal")
    w.add_argument("--batches", type=int, default=6000)
    w.add_argument("--per-batch", type=int, default=100)
    w.add_argument("--checkpoint", nargs="+", default=["128MB", "16MB"])
    o = sub.add_parser("outage")
    o.add_argument("--seconds", type=float, default=120.0)
    o.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    m = sub.add_parser("make-master")
    m.add_argument("--ids", type=int, required=True)
    m.add_argument("--lake", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("LAMBDALAKE_LOG_LEVEL", "WARNING")
    if args.what == "cursors":
        print(json.dumps(cursors(args.queries)))
    elif args.what == "wal":
        for threshold in args.checkpoint:  # each in a fresh state; RSS is the process's
            print(json.dumps(wal(args.batches, args.per_batch, threshold)), flush=True)
    elif args.what == "outage":
        print(json.dumps(outage(args.seconds, args.every)))
    elif args.what == "make-master":
        print(make_master(args.lake, args.ids))
    else:
        print(
            json.dumps(
                known_ids(args.ids, args.in_memory, args.batches, args.per_batch, args.next_ids)
            )
        )


if __name__ == "__main__":
    main()
