"""Serving benchmark: this API vs. a naive handler that reads Delta and speed state per request.

What it does
    1. Writes a lake with one published run: ``views/daily_sales`` (SKUS x STORES x
       DAYS rows), ``views/hourly_sales`` (the last 30 days), ``views/demand_forecast``
       and ``views/sentiment_by_sku``, in the batch layer's documented shapes.
    2. With ``--speed`` (default): starts an embedded broker, produces recent orders
       and reviews, starts one speed worker (``lambdalake speed run``) and waits until
       it has consumed them, so every answer includes a real speed merge.
    3. For each server — (a) ``serving.app`` and (b) the naive handler below — runs
       it in a subprocess (uvicorn), then
       * closed loop: ``--clients`` concurrent clients, a mixed query load, for
         ``--duration`` seconds: throughput and p50/p99 per query kind;
       * open loop: point queries (one sku, 30 days) at ``--rate`` requests/s for
         ``--duration`` seconds, latency measured from the scheduled send time
         (no coordinated omission): p50/p99.
       * breakdowns (``/v1/sales`` with ``group_by``): units per category per week over a
         quarter, the top 20 SKUs per month over a year, revenue per region per month over
         two years, each open loop at ``--breakdown-rate`` (50/s): p50/p99;
    4. For this API only: SQL (``POST /v1/sql``: a point lookup, a category x week
       aggregate over a quarter, a top 20 over a year) at ``--sql-rate`` (20/s) each,
       beside the same three questions through the endpoints at the same rate.
    5. Prints a table and one JSON line with every figure.

The load generator (``bench/loadgen.py``: asyncio streams, keep-alive HTTP/1.1, a
few tens of microseconds of CPU per request) runs on the same machine: on a small
box it still competes with the server for CPU, so the figures are a floor.

    .venv/bin/python bench/serving.py --skus 20 --stores 3 --days 90 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loadgen  # noqa: E402  (bench/loadgen.py: the script's own directory is on sys.path)

CATEGORIES = ["Kitchen", "Garden", "Toys", "Books", "Sports", "Beauty", "Office", "Pets"]
REGIONS = ["North", "South", "West"]
# Breakdowns (issue: the analyst's questions in one call), each at --breakdown-rate.
BREAKDOWNS = ("category_week_quarter", "top20_sku_month_year", "region_month_2y")
# Each breakdown's range (days back from today) and parameters.
BREAKDOWN_PARAMS = {
    "category_week_quarter": (91, {"granularity": "week", "group_by": "category"}),
    "top20_sku_month_year": (
        364,
        {"granularity": "month", "group_by": "sku", "order": "revenue_desc", "limit": 20},
    ),
    "region_month_2y": (730, {"granularity": "month", "group_by": "region"}),
}
# SQL and the same questions through the endpoints, each at --sql-rate.
SQL_KINDS = ("sql_point", "sql_category_week_quarter", "sql_top20_year")
# (top 20 through the endpoints ranks per month: the closest one call answers)
SQL_ENDPOINT_KINDS = ("sales_point", "category_week_quarter", "top20_sku_month_year")

MIX = [  # (kind, weight)
    ("sales_point", 60),
    ("sales_hour_all", 10),
    ("sentiment", 10),
    ("forecast", 10),
    ("ranking", 5),
    ("alerts", 5),
]


# --- the lake --------------------------------------------------------------------------------


def build_lake(root: Path, *, skus: int, stores: int, days: int, seed: int) -> dict[str, Any]:
    """One published run over synthetic views (documented shapes); watermark 0 everywhere."""
    import numpy as np
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from lambdalake.contract.events import TOPICS
    from lambdalake.contract.lake import (
        RUNS,
        VIEW_DAILY_SALES,
        VIEW_DEMAND_FORECAST,
        VIEW_HOURLY_SALES,
        VIEW_MONTHLY_SALES,
        VIEW_SENTIMENT_BY_SKU,
        VIEW_WEEKLY_SALES,
    )
    from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord
    from lambdalake.contract.views import PRODUCTS
    from lambdalake.contract.views import STORES as STORES_VIEW

    rng = np.random.default_rng(seed)
    run_id = "bench-run"
    today = datetime.now(UTC).date()
    sku_ids = [f"SKU-{i:04d}" for i in range(skus)]
    store_ids = [f"S{i:02d}" for i in range(stores)]

    dates = [today - timedelta(days=d) for d in range(days)]
    n = len(dates) * skus * stores
    units = rng.poisson(20, n).astype("int64")
    daily = pa.table(
        {
            "date": pa.array(np.repeat(dates, skus * stores), pa.date32()),
            "store_id": np.tile(np.repeat(store_ids, skus), len(dates)),
            "sku": np.tile(sku_ids, len(dates) * stores),
            "units": units,
            "revenue": units * rng.uniform(1, 100, n),
            "order_lines": (units * 0.8).astype("int64"),
            "run_id": [run_id] * n,
        }
    )
    write_deltalake(str(root / VIEW_DAILY_SALES), daily)

    hours = [
        datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(hours=h)
        for h in range(min(days, 30) * 24)
    ]
    nh = len(hours) * skus * stores
    hunits = rng.poisson(2, nh).astype("int64")
    hourly = pa.table(
        {
            "hour": pa.array(np.repeat(hours, skus * stores), pa.timestamp("us", tz="UTC")),
            "store_id": np.tile(np.repeat(store_ids, skus), len(hours)),
            "sku": np.tile(sku_ids, len(hours) * stores),
            "units": hunits,
            "revenue": hunits * 10.0,
            "order_lines": hunits,
            "run_id": [run_id] * nh,
        }
    )
    write_deltalake(str(root / VIEW_HOURLY_SALES), hourly)

    fdates = [today + timedelta(days=d) for d in range(-14, 28)]
    rows = []
    for s in sku_ids:
        for st in store_ids:
            for d in fdates:
                f = float(rng.uniform(5, 40))
                rows.append(
                    {
                        "sku": s,
                        "store_id": st,
                        "date": d,
                        "forecast": f,
                        "lower_80": f * 0.7,
                        "upper_80": f * 1.3,
                        "lower_95": f * 0.5,
                        "upper_95": f * 1.5,
                        "model": "AutoETS",
                        "run_id": run_id,
                    }
                )
    write_deltalake(str(root / VIEW_DEMAND_FORECAST), pa.Table.from_pylist(rows))
    sent = []
    for s in sku_ids:
        k = int(rng.integers(1, 500))
        pos = int(rng.integers(0, k + 1))
        neg = int(rng.integers(0, k - pos + 1))
        sent.append(
            {
                "sku": s,
                "reviews": k,
                "mean_rating": 3.0,
                "mean_sentiment": 0.1,
                "positive": pos,
                "neutral": k - pos - neg,
                "negative": neg,
                "rating_sum": 3.0 * k,
                "sentiment_sum": float(rng.uniform(-k, k)),
                "run_id": run_id,
            }
        )
    write_deltalake(str(root / VIEW_SENTIMENT_BY_SKU), pa.Table.from_pylist(sent))

    # Weekly and monthly sales: the daily rows rolled up, as the batch layer writes them.
    import pyarrow.compute as pc

    for table, column, unit in (
        (VIEW_WEEKLY_SALES, "week", "week"),
        (VIEW_MONTHLY_SALES, "month", "month"),
    ):
        start = pc.floor_temporal(daily["date"], unit=unit, week_starts_monday=True)
        rolled = (
            daily.append_column(column, start.cast(pa.date32()))
            .group_by([column, "store_id", "sku"], use_threads=False)
            .aggregate([("units", "sum"), ("revenue", "sum"), ("order_lines", "sum")])
            .rename_columns([column, "store_id", "sku", "units", "revenue", "order_lines"])
        )
        write_deltalake(
            str(root / table), rolled.append_column("run_id", pa.array([run_id] * rolled.num_rows))
        )
    # The catalog: CATEGORIES categories, REGIONS regions (the speed layer re-categorises some).
    for view, ids, attr, values in (
        (PRODUCTS, sku_ids, "category", CATEGORIES),
        (STORES_VIEW, store_ids, "region", REGIONS),
    ):
        rows = [
            {
                view.dimensions[0]: i,
                "messages": 1,
                "version": k * 4096,
                attr: values[k % len(values)],
                "run_id": run_id,
            }
            for k, i in enumerate(ids)
        ]
        schema = view.arrow_schema(None, extra=[("run_id", "string")])
        write_deltalake(str(root / view.tables[None]), pa.Table.from_pylist(rows, schema=schema))

    views = {
        v: int(DeltaTable(str(root / v)).version())
        for v in (
            VIEW_DAILY_SALES,
            VIEW_HOURLY_SALES,
            VIEW_WEEKLY_SALES,
            VIEW_MONTHLY_SALES,
            VIEW_DEMAND_FORECAST,
            VIEW_SENTIMENT_BY_SKU,
            PRODUCTS.tables[None],
            STORES_VIEW.tables[None],
        )
    }
    now = datetime.now(UTC)
    rec = RunRecord(
        run_id=run_id,
        status="published",
        started_at=now,
        published_at=now,
        watermark={t: {p: 0 for p in range(4)} for t in TOPICS},
        view_versions=views,
    )
    write_deltalake(str(root / RUNS), pa.Table.from_pylist([rec.to_row()], schema=RUNS_SCHEMA))
    return {"skus": sku_ids, "stores": store_ids, "today": today, "daily_rows": n}


# --- the naive handler (b) -------------------------------------------------------------------


def naive_app(settings: Any) -> Any:
    """Same endpoints and answers, but every request reads the runs table, the pinned Delta
    views and the speed workers: nothing is cached."""
    import duckdb
    import pyarrow.dataset as ds
    from deltalake import DeltaTable
    from fastapi import FastAPI

    from lambdalake.contract.lake import (
        RUNS,
        VIEW_DAILY_SALES,
        VIEW_DEMAND_FORECAST,
        VIEW_HOURLY_SALES,
        VIEW_SENTIMENT_BY_SKU,
        Lake,
    )
    from lambdalake.contract.manifest import latest_published_run
    from lambdalake.contract.views import PRODUCTS, SALES, SENTIMENT, STORES
    from serving.speed_client import SpeedClient, SpeedFilter

    lake = Lake(settings.lake_uri)
    speed = SpeedClient(settings)
    app = FastAPI()

    def view(name: str, run: Any, flt: Any = None) -> Any:
        dt = DeltaTable(lake.table(name), version=run.view_versions[name])
        return dt.to_pyarrow_dataset().to_table(filter=flt)

    def merge(rows: list[dict], keys: list[str], vd: Any) -> dict:
        acc: dict = {}
        for r in rows:
            k = tuple(str(r[c]) for c in keys)
            acc[k] = vd.combine_rows(acc.get(k, {m.name: None for m in vd.measures}), r)
        return acc

    def records(run: Any, vd: Any) -> dict[str, dict]:
        """A reference view's records: the run's Delta table and the speed layer's rows."""
        rows = view(vd.tables[None], run).to_pylist()
        res = speed.query(
            vd, SpeedFilter(granularity=None, dimensions=vd.dimensions), run.watermark
        )
        key = vd.dimensions[0]
        return {k[0]: v for k, v in merge(rows + res.rows, [key], vd).items()}

    def breakdown(
        run: Any,
        granularity: str,
        group: list[str],
        first: date,
        last: date,
        order: str,
        limit: int,
    ) -> dict:
        """Daily rows read per request, with the speed rows, rolled up and grouped in Python."""
        t = view(VIEW_DAILY_SALES, run, (ds.field("date") >= first) & (ds.field("date") <= last))
        res = speed.query(
            SALES,
            SpeedFilter(
                granularity="day",
                dimensions=("store_id", "sku"),
                first=datetime(first.year, first.month, first.day, tzinfo=UTC),
                last=datetime(last.year, last.month, last.day, 23, tzinfo=UTC),
            ),
            run.watermark,
        )
        rows = [{**r, "period": r.pop("date")} for r in t.to_pylist()] + res.rows
        refs = {}
        if "category" in group:
            refs["category"] = records(run, PRODUCTS)
        if "region" in group:
            refs["region"] = records(run, STORES)
        out: dict = {}
        for r in rows:
            d = r["period"]
            d = d if isinstance(d, date) else date.fromisoformat(str(d)[:10])
            p = d - timedelta(days=d.weekday()) if granularity == "week" else d.replace(day=1)
            values = {
                "category": (refs.get("category", {}).get(r["sku"]) or {}).get("category"),
                "region": (refs.get("region", {}).get(r["store_id"]) or {}).get("region"),
                "sku": r["sku"],
                "store_id": r["store_id"],
            }
            k = (p.isoformat(), *(values[g] for g in group))
            out[k] = SALES.combine_rows(out.get(k, {m.name: None for m in SALES.measures}), r)
        items = sorted(out.items(), key=lambda kv: str(kv[0]))
        if order != "period":
            measure = "units" if order == "units_desc" else "revenue"
            by_period: dict = {}
            for k, v in items:
                by_period.setdefault(k[0], []).append((k, v))
            items = [
                kv
                for per in by_period.values()
                for kv in sorted(per, key=lambda kv: -(kv[1][measure] or 0))[:limit]
            ]
        points = [{"period": k[0], **dict(zip(group, k[1:], strict=True)), **v} for k, v in items]
        return {"points": points, "as_of": {"run_id": run.run_id}}

    @app.get("/v1/sales")
    def sales(
        sku: str | None = None,
        store_id: str | None = None,
        start: str | None = None,
        end: str | None = None,
        granularity: str = "day",
        group_by: str | None = None,
        order: str = "period",
        limit: int = 1000,
    ) -> dict:
        run = latest_published_run(lake.table(RUNS))
        if group_by or granularity in ("week", "month"):
            last = date.fromisoformat(end[:10]) if end else datetime.now(UTC).date()
            first = date.fromisoformat(start[:10]) if start else last - timedelta(days=180)
            group = [g for g in (group_by or "").split(",") if g]
            return breakdown(run, granularity, group, first, last, order, limit)
        last = date.fromisoformat(end[:10]) if end else datetime.now(UTC).date()
        first = date.fromisoformat(start[:10]) if start else last - timedelta(days=29)
        col = "date" if granularity == "day" else "hour"
        name = VIEW_DAILY_SALES if granularity == "day" else VIEW_HOURLY_SALES
        flt = ds.field("sku") == sku if sku else None
        t = view(name, run, flt)
        con = duckdb.connect()
        con.execute("SET TimeZone='UTC'")
        con.register("t", t)
        where = f"CAST({col} AS DATE) BETWEEN ? AND ?"
        params: list[Any] = [first, last]
        if store_id:
            where += " AND store_id = ?"
            params.append(store_id)
        sql = SALES.merge_sql(f"(SELECT {col} AS period, * FROM t)", keys=["period"], where=where)
        rows = [
            dict(zip(["period", "units", "revenue", "order_lines"], r, strict=True))
            for r in con.execute(sql, params).fetchall()
        ]
        res = speed.query(
            SALES,
            SpeedFilter(
                granularity=granularity,
                sku=sku,
                store_id=store_id,
                first=datetime(first.year, first.month, first.day, tzinfo=UTC),
                last=datetime(last.year, last.month, last.day, 23, tzinfo=UTC),
            ),
            run.watermark,
        )
        acc = merge(rows + res.rows, ["period"], SALES)
        return {
            "points": [{"period": k[0], **v} for k, v in sorted(acc.items())],
            "as_of": {"run_id": run.run_id},
        }

    @app.get("/v1/sentiment/{sku}")
    def sentiment(sku: str) -> dict:
        run = latest_published_run(lake.table(RUNS))
        rows = view(VIEW_SENTIMENT_BY_SKU, run, ds.field("sku") == sku).to_pylist()
        res = speed.query(SENTIMENT, SpeedFilter(granularity=None, sku=sku), run.watermark)
        acc = merge(rows + res.rows, ["sku"], SENTIMENT).get((sku,), {})
        return {"sku": sku, **{d.name: d.compute(acc) for d in SENTIMENT.derived}, **acc}

    @app.get("/v1/forecast/{sku}")
    def forecast(sku: str, store_id: str | None = None) -> dict:
        run = latest_published_run(lake.table(RUNS))
        flt = ds.field("sku") == sku
        if store_id:
            flt = flt & (ds.field("store_id") == store_id)
        pts = view(VIEW_DEMAND_FORECAST, run, flt).to_pylist()
        today = datetime.now(UTC).date()
        actual = sales(
            sku=sku, store_id=store_id, start=str(today - timedelta(days=13)), end=str(today)
        )
        return {"sku": sku, "points": pts, "actuals": actual["points"]}

    @app.get("/v1/sentiment")
    def ranking(order: str = "worst", limit: int = 10) -> dict:
        run = latest_published_run(lake.table(RUNS))
        rows = view(VIEW_SENTIMENT_BY_SKU, run).to_pylist()
        res = speed.query(SENTIMENT, SpeedFilter(granularity=None), run.watermark)
        acc = merge(rows + res.rows, ["sku"], SENTIMENT)
        items = [
            {"sku": k[0], "mean_sentiment": SENTIMENT.derived[1].compute(v)} for k, v in acc.items()
        ]
        items.sort(key=lambda i: i["mean_sentiment"] or 0, reverse=order == "best")
        return {"items": items[:limit]}

    @app.get("/v1/alerts/demand")
    def alerts() -> dict:
        run = latest_published_run(lake.table(RUNS))
        today = datetime.now(UTC).date()
        fc = view(VIEW_DEMAND_FORECAST, run, ds.field("date") == today).to_pylist()
        t = view(VIEW_DAILY_SALES, run, ds.field("date") == today).to_pylist()
        res = speed.query(
            SALES,
            SpeedFilter(
                granularity="day",
                dimensions=("sku", "store_id"),  # merged per series, like the batch rows
                first=datetime(today.year, today.month, today.day, tzinfo=UTC),
                last=datetime(today.year, today.month, today.day, tzinfo=UTC),
            ),
            run.watermark,
        )
        acc = merge(t + res.rows, ["sku", "store_id"], SALES)
        items = [
            f
            for f in fc
            if (acc.get((f["sku"], f["store_id"])) or {}).get("units", 0) > f["upper_95"]
        ]
        return {"items": items}

    return app


def run_server(kind: str, lake: str, home: str, port: int, endpoints: str) -> None:
    import uvicorn

    from lambdalake.settings import Settings
    from serving.admission import StampingHttpToolsProtocol
    from serving.app import SERVING_LOOP, configure_loop, create_app

    settings = Settings(_env_file=None, lake_uri=lake, home=Path(home), speed_endpoints=endpoints)
    if kind == "fast":
        from lambdalake.memory import long_lived

        long_lived()  # what `lambdalake serve` does first (lambdalake/memory.py)
        configure_loop(settings)
    app = create_app(settings) if kind == "fast" else naive_app(settings)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http=StampingHttpToolsProtocol,  # what `lambdalake serve` runs: arrival times for admission
        loop=SERVING_LOOP,
    )


# --- the load ----------------------------------------------------------------------------------


def request_for(kind: str, rng: random.Random, data: dict[str, Any]) -> tuple[str, dict]:
    sku = rng.choice(data["skus"])
    store = rng.choice(data["stores"])
    today: date = data["today"]
    if kind == "sales_point":
        return "/v1/sales", {
            "sku": sku,
            "start": str(today - timedelta(days=29)),
            "end": str(today),
        }
    if kind == "sales_hour_all":
        return "/v1/sales", {
            "granularity": "hour",
            "start": str(today - timedelta(days=1)),
            "end": str(today),
        }
    if kind == "sentiment":
        return f"/v1/sentiment/{sku}", {}
    if kind == "forecast":
        return f"/v1/forecast/{sku}", {"store_id": store}
    if kind == "ranking":
        return "/v1/sentiment", {"order": rng.choice(["worst", "best"]), "limit": 10}
    if kind in BREAKDOWN_PARAMS:
        days, params = BREAKDOWN_PARAMS[kind]
        return "/v1/sales", {
            **params,
            "start": str(today - timedelta(days=days)),
            "end": str(today),
        }
    if kind == "sql_point":
        sql = (
            f"SELECT period, units, revenue FROM sales_daily WHERE sku = '{sku}' "
            f"AND store_id = '{store}' AND period > current_date - INTERVAL 30 DAY"
        )
        return "/v1/sql", {loadgen.JSON_BODY: {"sql": sql}}
    if kind == "sql_category_week_quarter":
        sql = (
            "SELECT p.category, date_trunc('week', s.period) AS week, sum(s.units) AS units "
            "FROM sales_daily s JOIN products p USING (sku) "
            "WHERE s.period >= current_date - INTERVAL 91 DAY GROUP BY ALL"
        )
        return "/v1/sql", {loadgen.JSON_BODY: {"sql": sql}}
    if kind == "sql_top20_year":
        sql = (
            "SELECT sku, sum(revenue) AS revenue FROM sales_daily "
            "WHERE period > current_date - INTERVAL 365 DAY GROUP BY sku "
            "ORDER BY revenue DESC LIMIT 20"
        )
        return "/v1/sql", {loadgen.JSON_BODY: {"sql": sql}}
    return "/v1/alerts/demand", {}


def request_stream(data: dict[str, Any], seed: int, kind: str | None = None) -> Any:
    """``next_request(i)`` for :mod:`bench.loadgen`: the mix (or one ``kind``), per client."""
    kinds = [k for k, w in MIX for _ in range(w)]
    rngs: dict[int, random.Random] = {}

    def next_request(i: int) -> tuple[str, str, dict]:
        rng = rngs.setdefault(i if kind is None else 0, random.Random(seed + i))
        k = kind or rng.choice(kinds)
        path, params = request_for(k, rng, data)
        return k, path, params

    return next_request


def open_loops(
    base: str, data: dict[str, Any], seed: int, kinds: tuple[str, ...], rate: float, duration: float
) -> dict[str, dict]:
    """An open loop of each kind in turn, at ``rate`` for ``duration`` s: kind -> figures."""
    return {
        k: asyncio.run(loadgen.open_loop(base, request_stream(data, seed, kind=k), rate, duration))
        for k in kinds
    }


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s (an overloaded server may still be working
    through requests its clients gave up on)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/sentiment", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


# --- the speed layer for the benchmark -----------------------------------------------------------


def start_speed(
    work: Path, lake: Path, data: dict, events: int, seed: int
) -> tuple[Any, subprocess.Popen, str]:
    """Embedded broker + recent events + one speed worker (caught up). Returns them."""
    from kafka import KafkaProducer

    from lambdalake.ops.broker import EmbeddedBroker, free_port

    broker = EmbeddedBroker.start(port=0, partitions=4, log_dir=work / "broker")
    rng = random.Random(seed)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
    now = datetime.now(UTC)
    for i in range(events):
        sku = rng.choice(data["skus"])
        ts = now - timedelta(seconds=rng.uniform(0, 36 * 3600))
        if i % 10 == 0:
            value = {
                "review_id": f"r{i}",
                "event_time": ts.isoformat(),
                "sku": sku,
                "rating": rng.randint(1, 5),
                "text": rng.choice(["great, love it", "bad, broke", "ok"]),
            }
            topic = "reviews"
        else:
            value = {
                "event_id": f"e{i}",
                "event_time": ts.isoformat(),
                "store_id": rng.choice(data["stores"]),
                "sku": sku,
                "quantity": rng.randint(1, 3),
                "unit_price": round(rng.uniform(1, 100), 2),
            }
            topic = "orders"
        producer.send(topic, key=sku.encode(), value=json.dumps(value).encode())
    # The catalog through the speed layer too: a record per SKU and store, then a fifth of
    # the SKUs re-categorised (the answers join the merged records).
    for k, sku in enumerate(data["skus"]):
        for version in range(1 + (k % 5 == 0)):
            category = CATEGORIES[(k + version) % len(CATEGORIES)]
            value = {"sku": sku, "category": category, "name": f"{sku} name"}
            producer.send("products", key=sku.encode(), value=json.dumps(value).encode())
    for k, store in enumerate(data["stores"]):
        value = {"store_id": store, "region": REGIONS[k % len(REGIONS)]}
        producer.send("stores", key=store.encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()
    port = free_port()
    home = work / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LAMBDALAKE_HOME": str(home),
        "LAMBDALAKE_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lambdalake.cli",
            "speed",
            "run",
            "--query-port",
            str(port),
            "--bootstrap",
            broker.bootstrap,
            "--lake",
            str(lake),
        ],
        env=env,
        cwd=work,
    )
    status = home / "speed" / "status" / "worker-0-of-1.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the speed worker exited")
        try:
            info = json.loads(status.read_text())
            held = sum((info.get("events") or {}).values())
            lag = sum(int(n) for ps in (info.get("lag") or {}).values() for n in ps.values())
            if held >= events + len(data["skus"]) + len(data["stores"]) and lag == 0:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    else:
        raise TimeoutError("the speed worker did not catch up")
    return broker, proc, f"grpc://127.0.0.1:{port}"


# --- overload -----------------------------------------------------------------------------------

P99_TARGET_MS = 50.0  # admitted requests, at any offered load
REFUSE_TARGET_MS = 10.0  # a refused request's answer


def refusal_buckets(base: str) -> dict[Any, float]:
    """The API's histogram of refusal waits (server's clock), cumulative counts by bucket,
    and its refusals by reason (keys ``"reason:<reason>"``)."""
    import httpx

    out: dict[Any, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("lambdalake_api_refusal_wait_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("lambdalake_api_refused_requests_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[f"reason:{reason}"] = float(line.rsplit(" ", 1)[1])
    return out


def server_refusals(before: dict[Any, float], after: dict[Any, float]) -> dict[str, Any]:
    """Refusals of one step by the server's clock: share within 10 ms, the bucket that
    holds the median and the 99th percentile (an upper bound), and the count by reason."""
    reasons = {
        k.split(":", 1)[1]: int(v - before.get(k, 0.0))
        for k, v in after.items()
        if isinstance(k, str) and v - before.get(k, 0.0)
    }
    delta = {
        le: after.get(le, 0.0) - before.get(le, 0.0)
        for le in sorted(k for k in after if not isinstance(k, str))
    }
    n = delta.get(float("inf"), 0.0)
    if not n:
        return {"n": 0}

    def bound(q: float) -> float:
        return next(le for le, c in delta.items() if c >= q * n)

    return {
        "n": int(n),
        "within_10ms": round(delta.get(0.01, 0.0) / n, 3),
        "p50_le_ms": bound(0.5) * 1000,
        "p99_le_ms": bound(0.99) * 1000,
        "by_reason": reasons,
    }


def sustains(run: dict) -> bool:
    """Every request answered 200 (nothing shed, no error) with p99 under the target."""
    return run["errors"] == 0 and run["p99_ms"] < P99_TARGET_MS


def recovery_seconds(record: list[tuple[float, float, int]], window: float = 0.5) -> float | None:
    """Seconds from the drop in load until every later ``window`` is clean (no refusal or
    error, p99 under the target); ``None`` if it never gets there."""
    if not record:
        return None
    end = max(at for at, _, _ in record)
    clean_from: float | None = None
    t = 0.0
    while t <= end:
        rows = [(lat, st) for at, lat, st in record if t <= at < t + window]
        ok = bool(rows) and all(st == 200 for _, st in rows)
        ok = ok and loadgen.percentile([lat for lat, _ in rows], 0.99) * 1000 < P99_TARGET_MS
        if ok and clean_from is None:
            clean_from = t
        elif not ok:
            clean_from = None
        t += window
    return clean_from


def overload_step(
    base: str,
    data: dict,
    seed: int,
    ramp: list[float],
    duration: float,
    given: float | None = None,
) -> dict:
    """Find the highest point-query rate served cleanly (ramp; or take ``given``), offer 2x
    and 4x of it, then drop to half of it and time the recovery."""
    point = request_stream(data, seed, kind="sales_point")
    steps = []
    sustained = given or 0.0
    for rate in [] if given else ramp:
        run = asyncio.run(loadgen.open_loop(base, point, rate, duration))
        steps.append({k: run[k] for k in ("target_rps", "achieved_rps", "p99_ms", "errors")})
        print(f"    ramp {rate:>6.0f} req/s: p99 {run['p99_ms']} ms, errors {run['errors']}")
        if not sustains(run):
            break
        sustained = rate
    out: dict[str, Any] = {"ramp": steps, "sustained_rps": sustained, "given": bool(given)}
    if not sustained:
        return out
    for factor in (2, 4):
        before = refusal_buckets(base)
        run = asyncio.run(loadgen.open_loop(base, point, factor * sustained, duration))
        run["server_refusals"] = server_refusals(before, refusal_buckets(base))
        out[f"x{factor}"] = run
        print(
            f"    {factor}x = {factor * sustained:.0f} req/s: admitted {run['achieved_rps']} req/s "
            f"p99 {run['p99_ms']} ms; refused {run['refused']} (p50 {run['refused_p50_ms']}, "
            f"p99 {run['refused_p99_ms']} ms; this client's own lag p99 {run['client_lag_p99_ms']} ms; "
            f"by the server's clock {run['server_refusals']}); "
            f"other errors {run['errors'] - run['refused']}; "
            f"max open connections {run['max_open_connections']}"
        )
    record: list[tuple[float, float, int]] = []
    calm = asyncio.run(
        loadgen.open_loop(base, point, sustained / 2, max(duration, 4.0), record=record)
    )
    out["recovery"] = {**calm, "recovered_after_s": recovery_seconds(record)}
    print(
        f"    back to {sustained / 2:.0f} req/s: clean after "
        f"{out['recovery']['recovered_after_s']} s, p99 {calm['p99_ms']} ms"
    )
    return out


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    srv = sub.add_parser("server", help="(internal) run one server")
    srv.add_argument("--kind", choices=["fast", "naive"], required=True)
    srv.add_argument("--lake", required=True)
    srv.add_argument("--home", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--endpoints", default="")
    ap.add_argument("--skus", type=int, default=100)
    ap.add_argument("--stores", type=int, default=5)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--speed-events", type=int, default=5000)
    ap.add_argument("--no-speed", action="store_true", help="batch views only (no broker)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--only", choices=["fast", "naive"], help="benchmark one server only")
    ap.add_argument(
        "--ramp",
        default="200,400,800,1200,1600",
        help="point-query rates (req/s) tried to find the highest served cleanly (fast only)",
    )
    ap.add_argument(
        "--overload-base",
        type=float,
        help="skip the ramp and take this rate (req/s) as the highest clean one: 2x and 4x "
        "of it are offered (to compare builds at the same rates on a machine whose capacity "
        "moves between runs)",
    )
    ap.add_argument("--step-duration", type=float, default=4.0, help="seconds per overload step")
    ap.add_argument("--no-overload", action="store_true", help="skip the overload step")
    ap.add_argument("--breakdown-rate", type=float, default=50.0, help="req/s per breakdown kind")
    ap.add_argument("--sql-rate", type=float, default=20.0, help="req/s per SQL question")
    ap.add_argument("--no-breakdowns", action="store_true", help="skip breakdowns and SQL")
    args = ap.parse_args()
    if args.cmd == "server":
        run_server(args.kind, args.lake, args.home, args.port, args.endpoints)
        return

    from lambdalake.ops.broker import free_port

    work = Path(tempfile.mkdtemp(prefix="lambdalake-bench-"))
    lake = work / "lake"
    print(f"[1/3] lake: {args.skus} skus x {args.stores} stores x {args.days} days", flush=True)
    data = build_lake(lake, skus=args.skus, stores=args.stores, days=args.days, seed=args.seed)
    broker = speed_proc = None
    endpoints = ""
    if not args.no_speed:
        print(f"[2/3] speed: broker + {args.speed_events} events + one worker", flush=True)
        broker, speed_proc, endpoints = start_speed(work, lake, data, args.speed_events, args.seed)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("cmd",)},
        "daily_rows": data["daily_rows"],
    }
    try:
        for kind in ["fast", "naive"] if args.only is None else [args.only]:
            port = free_port()
            print(f"[3/3] {kind}: closed loop then open loop", flush=True)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "server",
                    "--kind",
                    kind,
                    "--lake",
                    str(lake),
                    "--home",
                    str(work / "home"),
                    "--port",
                    str(port),
                    "--endpoints",
                    endpoints,
                ],
                # Arrow on malloc, as `lambdalake serve` runs (lambdalake/memory.py).
                env={
                    "ARROW_DEFAULT_MEMORY_POOL": "system",
                    **os.environ,
                    "LAMBDALAKE_LOG_LEVEL": "WARNING",
                },
            )
            try:
                base = f"http://127.0.0.1:{port}"
                wait_http(base)
                mix = request_stream(data, args.seed)
                asyncio.run(loadgen.closed_loop(base, mix, 10, 1.0))  # warm-up
                before = refusal_buckets(base) if kind == "fast" else {}
                closed = asyncio.run(loadgen.closed_loop(base, mix, args.clients, args.duration))
                if kind == "fast":
                    closed["server_refusals"] = server_refusals(before, refusal_buckets(base))
                point = request_stream(data, args.seed, kind="sales_point")
                opened = asyncio.run(loadgen.open_loop(base, point, args.rate, args.duration))
                results[kind] = {"closed_loop": closed, "open_loop_point": opened}
                if not args.no_breakdowns:
                    print(f"[3/3] {kind}: breakdowns at {args.breakdown_rate:g}/s each", flush=True)
                    results[kind]["breakdowns"] = open_loops(
                        base, data, args.seed, BREAKDOWNS, args.breakdown_rate, args.duration
                    )
                if kind == "fast" and not args.no_breakdowns:
                    print(
                        f"[3/3] fast: SQL and the same questions at {args.sql_rate:g}/s", flush=True
                    )
                    for key, kinds in (("sql", SQL_KINDS), ("sql_endpoints", SQL_ENDPOINT_KINDS)):
                        results[kind][key] = open_loops(
                            base, data, args.seed, kinds, args.sql_rate, args.duration
                        )
                if kind == "fast" and not args.no_overload:
                    print("[3/3] fast: overload (ramp, 2x, 4x, recovery)", flush=True)
                    ramp = [float(r) for r in args.ramp.split(",")]
                    results[kind]["overload"] = overload_step(
                        base, data, args.seed, ramp, args.step_duration, args.overload_base
                    )
            finally:
                stop_process(proc)
    finally:
        if speed_proc is not None:
            speed_proc.send_signal(signal.SIGTERM)
            speed_proc.wait(timeout=30)
        if broker is not None:
            broker.stop()
    print()
    header = (
        f"{'server':<7} {'mixed rps':>10} {'p50 ms':>8} {'p99 ms':>8} {'refused':>8}   "
        "point@rate p50/p99 ms"
    )
    print(header)
    for kind in ("fast", "naive"):
        if kind not in results:
            continue
        c, o = results[kind]["closed_loop"], results[kind]["open_loop_point"]
        print(
            f"{kind:<7} {c['throughput_rps']:>10} {c['p50_ms']:>8} {c['p99_ms']:>8} "
            f"{c['error_kinds'].get('HTTP 503', 0):>8}   "
            f"{o['achieved_rps']}/{o['target_rps']} rps: {o['p50_ms']} / {o['p99_ms']}"
        )
    if any("breakdowns" in results.get(k, {}) for k in ("fast", "naive")):
        print(f"\nbreakdowns at {args.breakdown_rate:g} req/s each: p50 / p99 ms (errors)")
        for b in BREAKDOWNS:
            cells = []
            for kind in ("fast", "naive"):
                r = results.get(kind, {}).get("breakdowns", {}).get(b)
                if r:
                    cells.append(f"{kind} {r['p50_ms']} / {r['p99_ms']} ({r['errors']})")
            print(f"  {b:<24} " + "   ".join(cells))
    if "sql" in results.get("fast", {}):
        print(f"\nSQL beside the endpoints at {args.sql_rate:g} req/s each: p50 / p99 ms (errors)")
        for k_sql, k_ep in zip(SQL_KINDS, SQL_ENDPOINT_KINDS, strict=True):
            a = results["fast"]["sql"][k_sql]
            b = results["fast"]["sql_endpoints"][k_ep]
            print(
                f"  {k_sql:<26} {a['p50_ms']} / {a['p99_ms']} ({a['errors']})   "
                f"{k_ep}: {b['p50_ms']} / {b['p99_ms']} ({b['errors']})"
            )
    over = results.get("fast", {}).get("overload")
    if over and over.get("sustained_rps"):
        base_rate = "given base rate" if over.get("given") else "highest clean rate"
        print(f"\noverload (point queries; {base_rate} {over['sustained_rps']:.0f} req/s)")
        print(
            f"{'offered':>8} {'admitted/s':>10} {'p99 ms':>8} {'refused':>8} {'ref p50':>8} "
            f"{'ref p99':>8} {'conns':>6} {'client lag p99':>14} {'server: <=10 ms':>15}"
        )
        for key in ("x2", "x4"):
            r = over[key]
            print(
                f"{r['target_rps']:>8.0f} {r['achieved_rps']:>10} {r['p99_ms']:>8} "
                f"{r['refused']:>8} {r['refused_p50_ms']:>8} {r['refused_p99_ms']:>8} "
                f"{r['max_open_connections']:>6} {r['client_lag_p99_ms']:>14} "
                f"{r['server_refusals'].get('within_10ms', '-'):>15}"
            )
        print(f"recovery at half the clean rate: {over['recovery']['recovered_after_s']} s")
        steps = [
            ("closed loop", results["fast"]["closed_loop"]),
            ("2x", over["x2"]),
            ("4x", over["x4"]),
        ]
        print(
            "refusals by reason (server): "
            + "; ".join(
                f"{k} {r.get('server_refusals', {}).get('by_reason', {})}" for k, r in steps
            )
        )
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
