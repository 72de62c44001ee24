"""The data-quality gate of the batch DAG, the publish step and quarantine retention.

Runs are written here the way the batch layer publishes them (view commits, then
a ``published`` row in ``runs`` through the shared manifest protocol), on real
Delta tables; a run with bad views must be demoted so readers fall back to the
previous published run. The check against a real Spark batch run is in
``test_dags_batch.py``.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from batch.maintenance import expire_quarantine
from batch.quality import check_run, confirm_published, demote_run, dq_check
from lambdalake.contract.lake import (
    MASTER_ORDERS,
    MASTER_ORDERS_SCHEMA,
    MASTER_REVIEWS,
    MASTER_REVIEWS_SCHEMA,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_HOURLY_SALES,
    VIEW_MONTHLY_SALES,
    VIEW_REVIEW_SCORES,
    VIEW_SENTIMENT_BY_SKU,
    VIEW_SENTIMENT_WEEKLY,
    VIEW_WEEKLY_SALES,
    Lake,
)
from lambdalake.contract.manifest import (
    RUNS_SCHEMA,
    RunRecord,
    ingest_app_id,
    ingest_positions,
    latest_published_run,
    read_runs,
)
from lambdalake.contract.views import PRODUCTS, STORES, forecast_level
from lambdalake.errors import OperationFailed
from lambdalake.settings import Settings

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
ORDERS, DUPLICATES, REVIEWS = 40, 5, 12
# What the batch records having read: the deduplicated events.
READ = {"orders": ORDERS, "reviews": REVIEWS}


def _orders(n: int, duplicates: int = 0) -> pa.Table:
    rows = []
    for i in range(n + duplicates):
        eid = f"o{i % n}"  # the last `duplicates` rows repeat earlier event_ids
        rows.append(
            {
                "event_id": eid,
                "event_time": T0 + timedelta(hours=i),
                "store_id": f"s{i % 2}",
                "sku": f"k{i % 3}",
                "quantity": 1 + i % 4,
                "unit_price": 2.5,
                "currency": "USD",
                "event_date": (T0 + timedelta(hours=i)).date(),
                "_topic": "orders",
                "_partition": i % 4,
                "_offset": i // 4,
                "_ingested_at": T0,
            }
        )
    return pa.Table.from_pylist(rows, schema=MASTER_ORDERS_SCHEMA)


def _reviews(n: int) -> pa.Table:
    rows = [
        {
            "review_id": f"r{i}",
            "event_time": T0,
            "sku": f"k{i % 3}",
            "rating": 1 + i % 5,
            "title": None,
            "text": "fine",
            "customer_id": None,
            "event_date": T0.date(),
            "_topic": "reviews",
            "_partition": i % 4,
            "_offset": i // 4,
            "_ingested_at": T0,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=MASTER_REVIEWS_SCHEMA)


def good_views(orders: pa.Table, reviews: pa.Table) -> dict[str, pa.Table]:
    """Views consistent with the master tables, computed plainly in Python."""
    seen: set[str] = set()
    sales: dict[tuple[date, str, str], list[float]] = {}
    hourly: dict[tuple[datetime, str, str], list[float]] = {}
    for r in orders.to_pylist():
        if r["event_id"] in seen:
            continue
        seen.add(r["event_id"])
        hour = r["event_time"].replace(minute=0, second=0, microsecond=0)
        for acc in (
            sales.setdefault((r["event_date"], r["store_id"], r["sku"]), [0, 0.0, 0]),
            hourly.setdefault((hour, r["store_id"], r["sku"]), [0, 0.0, 0]),
        ):
            acc[0] += r["quantity"]
            acc[1] += r["quantity"] * r["unit_price"]
            acc[2] += 1
    daily_sales = pa.Table.from_pylist(
        [
            {"date": d, "store_id": s, "sku": k, "units": u, "revenue": rev, "order_lines": n}
            for (d, s, k), (u, rev, n) in sorted(sales.items())
        ]
    )
    series = sorted({(k, s) for (_, s, k) in sales})
    # Every level: each series forecasts 3 a day; a SKU, a store and the total their sums.
    nodes = {(k, s): 3.0 for k, s in series}
    for k, s in series:
        for node in ((k, "*"), ("*", s), ("*", "*")):
            nodes[node] = nodes.get(node, 0.0) + 3.0
    forecast = pa.Table.from_pylist(
        [
            {
                "sku": k,
                "store_id": s,
                "date": date(2026, 11, 10) + timedelta(days=h),
                "forecast": f,
                "lower_80": 2.0 / 3 * f,
                "upper_80": 4.0 / 3 * f,
                "lower_95": 1.0 / 3 * f,
                "upper_95": 5.0 / 3 * f,
                "model": "AutoETS",
                "level": forecast_level(k, s),
                "run_id": "x",
            }
            for (k, s), f in sorted(nodes.items())
            for h in range(3)
        ]
    )
    accuracy = pa.Table.from_pylist(
        [{"sku": k, "store_id": s, "model": "AutoETS", "mase": 0.9} for k, s in sorted(nodes)]
    )
    scores = [
        {
            "review_id": r["review_id"],
            "sku": r["sku"],
            "rating": r["rating"],
            "sentiment": 0.5 if r["rating"] > 3 else -0.5,
            "label": "positive" if r["rating"] > 3 else "negative",
        }
        for r in reviews.to_pylist()
    ]
    by_sku: dict[str, dict[str, int]] = {}
    for s in scores:
        acc = by_sku.setdefault(s["sku"], {"reviews": 0, "positive": 0, "negative": 0})
        acc["reviews"] += 1
        acc[s["label"]] += 1
    sentiment = pa.Table.from_pylist(
        [{"sku": k, **v, "neutral": 0} for k, v in sorted(by_sku.items())]
    )
    monday = T0.date() - timedelta(days=T0.weekday())  # every review is at T0
    weekly = pa.Table.from_pylist(
        [{"week": monday, "sku": k, **v, "neutral": 0} for k, v in sorted(by_sku.items())]
    )
    hourly_sales = pa.Table.from_pylist(
        [
            {"hour": h, "store_id": s, "sku": k, "units": u, "revenue": rev, "order_lines": n}
            for (h, s, k), (u, rev, n) in sorted(hourly.items())
        ]
    )

    def roll_up(key: str, start: Any) -> pa.Table:  # the daily rows per week or month
        acc: dict[tuple, list[float]] = {}
        for (d, s, k), (u, rev, n) in sales.items():
            a = acc.setdefault((start(d), s, k), [0, 0.0, 0])
            a[0], a[1], a[2] = a[0] + u, a[1] + rev, a[2] + n
        return pa.Table.from_pylist(
            [
                {key: p, "store_id": s, "sku": k, "units": u, "revenue": rev, "order_lines": n}
                for (p, s, k), (u, rev, n) in sorted(acc.items())
            ]
        )

    return {
        VIEW_DAILY_SALES: daily_sales,
        VIEW_HOURLY_SALES: hourly_sales,
        VIEW_WEEKLY_SALES: roll_up("week", lambda d: d - timedelta(days=d.weekday())),
        VIEW_MONTHLY_SALES: roll_up("month", lambda d: d.replace(day=1)),
        VIEW_DEMAND_FORECAST: forecast,
        VIEW_FORECAST_ACCURACY: accuracy,
        VIEW_REVIEW_SCORES: pa.Table.from_pylist(scores),
        VIEW_SENTIMENT_BY_SKU: sentiment,
        VIEW_SENTIMENT_WEEKLY: weekly,
        # No reference data in this lake: its views are published empty.
        **{
            v.tables[None]: v.arrow_schema(None, extra=[("run_id", "string")]).empty_table()
            for v in (PRODUCTS, STORES)
        },
    }


def publish(lake: Lake, run_id: str, views: dict[str, pa.Table], at: datetime) -> RunRecord:
    """Publish a run as the batch layer does: view commits first, then the runs row."""
    versions = {}
    for name, table in views.items():
        write_deltalake(lake.table(name), table, mode="overwrite", schema_mode="overwrite")
        versions[name] = DeltaTable(lake.table(name)).version()
    master = {t: DeltaTable(lake.table(t)).version() for t in (MASTER_ORDERS, MASTER_REVIEWS)}
    record = RunRecord(
        run_id=run_id,
        status="published",
        started_at=at - timedelta(minutes=5),
        published_at=at,
        master_versions=master,
        view_versions=versions,
        # What the batch records: rows per view and the deduplicated events it read.
        row_counts={**{name: t.num_rows for name, t in views.items()}, **READ},
    )
    write_deltalake(
        lake.table(RUNS), pa.Table.from_pylist([record.to_row()], schema=RUNS_SCHEMA), mode="append"
    )
    return record


@pytest.fixture()
def lake_with_good_run(tmp_path: Path) -> tuple[Settings, Lake, dict[str, pa.Table]]:
    settings = Settings(_env_file=None, lake_uri=str(tmp_path / "lake"), home=tmp_path / "home")  # type: ignore[call-arg]
    lake = Lake(settings.lake_uri)
    orders, reviews = _orders(ORDERS, duplicates=DUPLICATES), _reviews(REVIEWS)
    write_deltalake(lake.table(MASTER_ORDERS), orders)
    write_deltalake(lake.table(MASTER_REVIEWS), reviews)
    views = good_views(orders, reviews)
    publish(lake, "run-good", views, T0)
    return settings, lake, views


def test_a_consistent_run_passes_every_check(lake_with_good_run) -> None:
    settings, _, _ = lake_with_good_run
    assert check_run(settings, "run-good") == []


def _with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type=table.schema.field(name).type))


def _bad_forecast_negative(views):
    t = views[VIEW_DEMAND_FORECAST]
    f = t.column("forecast").to_pylist()
    f[0] = -1.0
    return {**views, VIEW_DEMAND_FORECAST: _with_column(t, "forecast", f)}


def _bad_forecast_bounds(views):
    t = views[VIEW_DEMAND_FORECAST]
    up = t.column("upper_80").to_pylist()
    up[1] = 2.5  # below the forecast of its row
    return {**views, VIEW_DEMAND_FORECAST: _with_column(t, "upper_80", up)}


def _bad_forecast_levels(views):
    t = views[VIEW_DEMAND_FORECAST]
    f = t.column("forecast").to_pylist()
    i = t.column("level").to_pylist().index("store")
    f[i] *= 1.1  # inside its bounds, but no longer the sum of the store's series
    return {**views, VIEW_DEMAND_FORECAST: _with_column(t, "forecast", f)}


def _bad_null_key(views):
    t = views[VIEW_DAILY_SALES]
    skus = t.column("sku").to_pylist()
    skus[0] = None
    return {**views, VIEW_DAILY_SALES: _with_column(t, "sku", skus)}


def _bad_lost_rows(views):
    t = views[VIEW_DAILY_SALES]
    return {**views, VIEW_DAILY_SALES: t.slice(0, t.num_rows - 3)}


def _bad_hourly_lost_rows(views):
    t = views[VIEW_HOURLY_SALES]
    return {**views, VIEW_HOURLY_SALES: t.slice(1)}


def _bad_weekly_lost_reviews(views):
    t = views[VIEW_SENTIMENT_WEEKLY]
    return {**views, VIEW_SENTIMENT_WEEKLY: t.slice(1)}


def _bad_double_counted_reviews(views):
    t = views[VIEW_REVIEW_SCORES]
    return {**views, VIEW_REVIEW_SCORES: pa.concat_tables([t, t.slice(0, 2)])}


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_bad_forecast_negative, "negative forecast"),
        (_bad_forecast_bounds, "bounds out of order"),
        (_bad_forecast_levels, "1 store-level row(s) that are not the sum"),
        (_bad_null_key, "null key"),
        (_bad_lost_rows, "order_lines, the run read 40 orders"),
        (_bad_hourly_lost_rows, "hourly_sales: 39 order_lines, the run read 40 orders"),
        (_bad_weekly_lost_reviews, "sentiment_weekly: "),
        (_bad_double_counted_reviews, "duplicated key"),
    ],
)
def test_a_bad_run_fails_the_check_and_the_previous_run_stays_served(
    lake_with_good_run, spoil, expected: str
) -> None:
    settings, lake, views = lake_with_good_run
    publish(lake, "run-bad", spoil(views), T0 + timedelta(hours=1))
    assert latest_published_run(lake.table(RUNS)).run_id == "run-bad"  # what batch published

    failures = dq_check(settings, "run-bad")

    assert any(expected in f for f in failures), failures
    served = latest_published_run(lake.table(RUNS))
    assert served is not None and served.run_id == "run-good"
    failed = [r for r in read_runs(lake.table(RUNS)) if r.status == "failed"]
    assert [r.run_id for r in failed] == ["run-bad"]
    assert expected in (failed[0].error or "")
    with pytest.raises(OperationFailed, match="not the served run"):
        confirm_published(settings, "run-bad")
    assert confirm_published(settings, "run-good").run_id == "run-good"


def test_demoting_twice_writes_one_failed_row(lake_with_good_run) -> None:
    settings, lake, views = lake_with_good_run
    publish(lake, "run-bad", _bad_forecast_negative(views), T0 + timedelta(hours=1))
    assert demote_run(settings, "run-bad", ["negative forecast"]) is True
    assert demote_run(settings, "run-bad", ["negative forecast"]) is False
    assert [r.status for r in read_runs(lake.table(RUNS)) if r.run_id == "run-bad"] == [
        "published",
        "failed",
    ]


def test_a_run_that_was_never_published_fails_the_check(lake_with_good_run) -> None:
    settings, _, _ = lake_with_good_run
    assert check_run(settings, "no-such-run") == [
        "run no-such-run has no published row in the runs table"
    ]


def test_dq_check_command_exits_non_zero_with_the_reason(lake_with_good_run) -> None:
    settings, lake, views = lake_with_good_run
    publish(lake, "run-bad", _bad_forecast_bounds(views), T0 + timedelta(hours=1))
    cli = str(Path(sys.executable).parent / "lambdalake")
    cmd = [cli, "batch", "check", "--lake", settings.lake_uri]

    ok = subprocess.run([*cmd, "--run-id", "run-good"], capture_output=True, text=True)
    bad = subprocess.run([*cmd, "--run-id", "run-bad"], capture_output=True, text=True)

    assert ok.returncode == 0, ok.stderr
    assert '"ok": true' in ok.stdout
    assert bad.returncode == 1
    assert "run run-bad failed 1 data-quality check(s)" in bad.stderr
    assert "bounds out of order" in bad.stderr


def test_quarantine_retention_deletes_old_messages_and_keeps_positions(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, lake_uri=str(tmp_path / "lake"))  # type: ignore[call-arg]
    uri = Lake(settings.lake_uri).table(QUARANTINE)
    now = datetime(2026, 11, 23, tzinfo=UTC)
    rows = [
        {
            "_topic": "orders",
            "_partition": 0,
            "_offset": i,
            "_ingested_at": now - timedelta(days=age),
            "raw": b"{",
            "reason": "bad_json",
        }
        for i, age in enumerate([45, 31, 29, 1])
    ]
    from deltalake import CommitProperties, Transaction

    write_deltalake(
        uri,
        pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA),
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id=ingest_app_id("orders", 0), version=4)]
        ),
    )

    assert expire_quarantine(settings, 30, now=now) == 2
    assert expire_quarantine(settings, 30, now=now) == 0  # idempotent

    left = DeltaTable(uri).to_pyarrow_table().column("_offset").to_pylist()
    assert sorted(left) == [2, 3]
    assert ingest_positions(uri, "orders") == {0: 4}


def test_quarantine_retention_without_a_table_deletes_nothing(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, lake_uri=str(tmp_path / "lake"))  # type: ignore[call-arg]
    assert expire_quarantine(settings, 30) == 0
