"""The dashboard in headless Chromium against a running system (broker, ingest, Spark batch,
speed worker, API, live events): the charts render with data and a screenshot is kept in
``test-artifacts/dashboard.png``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from kafka import TopicPartition

from batch.ingest import run_ingest
from batch.run import run_batch
from generator.produce import run_history, run_live
from lambdalake.kafka.clients import end_offsets
from lambdalake.ops.broker import free_port
from lambdalake.settings import TOPICS
from serving.app import create_app, running_server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1100",
    "--virtual-time-budget=20000",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)"
)


def _chromium(args: list[str], user_dir: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dashboard_renders_forecast_history_live_actuals_and_sentiment(
    fresh_broker, settings_for, spark, tmp_path, artifacts_dir
) -> None:
    settings = settings_for(fresh_broker)
    fractions = {"late_fraction": 0.01, "duplicate_fraction": 0.01, "bad_fraction": 0.002}
    run_history(
        settings, days=60, skus=6, stores=2, seed=5, end_date=None, processes=1, **fractions
    )
    run_ingest(settings, until_end=True, stop=threading.Event())
    run_id = run_batch(settings, spark)

    # Today's live events, then a speed worker that holds everything above the watermark.
    run_live(
        settings,
        rate=300,
        duration=4,
        skus=6,
        stores=2,
        seed=5,
        stop=threading.Event(),
        **fractions,
    )
    port = free_port()
    log = (tmp_path / "speed.log").open("ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "lambdalake.cli", "speed", "run", "--query-port", str(port),
         "--bootstrap", settings.bootstrap, "--lake", settings.lake_uri],
        env={**os.environ, "LAMBDALAKE_HOME": str(settings.home), "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with running_server(create_app(settings)) as base:
            client = httpx.Client(base_url=base, timeout=10)
            # Wait until the worker has consumed to the true end of every partition.
            tps = [TopicPartition(t, p) for t in TOPICS for p in range(settings.partitions)]
            ends = {
                (tp.topic, tp.partition): n
                for tp, n in end_offsets(settings.bootstrap, tps).items()
            }
            deadline = time.monotonic() + 120
            while True:
                workers = client.get("/v1/status").json()["speed"]["workers"]
                offsets = workers[0].get("offsets", {}) if workers else {}
                if all(int(offsets.get(t, {}).get(str(p), -1)) >= n for (t, p), n in ends.items()):
                    break
                assert worker.poll() is None, (tmp_path / "speed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"speed worker did not catch up: {workers}"
                time.sleep(0.5)
            listing = client.get("/dashboard/api/skus").json()
            assert listing["skus"] and listing["stores"]
            today = datetime.now(UTC).date().isoformat()

            def units_today(sku: str, store: str) -> int:
                params = {"sku": sku, "store_id": store, "start": today, "end": today}
                return sum(
                    p["units"] for p in client.get("/v1/sales", params=params).json()["points"]
                )

            live_units = {
                (k, s): units_today(k, s) for k in listing["skus"] for s in listing["stores"]
            }
            sku, store = max(live_units, key=lambda key: live_units[key])
            assert live_units[sku, store] > 0, (
                "the live events should show up today: " + client.get("/v1/status").text
            )

            url = f"{base}/dashboard?sku={sku}&store={store}"
            dom = _chromium(["--dump-dom", url], tmp_path / "chrome-dom")
            assert dom.returncode == 0, dom.stderr[-2000:]
            match = re.search(r'data-rendered="([^"]*)"', dom.stdout)
            assert match, f"the page never finished a refresh:\n{dom.stdout[:3000]}"
            rendered = json.loads(match.group(1).replace("&quot;", '"'))
            assert "error" not in rendered, rendered.get("error")
            assert rendered["refreshes"] >= 1
            assert rendered["sales"] >= 30, rendered  # daily history points drawn
            # Every day of the history is a point: a day without sales is drawn as zero.
            assert rendered["sales"] == rendered["history_days"], rendered
            assert rendered["forecast"] == 28, rendered  # the batch forecast horizon
            assert rendered["accuracy"] == 1, rendered  # the series' backtest, beside it
            assert "backtest of " in dom.stdout and "MASE " in dom.stdout
            assert rendered["sentiment"] >= 1, rendered  # weekly sentiment trend points
            # Weekly units by category, stacked: the generator's catalog names every SKU.
            assert rendered["breakdown"] and "(none)" not in rendered["breakdown"], rendered
            assert f"run {run_id}" in dom.stdout
            assert f"{live_units[sku, store]} units so far" in dom.stdout
            # One store: the forecast's 80/95 % bands are drawn (quantiles are per series).
            assert "95 %: –" not in dom.stdout

            shot = artifacts_dir / "dashboard.png"
            shot.unlink(missing_ok=True)
            out = _chromium([f"--screenshot={shot}", url], tmp_path / "chrome-shot")
            assert out.returncode == 0, out.stderr[-2000:]
            assert shot.exists() and shot.stat().st_size > 20_000
    finally:
        worker.terminate()
        worker.wait(timeout=20)
