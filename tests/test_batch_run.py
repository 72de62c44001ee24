"""Batch runs over master tables written like ingest writes them (real Spark, real Delta).

The master tables come from ``batch.synthetic`` (Arrow tables of the master schema,
appended with delta-rs together with their ingest positions), so each test knows
exactly which events, duplicates and offsets the lake holds.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from urllib.parse import unquote

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from batch.forecast import ForecastConfig
from batch.forecast_models import BY_NAME
from batch.publish import VIEW_SCHEMAS
from batch.run import STAGES, InjectedFailure, aggregate_stages, run_batch
from batch.snapshot import pin_table, read_pinned
from batch.synthetic import SalesSpec, build_master, synthetic_orders, write_master
from lambdalake.contract.events import REFERENCE_TOPICS, TOPICS
from lambdalake.contract.lake import (
    BATCH_VIEWS,
    DIM_PRODUCTS,
    DIM_STORES,
    MASTER_ORDERS,
    MASTER_REVIEWS,
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_HOURLY_SALES,
    VIEW_REVIEW_SCORES,
    VIEW_SENTIMENT_BY_SKU,
    Lake,
)
from lambdalake.contract.manifest import RunRecord, latest_published_run, read_runs
from lambdalake.sentiment import SentimentModel
from lambdalake.settings import Settings

SPEC = SalesSpec(
    days=84, skus=6, stores=2, end_date=date(2026, 3, 31), seed=7, review_rate=0.2,
    duplicate_fraction=0.03,
)  # fmt: skip
VIEWS = BATCH_VIEWS  # every view a run publishes (lambdalake.contract.lake.PUBLISHED_VIEWS)


def make_settings(root: Path) -> Settings:
    return Settings(_env_file=None, lake_uri=str(root), spark_master="local[2]")  # type: ignore[call-arg]


def view_at(lake: Lake, view: str, version: int) -> pa.Table:
    return DeltaTable(lake.table(view), version=version).to_pyarrow_table()


def duck(lake: Lake, run: RunRecord) -> duckdb.DuckDBPyConnection:
    """DuckDB over the master snapshot the run pinned and the views it published."""
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'").fetchall()
    for name, table in (("orders", MASTER_ORDERS), ("reviews", MASTER_REVIEWS)):
        dt = DeltaTable(lake.table(table), version=run.master_versions[table])
        con.register(f"master_{name}", dt.to_pyarrow_table())
    for view, version in run.view_versions.items():
        con.register(view.split("/")[1], view_at(lake, view, version))
    return con


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch") / "lake"
    lake = Lake(str(root))
    written = build_master(lake, SPEC, commits=3)
    settings = make_settings(root)
    run_id = run_batch(settings, spark=spark)
    run = latest_published_run(lake.table(RUNS))
    assert run is not None and run.run_id == run_id
    return lake, run, written, settings


def test_daily_sales_equals_a_duckdb_recompute_over_the_deduplicated_master(published):
    lake, run, written, _ = published
    con = duck(lake, run)
    expected = con.execute(
        """
        WITH dedup AS (
            SELECT * FROM master_orders
            QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY _offset, _partition) = 1
        )
        SELECT event_date AS date, store_id, sku, SUM(quantity)::BIGINT AS units,
               SUM(quantity * unit_price) AS revenue, COUNT(*)::BIGINT AS order_lines
        FROM dedup GROUP BY ALL ORDER BY date, store_id, sku
        """
    ).fetchall()
    got = con.execute(
        "SELECT date, store_id, sku, units, revenue, order_lines FROM daily_sales "
        "ORDER BY date, store_id, sku"
    ).fetchall()
    assert len(got) == len(expected) > 100
    for g, e in zip(got, expected, strict=True):
        assert g[:4] == e[:4] and g[5] == e[5]
        assert g[4] == pytest.approx(e[4], rel=1e-9)
    # The master really held duplicates, and they were not counted.
    total, distinct = con.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM master_orders"
    ).fetchall()[0]
    assert total > distinct
    assert con.execute("SELECT sum(order_lines) FROM daily_sales").fetchall()[0][0] == distinct
    assert run.row_counts["orders"] == distinct
    assert written["orders"].num_rows == total


def test_hourly_sales_equals_a_duckdb_recompute_by_utc_hour_and_adds_up_to_the_days(published):
    lake, run, _, _ = published
    con = duck(lake, run)
    expected = con.execute(
        """
        WITH dedup AS (
            SELECT * FROM master_orders
            QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY _offset, _partition) = 1
        )
        SELECT date_trunc('hour', event_time) AS hour, store_id, sku,
               SUM(quantity)::BIGINT AS units, SUM(quantity * unit_price) AS revenue,
               COUNT(*)::BIGINT AS order_lines
        FROM dedup GROUP BY ALL ORDER BY hour, store_id, sku
        """
    ).fetchall()
    got = con.execute(
        "SELECT hour, store_id, sku, units, revenue, order_lines FROM hourly_sales "
        "ORDER BY hour, store_id, sku"
    ).fetchall()
    assert len(got) == len(expected) == run.row_counts[VIEW_HOURLY_SALES]
    for g, e in zip(got, expected, strict=True):
        assert g[:4] == e[:4] and g[5] == e[5]
        assert g[4] == pytest.approx(e[4], rel=1e-9)
    # Finer than days (several hours a day per series), and the hours add up to the days.
    assert len(got) > run.row_counts[VIEW_DAILY_SALES]
    diff = con.execute(
        """
        SELECT count(*) FROM (
            SELECT CAST(hour AS DATE) AS date, store_id, sku, sum(units) AS units,
                   sum(order_lines) AS order_lines
            FROM hourly_sales GROUP BY ALL
        ) h FULL JOIN daily_sales d USING (date, store_id, sku)
        WHERE h.units IS DISTINCT FROM d.units OR h.order_lines IS DISTINCT FROM d.order_lines
        """
    ).fetchall()[0][0]
    assert diff == 0


def test_sentiment_by_sku_counts_and_means_equal_a_duckdb_recompute(published):
    lake, run, _, _ = published
    con = duck(lake, run)
    expected = con.execute(
        """
        WITH dedup AS (
            SELECT * FROM master_reviews
            QUALIFY row_number() OVER (PARTITION BY review_id ORDER BY _offset, _partition) = 1
        )
        SELECT sku, count(*) AS reviews, avg(rating) AS mean_rating, sum(rating) AS rating_sum
        FROM dedup GROUP BY sku ORDER BY sku
        """
    ).fetchall()
    got = con.execute(
        "SELECT sku, reviews, mean_rating, rating_sum FROM sentiment_by_sku ORDER BY sku"
    ).fetchall()
    assert [(g[0], g[1], g[3]) for g in got] == [(e[0], e[1], e[3]) for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g[2] == pytest.approx(e[2], rel=1e-12)
    # Label counts and sentiment sums add up to the scored reviews.
    mismatches = con.execute(
        """
        SELECT count(*) FROM sentiment_by_sku s JOIN (
            SELECT sku, count(*) n, sum(sentiment) ss,
                   count(*) FILTER (WHERE label = 'positive') pos,
                   count(*) FILTER (WHERE label = 'neutral') neu,
                   count(*) FILTER (WHERE label = 'negative') neg
            FROM review_scores GROUP BY sku) r USING (sku)
        WHERE s.reviews <> r.n OR s.positive <> r.pos OR s.neutral <> r.neu
           OR s.negative <> r.neg OR abs(s.sentiment_sum - r.ss) > 1e-9
           OR abs(s.mean_sentiment - r.ss / r.n) > 1e-12
           OR s.positive + s.neutral + s.negative <> s.reviews
        """
    ).fetchall()[0][0]
    assert mismatches == 0


def test_sentiment_weekly_equals_a_recompute_and_adds_up_to_all_time(published):
    """The weekly grain of the sentiment view: per ISO week (Monday, UTC) exactly the scored
    reviews of that week, and its weeks sum to ``sentiment_by_sku``."""
    lake, run, _, _ = published
    con = duck(lake, run)
    assert con.execute("SELECT count(*) FROM sentiment_weekly").fetchall()[0][0] > 0
    assert con.execute(
        "SELECT count(*) FROM sentiment_weekly WHERE dayofweek(week) <> 1"
    ).fetchall() == [(0,)]  # every period is a Monday
    mismatches = con.execute(
        """
        SELECT count(*) FROM sentiment_weekly w FULL JOIN (
            SELECT CAST(event_time - INTERVAL (isodow(event_time) - 1) DAY AS DATE) AS week,
                   sku, count(*) n, sum(rating) rs, sum(sentiment) ss,
                   count(*) FILTER (WHERE label = 'positive') pos
            FROM review_scores GROUP BY ALL) r USING (week, sku)
        WHERE w.reviews IS DISTINCT FROM r.n OR w.rating_sum IS DISTINCT FROM r.rs
           OR w.positive IS DISTINCT FROM r.pos OR abs(w.sentiment_sum - r.ss) > 1e-9
           OR abs(w.mean_rating - r.rs / r.n) > 1e-12
        """
    ).fetchall()[0][0]
    assert mismatches == 0
    summed = con.execute(
        """
        SELECT count(*) FROM (SELECT sku, sum(reviews) n, sum(rating_sum) rs
                              FROM sentiment_weekly GROUP BY sku) w
        FULL JOIN sentiment_by_sku s USING (sku)
        WHERE w.n IS DISTINCT FROM s.reviews OR w.rs IS DISTINCT FROM s.rating_sum
        """
    ).fetchall()[0][0]
    assert summed == 0


def test_review_scores_equal_what_the_published_model_scores(published):
    lake, run, _, _ = published
    model = SentimentModel.load(lake, run.model_versions["sentiment"])
    assert model.kind == "tfidf-lr"  # enough labelled reviews: the trained model
    con = duck(lake, run)
    rows = con.execute(
        """
        SELECT s.review_id, s.sentiment, s.label, s.model_version, m.text, m.title
        FROM review_scores s JOIN (
            SELECT * FROM master_reviews
            QUALIFY row_number() OVER (PARTITION BY review_id ORDER BY _offset, _partition) = 1
        ) m USING (review_id) ORDER BY s.review_id
        """
    ).fetchall()
    assert len(rows) == run.row_counts["reviews"] == run.row_counts[VIEW_REVIEW_SCORES]
    sentiment, labels = model.score([r[4] for r in rows], [r[5] for r in rows])
    np.testing.assert_array_equal(np.array([r[1] for r in rows]), sentiment)
    assert [r[2] for r in rows] == list(labels)
    assert {r[3] for r in rows} == {model.version}


def test_forecast_views_cover_every_level_with_ordered_bounds(published):
    lake, run, _, _ = published
    con = duck(lake, run)
    n_series, n_skus, n_stores = con.execute(
        "SELECT count(DISTINCT (sku, store_id)), count(DISTINCT sku), count(DISTINCT store_id) "
        "FROM daily_sales"
    ).fetchall()[0]
    last = con.execute("SELECT max(date) FROM daily_sales").fetchall()[0][0]
    per_series = con.execute(
        "SELECT level, count(*), min(date), max(date) FROM demand_forecast "
        "GROUP BY level, sku, store_id"
    ).fetchall()
    levels = {}
    for level, *_ in per_series:
        levels[level] = levels.get(level, 0) + 1
    assert levels == {"sku_store": n_series, "sku": n_skus, "store": n_stores, "total": 1}
    assert all(
        n == 28 and (lo - last).days == 1 and (hi - last).days == 28 for _, n, lo, hi in per_series
    )
    bad = con.execute(
        """
        SELECT count(*) FROM demand_forecast WHERE NOT (
            0 <= lower_95 AND lower_95 <= lower_80 AND lower_80 <= forecast
            AND forecast <= upper_80 AND upper_80 <= upper_95)
           OR forecast IS NULL OR upper_95 IS NULL OR isnan(upper_95)
        """
    ).fetchall()[0][0]
    assert bad == 0
    acc = con.execute(
        "SELECT count(*), count(DISTINCT (sku, store_id)), min(n_train_days), "
        "count(*) FILTER (WHERE mase IS NULL) FROM forecast_accuracy"
    ).fetchall()[0]
    assert acc[0] == acc[1] == n_series + n_skus + n_stores + 1
    assert acc[2] >= 70 and acc[3] == 0  # 84 days of history: every series backtested
    models = {m for (m,) in con.execute("SELECT DISTINCT model FROM forecast_accuracy").fetchall()}
    # A registered model, or the default ensemble of the smooth tier: never the untested mean.
    cfg = ForecastConfig()
    assert models <= set(BY_NAME) | {cfg.ensemble_name, cfg.for_short().ensemble_name}


def test_published_forecast_levels_add_up(published):
    """Each SKU's, each store's and the total forecast are the sums of their (sku, store)
    series, day by day; the aggregate rows carry '*' for the key they sum over."""
    lake, run, _, _ = published
    con = duck(lake, run)
    for level, key, other in (("sku", "sku", "store_id"), ("store", "store_id", "sku")):
        rows = con.execute(
            f"""
            SELECT count(*), max(abs(t.forecast - b.s) / greatest(1, b.s)),
                   count(*) FILTER (WHERE t.{other} <> '*')
            FROM (SELECT {key}, date, sum(forecast) s FROM demand_forecast
                  WHERE level = 'sku_store' GROUP BY ALL) b
            JOIN (SELECT * FROM demand_forecast WHERE level = '{level}') t USING ({key}, date)
            """
        ).fetchall()[0]
        assert rows[0] > 0 and rows[1] < 1e-9 and rows[2] == 0, (level, rows)
    n, worst = con.execute(
        """
        SELECT count(*), max(abs(t.forecast - b.s) / greatest(1, b.s))
        FROM (SELECT date, sum(forecast) s FROM demand_forecast WHERE level = 'sku_store'
              GROUP BY ALL) b
        JOIN (SELECT * FROM demand_forecast WHERE sku = '*' AND store_id = '*') t USING (date)
        """
    ).fetchall()[0]
    assert n == 28 and worst < 1e-9
    assert "/levels:" in run.model_versions["forecast"]


def test_reference_views_hold_each_ids_last_record(published):
    """``dims/products`` and ``dims/stores``: one row per id, the fields of its last message
    (by offset, then partition), every message counted; re-categorised SKUs included."""
    lake, run, written, _ = published
    con = duck(lake, run)
    for topic, key, attr, table in (
        ("products", "sku", "category", DIM_PRODUCTS),
        ("stores", "store_id", "region", DIM_STORES),
    ):
        rows = written[topic].to_pylist()
        last: dict[str, dict] = {}
        for r in sorted(rows, key=lambda r: (r["_offset"], r["_partition"])):
            last[r[key]] = r
        con.register(
            f"dim_{topic}",
            DeltaTable(lake.table(table), version=run.view_versions[table]).to_pyarrow_table(),
        )
        got = {
            r[0]: (r[1], r[2])
            for r in con.execute(f"SELECT {key}, {attr}, messages FROM dim_{topic}").fetchall()
        }
        counts = {k: sum(r[key] == k for r in rows) for k in last}
        assert got == {k: (r[attr], counts[k]) for k, r in last.items()}
        assert max(counts.values()) > 1, "the fixture re-sends some ids"
        assert run.row_counts[topic] == len(rows)


def test_run_record_lists_the_pin_watermark_views_and_models(published):
    lake, run, written, _ = published
    for topic, table in (("orders", MASTER_ORDERS), ("reviews", MASTER_REVIEWS)):
        assert run.master_versions[table] == 2  # three commits
        t = written[topic]
        parts = t.column("_partition").to_numpy()
        offs = t.column("_offset").to_numpy()
        expected = {int(p): int(offs[parts == p].max()) + 1 for p in np.unique(parts)}
        assert run.watermark[topic] == expected
    assert set(run.view_versions) == set(VIEWS)
    for view, version in run.view_versions.items():
        table = view_at(lake, view, version)
        assert table.schema.names == VIEW_SCHEMAS[view].names
        assert set(table.column("run_id").to_pylist()) == {run.run_id}
        assert table.num_rows == run.row_counts[view]
    assert set(STAGES) - {"publish"} <= set(run.stage_seconds)
    assert run.stage_seconds["total"] > 0
    assert run.model_versions["sentiment"].startswith("tfidf-lr-")
    forecast_version = run.model_versions["forecast"]
    assert forecast_version.startswith("statsforecast-2.1.1+lightgbm-"), forecast_version
    assert "/mean(FourierETS+LightGBM)/" in forecast_version  # names the default ensemble
    assert "/short(FourierETS+SARIMA)/" in forecast_version  # and the one of short series
    statuses = [r.status for r in read_runs(lake.table(RUNS)) if r.run_id == run.run_id]
    assert statuses == ["running", "published"]


def test_spark_reads_exactly_the_pinned_version_and_its_files(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    spec = SalesSpec(days=10, skus=3, stores=2, seed=1)
    first = synthetic_orders(spec)
    write_master(lake, "orders", first, partitions=spec.partitions)
    pin = pin_table(lake, "orders")
    later = synthetic_orders(SalesSpec(days=10, skus=3, stores=2, seed=2))
    write_master(lake, "orders", later, partitions=spec.partitions)

    df = read_pinned(spark, pin)
    assert df.count() == first.num_rows
    # Delta's reader at versionAsOf scans exactly the files delta-rs listed for the pin.
    assert {re.sub("^file:/+", "/", unquote(f)) for f in df.inputFiles()} == set(pin.files)
    assert dict(df.dtypes)["event_date"] == "date"
    dates = {r[0] for r in df.select("event_date").distinct().collect()}
    assert dates == set(first.column("event_date").to_pylist())
    parts = first.column("_partition").to_numpy()
    offsets = first.column("_offset").to_numpy()
    # Every partition has a position, 0 for one without events (as ingest writes them).
    assert pin.positions == {
        p: int(offsets[parts == p].max()) + 1 if (parts == p).any() else 0
        for p in range(spec.partitions)
    }


def test_failure_before_publish_leaves_the_previous_run_served_and_a_rerun_is_clean(
    published, spark
):
    # Uses the module's lake: the other tests read the first run at its pinned versions,
    # which later commits do not change.
    lake, first, _, settings = published
    assert latest_published_run(lake.table(RUNS)).run_id == first.run_id
    first_id = first.run_id
    before = {v: view_at(lake, v, n) for v, n in first.view_versions.items()}

    # New events arrive; the next run dies after the sentiment_by_sku stage.
    more = SalesSpec(days=35, skus=3, stores=2, end_date=SPEC.end_date, seed=22, review_rate=0.2)
    build_master(lake, more)
    with pytest.raises(InjectedFailure):
        run_batch(settings, spark=spark, fail_after_stage="sentiment_by_sku")

    current = latest_published_run(lake.table(RUNS))
    assert current is not None and current.run_id == first_id
    failed = [r for r in read_runs(lake.table(RUNS)) if r.status == "failed"]
    assert len(failed) == 1 and "injected failure" in (failed[0].error or "")
    # The failed run did commit some views, but readers pinning the served run see it unchanged.
    moved = [v for v in VIEWS if DeltaTable(lake.table(v)).version() > first.view_versions[v]]
    # Every sales table, the scores and the all-time sentiment came before the failure.
    sales_tables = {table for _, _, table in aggregate_stages("orders")}
    assert {VIEW_DAILY_SALES, VIEW_HOURLY_SALES} <= sales_tables
    dims = {table for topic in REFERENCE_TOPICS for _, _, table in aggregate_stages(topic)}
    assert set(moved) == sales_tables | dims | {VIEW_REVIEW_SCORES, VIEW_SENTIMENT_BY_SKU}
    for view, version in first.view_versions.items():
        assert view_at(lake, view, version).equals(before[view])

    # A rerun publishes cleanly: only its own rows, the new events included.
    third_id = run_batch(settings, spark=spark)
    third = latest_published_run(lake.table(RUNS))
    assert third is not None and third.run_id == third_id != failed[0].run_id
    for view, version in third.view_versions.items():
        assert set(view_at(lake, view, version).column("run_id").to_pylist()) == {third_id}
    assert third.row_counts["orders"] > first.row_counts["orders"]
    for topic, parts in first.watermark.items():
        assert all(third.watermark[topic][p] >= o for p, o in parts.items())
    assert sum(third.watermark["orders"].values()) > sum(first.watermark["orders"].values())
    assert (
        sum(
            view_at(lake, VIEW_DAILY_SALES, third.view_versions[VIEW_DAILY_SALES])
            .column("order_lines")
            .to_pylist()
        )
        == third.row_counts["orders"]
    )


def test_a_run_over_an_empty_lake_publishes_empty_views_and_says_why(spark, tmp_path):
    root = tmp_path / "lake"
    run_id = run_batch(make_settings(root), spark=spark)
    run = latest_published_run(Lake(str(root)).table(RUNS))
    assert run is not None and run.run_id == run_id
    assert run.master_versions == {} and run.watermark == {t: {} for t in TOPICS}
    assert all(run.row_counts[v] == 0 for v in VIEWS)
    assert any("master/orders absent" in n for n in run.notes)
    assert any("lexicon" in n for n in run.notes)
    assert run.model_versions["sentiment"] == "vader-lexicon-3.3.2"


def test_unknown_stage_for_the_failure_hook_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="fail_after_stage must be one of"):
        run_batch(make_settings(tmp_path / "lake"), spark=object(), fail_after_stage="nope")  # type: ignore[arg-type]


def test_committing_a_view_twice_for_the_same_run_is_a_no_op(spark, tmp_path):
    from batch.publish import RunIdentity, write_view

    lake = Lake(str(tmp_path / "lake"))
    rows = [(date(2026, 1, d), "S1", "A", d, 2.5 * d, 1) for d in range(1, 6)]
    df = spark.createDataFrame(
        rows, "date date, store_id string, sku string, units long, revenue double, order_lines long"
    )
    run = RunIdentity.new()
    first = write_view(df.withColumn("run_id", F.lit(run.run_id)), lake, VIEW_DAILY_SALES, run)
    again = write_view(df.withColumn("run_id", F.lit(run.run_id)), lake, VIEW_DAILY_SALES, run)
    assert first == again == (0, 5)
    dt = DeltaTable(lake.table(VIEW_DAILY_SALES))
    assert dt.version() == 0
    assert dt.schema().to_arrow() == pa.schema(VIEW_SCHEMAS[VIEW_DAILY_SALES])  # types as declared
    protocol = dt.protocol()  # what delta-rs reads and appends to: no table features
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert not protocol.reader_features and not protocol.writer_features
    stats = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
    assert sum(stats["num_records"]) == 5
    # delta-spark's file statistics let readers skip files.
    assert min(stats["min.units"]) == 1 and max(stats["max.units"]) == 5
    assert min(stats["min.date"]) == date(2026, 1, 1)

    later = RunIdentity.new()
    version, n = write_view(
        df.limit(2).withColumn("run_id", F.lit(later.run_id)), lake, VIEW_DAILY_SALES, later
    )
    assert (version, n) == (1, 2)
    assert DeltaTable(lake.table(VIEW_DAILY_SALES)).to_pyarrow_table().num_rows == 2
    assert DeltaTable(lake.table(VIEW_DAILY_SALES), version=0).to_pyarrow_table().num_rows == 5


def test_a_run_during_the_day_forecasts_from_the_last_complete_day(spark) -> None:
    """Sales of today (a run at noon sees part of the day) are not a day to train on: the
    origin is yesterday, and the forecasts start today, so today keeps its bounds."""
    from datetime import UTC, datetime, timedelta

    from batch.run import forecast_frames

    today = datetime.now(UTC).date()
    rows = [
        (sku, "S1", today - timedelta(days=d), 20 + (d % 7), 50.0, 20)
        for sku in ("A", "B")
        for d in range(0, 120)
    ]
    daily = spark.createDataFrame(
        rows, "sku string, store_id string, date date, units long, revenue double, order_lines long"
    )
    cfg = ForecastConfig(
        horizon=7,
        backtest_windows=1,
        backtest_horizon=7,
        smooth_models=("SeasonalNaive",),
        intermittent_models=("SeasonalNaive",),
        reconcile="BottomUp",
    )
    info: dict = {}
    fc, _, _ = forecast_frames(spark, daily, cfg, "origin-test", info, lambda df: df)
    dates = sorted({r["date"] for r in fc.select("date").collect()})
    assert dates[0] == today and len(dates) == 7, dates
