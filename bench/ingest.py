"""Ingest benchmark: order events/s from a pre-filled topic into master/orders, end to end.

What it does
    1. Starts an embedded broker (Tansu) and pre-fills ``orders`` with ``--events``
       valid order events (JSON, keyed by SKU, a history in time order), with two
       producer processes. Pre-filling is not timed.
    2. Runs ``lambdalake ingest --until-end`` as a subprocess into a fresh lake and
       times it end to end (process start, connect, true end offsets, consume,
       validate, Delta commits, exit).
    3. Checks the result (rows written = events, positions = end offsets) and
       prints a table and one JSON line: events/s end to end, events/s inside the
       ingest loop (from its ``ingest.done`` log line), the micro-batch size, and
       the mean validate / commit seconds per micro-batch, and how long the consumer
       waited for commits (more than a little: validation and Delta writes are the
       bottleneck; none: consuming and decoding are).

Everything runs on one machine: the broker, the producer (before timing) and
ingest share the cores, so the figures are a floor; the ingest process's CPU
seconds per event are also printed, as they depend little on what else runs.

    .venv/bin/python bench/ingest.py --events 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltalake import DeltaTable  # noqa: E402
from kafka import KafkaProducer, TopicPartition  # noqa: E402

from lambdalake.contract.lake import Lake  # noqa: E402
from lambdalake.contract.manifest import ingest_positions  # noqa: E402
from lambdalake.kafka.clients import end_offsets  # noqa: E402
from lambdalake.ops.broker import EmbeddedBroker  # noqa: E402

PRODUCER_CONFIG = {"batch_size": 1 << 20, "linger_ms": 30, "metrics_enabled": False}
SKUS = 500
STORES = 20
DAYS = 90


def order_value(i: int, n: int) -> bytes:
    """The ``i``-th of ``n`` order events: a history spread over DAYS days, in time order."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    at = start + timedelta(seconds=i * (DAYS * 86_400 / n))
    sku = f"SKU-{(i * 7919) % SKUS:05d}"
    event = {
        "event_id": f"bench-{i:09d}",
        "event_time": at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "store_id": f"store-{(i * 31) % STORES:03d}",
        "sku": sku,
        "quantity": 1 + (i % 4) if i % 50 else -1,
        "unit_price": round(2.5 + (i % 997) / 10, 2),
        "currency": "USD",
    }
    return json.dumps(event, separators=(",", ":")).encode()


def produce_share(bootstrap: str, n: int, share: int, ways: int, partitions: int) -> int:
    """Send the events whose partition p has p % ways == share."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_CONFIG)
    sent = 0
    for i in range(n):
        p = i % partitions
        if p % ways != share:
            continue
        value = order_value(i, n)
        producer.send(
            "orders", value=value, key=f"SKU-{(i * 7919) % SKUS:05d}".encode(), partition=p
        )
        sent += 1
    producer.flush(timeout=300)
    producer.close()
    return sent


def prefill(bootstrap: str, n: int, partitions: int) -> float:
    t0 = time.monotonic()
    ways = 2
    with ProcessPoolExecutor(ways) as pool:
        futures = [
            pool.submit(produce_share, bootstrap, n, s, ways, partitions) for s in range(ways)
        ]
        sent = sum(f.result() for f in futures)
    assert sent == n, (sent, n)
    return time.monotonic() - t0


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="lambdalake-bench-ingest-"))
    with EmbeddedBroker.start(
        port=0, partitions=args.partitions, log_dir=work / "broker"
    ) as broker:
        print(f"pre-filling {args.events:,} order events ...", file=sys.stderr, flush=True)
        fill_s = prefill(broker.bootstrap, args.events, args.partitions)
        tps = [TopicPartition("orders", p) for p in range(args.partitions)]
        ends = {tp.partition: e for tp, e in end_offsets(broker.bootstrap, tps).items()}
        assert sum(ends.values()) == args.events, ends
        print(f"pre-filled in {fill_s:.1f} s; ingesting ...", file=sys.stderr, flush=True)

        lake = Lake(str(work / "lake"))
        env = {
            **os.environ,
            "LAMBDALAKE_LOG_FORMAT": "json",
            "LAMBDALAKE_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
        if args.batch_size:
            env["LAMBDALAKE_INGEST_BATCH_SIZE"] = str(args.batch_size)
        cmd = [sys.executable, "-m", "lambdalake.cli", "ingest", "--until-end"]
        cmd += ["--bootstrap", broker.bootstrap, "--lake", lake.root]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall_s = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"ingest failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        logs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        batches = [e for e in logs if e.get("event") == "ingest.batch" and e["topic"] == "orders"]
        start = next(e for e in logs if e.get("event") == "ingest.start")
        finish = next(e for e in logs if e.get("event") == "ingest.done")

        written = summary["orders"]["written"]
        assert written == args.events, summary
        assert ingest_positions(lake.master("orders"), "orders") == ends
        files = len(DeltaTable(lake.master("orders")).file_uris())
    return {
        "events": args.events,
        "partitions": args.partitions,
        "batch_size": start["batch_size"],
        "micro_batches": len(batches),
        "end_to_end_s": round(wall_s, 2),
        "end_to_end_events_per_s": round(args.events / wall_s),
        "loop_s": finish["seconds"],
        "loop_events_per_s": finish["events_per_s"],
        "consumer_blocked_s": finish["consumer_blocked_s"],
        # CPU seconds of the ingest process (all threads): comparable across machine loads.
        "ingest_cpu_s": round(cpu_s, 2),
        "ingest_cpu_us_per_event": round(cpu_s / args.events * 1e6, 2),
        "validate_s_per_batch": round(mean(b["validate_s"] for b in batches), 3),
        "commit_s_per_batch": round(mean(b["commit_s"] for b in batches), 3),
        "files": files,
        "prefill_s": round(fill_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--batch-size", type=int, default=0, help="micro-batch size (default: the setting's)"
    )
    args = parser.parse_args()
    result = run(args)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
