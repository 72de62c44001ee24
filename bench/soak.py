"""Soak benchmark: the demo's live load plus steady API traffic, every process sampled each minute.

What it does
    1. Starts ``lambdalake demo`` (a subprocess, in a fresh ``--home``): the embedded broker,
       a generated history, ingest, a batch run, then the long-lived processes the demo keeps
       running: the speed worker, continuous ingest, the API and the live event generator
       (``--rate`` events/s). Free ports, so it runs next to anything else.
    2. Once the demo says it is ready, sends open-loop API traffic (``--api-rate`` requests/s,
       bench/serving.py's query mix plus ``/v1/status``) for ``--minutes`` minutes, and at
       the start and then every minute samples each process of the demo (the broker's JVM,
       speed, ingest, api, live, the demo itself): RSS, open file descriptors, threads, CPU
       seconds; plus the minute's API p50/p99, errors and load refused (503), and the speed
       layer's lag from ``/v1/status``.
    3. With ``--batch-every M`` (default 10), runs ``lambdalake batch run`` every M minutes as
       Airflow would (hourly in production), so the speed layer is pruned at a new watermark
       as in a real deployment; without batch runs the speed worker holds every live event
       since the first run and its memory grows by design. With ``--compact-every M``, runs
       ``lambdalake maintenance compact`` every M minutes as the maintenance DAG would (hourly
       by default): ingest's memory follows the master tables' file count until then.
       The broker JVM's heap (used, old generation, committed) is sampled with ``jstat``.
    4. Prints a table per minute, the slope per hour of RSS, fds and threads per process
       (Theil-Sen: the median of pairwise slopes, so one noisy minute does not decide) and a
       verdict line on flatness; ``--json PATH`` writes every sample.

    .venv/bin/python bench/soak.py --minutes 30 --json soak.json

A process is flat when, after ``--warmup-minutes``, its RSS grows by less than
max(16 MiB, 5 % of its median) per hour, and its fds and threads by fewer than 10 and 5 per
hour. Ctrl-C stops early and still reports (and stops every process the demo started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loadgen  # noqa: E402  (bench/loadgen.py: the script's own directory is on sys.path)
import psutil  # noqa: E402

MIB = 1024 * 1024
# (kind, weight): bench/serving.py's mix, plus the status page operators poll.
MIX = [
    ("sales_point", 55),
    ("sales_hour_all", 10),
    ("sentiment", 10),
    ("forecast", 10),
    ("ranking", 5),
    ("alerts", 5),
    ("status", 5),
]
RSS_FLAT_MIB_PER_H = 16.0
RSS_FLAT_FRACTION_PER_H = 0.05
FDS_FLAT_PER_H = 10.0
THREADS_FLAT_PER_H = 5.0


# --- the processes ------------------------------------------------------------------------------


def process_name(proc: psutil.Process) -> str | None:
    """Which part of the demo a process is (None: not one we follow, e.g. a batch run)."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if cmd and Path(cmd[0]).name.startswith("java") and any("kafka" in a.lower() for a in cmd):
        return "broker"
    if "lambdalake.cli" not in cmd:
        return None
    words = cmd[cmd.index("lambdalake.cli") + 1 :]
    head = words[:2]
    if head[:1] == ["ingest"] and "--until-end" not in words:
        return "ingest"
    if head == ["speed", "run"]:
        return "speed"
    if head[:1] == ["serve"]:
        return "api"
    if head == ["generate", "live"]:
        return "live"
    if head[:1] == ["demo"]:
        return "demo"
    return None


def demo_processes(demo: psutil.Process) -> dict[str, psutil.Process]:
    """The demo and its long-lived children, by name (the API's own workers included as
    ``api/<pid>`` when it runs several)."""
    found = {"demo": demo}
    for child in demo.children(recursive=True):
        name = process_name(child)
        if name is None or name == "demo":
            continue
        found[name if name not in found else f"{name}/{child.pid}"] = child
    return found


@dataclass
class ProcessSample:
    pid: int
    rss_mib: float
    fds: int
    threads: int
    cpu_s: float
    # Linux: RSS split into anonymous memory (heaps, stacks) and file pages mapped in
    # (libraries, Kafka's mmapped index files): growth of the second is page cache.
    rss_anon_mib: float | None = None
    rss_file_mib: float | None = None


def _rss_split(pid: int) -> tuple[float | None, float | None]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    kib = {
        k: int(v.split()[0])
        for k, v in (ln.split(":", 1) for ln in text.splitlines())
        if k in ("RssAnon", "RssFile")
    }
    anon, file = kib.get("RssAnon"), kib.get("RssFile")
    return (
        None if anon is None else round(anon / 1024, 1),
        None if file is None else round(file / 1024, 1),
    )


def sample_process(proc: psutil.Process) -> ProcessSample | None:
    try:
        with proc.oneshot():
            cpu = proc.cpu_times()
            anon, file = _rss_split(proc.pid)
            return ProcessSample(
                pid=proc.pid,
                rss_mib=round(proc.memory_info().rss / MIB, 1),
                fds=proc.num_fds(),
                threads=proc.num_threads(),
                cpu_s=round(cpu.user + cpu.system, 2),
                rss_anon_mib=anon,
                rss_file_mib=file,
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# --- the API traffic -----------------------------------------------------------------------------


def request_stream(skus: int, stores: int, seed: int) -> Any:
    """``next_request(i)`` for :mod:`bench.loadgen` over the demo's catalog ids."""
    rng = random.Random(seed)
    kinds = [k for k, w in MIX for _ in range(w)]
    sku_ids = [f"SKU-{i + 1:05d}" for i in range(skus)]  # generator/model.py's ids
    store_ids = [f"S{j + 1:03d}" for j in range(stores)]

    def next_request(i: int) -> loadgen.Request:
        kind = rng.choice(kinds)
        today = datetime.now(UTC).date()
        sku, store = rng.choice(sku_ids), rng.choice(store_ids)
        if kind == "sales_point":
            return kind, "/v1/sales", {"sku": sku, "start": str(today - timedelta(days=29))}
        if kind == "sales_hour_all":
            start = str(today - timedelta(days=1))
            return kind, "/v1/sales", {"granularity": "hour", "start": start}
        if kind == "sentiment":
            return kind, f"/v1/sentiment/{sku}", {}
        if kind == "forecast":
            return kind, f"/v1/forecast/{sku}", {"store_id": store}
        if kind == "ranking":
            return kind, "/v1/sentiment", {"order": rng.choice(["worst", "best"]), "limit": 10}
        if kind == "alerts":
            return kind, "/v1/alerts/demand", {}
        return kind, "/v1/status", {}

    return next_request


def speed_status(api: str, speed_dir: Path | None = None) -> dict[str, Any]:
    """Speed lag (messages behind, all workers) and events held, from ``/v1/status``; with
    ``speed_dir``, the size of the workers' DuckDB write-ahead logs (what DuckDB holds in
    memory until its next checkpoint, at LAMBDALAKE_SPEED_CHECKPOINT of log: docs/speed.md)."""
    import httpx

    try:
        status = httpx.get(f"{api}/v1/status", timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": type(exc).__name__}
    workers = status.get("speed", {}).get("workers", [])
    lag = sum(int(n) for w in workers for ps in (w.get("lag") or {}).values() for n in ps.values())
    held = sum(int(n) for w in workers for n in (w.get("events") or {}).values())
    out = {"run_id": status.get("batch", {}).get("run_id"), "lag": lag, "held": held}
    # Where the workers' memory is (MiB): DuckDB's buffers, malloc's heap in use / free.
    memory = [w.get("memory") or {} for w in workers]
    if memory and all(m.get("heap") for m in memory):
        out["duckdb_mib"] = round(sum(m.get("duckdb") or 0 for m in memory) / MIB, 1)
        out["heap_in_use_mib"] = round(sum(m["heap"]["in_use"] for m in memory) / MIB, 1)
        out["heap_free_mib"] = round(sum(m["heap"]["free"] for m in memory) / MIB, 1)
    # The dedup ids kept for the horizon (rows of known_*, all workers).
    rows = [(w.get("state") or {}).get("rows") or {} for w in workers]
    out["known_ids"] = sum(int(n) for r in rows for t, n in r.items() if t.startswith("known_"))
    if speed_dir is not None:
        wal = sum(p.stat().st_size for p in speed_dir.glob("*.duckdb.wal") if p.exists())
        out["wal_mib"] = round(wal / MIB, 1)
    return out


def jvm_heap(pid: int) -> dict[str, float]:
    """The broker JVM's heap (MiB) from ``jstat -gc``: ``used`` (young + old), ``old_used``
    (what survived young collections: a leak shows here after mixed collections),
    ``committed`` (what the JVM took from the OS, bounded by -Xmx) and the count of full
    collections. Empty when ``jstat`` (a JDK tool) is not there."""
    try:
        out = subprocess.run(
            ["jstat", "-gc", str(pid)], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split("\n")
        row = dict(zip(out[0].split(), map(float, out[1].split()), strict=True))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {}
    kib = 1024
    young = row["S0U"] + row["S1U"] + row["EU"]
    return {
        "used": round((young + row["OU"]) / kib, 1),
        "old_used": round(row["OU"] / kib, 1),
        "committed": round((row["S0C"] + row["S1C"] + row["EC"] + row["OC"]) / kib, 1),
        "full_gcs": row.get("FGC", 0.0),
    }


def api_heap(api: str) -> dict[str, float]:
    """The API process's malloc heap (MiB by state: in_use, free, mapped), Arrow's pool
    (``arrow``, MiB) and Python's allocated blocks (``py_blocks``, thousands), from
    ``/metrics``."""
    import httpx

    try:
        text = httpx.get(f"{api}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    heap: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("lambdalake_process_heap_bytes{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            heap[state] = round(float(line.rsplit(" ", 1)[1]) / MIB, 1)
        elif line.startswith("lambdalake_arrow_allocated_bytes{"):
            heap["arrow"] = round(float(line.rsplit(" ", 1)[1]) / MIB, 1)
        elif line.startswith("lambdalake_python_allocated_blocks "):
            heap["py_blocks"] = round(float(line.rsplit(" ", 1)[1]) / 1000, 1)
    return heap


# --- the soak --------------------------------------------------------------------------------------


@dataclass
class Minute:
    minute: float
    at: str
    api: dict[str, Any]
    speed: dict[str, Any]
    processes: dict[str, ProcessSample | None]
    batch_runs: list[dict[str, Any]] = field(default_factory=list)
    api_heap: dict[str, float] = field(default_factory=dict)
    broker_heap: dict[str, float] = field(default_factory=dict)


class Demo:
    """``lambdalake demo`` as a subprocess in its own home, on free ports."""

    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        from lambdalake.ops.broker import free_port

        self.home = home
        self.api_port = free_port()
        self.broker_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
        env.update(
            LAMBDALAKE_HOME=str(home),
            LAMBDALAKE_BROKER_PORT=str(self.broker_port),
            LAMBDALAKE_API_PORT=str(self.api_port),
            LAMBDALAKE_LOG_LEVEL="WARNING",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        self.env = env
        self.log_path = home / "demo.log"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "lambdalake.cli",
            "demo",
            *("--days", str(args.days), "--skus", str(args.skus), "--stores", str(args.stores)),
            *("--rate", str(args.rate)),
        ]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (open for the demo's lifetime)
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=home,  # not the caller's directory: its .env would configure the demo
            start_new_session=True,
        )
        self.ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if b"lambdalake demo is ready" in line:
                self.ready.set()

    def wait_ready(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(1.0):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the demo exited with {self.proc.returncode}; see {self.log_path}"
                )
            if stop.is_set() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the demo was not ready in {timeout:.0f} s; see {self.log_path}"
                )

    def batch_run(self) -> dict[str, Any]:
        """One ``lambdalake batch run`` with the demo's settings, as Airflow would run it."""
        return self.run_cli("batch", "run")

    def compact(self) -> dict[str, Any]:
        """``lambdalake maintenance compact``, as the maintenance DAG runs it (a week of
        history kept for time travel)."""
        return self.run_cli("maintenance", "compact", "--retention-hours", "168")

    def run_cli(self, *words: str) -> dict[str, Any]:
        env = dict(
            self.env,
            LAMBDALAKE_KAFKA_BOOTSTRAP=f"127.0.0.1:{self.broker_port}",
            LAMBDALAKE_LAKE_URI=str(self.home / "lake"),
            LAMBDALAKE_SPEED_DIR=str(self.home / "speed"),
            PYSPARK_PYTHON=sys.executable,
        )
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "lambdalake.cli", *words],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=self.home,
            check=False,
        )
        out = done.stdout.decode(errors="replace").strip().splitlines()
        last = out[-1] if out and done.returncode == 0 else None
        result: dict[str, Any] = {
            "what": " ".join(words[:2]),
            "seconds": round(time.monotonic() - t0, 1),
            "code": done.returncode,
        }
        if words[0] == "batch":
            result["run_id"] = last
        elif last:  # the compaction's summary: files per table before and after
            with contextlib.suppress(ValueError):
                result["tables"] = json.loads(last)
        return result

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the demo (it stops its children and the broker); then, for anything
        still running after ``timeout``, SIGKILL to each process it started, by pid."""
        try:
            tree = [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(True))]
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        for pid in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        self.proc.wait()
        self.log.close()


def soak(args: argparse.Namespace, stop: threading.Event) -> dict[str, Any]:
    home = Path(args.home or tempfile.mkdtemp(prefix="lambdalake-soak-"))
    started_at = datetime.now(UTC)
    demo = Demo(args, home)
    minutes: list[Minute] = []
    batch_runs: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        demo.wait_ready(args.ready_timeout, stop)
        startup_s = round(time.monotonic() - t0, 1)
        print(
            f"demo ready in {startup_s:.0f} s (home {home}); soaking {args.minutes} min", flush=True
        )
        procs = demo_processes(psutil.Process(demo.proc.pid))
        next_request = request_stream(args.skus, args.stores, args.seed)
        batch_thread: threading.Thread | None = None
        soak_t0 = time.monotonic()

        def record(api: dict[str, Any]) -> None:
            minute = (time.monotonic() - soak_t0) / 60
            done = []
            while batch_runs:  # appended by the batch thread
                done.append(batch_runs.pop(0))
            minutes.append(
                Minute(
                    minute=round(minute, 2),
                    at=datetime.now(UTC).isoformat(timespec="seconds"),
                    api=api,
                    speed=speed_status(demo.api, demo.home / "speed"),
                    api_heap=api_heap(demo.api),
                    broker_heap=jvm_heap(procs["broker"].pid) if "broker" in procs else {},
                    processes={n: sample_process(p) for n, p in procs.items()},
                    batch_runs=done,
                )
            )
            print_row(minutes[-1], list(procs))

        print_header(list(procs))
        record({})
        for m in range(1, args.minutes + 1):
            if stop.is_set():
                break
            if demo.proc.poll() is not None:
                raise RuntimeError(
                    f"the demo exited with {demo.proc.returncode}; see {demo.log_path}"
                )
            # Batch runs and compactions, one at a time (as one Airflow pool would run them).
            jobs = []
            if args.batch_every and m > 1 and (m - 1) % args.batch_every == 0:
                jobs.append(demo.batch_run)
            if args.compact_every and m % args.compact_every == 0:
                jobs.append(demo.compact)
            if jobs and (batch_thread is None or not batch_thread.is_alive()):
                batch_thread = threading.Thread(
                    target=lambda jobs=jobs: batch_runs.extend(job() for job in jobs),
                    daemon=True,
                )
                batch_thread.start()
            # One minute of open-loop traffic (what a minute's p99 is measured over).
            left = soak_t0 + 60 * m - time.monotonic()
            api = asyncio.run(
                loadgen.open_loop(demo.api, next_request, args.api_rate, max(1.0, left - 0.2))
            )
            # Per kind, so a growing p99 can be traced to the query that grows.
            api["p99_by_kind"] = {k: v["p99_ms"] for k, v in api.pop("by_kind", {}).items()}
            record(api)
        if batch_thread is not None:  # a run still going: wait for it (it is ours to end)
            batch_thread.join()
            if minutes and batch_runs:
                minutes[-1].batch_runs.extend(batch_runs)
    finally:
        demo.stop()
    names = sorted({n for m in minutes for n in m.processes})
    slopes = {n: slopes_per_hour(minutes, n, args.warmup_minutes) for n in names}
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "started_at": started_at.isoformat(timespec="seconds"),
        "home": str(home),
        "startup_s": startup_s if minutes else None,
        "minutes": [asdict(m) for m in minutes],
        "slopes_per_hour": slopes,
        "verdict": verdict(slopes),
    }


# --- flatness -----------------------------------------------------------------------------------------


def theil_sen(points: list[tuple[float, float]]) -> float | None:
    """The median of the pairwise slopes (robust to a few outliers); None below 2 points."""
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if x2 != x1
    ]
    return statistics.median(slopes) if slopes else None


def slopes_per_hour(minutes: list[Minute], name: str, warmup: float) -> dict[str, Any]:
    samples = [(m.minute, m.processes.get(name)) for m in minutes]
    kept = [(t, s) for t, s in samples if s is not None and t >= warmup]
    if len(kept) < 3:  # a short run: keep the warm-up rather than judge on two points
        kept = [(t, s) for t, s in samples if s is not None]
    out: dict[str, Any] = {"samples": len(kept)}
    for metric in ("rss_mib", "fds", "threads"):
        points = [(t / 60, float(getattr(s, metric))) for t, s in kept]
        slope = theil_sen(points)
        out[metric] = None if slope is None else round(slope, 2)
        if points:
            out[f"{metric}_first"], out[f"{metric}_last"] = points[0][1], points[-1][1]
    rss = [float(s.rss_mib) for _, s in kept]
    limit = max(RSS_FLAT_MIB_PER_H, RSS_FLAT_FRACTION_PER_H * statistics.median(rss)) if rss else 0
    out["flat"] = (
        len(kept) >= 2
        and abs(out["rss_mib"] or 0) < limit
        and abs(out["fds"] or 0) < FDS_FLAT_PER_H
        and abs(out["threads"] or 0) < THREADS_FLAT_PER_H
    )
    out["rss_limit_mib_per_h"] = round(limit, 1)
    return out


def verdict(slopes: dict[str, dict[str, Any]]) -> str:
    growing = [n for n, s in slopes.items() if not s["flat"]]
    if not slopes:
        return "no samples"
    if not growing:
        return "FLAT: RSS, fds and threads of every process within the limits"
    parts = [
        f"{n} (RSS {slopes[n]['rss_mib']:+} MiB/h, fds {slopes[n]['fds']:+}/h, "
        f"threads {slopes[n]['threads']:+}/h)"
        for n in growing
    ]
    return "GROWING: " + "; ".join(parts)


# --- output ---------------------------------------------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    return Console(width=200)


def print_header(names: list[str]) -> None:
    _console().print(
        "[bold]per minute:[/] API p50/p99 ms, requests, errors, refused (503); speed lag and "
        "events held; per process RSS MiB / fds / threads: " + ", ".join(names)
    )


def job_label(job: dict[str, Any]) -> str:
    """``batch run <run id>``, ``maintenance compact ok``, or the job's name and FAILED."""
    ok = (job.get("run_id") or "ok") if job["code"] == 0 else "FAILED"
    return f"{job.get('what', 'batch run')} {ok}"


def print_row(m: Minute, names: list[str]) -> None:
    api = m.api
    cols = [f"{m.minute:5.1f} min"]
    if api:
        cols.append(
            f"api {api['p50_ms']:.1f}/{api['p99_ms']:.1f} ms n={api['requests']} "
            f"err={api['errors']} refused={api['refused']}"
        )
        by_kind = api.get("p99_by_kind") or {}
        if by_kind:
            worst = max(by_kind, key=lambda k: by_kind[k])
            cols.append(f"slowest {worst} p99 {by_kind[worst]:.0f} ms")
    else:
        cols.append("api -")
    sp = m.speed
    cols.append(f"lag {sp.get('lag', '?')} held {sp.get('held', '?')}")
    if "heap_in_use_mib" in sp:
        cols.append(
            f"speed duckdb {sp['duckdb_mib']:.0f} heap {sp['heap_in_use_mib']:.0f}+{sp['heap_free_mib']:.0f} free"
        )
    if "wal_mib" in sp:
        cols.append(f"wal {sp['wal_mib']:.0f} known {sp.get('known_ids', 0)}")
    if m.api_heap:
        cols.append(
            f"api heap {m.api_heap.get('in_use', 0):.0f}+{m.api_heap.get('free', 0):.0f} free"
            f" arrow {m.api_heap.get('arrow', 0):.0f} py {m.api_heap.get('py_blocks', 0):.0f}k"
        )
    for n in names:
        s = m.processes.get(n)
        cols.append(f"{n} {s.rss_mib:.0f}/{s.fds}/{s.threads}" if s else f"{n} gone")
    if m.broker_heap:
        h = m.broker_heap
        cols.append(f"jvm heap {h['used']:.0f} (old {h['old_used']:.0f}) of {h['committed']:.0f}")
    for b in m.batch_runs:
        cols.append(f"{job_label(b)} in {b['seconds']} s")
    print(" | ".join(cols), flush=True)


def print_report(result: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    minutes = result["minutes"]
    names = sorted({n for m in minutes for n in m["processes"]})
    table = Table(title=f"soak: {len(minutes)} samples, one a minute", show_lines=False)
    for col in ("min", "p50 ms", "p99 ms", "req", "err", "503", "lag", "held"):
        table.add_column(col, justify="right")
    for n in names:
        table.add_column(f"{n}\nMiB/fds/thr", justify="right")
    for m in minutes:
        api, sp = m["api"], m["speed"]
        row = [
            f"{m['minute']:.1f}",
            f"{api['p50_ms']:.1f}" if api else "-",
            f"{api['p99_ms']:.1f}" if api else "-",
            str(api.get("requests", "-")),
            str(api.get("errors", "-")),
            str(api.get("refused", "-")),
            str(sp.get("lag", "?")),
            str(sp.get("held", "?")),
        ]
        for n in names:
            s = m["processes"].get(n)
            row.append(f"{s['rss_mib']:.0f}/{s['fds']}/{s['threads']}" if s else "-")
        table.add_row(*row)
    console.print(table)
    slopes = Table(title="slope per hour (Theil-Sen, after the warm-up)")
    for col in (
        "process",
        "RSS MiB first→last",
        "RSS MiB/h",
        "limit",
        "fds/h",
        "threads/h",
        "flat",
    ):
        slopes.add_column(col, justify="right")
    for n, s in result["slopes_per_hour"].items():
        slopes.add_row(
            n,
            f"{s.get('rss_mib_first', 0):.0f}→{s.get('rss_mib_last', 0):.0f}",
            f"{s['rss_mib']:+.1f}" if s["rss_mib"] is not None else "-",
            f"{s['rss_limit_mib_per_h']:.0f}",
            f"{s['fds']:+.1f}" if s["fds"] is not None else "-",
            f"{s['threads']:+.1f}" if s["threads"] is not None else "-",
            "yes" if s["flat"] else "NO",
        )
    console.print(slopes)
    every = [m["api"] for m in minutes if m["api"]]
    if every:
        console.print(
            f"API over the soak: {sum(a['requests'] for a in every)} requests, "
            f"{sum(a['errors'] for a in every)} errors, worst minute p99 "
            f"{max(a['p99_ms'] for a in every):.1f} ms"
        )
    runs = [b for m in minutes for b in m["batch_runs"]]
    if runs:
        console.print(
            "batch runs during the soak: "
            + ", ".join(f"{job_label(b)} ({b['seconds']} s)" for b in runs)
        )
    console.print(f"[bold]verdict:[/] {result['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=int, default=30, help="soak length after start-up")
    ap.add_argument("--rate", type=float, default=300.0, help="live events/s (the demo's default)")
    ap.add_argument("--api-rate", type=float, default=20.0, help="API requests/s, open loop")
    ap.add_argument(
        "--batch-every", type=int, default=10, help="minutes between batch runs; 0: none"
    )
    ap.add_argument(
        "--compact-every",
        type=int,
        default=0,
        help="minutes between lake compactions (the maintenance DAG's job); 0: none",
    )
    ap.add_argument("--warmup-minutes", type=float, default=1.0, help="left out of the slopes")
    ap.add_argument("--days", type=int, default=90, help="history for the demo")
    ap.add_argument("--skus", type=int, default=50)
    ap.add_argument("--stores", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds for start-up")
    ap.add_argument("--home", help="the demo's LAMBDALAKE_HOME (default: a new temp dir)")
    ap.add_argument("--json", type=Path, help="write every sample and the verdict here")
    args = ap.parse_args()
    if args.minutes < 1:
        ap.error("--minutes must be at least 1")

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        result = soak(args, stop)
    except RuntimeError as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
