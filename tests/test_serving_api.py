"""The serving API over batch views: shapes, validation, auth, reloads, metrics — real HTTP.

These tests write Delta view tables and a ``runs`` row in the documented shapes
themselves (the batch layer's contract), run the API with uvicorn on a free
port and query it with httpx. No speed worker runs here, so every answer must
say it is degraded and list the partitions whose recent events it lacks; the
exact batch + speed merge is checked by the invariant suite.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from lambdalake.contract.lake import (
    MASTER_ORDERS,
    MASTER_ORDERS_SCHEMA,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_HOURLY_SALES,
    VIEW_MONTHLY_SALES,
    VIEW_SENTIMENT_BY_SKU,
    VIEW_SENTIMENT_WEEKLY,
    VIEW_WEEKLY_SALES,
)
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord
from lambdalake.contract.views import PERIOD_COLUMN, PRODUCTS, forecast_level
from lambdalake.contract.views import STORES as STORES_VIEW
from lambdalake.settings import Settings
from serving.app import create_app, running_server

NOW = datetime(2024, 5, 10, 20, 0, tzinfo=UTC)  # late in the day: low-demand alerts are armed
TODAY = NOW.date()
SKUS = ("A", "B", "C")
STORES = ("S1", "S2")
# The run's reference data: C has no product record, S2 no store record (their sales group
# under a null category / region).
CATEGORY = {"A": "toys", "B": "food"}
REGION = {"S1": "west"}


# --- writing a lake in the documented shapes -----------------------------------------------


def make_orders(seed: int = 7, n: int = 400) -> list[dict[str, Any]]:
    """Master rows over 10 days, with a few duplicate deliveries (same event_id, later offset)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    offsets = defaultdict(int)
    for i in range(n):
        ts = NOW - timedelta(minutes=rng.randrange(0, 10 * 24 * 60))
        sku = rng.choice(SKUS)
        part = SKUS.index(sku) % 4
        row = {
            "event_id": f"e{i}",
            "event_time": ts,
            "store_id": rng.choice(STORES),
            "sku": sku,
            "quantity": rng.choice([1, 1, 2, 3, -1]),
            "unit_price": round(rng.uniform(1, 50), 2),
            "currency": "USD",
            "event_date": ts.date(),
            "_topic": "orders",
            "_partition": part,
            "_offset": offsets[part],
            "_ingested_at": NOW,
        }
        offsets[part] += 1
        rows.append(row)
    for dup in rng.sample(rows, 20):  # redelivered later: must count once
        part = dup["_partition"]
        rows.append({**dup, "_offset": offsets[part]})
        offsets[part] += 1
    return rows


def dedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["_offset"]):
        best.setdefault(r["event_id"], r)
    return list(best.values())


def period_start(r: dict[str, Any], granularity: str) -> date:
    """The start of an order's day, week (Monday) or month (first day), UTC."""
    day = r["event_date"]
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1) if granularity == "month" else day


def period_sales(rows: list[dict[str, Any]], run_id: str, granularity: str) -> pa.Table:
    """``views/daily_sales``, ``weekly_sales`` or ``monthly_sales`` rows, as the batch layer
    writes them (the period column named by ``PERIOD_COLUMN``)."""
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0])
    for r in dedup(rows):
        a = acc[(period_start(r, granularity), r["store_id"], r["sku"])]
        a[0] += r["quantity"]
        a[1] += r["quantity"] * r["unit_price"]
        a[2] += 1
    keys = sorted(acc)
    return pa.table(
        {
            PERIOD_COLUMN[granularity]: pa.array([k[0] for k in keys], pa.date32()),
            "store_id": [k[1] for k in keys],
            "sku": [k[2] for k in keys],
            "units": pa.array([acc[k][0] for k in keys], pa.int64()),
            "revenue": [acc[k][1] for k in keys],
            "order_lines": pa.array([acc[k][2] for k in keys], pa.int64()),
            "run_id": [run_id] * len(keys),
        }
    )


def daily_sales(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    return period_sales(rows, run_id, "day")


def hourly_sales(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0])
    for r in dedup(rows):
        hour = r["event_time"].replace(minute=0, second=0, microsecond=0)
        a = acc[(hour, r["store_id"], r["sku"])]
        a[0] += r["quantity"]
        a[1] += r["quantity"] * r["unit_price"]
        a[2] += 1
    keys = sorted(acc)
    return pa.table(
        {
            "hour": pa.array([k[0] for k in keys], pa.timestamp("us", tz="UTC")),
            "store_id": [k[1] for k in keys],
            "sku": [k[2] for k in keys],
            "units": pa.array([acc[k][0] for k in keys], pa.int64()),
            "revenue": [acc[k][1] for k in keys],
            "order_lines": pa.array([acc[k][2] for k in keys], pa.int64()),
            "run_id": [run_id] * len(keys),
        }
    )


FORECAST_DATES = [TODAY + timedelta(days=d) for d in range(-3, 10)]


# The aggregate levels' own forecasts (a run with forecast levels): SKU over stores, store over
# SKUs, the total; each with bounds of its own, distinct from any sum of the bottom bounds.
LEVEL_ROWS = {("A", "*"): 10.0, ("B", "*"): 80.0, ("*", "S1"): 45.0, ("*", "S2"): 45.0}
LEVEL_ROWS[("*", "*")] = 90.0


def forecast_table(run_id: str, *, levels: bool = False) -> pa.Table:
    rows = []
    if levels:
        for (sku, store), f in LEVEL_ROWS.items():
            for d in FORECAST_DATES:
                rows.append(
                    {
                        "sku": sku,
                        "store_id": store,
                        "date": d,
                        "forecast": f,
                        "lower_80": 0.8 * f,
                        "upper_80": 1.2 * f,
                        "lower_95": 0.7 * f,
                        "upper_95": 1.3 * f,
                        "model": "FourierETS+LightGBM",
                        "level": forecast_level(sku, store),
                        "run_id": run_id,
                    }
                )
    for sku in ("A", "B"):
        for store in STORES:
            for d in FORECAST_DATES:
                f = 5.0 if sku == "A" else 40.0
                upper = 0.5 if (sku, store) == ("A", "S1") else f * 3
                lower = 30.0 if (sku, store) == ("B", "S2") else 0.0
                rows.append(
                    {
                        "sku": sku,
                        "store_id": store,
                        "date": d,
                        "forecast": f,
                        "lower_80": lower,
                        "upper_80": upper,
                        "lower_95": lower,
                        "upper_95": upper,
                        "model": "AutoETS",
                        **({"level": "sku_store"} if levels else {}),
                        "run_id": run_id,
                    }
                )
    return pa.Table.from_pylist(rows)


def accuracy_table(run_id: str, *, levels: bool = False) -> pa.Table:
    """One backtest row per forecast series; B/S2's MASE could not be computed (NaN)."""
    extra = [
        {
            "sku": sku,
            "store_id": store,
            "model": "FourierETS+LightGBM",
            "mase": 0.25,
            "smape": 10.0,
            "coverage_80": 0.81,
            "coverage_95": 0.96,
            "n_train_days": 90,
            "run_id": run_id,
        }
        for sku, store in (LEVEL_ROWS if levels else {})
    ]
    rows = extra + [
        {
            "sku": sku,
            "store_id": store,
            "model": "AutoETS",
            "mase": math.nan if (sku, store) == ("B", "S2") else 0.5 + i / 10,
            "smape": 20.0,
            "coverage_80": 0.8,
            "coverage_95": 0.95,
            "n_train_days": 90,
            "run_id": run_id,
        }
        for i, (sku, store) in enumerate((s, t) for s in ("A", "B") for t in STORES)
    ]
    return pa.Table.from_pylist(rows)


SENTIMENT_ROWS = [
    # sku, reviews, rating_sum, sentiment_sum, positive, neutral, negative
    ("A", 4, 14, 1.2, 3, 1, 0),
    ("B", 2, 3, -0.8, 0, 0, 2),
    ("C", 1, 5, 0.9, 1, 0, 0),
]


# The same reviews per ISO week (Mondays): A's span two weeks, and add up to the rows above.
SENTIMENT_WEEK_ROWS = [
    # week, sku, reviews, rating_sum, sentiment_sum, positive, neutral, negative
    (date(2024, 4, 29), "A", 3, 11, 0.9, 2, 1, 0),
    (date(2024, 5, 6), "A", 1, 3, 0.3, 1, 0, 0),
    (date(2024, 5, 6), "B", 2, 3, -0.8, 0, 0, 2),
    (date(2024, 5, 6), "C", 1, 5, 0.9, 1, 0, 0),
]


def sentiment_weekly_table(run_id: str) -> pa.Table:
    names = ["week", "sku", "reviews", "rating_sum", "sentiment_sum"]
    names += ["positive", "neutral", "negative"]
    rows = [dict(zip(names, r, strict=True)) for r in SENTIMENT_WEEK_ROWS]
    return pa.Table.from_pylist([{**r, "run_id": run_id} for r in rows])


def sentiment_table(run_id: str) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "sku": s,
                "reviews": n,
                "mean_rating": r / n,
                "mean_sentiment": m / n,
                "positive": p,
                "neutral": u,
                "negative": g,
                "rating_sum": float(r),
                "sentiment_sum": m,
                "run_id": run_id,
            }
            for s, n, r, m, p, u, g in SENTIMENT_ROWS
        ]
    )


def write_run(
    root: Path,
    run_id: str,
    orders: list[dict[str, Any]],
    *,
    hourly_view: bool = False,
    weekly_view: bool = True,
    status: str = "published",
    published_at: datetime | None = None,
    levels: bool = False,
    forecast: pa.Table | None = None,
) -> RunRecord:
    """Write one run's views (appending a new version to each table) and its runs row."""
    mode = "overwrite" if (root / VIEW_DAILY_SALES).exists() else "error"
    master = pa.Table.from_pylist(orders, schema=MASTER_ORDERS_SCHEMA)
    write_deltalake(str(root / MASTER_ORDERS), master, mode=mode)
    write_deltalake(str(root / VIEW_DAILY_SALES), daily_sales(orders, run_id), mode=mode)
    if forecast is None:
        forecast = forecast_table(run_id, levels=levels)
    write_deltalake(str(root / VIEW_DEMAND_FORECAST), forecast, mode=mode)
    write_deltalake(str(root / VIEW_SENTIMENT_BY_SKU), sentiment_table(run_id), mode=mode)
    write_deltalake(
        str(root / VIEW_FORECAST_ACCURACY), accuracy_table(run_id, levels=levels), mode=mode
    )

    from deltalake import DeltaTable

    def version(name: str) -> int:
        return int(DeltaTable(str(root / name)).version())

    views = {
        v: version(v)
        for v in (
            VIEW_DAILY_SALES,
            VIEW_DEMAND_FORECAST,
            VIEW_SENTIMENT_BY_SKU,
            VIEW_FORECAST_ACCURACY,
        )
    }
    for view, key, attr, records in (
        (PRODUCTS, "sku", "category", CATEGORY),
        (STORES_VIEW, "store_id", "region", REGION),
    ):
        table = view.tables[None]
        rows = [
            {key: k, "messages": 1, "version": i * 4096, attr: v, "run_id": run_id}
            for i, (k, v) in enumerate(sorted(records.items()))
        ]
        schema = view.arrow_schema(None, extra=[("run_id", "string")])
        rmode = "overwrite" if (root / table).exists() else "error"
        write_deltalake(str(root / table), pa.Table.from_pylist(rows, schema=schema), mode=rmode)
        views[table] = version(table)
    for table, grain in ((VIEW_WEEKLY_SALES, "week"), (VIEW_MONTHLY_SALES, "month")):
        pmode = "overwrite" if (root / table).exists() else "error"
        write_deltalake(str(root / table), period_sales(orders, run_id, grain), mode=pmode)
        views[table] = version(table)
    if weekly_view:
        wmode = "overwrite" if (root / VIEW_SENTIMENT_WEEKLY).exists() else "error"
        write_deltalake(
            str(root / VIEW_SENTIMENT_WEEKLY), sentiment_weekly_table(run_id), mode=wmode
        )
        views[VIEW_SENTIMENT_WEEKLY] = version(VIEW_SENTIMENT_WEEKLY)
    if hourly_view:
        hmode = "overwrite" if (root / VIEW_HOURLY_SALES).exists() else "error"
        write_deltalake(str(root / VIEW_HOURLY_SALES), hourly_sales(orders, run_id), mode=hmode)
        views[VIEW_HOURLY_SALES] = version(VIEW_HOURLY_SALES)
    watermark: dict[str, dict[int, int]] = {
        "orders": {p: 0 for p in range(4)},
        "products": {0: len(CATEGORY)},
        "stores": {0: len(REGION)},
    }
    for r in orders:
        p = r["_partition"]
        watermark["orders"][p] = max(watermark["orders"][p], r["_offset"] + 1)
    stamp = published_at or datetime.now(UTC)
    rec = RunRecord(
        run_id=run_id,
        status=status,
        started_at=stamp,
        published_at=stamp if status == "published" else None,
        master_versions={MASTER_ORDERS: version(MASTER_ORDERS)},
        watermark=watermark,
        view_versions=views,
    )
    write_deltalake(
        str(root / RUNS), pa.Table.from_pylist([rec.to_row()], schema=RUNS_SCHEMA), mode="append"
    )
    return rec


def settings_at(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"lake_uri": str(root), "home": root.parent / "home", "partitions": 4}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --- expectations computed independently ---------------------------------------------------


def expected_sales(
    orders: list[dict[str, Any]],
    *,
    granularity: str,
    first: datetime,
    last: datetime,
    sku: str | None = None,
    store: str | None = None,
) -> dict[str, tuple[int, float, int]]:
    out: dict[str, list] = defaultdict(lambda: [0, 0.0, 0])
    for r in dedup(orders):
        if sku is not None and r["sku"] != sku:
            continue
        if store is not None and r["store_id"] != store:
            continue
        if granularity == "day":
            day = r["event_date"]
            if not first.date() <= day <= last.date():
                continue
            key = day.isoformat()
        else:
            hour = r["event_time"].replace(minute=0, second=0, microsecond=0)
            if not first <= hour <= last:
                continue
            key = hour.strftime("%Y-%m-%dT%H:00:00Z")
        a = out[key]
        a[0] += r["quantity"]
        a[1] += r["quantity"] * r["unit_price"]
        a[2] += 1
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def points_of(body: dict[str, Any]) -> dict[str, tuple[int, float, int]]:
    return {p["period"]: (p["units"], p["revenue"], p["order_lines"]) for p in body["points"]}


def assert_same_points(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k][0] == want[k][0], k
        assert got[k][2] == want[k][2], k
        assert got[k][1] == pytest.approx(want[k][1], rel=1e-9, abs=1e-9), k


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("serving") / "lake"
    orders = make_orders()
    write_run(root, "run-1", orders, hourly_view=True, published_at=NOW - timedelta(hours=1))
    quarantine = pa.Table.from_pylist(
        [
            {
                "_topic": "orders",
                "_partition": 0,
                "_offset": 99,
                "_ingested_at": NOW,
                "raw": b"{",
                "reason": "bad_json",
            }
        ],
        schema=QUARANTINE_SCHEMA,
    )
    write_deltalake(str(root / QUARANTINE), quarantine)
    return root, orders


@pytest.fixture(scope="module")
def api(lake: tuple[Path, list[dict[str, Any]]]) -> Any:
    root, _ = lake
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


# --- tests ---------------------------------------------------------------------------------


def test_sales_by_day_sums_over_unfiltered_dimensions(api: httpx.Client, lake: Any) -> None:
    _, orders = lake
    first, last = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 10, tzinfo=UTC)
    for sku, store in [(None, None), ("A", None), (None, "S2"), ("B", "S1")]:
        params = {"start": "2024-05-01", "end": "2024-05-10", "granularity": "day"}
        if sku:
            params["sku"] = sku
        if store:
            params["store_id"] = store
        r = api.get("/v1/sales", params=params)
        assert r.status_code == 200, r.text
        want = expected_sales(
            orders, granularity="day", first=first, last=last, sku=sku, store=store
        )
        assert want, "the fixture must have data in range"
        assert_same_points(points_of(r.json()), want)


def test_sales_by_hour_from_the_hourly_view(api: httpx.Client, lake: Any) -> None:
    _, orders = lake
    r = api.get(
        "/v1/sales",
        params={
            "sku": "A",
            "start": "2024-05-08T05:30:00Z",
            "end": "2024-05-09",
            "granularity": "hour",
        },
    )
    assert r.status_code == 200, r.text
    want = expected_sales(
        orders,
        granularity="hour",
        first=datetime(2024, 5, 8, 5, tzinfo=UTC),  # a time inside an hour selects that hour
        last=datetime(2024, 5, 9, 23, tzinfo=UTC),  # a date as end includes its whole day
        sku="A",
    )
    assert want
    assert_same_points(points_of(r.json()), want)


def test_hours_of_a_day_add_up_to_the_day(api: httpx.Client) -> None:
    day = api.get("/v1/sales", params={"start": "2024-05-07", "end": "2024-05-07"}).json()
    hours = api.get(
        "/v1/sales", params={"start": "2024-05-07", "end": "2024-05-07", "granularity": "hour"}
    ).json()
    assert len(day["points"]) == 1
    assert 1 < len(hours["points"]) <= 24
    assert sum(p["units"] for p in hours["points"]) == day["points"][0]["units"]
    assert sum(p["order_lines"] for p in hours["points"]) == day["points"][0]["order_lines"]


def test_every_answer_carries_as_of_and_says_it_is_degraded_without_speed(
    api: httpx.Client,
) -> None:
    body = api.get("/v1/sales", params={"sku": "A"}).json()
    assert body["as_of"]["run_id"] == "run-1"
    assert set(body["as_of"]["watermark"]["orders"]) == {"0", "1", "2", "3"}
    assert body["as_of"]["speed_offsets"] == {}
    # No speed worker is running: the recent events of every partition are missing.
    assert body["degraded"] is True
    assert body["missing_partitions"] == {"orders": [0, 1, 2, 3]}
    for path in ("/v1/sentiment/A", "/v1/forecast/A", "/v1/alerts/demand", "/v1/sentiment"):
        b = api.get(path).json()
        assert b["as_of"]["run_id"] == "run-1", path
        assert b["degraded"] is True, path


def test_unknown_sku_is_an_empty_answer_not_an_error(api: httpx.Client) -> None:
    r = api.get("/v1/sales", params={"sku": "NOPE"})
    assert r.status_code == 200 and r.json()["points"] == []
    s = api.get("/v1/sentiment/NOPE")
    assert s.status_code == 200
    assert s.json()["reviews"] == 0 and s.json()["mean_sentiment"] is None
    f = api.get("/v1/forecast/NOPE")
    assert f.status_code == 200
    assert f.json()["points"] == [] and f.json()["actuals"] == [] and f.json()["model"] is None


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/v1/sales", {"start": "2024-13-01"}, "'start'"),
        ("/v1/sales", {"end": "yesterday"}, "'end'"),
        ("/v1/sales", {"start": "2024-05-10", "end": "2024-05-01"}, "after end"),
        ("/v1/sales", {"granularity": "minute"}, "'granularity'"),
        ("/v1/sales", {"start": "2000-01-01", "end": "2024-01-01"}, "range too large"),
        (
            "/v1/sales",
            {"start": "2023-01-01", "end": "2024-01-01", "granularity": "hour"},
            "granularity=day",
        ),
        ("/v1/sales", {"sku": "x" * 300}, "'sku'"),
        ("/v1/sales", {"store_id": " "}, "'store_id'"),
        ("/v1/forecast/A", {"horizon": "0"}, "'horizon'"),
        ("/v1/forecast/A", {"horizon": "many"}, "'horizon'"),
        ("/v1/sentiment", {"order": "middle"}, "'order'"),
        ("/v1/sentiment", {"limit": "100000"}, "'limit'"),
        ("/v1/sales", {"end": "9999-12-31"}, "supported range"),
        ("/v1/sales", {"end": "9999-12-31", "granularity": "hour"}, "supported range"),
        ("/v1/sales", {"start": "0001-01-01", "end": "0001-01-02"}, "supported range"),
        ("/v1/sales", {"end": "0001-01-01"}, "supported range"),
        ("/v1/sales", {"start": "0001-01-01T00:00:00+05:00"}, "supported range"),
        ("/v1/sales", {"start": "9999-12-31T23:59:59-05:00"}, "supported range"),
    ],
)
def test_invalid_parameters_get_400_with_a_clear_message(
    api: httpx.Client, path: str, params: dict[str, str], fragment: str
) -> None:
    r = api.get(path, params=params)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "invalid parameter" in detail and fragment in detail, detail


def test_forecast_for_a_store_has_bounds_and_merged_actuals(api: httpx.Client, lake: Any) -> None:
    _, orders = lake
    r = api.get("/v1/forecast/A", params={"store_id": "S1", "horizon": "5", "actuals_days": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sku"] == "A" and body["store_id"] == "S1" and body["model"] == "AutoETS"
    assert body["level"] == "sku_store"
    assert body["accuracy"] == [
        {
            "sku": "A",
            "store_id": "S1",
            "model": "AutoETS",
            "mase": 0.5,
            "coverage_80": 0.8,
            "coverage_95": 0.95,
            "n_train_days": 90,
        }
    ]
    # The actuals window (4 days up to today) plus 5 days ahead, today counted once.
    want_dates = [(TODAY + timedelta(days=d)).isoformat() for d in range(-3, 5)]
    assert [p["date"] for p in body["points"]] == want_dates
    assert all(p["upper_95"] == 0.5 for p in body["points"])
    want = expected_sales(
        orders,
        granularity="day",
        first=datetime(2024, 5, 7, tzinfo=UTC),
        last=datetime(2024, 5, 10, tzinfo=UTC),
        sku="A",
        store="S1",
    )
    assert {a["date"]: a["units"] for a in body["actuals"]} == {k: v[0] for k, v in want.items()}


def test_forecast_over_all_stores_sums_points_without_bounds(api: httpx.Client) -> None:
    """A run from before forecast levels (only (sku, store) series): a SKU over all stores is
    the sum of its stores' forecasts, without bounds."""
    body = api.get("/v1/forecast/B", params={"horizon": "1", "actuals_days": "1"}).json()
    assert body["store_id"] is None and body["level"] == "sku"
    # Each store's backtest; a score the backtest could not give is null, not NaN.
    assert [(a["store_id"], a["mase"]) for a in body["accuracy"]] == [
        (store, None if store == "S2" else pytest.approx(0.5 + (len(STORES) + i) / 10))
        for i, store in enumerate(STORES)
    ]
    assert body["points"] == [
        {
            "date": TODAY.isoformat(),
            "forecast": 80.0,
            "lower_80": None,
            "upper_80": None,
            "lower_95": None,
            "upper_95": None,
        }
    ]


@pytest.fixture(scope="module")
def levels_api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A served run with forecast levels (each SKU, each store and the total have rows)."""
    root = tmp_path_factory.mktemp("serving-levels") / "lake"
    orders = make_orders()
    write_run(root, "run-levels", orders, published_at=NOW - timedelta(hours=1), levels=True)
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, orders


@pytest.mark.parametrize(
    ("path", "params", "node", "level"),
    [
        ("/v1/forecast/B", {}, ("B", "*"), "sku"),
        ("/v1/forecast", {"store_id": "S2"}, ("*", "S2"), "store"),
        ("/v1/forecast", {}, ("*", "*"), "total"),
        ("/v1/forecast/A", {"store_id": "S1"}, ("A", "S1"), "sku_store"),
    ],
)
def test_every_level_of_the_hierarchy_has_its_own_forecast_bounds_and_actuals(
    levels_api: Any, path: str, params: dict[str, str], node: tuple[str, str], level: str
) -> None:
    api, orders = levels_api
    r = api.get(path, params={**params, "horizon": "3", "actuals_days": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    sku, store = node
    assert body["level"] == level
    assert (body["sku"], body["store_id"]) == (
        None if sku == "*" else sku,
        None if store == "*" else store,
    )
    assert body["as_of"]["run_id"] == "run-levels"
    assert [p["date"] for p in body["points"]] == [
        (TODAY + timedelta(days=d)).isoformat() for d in range(-3, 3)
    ]
    if level != "sku_store":
        f = LEVEL_ROWS[node]
        # The level's own bounds, not a sum of its members' (those would be 0.5 / 3 * f).
        assert all(
            (p["forecast"], p["lower_95"], p["upper_95"]) == (f, 0.7 * f, 1.3 * f)
            for p in body["points"]
        )
        assert [(a["sku"], a["store_id"], a["mase"]) for a in body["accuracy"]] == [
            (sku, store, 0.25)
        ]
    want = expected_sales(
        orders,
        granularity="day",
        first=datetime(2024, 5, 7, tzinfo=UTC),
        last=datetime(2024, 5, 10, tzinfo=UTC),
        sku=None if sku == "*" else sku,
        store=None if store == "*" else store,
    )
    assert want
    assert {a["date"]: a["units"] for a in body["actuals"]} == {k: v[0] for k, v in want.items()}


def test_alerts_compare_store_series_only(levels_api: Any) -> None:
    """Aggregate levels' rows are not alerts of their own (an alert names a SKU at a store)."""
    api, _ = levels_api
    items = api.get("/v1/alerts/demand").json()["items"]
    assert items and all(i["sku"] != "*" and i["store_id"] not in (None, "*") for i in items)


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/v1/forecast", {"store_id": "*"}, "'store_id'"),
        ("/v1/forecast/*", {}, "'sku'"),
        ("/v1/forecast", {"horizon": "0"}, "'horizon'"),
        ("/v1/forecast", {"store_id": ""}, "'store_id'"),
        ("/v1/forecast", {"actuals_days": "x"}, "'actuals_days'"),
    ],
)
def test_bad_forecast_level_parameters_are_400s(
    levels_api: Any, path: str, params: dict[str, str], fragment: str
) -> None:
    api, _ = levels_api
    r = api.get(path, params=params)
    assert r.status_code in (400, 422), r.text
    detail = r.json()["detail"]
    assert fragment in str(detail), detail


def test_sentiment_means_come_from_merged_sums(api: httpx.Client) -> None:
    body = api.get("/v1/sentiment/A").json()
    assert body["reviews"] == 4
    assert body["mean_rating"] == pytest.approx(14 / 4)
    assert body["mean_sentiment"] == pytest.approx(1.2 / 4)
    assert (body["positive"], body["neutral"], body["negative"]) == (3, 1, 0)


def test_sentiment_weeks_come_from_the_weekly_view(api: httpx.Client) -> None:
    body = api.get("/v1/sentiment-weeks/A", params={"start": "2024-04-01"}).json()
    weeks = {w["week"]: w for w in body["weeks"]}
    assert list(weeks) == ["2024-04-29", "2024-05-06"]
    assert weeks["2024-04-29"]["reviews"] == 3
    assert weeks["2024-04-29"]["mean_rating"] == pytest.approx(11 / 3)
    assert weeks["2024-05-06"]["mean_sentiment"] == pytest.approx(0.3)
    # The weeks add up to the all-time answer.
    total = api.get("/v1/sentiment/A").json()
    assert sum(w["reviews"] for w in body["weeks"]) == total["reviews"]
    # A date inside a week selects the week; the default range ends at today's week.
    one = api.get("/v1/sentiment-weeks/A", params={"start": "2024-05-01", "end": "2024-05-02"})
    assert [w["week"] for w in one.json()["weeks"]] == ["2024-04-29"]
    assert [w["week"] for w in api.get("/v1/sentiment-weeks/B").json()["weeks"]] == ["2024-05-06"]
    bad = api.get("/v1/sentiment-weeks/A", params={"start": "2024-05-10", "end": "2024-04-01"})
    assert bad.status_code == 400 and "after end" in bad.json()["detail"]
    huge = api.get("/v1/sentiment-weeks/A", params={"start": "2000-01-01"})
    assert huge.status_code == 400 and "at most" in huge.json()["detail"]


def test_a_run_without_weekly_sentiment_says_so(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    write_run(root, "run-1", make_orders(seed=2, n=50), weekly_view=False)
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        r = client.get("/v1/sentiment-weeks/A")
        assert r.status_code == 503, r.text
        assert "views/sentiment_weekly" in r.json()["detail"]
        assert client.get("/v1/sentiment/A").json()["reviews"] == 4


def test_sentiment_ranking_orders_and_limits(api: httpx.Client) -> None:
    worst = api.get("/v1/sentiment", params={"order": "worst"}).json()["items"]
    assert [i["sku"] for i in worst] == ["B", "A", "C"]
    best = api.get("/v1/sentiment", params={"order": "best", "limit": "2"}).json()["items"]
    assert [i["sku"] for i in best] == ["C", "A"]
    many = api.get("/v1/sentiment", params={"order": "best", "min_reviews": "2"}).json()["items"]
    assert [i["sku"] for i in many] == ["A", "B"]


def test_demand_alerts_flag_series_outside_the_95_interval(api: httpx.Client, lake: Any) -> None:
    _, orders = lake
    body = api.get("/v1/alerts/demand").json()
    assert body["date"] == TODAY.isoformat()
    assert body["day_fraction"] == pytest.approx(20 / 24, abs=1e-3)
    got = {(a["sku"], a["store_id"], a["kind"]) for a in body["items"]}
    today_units = defaultdict(int)
    for r in dedup(orders):
        if r["event_date"] == TODAY:
            today_units[(r["sku"], r["store_id"])] += r["quantity"]
    want = set()
    if today_units[("A", "S1")] > 0.5:
        want.add(("A", "S1", "above_upper_95"))
    if today_units[("B", "S2")] < 0.5 * 30.0 * (20 / 24):
        want.add(("B", "S2", "below_lower_95"))
    assert want, "the fixture must trigger at least one alert"
    assert got == want


# --- alerts: ranked and paged ----------------------------------------------------------------

# Today's series for the alert ranking: (sku, store) -> (units today, forecast, lower, upper).
ALERT_SERIES: dict[tuple[str, str], tuple[int, float, float, float]] = {
    **{(f"K{i:02d}", "S1"): (20 + 3 * i, 10.0, 4.0, 20.0) for i in range(1, 12)},  # above
    ("K20", "S1"): (14, 10.0, 4.0, 20.0),  # inside the interval: no alert
    ("K21", "S1"): (0, 10.0, 4.0, 20.0),  # late in the day with nothing sold: below
    ("K22", "S2"): (1, 30.0, 24.0, 40.0),  # far below
    ("K23", "S2"): (3, 0.2, 0.0, 0.5),  # a collapsed interval: one unit of half-width at least
    ("K24", "S2"): (41, 30.0, 24.0, 40.0),  # just above
    ("K25", "S2"): (52, 28.0, 24.0, 40.0),  # K12's severity (1.0), more units past: first
    ("K12", "S1"): (30, 10.0, 4.0, 20.0),
}


def alert_orders() -> list[dict[str, Any]]:
    rows = []
    for i, ((sku, store), (units, *_)) in enumerate(sorted(ALERT_SERIES.items())):
        if units:
            ts = NOW - timedelta(hours=1, minutes=i)
            rows.append(
                {
                    "event_id": f"a{i}",
                    "event_time": ts,
                    "store_id": store,
                    "sku": sku,
                    "quantity": units,
                    "unit_price": 2.0,
                    "currency": "USD",
                    "event_date": ts.date(),
                    "_topic": "orders",
                    "_partition": i % 4,
                    "_offset": i // 4,
                    "_ingested_at": NOW,
                }
            )
    return rows


def alert_forecasts(run_id: str) -> pa.Table:
    rows = [
        {
            "sku": sku,
            "store_id": store,
            "date": TODAY,
            "forecast": f,
            "lower_80": lo,
            "upper_80": up,
            "lower_95": lo,
            "upper_95": up,
            "model": "AutoETS",
            "run_id": run_id,
        }
        for (sku, store), (_, f, lo, up) in ALERT_SERIES.items()
    ]
    return pa.Table.from_pylist(rows)


def expected_alerts(fraction: float) -> list[tuple[str, str, str, float]]:
    """(sku, store, kind, severity) worst first, by the documented rule."""
    out = []
    for (sku, store), (units, f, lo, up) in ALERT_SERIES.items():
        if units > up:
            out.append((sku, store, "above_upper_95", (units - up) / max(up - f, 1), units - up))
        elif fraction >= 0.75 and units < 0.5 * lo * fraction:
            t = 0.5 * lo * fraction
            sev = (t - units) / max((f - lo) * fraction, 1)
            out.append((sku, store, "below_lower_95", sev, t - units))
    out.sort(key=lambda a: (-round(a[3], 4), -a[4], a[0], a[1]))
    return [a[:4] for a in out]


@pytest.fixture(scope="module")
def alerts_api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("alerts") / "lake"
    write_run(root, "run-1", alert_orders(), forecast=alert_forecasts("run-1"))
    clock = [NOW]
    app = create_app(settings_at(root), clock=lambda: clock[0])
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, clock


def test_alerts_are_ranked_worst_first_by_how_far_past_the_bound(alerts_api: Any) -> None:
    api, clock = alerts_api
    body = api.get("/v1/alerts/demand").json()
    want = expected_alerts(20 / 24)
    got = [(a["sku"], a["store_id"], a["kind"], a["severity"]) for a in body["items"]]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert [g[3] for g in got] == pytest.approx([w[3] for w in want], abs=1e-3)
    assert body["total"] == len(want) == 17 and body["next_cursor"] is None
    by_id = {(a["sku"], a["store_id"]): a for a in body["items"]}
    # K11 (53 units, bound 20, half-width 10) leads; the collapsed K23 (3 units over 0.5)
    # counts a half-width of one unit, not 0.3; ties go to more units past the threshold.
    assert got[0][:2] == ("K11", "S1") and by_id["K11", "S1"]["severity"] == pytest.approx(3.3)
    assert by_id["K23", "S2"]["severity"] == pytest.approx(2.5)
    assert by_id["K21", "S1"]["threshold"] == pytest.approx(0.5 * 4.0 * 20 / 24, abs=1e-3)
    assert ("K20", "S1") not in by_id
    order = [g[:2] for g in got]
    assert order.index(("K25", "S2")) == order.index(("K12", "S1")) - 1
    # Before 18:00 UTC the low-demand alerts are not armed yet.
    clock[0] = NOW.replace(hour=12)
    try:
        early = api.get("/v1/alerts/demand").json()
    finally:
        clock[0] = NOW
    assert {a["kind"] for a in early["items"]} == {"above_upper_95"}
    assert [(a["sku"], a["store_id"]) for a in early["items"]] == [
        w[:2] for w in expected_alerts(0.5)
    ]


def test_alert_pages_hold_every_alert_once_as_of_the_first_page(alerts_api: Any) -> None:
    api, clock = alerts_api
    whole = api.get("/v1/alerts/demand").json()
    first = api.get("/v1/alerts/demand", params={"limit": "5"}).json()
    assert len(first["items"]) == 5 and first["total"] == whole["total"]
    pages, cursor = [first], first["next_cursor"]
    # The day moves on between pages (past midnight, even): later pages keep the first's time.
    clock[0] = NOW + timedelta(hours=5)
    try:
        while cursor:
            r = api.get("/v1/alerts/demand", params={"limit": "5", "cursor": cursor})
            assert r.status_code == 200, r.text
            page = r.json()
            assert page["as_of"] == first["as_of"] and page["date"] == first["date"]
            assert page["day_fraction"] == first["day_fraction"]
            pages.append(page)
            cursor = page["next_cursor"]
        assert api.get("/v1/alerts/demand").json()["date"] != first["date"]
    finally:
        clock[0] = NOW
    assert [len(p["items"]) for p in pages] == [5, 5, 5, 2]
    assert [a for p in pages for a in p["items"]] == whole["items"]
    # A cursor belongs to its question (the same limit); a sales cursor is not an alerts one.
    other = api.get("/v1/alerts/demand", params={"limit": "6", "cursor": first["next_cursor"]})
    assert other.status_code == 400 and "another question" in other.json()["detail"]
    # A cursor made up with the right question but an impossible time is a 400, not a 500.
    from serving.params import AlertsQuery, Cursor

    forged = Cursor(AlertsQuery(limit=5).digest, "run-1", {}, {}, 5, at_ms=10**20).encode()
    r = api.get("/v1/alerts/demand", params={"limit": "5", "cursor": forged})
    assert r.status_code == 400 and "'cursor'" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": "0"}, "'limit'"),
        ({"limit": "1001"}, "'limit'"),
        ({"limit": "-3"}, "'limit'"),
        ({"limit": "ten"}, "'limit'"),
        ({"cursor": "not-a-cursor"}, "'cursor'"),
        ({"cursor": ""}, "'cursor'"),
    ],
)
def test_bad_alert_parameters_are_400s_that_say_what_to_send(
    alerts_api: Any, params: dict[str, str], fragment: str
) -> None:
    api, _ = alerts_api
    r = api.get("/v1/alerts/demand", params=params)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"], r.json()


def test_status_is_the_status_json_object(api: httpx.Client) -> None:
    body = api.get("/v1/status").json()
    assert body["batch"]["run_id"] == "run-1"
    assert body["batch"]["watermark"]["orders"]
    assert body["speed"]["workers"] == []
    assert body["quarantine"] == {"orders": {"bad_json": 1}}


def test_concurrent_status_polls_share_one_read_a_second(lake: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    root, _ = lake
    app = create_app(settings_at(root), clock=lambda: NOW)
    app.state.status.ttl = 3.0  # room for twelve requests on a busy machine
    with running_server(app) as url, ThreadPoolExecutor(12) as pool:
        first = pool.map(lambda _: httpx.get(url + "/v1/status", timeout=30).json(), range(12))
        answers = list(first)
        assert app.state.status.reads == 1  # twelve pollers, one read of the lake
        assert all(a == answers[0] for a in answers)
        time.sleep(app.state.status.ttl)
        later = httpx.get(url + "/v1/status", timeout=30).json()
    assert app.state.status.reads == 2  # once the answer is older than ttl: read again
    assert later["generated_at"] > answers[0]["generated_at"]


def test_metrics_expose_latency_batch_age_and_quarantine(api: httpx.Client) -> None:
    api.get("/v1/sales", params={"sku": "A"})
    text = api.get("/metrics").text
    assert 'lambdalake_api_request_seconds_bucket{le="0.05",method="GET",route="/v1/sales"' in text
    assert 'lambdalake_batch_age_seconds{run_id="run-1"}' in text
    assert 'lambdalake_quarantine_events{reason="bad_json",topic="orders"} 1.0' in text
    assert 'lambdalake_api_degraded_answers_total{route="sales"}' in text
    assert 'lambdalake_process_heap_bytes{state="in_use"}' in text  # glibc: this machine's


def test_openapi_documents_every_endpoint_with_examples(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    for path in (
        "/v1/sales",
        "/v1/forecast/{sku}",
        "/v1/forecast",
        "/v1/sentiment/{sku}",
        "/v1/sentiment",
        "/v1/sentiment-weeks/{sku}",
        "/v1/alerts/demand",
        "/v1/status",
        "/health",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert "example" in spec["components"]["schemas"]["SalesAnswer"]
    assert api.get("/docs").status_code == 200


KEY_1, KEY_2 = "k1-0123456789abcdef", "k2-0123456789abcdef"


def test_api_keys_guard_everything_but_health(tmp_path: Path, lake: Any) -> None:
    root, _ = lake
    app = create_app(settings_at(root, api_keys=f"{KEY_1}, {KEY_2}"), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/health").status_code == 200
        for path in (
            "/v1/sales",
            "/v1/sentiment/A",
            "/v1/forecast",
            "/v1/status",
            "/metrics",
            "/docs",
            "/redoc",
            "/openapi.json",
            "/dashboard/api/skus",
            "/v1/sentiment-weeks/A",
        ):
            r = client.get(path)
            assert r.status_code == 401, path
            assert "X-API-Key" in r.json()["detail"]
            assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 401
            assert client.get(path, headers={"X-API-Key": KEY_2}).status_code == 200, path
        # A key in the URL is refused even when it is valid: URLs end up in logs.
        for path in ("/v1/sales", "/dashboard"):
            r = client.get(path, params={"key": KEY_2}, headers={"X-API-Key": KEY_2})
            assert r.status_code == 400, path
            assert "X-API-Key header" in r.json()["detail"]


@pytest.mark.parametrize("keys", ["change-me", "k1-0123456789abcdef,CHANGE_ME", "short-key"])
def test_example_or_short_api_keys_are_refused_at_start(lake: Any, keys: str) -> None:
    root, _ = lake
    with pytest.raises(ValueError, match="LAMBDALAKE_API_KEYS") as info:
        create_app(settings_at(root, api_keys=keys))
    assert "\n" not in str(info.value)


def test_skus_with_a_slash_can_be_queried(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    orders = [{**r, "sku": "BOX/12" if r["sku"] == "A" else r["sku"]} for r in make_orders(seed=4)]
    write_run(root, "run-1", orders, hourly_view=True)
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        body = client.get("/v1/sales", params={"sku": "BOX/12"}).json()
        want = expected_sales(
            orders,
            granularity="day",
            first=datetime(2024, 4, 11, tzinfo=UTC),
            last=datetime(2024, 5, 10, tzinfo=UTC),
            sku="BOX/12",
        )
        assert want
        assert_same_points(points_of(body), want)
        for path in ("/v1/forecast/BOX/12", "/v1/forecast/BOX%2F12"):
            r = client.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.json()["sku"] == "BOX/12"
            assert sum(a["units"] for a in r.json()["actuals"]) > 0
        r = client.get("/v1/sentiment/BOX%2F12")
        assert r.status_code == 200 and r.json()["sku"] == "BOX/12"
        assert client.get("/v1/sentiment-weeks/BOX%2F12").status_code == 200
        r = client.get("/v1/sentiment/")
        assert r.status_code == 400 and "'sku'" in r.json()["detail"]


def test_new_published_run_is_served_and_failed_run_is_not(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    orders = make_orders(seed=1, n=100)
    write_run(root, "run-1", orders, published_at=NOW - timedelta(hours=2))
    app = create_app(settings_at(root), clock=lambda: NOW, poll_seconds=0.2)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        first = client.get("/v1/sales", params={"start": "2024-05-01", "end": "2024-05-10"}).json()
        assert first["as_of"]["run_id"] == "run-1"

        more = orders + make_orders(seed=2, n=50)
        more = [{**r, "_offset": i} for i, r in enumerate(more)]  # distinct lineage
        for r in more[len(orders) :]:
            r["event_id"] = "new-" + r["event_id"]
        write_run(root, "run-bad", more, status="failed")
        time.sleep(1.0)
        assert client.get("/v1/sales").json()["as_of"]["run_id"] == "run-1"

        write_run(root, "run-2", more, hourly_view=True)
        deadline = time.monotonic() + 10
        while client.get("/health").json()["run_id"] != "run-2":
            assert time.monotonic() < deadline, "run-2 was not picked up"
            time.sleep(0.1)
        body = client.get("/v1/sales", params={"start": "2024-05-01", "end": "2024-05-10"}).json()
        assert body["as_of"]["run_id"] == "run-2"
        want = expected_sales(
            more,
            granularity="day",
            first=datetime(2024, 5, 1, tzinfo=UTC),
            last=datetime(2024, 5, 10, tzinfo=UTC),
        )
        assert_same_points(points_of(body), want)
        # Hourly answers now come from the run's hourly view, and agree with the master.
        hours = client.get(
            "/v1/sales", params={"start": "2024-05-09", "end": "2024-05-10", "granularity": "hour"}
        ).json()
        want_h = expected_sales(
            more,
            granularity="hour",
            first=datetime(2024, 5, 9, tzinfo=UTC),
            last=datetime(2024, 5, 10, 23, tzinfo=UTC),
        )
        assert_same_points(points_of(hours), want_h)
        assert VIEW_HOURLY_SALES not in app.state.batch.current().missing


def test_hot_path_answers_from_memory_without_reading_delta_files(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    orders = make_orders(seed=3, n=100)
    write_run(root, "run-1", orders, hourly_view=True)
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        before = client.get("/v1/sales", params={"sku": "A", "granularity": "hour"}).json()
        assert before["points"]
        # Remove every view and master data file: the loaded run must still answer the same.
        removed = 0
        for parquet in root.rglob("*.parquet"):
            if "runs" not in parquet.parts:
                parquet.unlink()
                removed += 1
        assert removed
        after = client.get("/v1/sales", params={"sku": "A", "granularity": "hour"}).json()
        assert after["points"] == before["points"]
        assert client.get("/v1/sentiment/A").json()["reviews"] == 4


def test_a_run_without_hourly_view_refuses_hours_and_never_reads_master(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    orders = make_orders(seed=5, n=100)
    write_run(root, "run-1", orders)  # daily views only, as runs before hourly views
    for parquet in (root / MASTER_ORDERS).rglob("*.parquet"):
        parquet.unlink()  # serving must not need the master table at all
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        day = client.get("/v1/sales", params={"start": "2024-05-01", "end": "2024-05-10"})
        assert day.status_code == 200 and day.json()["points"]
        hour = client.get("/v1/sales", params={"sku": "A", "granularity": "hour"})
        assert hour.status_code == 503, hour.text
        detail = hour.json()["detail"]
        assert "run-1" in detail and "views/hourly_sales" in detail and "granularity=day" in detail
        assert VIEW_HOURLY_SALES in app.state.batch.current().missing


def test_no_published_run_yet_answers_empty_with_null_run(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    app = create_app(settings_at(root), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        body = client.get("/v1/sales").json()
        assert body["points"] == []
        assert body["as_of"] == {"run_id": None, "watermark": {}, "speed_offsets": {}}
        assert client.get("/health").json() == {"status": "ok", "run_id": None}
        assert json.loads(client.get("/v1/status").text)["batch"]["run_id"] is None


def test_unreachable_speed_worker_makes_answers_degraded_not_partial(
    tmp_path: Path, lake: Any
) -> None:
    root, orders = lake
    from serving.app import free_port

    settings = settings_at(root, home=tmp_path / "home")
    status_dir = settings.speed_state_dir / "status"
    status_dir.mkdir(parents=True)
    # A worker that owned partitions 0 and 2 left its status file behind, then died.
    (status_dir / "worker-0-of-2.json").write_text(
        json.dumps(
            {
                "worker": "0/2",
                "query_endpoint": f"grpc://127.0.0.1:{free_port()}",
                "offsets": {"orders": {"0": 5, "2": 7}},
                "updated_at": NOW.isoformat(),
            }
        )
    )
    app = create_app(settings, clock=lambda: NOW, speed_timeout=1.0)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        started = time.monotonic()
        body = client.get("/v1/sales", params={"start": "2024-05-01", "end": "2024-05-10"}).json()
        assert time.monotonic() - started < 5
        assert body["degraded"] is True
        assert body["missing_partitions"] == {"orders": [0, 1, 2, 3]}
        assert body["as_of"]["speed_offsets"] == {}
        # What is there (the batch views) is still answered in full.
        want = expected_sales(
            orders,
            granularity="day",
            first=datetime(2024, 5, 1, tzinfo=UTC),
            last=datetime(2024, 5, 10, tzinfo=UTC),
        )
        assert_same_points(points_of(body), want)
        metrics = client.get("/metrics").text
        assert 'lambdalake_api_degraded_answers_total{route="sales"} 1.0' in metrics


# --- /v1/sales: grains, breakdowns, order, paging, formats -----------------------------------


def recompute(
    orders: list[dict[str, Any]],
    granularity: str,
    group_by: tuple[str, ...],
    *,
    skus: set[str] | None = None,
    stores: set[str] | None = None,
) -> dict[tuple, tuple[int, float, int]]:
    """(period, *group fields) -> (units, revenue, order_lines), from the deduplicated orders."""
    out: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0])
    for r in dedup(orders):
        if (skus and r["sku"] not in skus) or (stores and r["store_id"] not in stores):
            continue
        period = (
            r["event_date"] if granularity == "day" else period_start(r, granularity)
        ).isoformat()
        r = {**r, "category": CATEGORY.get(r["sku"]), "region": REGION.get(r["store_id"])}
        a = out[(period, *(r[g] for g in group_by))]
        a[0] += r["quantity"]
        a[1] += r["quantity"] * r["unit_price"]
        a[2] += 1
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def keyed(points: list[dict[str, Any]], group_by: tuple[str, ...]) -> dict[tuple, tuple]:
    rows = {
        (p["period"], *(p[g] for g in group_by)): (p["units"], p["revenue"], p["order_lines"])
        for p in points
    }
    assert len(rows) == len(points), "a row appears twice"
    return rows


def assert_same_rows(got: dict[tuple, tuple], want: dict[tuple, tuple]) -> None:
    assert set(got) == set(want)
    for k, (units, revenue, lines) in want.items():
        assert got[k][0] == units and got[k][2] == lines, k
        assert got[k][1] == pytest.approx(revenue, rel=1e-9), k


@pytest.mark.parametrize("granularity", ["day", "week", "month"])
@pytest.mark.parametrize("group_by", [(), ("sku",), ("store_id",), ("sku", "store_id")])
def test_sales_at_every_grain_and_breakdown_equal_a_recompute(
    api: httpx.Client, lake: Any, granularity: str, group_by: tuple[str, ...]
) -> None:
    _, orders = lake
    params = {"granularity": granularity, "start": "2024-04-01", "end": "2024-05-31"}
    if group_by:
        params["group_by"] = ",".join(group_by)
    body = api.get("/v1/sales", params=params).json()
    assert_same_rows(keyed(body["points"], group_by), recompute(orders, granularity, group_by))
    assert body["next_cursor"] is None
    for p in body["points"]:  # a point carries exactly the fields it was grouped by
        assert set(p) == {"period", *group_by, "units", "revenue", "order_lines"}
    if granularity == "week":
        assert all(date.fromisoformat(p["period"]).weekday() == 0 for p in body["points"])
    if granularity == "month":
        assert all(p["period"].endswith("-01") for p in body["points"])


def test_sales_filters_take_repeats_and_comma_lists(api: httpx.Client, lake: Any) -> None:
    _, orders = lake
    params = [
        ("granularity", "week"),
        ("start", "2024-04-01"),
        ("end", "2024-05-31"),
        ("group_by", "sku,store_id"),
        ("sku", "A,B"),
        ("sku", "A"),
        ("store_id", "S2"),
    ]
    body = api.get("/v1/sales", params=params).json()
    want = recompute(orders, "week", ("sku", "store_id"), skus={"A", "B"}, stores={"S2"})
    assert want
    assert_same_rows(keyed(body["points"], ("sku", "store_id")), want)


def test_top_n_ranks_within_each_period(api: httpx.Client, lake: Any) -> None:
    _, orders = lake
    params = {
        "granularity": "month",
        "start": "2024-04-01",
        "end": "2024-05-31",
        "group_by": "sku",
        "order": "revenue_desc",
        "limit": "2",
    }
    body = api.get("/v1/sales", params=params).json()
    full = recompute(orders, "month", ("sku",))
    want: list[tuple] = []
    for period in sorted({k[0] for k in full}):
        ranked = sorted((k for k in full if k[0] == period), key=lambda k: (-full[k][1], k[1:]))
        want += ranked[:2]
    assert [(p["period"], p["sku"]) for p in body["points"]] == want


def test_cursor_pages_hold_every_row_exactly_once(api: httpx.Client) -> None:
    params = {
        "granularity": "day",
        "start": "2024-04-01",
        "end": "2024-05-31",
        "group_by": "sku,store_id",
        "limit": "4",
    }
    whole = api.get("/v1/sales", params={**params, "limit": "10000"}).json()
    assert whole["next_cursor"] is None
    pages, cursor = [], None
    while True:
        r = api.get("/v1/sales", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["as_of"] == whole["as_of"]  # every page as of the first page's as_of
        assert len(page["points"]) <= 4
        pages.append(page["points"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(pages) > 2
    assert [p for page in pages for p in page] == whole["points"]
    # A cursor belongs to its question; anything else is a 400 that says so.
    first = api.get("/v1/sales", params=params).json()
    other = api.get("/v1/sales", params={**params, "limit": "5", "cursor": first["next_cursor"]})
    assert other.status_code == 400 and "another question" in other.json()["detail"]
    junk = api.get("/v1/sales", params={**params, "cursor": "not-a-cursor"})
    assert junk.status_code == 400 and "'cursor'" in junk.json()["detail"]


def test_a_cursor_of_a_run_no_longer_served_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    orders = make_orders(seed=9, n=200)
    write_run(root, "run-1", orders, published_at=NOW - timedelta(hours=2))
    app = create_app(settings_at(root), clock=lambda: NOW)
    params = {"start": "2024-05-01", "end": "2024-05-10", "group_by": "sku", "limit": "2"}
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        first = client.get("/v1/sales", params=params).json()
        assert first["next_cursor"]
        write_run(root, "run-2", orders, published_at=NOW - timedelta(hours=1))
        app.state.batch.refresh()
        r = client.get("/v1/sales", params={**params, "cursor": first["next_cursor"]})
        assert r.status_code == 410, r.text
        assert "run-1" in r.json()["detail"] and "without cursor" in r.json()["detail"]


@pytest.mark.parametrize("form", ["csv", "parquet", "arrow"])
def test_sales_as_csv_parquet_and_arrow_hold_the_json_points(api: httpx.Client, form: str) -> None:
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    params = {"granularity": "week", "start": "2024-04-01", "group_by": "sku"}
    body = api.get("/v1/sales", params={**params, "end": "2024-05-31"}).json()
    media = {
        "csv": "text/csv",
        "parquet": "application/vnd.apache.parquet",
        "arrow": "application/vnd.apache.arrow.stream",
    }[form]
    for r in (
        api.get("/v1/sales", params={**params, "end": "2024-05-31", "format": form}),
        api.get("/v1/sales", params={**params, "end": "2024-05-31"}, headers={"Accept": media}),
    ):
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(media)
        assert json.loads(r.headers["X-As-Of"]) == body["as_of"]
        assert r.headers["X-Degraded"] == str(body["degraded"]).lower()
        data = io.BytesIO(r.content)
        table = (
            pacsv.read_csv(data, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
            if form == "csv"
            else pq.read_table(data)
            if form == "parquet"
            else pa.ipc.open_stream(data).read_all()
        )
        assert table.column_names == ["period", "sku", "units", "revenue", "order_lines"]
        got = [
            {**row, "period": str(row["period"])} for row in table.to_pylist()
        ]  # CSV reads dates back as dates
        assert got == body["points"]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"group_by": "colour"}, "'group_by'"),
        ({"order": "best"}, "'order'"),
        ({"limit": "0"}, "'limit'"),
        ({"limit": "10001"}, "'limit'"),
        ({"format": "xml"}, "'format'"),
        ({"granularity": "year"}, "'granularity'"),
        ({"granularity": "week", "start": "1990-01-01", "end": "2024-01-01"}, "granularity=month"),
        ({"granularity": "month", "start": "1900-01-01", "end": "2999-01-01"}, "at most 1200"),
        ({"sku": "A,,B"}, "'sku'"),
    ],
)
def test_bad_sales_parameters_are_400s_that_say_what_to_send(
    api: httpx.Client, params: dict[str, str], fragment: str
) -> None:
    r = api.get("/v1/sales", params=params)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]


# --- reference data: products and stores ---------------------------------------------------


@pytest.mark.parametrize(
    "group_by", [("category",), ("region",), ("category", "store_id"), ("sku", "region")]
)
def test_sales_by_category_and_region_join_the_current_records(
    api: httpx.Client, lake: Any, group_by: tuple[str, ...]
) -> None:
    """Type-1: each SKU's sales count under its category, a store's under its region; ids no
    record names group under null (kept in JSON and CSV)."""
    _, orders = lake
    params = {"granularity": "week", "start": "2024-04-01", "end": "2024-05-31"}
    body = api.get("/v1/sales", params={**params, "group_by": ",".join(group_by)}).json()
    assert_same_rows(keyed(body["points"], group_by), recompute(orders, "week", group_by))
    assert any(None in k[1:] for k in keyed(body["points"], group_by)), "unknown ids are null"
    assert all(
        set(p) == {"period", *group_by, "units", "revenue", "order_lines"} for p in body["points"]
    )
    csv = api.get("/v1/sales", params={**params, "group_by": ",".join(group_by), "format": "csv"})
    header = csv.text.splitlines()[0].replace('"', "")
    assert header == ",".join(["period", *group_by, "units", "revenue", "order_lines"])


def test_category_and_region_filters_select_skus_and_stores_by_their_records(
    api: httpx.Client, lake: Any
) -> None:
    _, orders = lake
    params = {"granularity": "month", "start": "2024-04-01", "end": "2024-05-31"}
    body = api.get(
        "/v1/sales", params={**params, "category": "toys,food", "group_by": "sku"}
    ).json()
    assert_same_rows(
        keyed(body["points"], ("sku",)), recompute(orders, "month", ("sku",), skus={"A", "B"})
    )
    body = api.get("/v1/sales", params={**params, "region": "west", "sku": "A,C"}).json()
    want = recompute(orders, "month", (), skus={"A", "C"}, stores={"S1"})
    assert_same_rows(keyed(body["points"], ()), want)
    # A category no record names selects nothing (not everything).
    body = api.get("/v1/sales", params={**params, "category": "garden"}).json()
    assert body["points"] == []
    for bad in ({"category": ""}, {"region": "x" * 257}, {"group_by": "brand"}):
        r = api.get("/v1/sales", params={**params, **bad})
        assert r.status_code == 400 and r.json()["detail"], r.text


def test_products_and_stores_list_the_current_records(api: httpx.Client) -> None:
    body = api.get("/v1/products").json()
    assert [(p["sku"], p["category"]) for p in body["items"]] == sorted(CATEGORY.items())
    assert body["items"][0]["name"] is None  # a field the record left out
    assert body["as_of"]["watermark"]["products"] == {"0": len(CATEGORY)}
    body = api.get("/v1/products", params={"category": "food"}).json()
    assert [p["sku"] for p in body["items"]] == ["B"]
    body = api.get("/v1/stores").json()
    assert [(s["store_id"], s["region"]) for s in body["items"]] == sorted(REGION.items())
    assert api.get("/v1/stores", params={"region": ""}).status_code == 400
