"""API fuzzing from the OpenAPI schema (schemathesis) against the real API over real HTTP.

Set-up: a fresh broker with recent orders and reviews, a lake with one published run
(watermark 0: the speed layer holds every event), one speed worker process caught up,
and the API in per-request mode (``speed_cache_ttl=0``: every question, with its
parameters, goes to the worker — the mode in which a bad request used to reach the
worker and mark it down for everyone) with an API key.

For every operation in ``/openapi.json``, schemathesis generates valid and invalid
requests. Each must get:

* no 5xx;
* for a 4xx, a JSON body with a one-line ``detail`` message;
* for a 200 answer with ``degraded``, ``degraded: false`` (the worker is up the whole
  time: an answer that says otherwise means some request made it look down).

And a reference query answers identically (same points, same ``as_of``, not degraded)
before and after the fuzzing: no request changes another client's answer.
``LAMBDALAKE_FUZZ_EXAMPLES`` sets examples per operation and mode (default 40; four
times that for ``/v1/sales``, twice for the forecast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from kafka import KafkaProducer

from lambdalake.ops.broker import free_port
from serving.app import create_app, running_server
from tests.serving_lake import write_small_run

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "fuzz-test-key-0123456789abcdef"
SKUS = ["SKU-00001", "SKU-00002", "BOX/12"]
STORES = ["S001", "S002"]
EXAMPLES = int(os.environ.get("LAMBDALAKE_FUZZ_EXAMPLES", "40"))
# The operations with the most parameters to combine get more examples.
EXAMPLES_BY_PATH = {"/v1/sales": 4 * EXAMPLES, "/v1/forecast/{sku}": 2 * EXAMPLES}


def produce_recent_events(bootstrap: str, now: datetime) -> dict[str, int]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    counts = {"orders": 0, "reviews": 0}
    for i in range(300):
        sku = SKUS[i % len(SKUS)]
        ts = (now - timedelta(minutes=7 * i)).isoformat()
        if i % 10 == 0:
            topic = "reviews"
            value = {"review_id": f"r{i}", "event_time": ts, "sku": sku, "rating": 1 + i % 5,
                     "text": "great, love it" if i % 20 else "broke after a day"}  # fmt: skip
        else:
            topic = "orders"
            value = {"event_id": f"e{i}", "event_time": ts, "store_id": STORES[i % 2],
                     "sku": sku, "quantity": 1 + i % 3, "unit_price": 9.5}  # fmt: skip
        producer.send(topic, key=sku.encode(), value=json.dumps(value).encode())
        counts[topic] += 1
    producer.flush()
    producer.close()
    return counts


def wait_caught_up(status: Path, counts: dict[str, int], worker: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the speed worker exited"
        try:
            info = json.loads(status.read_text())
            held = info.get("events") or {}
            if all(int(held.get(t, 0)) >= n for t, n in counts.items()):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the speed worker did not catch up: {status.read_text()[-2000:]}")


def reference(client: httpx.Client, today: str) -> dict[str, Any]:
    r = client.get(
        "/v1/sales", params={"sku": "BOX/12", "start": today, "end": today, "granularity": "hour"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is False, body
    assert body["points"], "the reference must include speed data"
    return body


def test_fuzzed_requests_get_no_5xx_clear_4xx_and_change_no_other_answer(
    fresh_broker, settings_for, tmp_path: Path
) -> None:
    settings = settings_for(fresh_broker, api_keys=API_KEY)
    now = datetime.now(UTC)
    counts = produce_recent_events(settings.bootstrap, now)
    write_small_run(Path(settings.lake_uri), skus=SKUS, stores=STORES, today=now.date())

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
        wait_caught_up(settings.speed_state_dir / "status" / "worker-0-of-1.json", counts, worker)
        app = create_app(settings, speed_cache_ttl=0)
        headers = {"X-API-Key": API_KEY}
        with running_server(app) as base, httpx.Client(base_url=base, headers=headers) as client:
            today = now.date().isoformat()
            before = reference(client, today)
            spec = client.get("/openapi.json").json()
            schema = schemathesis.openapi.from_dict(spec)
            failures: list[str] = []
            calls = 0

            def check(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=base, headers=headers, timeout=30)
                where = f"{case.method} {response.request.url} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{where}: {response.text[:300]}")
                    return
                if response.status_code >= 400:
                    try:
                        detail = response.json()["detail"]
                    except (ValueError, KeyError, TypeError):
                        failures.append(f"{where}: not JSON with a detail: {response.text[:300]}")
                        return
                    if not isinstance(detail, str) or not detail or "\n" in detail:
                        failures.append(f"{where}: detail is not one line: {detail!r}")
                    return
                if "json" in response.headers.get("content-type", ""):
                    body = response.json()
                    if isinstance(body, dict) and body.get("degraded"):
                        failures.append(f"{where}: degraded with the worker up: {body}")

            for result in schema.get_all_operations():
                operation = result.ok()
                for mode in schemathesis.GenerationMode:

                    @hypothesis_settings(
                        max_examples=EXAMPLES_BY_PATH.get(operation.path, EXAMPLES),
                        deadline=None,
                        database=None,
                        derandomize=True,
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=operation.as_strategy(generation_mode=mode))
                    def fuzz(case: Any) -> None:
                        check(case)

                    try:
                        fuzz()
                    except Unsatisfiable:  # no parameter to make invalid (e.g. /health)
                        assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
            after = reference(client, today)
        assert calls > 200, calls
        assert not failures, f"{len(failures)} of {calls} fuzzed requests failed:\n" + "\n".join(
            failures[:20]
        )
        assert after == before, "a fuzzed request changed another client's answer"
    finally:
        worker.terminate()
        worker.wait(timeout=20)
