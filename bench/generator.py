"""Benchmark: how fast ``generate history`` produces, split into model and Kafka send.

Runs the pure stream (model + JSON + late/duplicate/bad plan) alone, then the
whole ``run_history`` into a broker (an embedded Tansu unless ``--bootstrap``),
and prints one JSON line with messages/s for each, and the CPU time per message
of the model, of the producing process(es) and of the broker (wall times on a
shared machine say little; CPU per message carries over).

    .venv/bin/python bench/generator.py --days 30 --skus 100 --stores 5
    .venv/bin/python bench/generator.py --days 730 --skus 200 --stores 10   # the big one
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import date, timedelta
from pathlib import Path

# This file is named like the package it measures: keep its folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from generator.model import make_catalog  # noqa: E402
from generator.produce import run_history  # noqa: E402
from generator.stream import Counts, Fractions, history  # noqa: E402
from lambdalake.ops.broker import EmbeddedBroker  # noqa: E402
from lambdalake.settings import Settings  # noqa: E402


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--skus", type=int, default=100)
    ap.add_argument("--stores", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--end-date", default="2025-12-31")
    ap.add_argument("--processes", type=int, default=None, help="default: the generator's choice")
    ap.add_argument("--late", type=float, default=0.01)
    ap.add_argument("--duplicates", type=float, default=0.01)
    ap.add_argument("--bad", type=float, default=0.001)
    ap.add_argument("--bootstrap", default=None, help="a running Kafka (default: embedded Tansu)")
    a = ap.parse_args()
    fr = Fractions(a.late, a.duplicates, a.bad)
    last = date.fromisoformat(a.end_date)
    first = last - timedelta(days=a.days - 1)

    # 1. The model alone: every message built, nothing sent.
    counts = Counts()
    cpu, wall = time.process_time(), time.perf_counter()
    catalog = make_catalog(a.seed, a.skus, a.stores)
    messages = sum(len(b.messages) for b in history(catalog, first, a.days, fr, 256 * 1024, counts))
    model_s, model_cpu = time.perf_counter() - wall, time.process_time() - cpu

    # 2. The whole history into Kafka.
    broker = None if a.bootstrap else EmbeddedBroker.start(port=0)
    try:
        bootstrap = a.bootstrap or broker.bootstrap  # type: ignore[union-attr]
        settings = Settings(_env_file=None, kafka_bootstrap=bootstrap)  # type: ignore[call-arg]
        kw = dict(days=a.days, skus=a.skus, stores=a.stores, seed=a.seed, end_date=a.end_date)
        broker_cpu = _proc_cpu_s(broker.process.pid) if broker else float("nan")
        children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, wall = time.process_time(), time.perf_counter()
        summary = run_history(
            settings,
            **kw,
            late_fraction=a.late,
            duplicate_fraction=a.duplicates,
            bad_fraction=a.bad,
            processes=a.processes,
        )
        total_s, parent_cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        helper_cpu = (after.ru_utime + after.ru_stime) - (
            children_cpu.ru_utime + children_cpu.ru_stime
        )
        if broker:
            broker_cpu = _proc_cpu_s(broker.process.pid) - broker_cpu
    finally:
        if broker is not None:
            broker.stop()
    assert summary == counts.as_dict(), (summary, counts)
    result = {
        "bench": "generator.history",
        "days": a.days,
        "skus": a.skus,
        "stores": a.stores,
        "processes": a.processes or "auto",
        "messages": messages,
        "summary": summary,
        "model_s": round(model_s, 2),
        "model_messages_per_s": round(messages / model_s),
        "history_s": round(total_s, 2),
        "history_messages_per_s": round(messages / total_s),
        # CPU per message: comparable across machines and load, unlike wall times.
        "cpu_us_per_message": {
            "model": round(model_cpu / messages * 1e6, 1),
            "history_main_process": round(parent_cpu / messages * 1e6, 1),
            "history_helper_processes": round(helper_cpu / messages * 1e6, 1),
            "broker": round(broker_cpu / messages * 1e6, 1),
        },
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
