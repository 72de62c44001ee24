"""A small lake with one published run, written in the batch layer's documented view shapes.

For serving tests that need a served run but no Spark: ``views/daily_sales``,
``views/hourly_sales``, ``views/demand_forecast``, ``views/sentiment_by_sku``,
``views/sentiment_weekly`` and ``views/review_scores`` for the given ids, and the ``runs`` row that publishes them.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from lambdalake.contract.lake import (
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_DEMAND_FORECAST,
    VIEW_HOURLY_SALES,
    VIEW_MONTHLY_SALES,
    VIEW_REVIEW_SCORES,
    VIEW_SENTIMENT_BY_SKU,
    VIEW_SENTIMENT_WEEKLY,
    VIEW_WEEKLY_SALES,
)
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord


def write_small_run(
    root: Path,
    *,
    skus: list[str],
    stores: list[str],
    today: date,
    days: int = 30,
    run_id: str = "run-1",
    watermark: dict[str, dict[int, int]] | None = None,
    seed: int = 3,
) -> RunRecord:
    """One published run over ``days`` days up to ``today`` (forecast: 14 days back, 28 ahead).

    Demand today is far above the forecast for every series, so each (sku, store) is a
    demand alert; ``watermark`` defaults to 0 for partitions 0-3 of both topics."""
    rng = random.Random(seed)
    series = [(k, s) for k in skus for s in stores]
    daily, hourly, forecast = [], [], []
    for d in range(days):
        day = today - timedelta(days=d)
        for sku, store in series:
            units = rng.randint(1, 30) + (1000 if d == 0 else 0)
            daily.append((day, store, sku, units, units * 2.5, units))
            hour = datetime(day.year, day.month, day.day, rng.randrange(24), tzinfo=UTC)
            hourly.append((hour, store, sku, units, units * 2.5, units))
    for d in range(-14, 28):
        day = today + timedelta(days=d)
        for sku, store in series:
            f = 10.0 + rng.random()
            forecast.append((sku, store, day, f, f * 0.8, f * 1.2, f * 0.6, f * 1.4))

    def table(rows: list[tuple], names: list[str]) -> pa.Table:
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
        return pa.table({n: list(c) for n, c in zip(names, cols, strict=True)})

    measures = ["store_id", "sku", "units", "revenue", "order_lines"]
    write_deltalake(str(root / VIEW_DAILY_SALES), table(daily, ["date", *measures]))
    for view, column, start in (
        (VIEW_WEEKLY_SALES, "week", lambda d: d - timedelta(days=d.weekday())),
        (VIEW_MONTHLY_SALES, "month", lambda d: d.replace(day=1)),
    ):  # the daily rows rolled up, as the batch layer's weekly and monthly views hold them
        acc: dict[tuple, list] = {}
        for day, store, sku, units, revenue, lines in daily:
            a = acc.setdefault((start(day), store, sku), [0, 0.0, 0])
            a[0], a[1], a[2] = a[0] + units, a[1] + revenue, a[2] + lines
        rows = [(*k, *v) for k, v in sorted(acc.items())]
        write_deltalake(str(root / view), table(rows, [column, *measures]))
    hours = table(hourly, ["hour", *measures])
    hours = hours.set_column(0, "hour", hours["hour"].cast(pa.timestamp("us", tz="UTC")))
    write_deltalake(str(root / VIEW_HOURLY_SALES), hours)
    fc = table(
        forecast,
        ["sku", "store_id", "date", "forecast", "lower_80", "upper_80", "lower_95", "upper_95"],
    )
    write_deltalake(
        str(root / VIEW_DEMAND_FORECAST), fc.append_column("model", pa.array(["AutoETS"] * len(fc)))
    )
    sentiment = [
        {
            "sku": sku,
            "reviews": 4,
            "mean_rating": 3.5,
            "mean_sentiment": 0.25,
            "positive": 2,
            "neutral": 1,
            "negative": 1,
            "rating_sum": 14.0,
            "sentiment_sum": 1.0,
        }
        for sku in skus
    ]
    write_deltalake(str(root / VIEW_SENTIMENT_BY_SKU), pa.Table.from_pylist(sentiment))
    scores = [
        {
            "review_id": f"r-{i}-{w}",
            "sku": sku,
            "event_time": datetime(today.year, today.month, today.day, tzinfo=UTC)
            - timedelta(weeks=w),
            "rating": 4,
            "sentiment": 0.5,
            "label": "positive",
            "model_version": "test",
        }
        for i, sku in enumerate(skus)
        for w in range(3)
    ]
    write_deltalake(str(root / VIEW_REVIEW_SCORES), pa.Table.from_pylist(scores))
    weekly = [  # the scores per ISO week, as the batch layer aggregates them
        {
            "week": s["event_time"].date() - timedelta(days=s["event_time"].weekday()),
            "sku": s["sku"],
            "reviews": 1,
            "rating_sum": s["rating"],
            "sentiment_sum": s["sentiment"],
            "positive": 1,
            "neutral": 0,
            "negative": 0,
        }
        for s in scores
    ]
    write_deltalake(str(root / VIEW_SENTIMENT_WEEKLY), pa.Table.from_pylist(weekly))
    views = {
        v: int(DeltaTable(str(root / v)).version())
        for v in (
            VIEW_DAILY_SALES,
            VIEW_HOURLY_SALES,
            VIEW_WEEKLY_SALES,
            VIEW_MONTHLY_SALES,
            VIEW_DEMAND_FORECAST,
            VIEW_SENTIMENT_BY_SKU,
            VIEW_SENTIMENT_WEEKLY,
            VIEW_REVIEW_SCORES,
        )
    }
    now = datetime.now(UTC)
    record = RunRecord(
        run_id=run_id,
        status="published",
        started_at=now,
        published_at=now,
        watermark=watermark
        or {"orders": {p: 0 for p in range(4)}, "reviews": {p: 0 for p in range(4)}},
        view_versions=views,
    )
    write_deltalake(
        str(root / RUNS), pa.Table.from_pylist([record.to_row()], schema=RUNS_SCHEMA), mode="append"
    )
    return record
