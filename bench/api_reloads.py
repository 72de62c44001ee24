"""Does an API process keep memory from the runs it served? Reload after reload, measured.

Each published batch run makes every API process load the run's views into a new snapshot and
drop the old one. A process up for weeks sees hundreds of runs, so whatever a reload leaves
behind adds up. This bench starts `lambdalake serve` (one process, no speed layer) on a lake
with one published run (`bench/serving.py`'s synthetic views), then ``--reloads`` times
publishes the same views again under a new run id, waits until `/health` reports the new run,
sends ``--queries`` point queries (sales by day, forecasts), and samples the process: RSS,
anonymous RSS, threads and open files. It prints a line every ``--every`` reloads and the
Theil-Sen slope per reload after ``--warmup`` reloads (MiB a reload; flat is about 0).

    PYTHONPATH=. .venv/bin/python bench/api_reloads.py --reloads 80
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import build_lake, stop_process, wait_http  # noqa: E402
from bench.soak import theil_sen  # noqa: E402


def sample(pid: int) -> dict[str, float]:
    """RSS, anonymous RSS (MiB), threads and open files of ``pid``."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon"):
                out[{"VmRSS": "rss_mib", "RssAnon": "anon_mib"}[key]] = int(line.split()[1]) / 1024
    out["threads"] = len(os.listdir(f"/proc/{pid}/task"))
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reloads", type=int, default=80)
    p.add_argument("--queries", type=int, default=100, help="point queries after each reload")
    p.add_argument("--skus", type=int, default=100)
    p.add_argument("--stores", type=int, default=5)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--warmup", type=int, default=10, help="reloads left out of the slope")
    p.add_argument("--every", type=int, default=5, help="print a line every N reloads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import httpx

    from batch.publish import append_run
    from lambdalake.contract.lake import RUNS, Lake
    from lambdalake.contract.manifest import latest_published_run
    from lambdalake.ops.net import free_port

    work = Path(tempfile.mkdtemp(prefix="api-reloads-"))
    lake_dir = work / "lake"
    print(f"[1/3] lake: {args.skus} SKUs x {args.stores} stores x {args.days} days", flush=True)
    data = build_lake(lake_dir, skus=args.skus, stores=args.stores, days=args.days, seed=args.seed)
    lake = Lake(str(lake_dir))
    run = latest_published_run(lake.table(RUNS))
    assert run is not None
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LAMBDALAKE_HOME": str(work / "home"),
        "LAMBDALAKE_LAKE_URI": str(lake_dir),
        "LAMBDALAKE_SPEED_ENDPOINTS": "",
        "LAMBDALAKE_API_KEYS": "",
        "LAMBDALAKE_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "lambdalake.cli", "serve", "--port", str(port)]
    print("[2/3] api: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=work)
    base = f"http://127.0.0.1:{port}"
    samples: list[dict[str, Any]] = []
    try:
        wait_http(base, timeout=120)
        client = httpx.Client(base_url=base, timeout=30)
        skus = data["skus"]

        def queries() -> None:
            for i in range(args.queries):
                sku = skus[i % len(skus)]
                client.get(
                    "/v1/sales", params={"sku": sku, "granularity": "day"}
                ).raise_for_status()
                if i % 5 == 0:
                    client.get(f"/v1/forecast/{sku}").raise_for_status()

        queries()
        samples.append({"reload": 0, "seconds": 0.0, **sample(proc.pid)})
        print(f"[3/3] {args.reloads} reloads, {args.queries} queries after each", flush=True)
        print(f"{'reload':>6} {'RSS MiB':>8} {'anon MiB':>9} {'threads':>8} {'fds':>5} {'s':>6}")
        for k in range(1, args.reloads + 1):
            run_id = f"reload-{k:04d}-{time.time_ns()}"
            append_run(
                lake, dataclasses.replace(run, run_id=run_id, published_at=datetime.now(UTC))
            )
            started = time.monotonic()
            while client.get("/health").json().get("run_id") != run_id:
                if time.monotonic() - started > 120:
                    raise TimeoutError(f"the API did not load run {run_id}")
                time.sleep(0.1)
            seconds = time.monotonic() - started
            queries()
            s = {"reload": k, "seconds": round(seconds, 2), **sample(proc.pid)}
            samples.append(s)
            if k % args.every == 0 or k == args.reloads:
                print(
                    f"{k:>6} {s['rss_mib']:>8.0f} {s['anon_mib']:>9.0f} {s['threads']:>8.0f} "
                    f"{s['fds']:>5.0f} {seconds:>6.1f}",
                    flush=True,
                )
    finally:
        stop_process(proc)
    after = [s for s in samples if s["reload"] >= args.warmup]
    slopes = {
        key: theil_sen([(s["reload"], s[key]) for s in after])
        for key in ("rss_mib", "anon_mib", "threads", "fds")
    }
    rss = [s["rss_mib"] for s in after]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "per_reload_slope": slopes,
        "rss_after_warmup": {"min": min(rss), "max": max(rss)} if rss else {},
        "samples": samples,
    }
    fmt = {k: "n/a" if v is None else f"{v:+.3f}" for k, v in slopes.items()}
    print(
        f"slope per reload from reload {args.warmup} on (Theil-Sen): RSS {fmt['rss_mib']} MiB, "
        f"anon {fmt['anon_mib']} MiB, threads {fmt['threads']}, fds {fmt['fds']}; "
        f"RSS {min(rss):.0f}-{max(rss):.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
