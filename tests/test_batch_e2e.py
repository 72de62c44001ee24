"""End to end through the real pipeline: generator -> Kafka (Tansu) -> ingest -> batch run."""

from __future__ import annotations

import threading

import duckdb
import pytest
from deltalake import DeltaTable
from kafka import TopicPartition

from lambdalake.contract.lake import MASTER_ORDERS, MASTER_REVIEWS, RUNS, Lake
from lambdalake.contract.manifest import latest_published_run
from lambdalake.kafka.clients import end_offsets


@pytest.mark.slow
def test_batch_over_ingested_history_matches_the_log_and_a_duckdb_recompute(
    fresh_broker, settings_for, spark
):
    from batch.ingest import run_ingest
    from batch.run import run_batch
    from generator.produce import run_history

    settings = settings_for(fresh_broker)
    sent = run_history(
        settings,
        days=30,
        skus=4,
        stores=2,
        seed=3,
        end_date="2026-03-31",
        late_fraction=0.03,
        duplicate_fraction=0.05,
        bad_fraction=0.02,
        processes=1,
    )
    ingested = run_ingest(settings, until_end=True, stop=threading.Event())
    run_id = run_batch(settings, spark=spark)

    lake = Lake(settings.lake_uri)
    run = latest_published_run(lake.table(RUNS))
    assert run is not None and run.run_id == run_id

    # The watermark is the log's end: every message consumed, quarantined ones included.
    parts = range(fresh_broker.partitions)
    for topic in ("orders", "reviews"):
        ends = end_offsets(fresh_broker.bootstrap, [TopicPartition(topic, p) for p in parts])
        assert run.watermark[topic] == {tp.partition: off for tp, off in ends.items()}
    assert sum(sum(p.values()) for p in run.watermark.values()) == (
        sent["orders"]
        + sent["reviews"]
        + sent["duplicates"]
        + sent["bad"]
        + sent["products"]
        + sent["stores"]  # the catalog, sent first
    )

    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'").fetchall()
    for name, table in (("orders", MASTER_ORDERS), ("reviews", MASTER_REVIEWS)):
        dt = DeltaTable(lake.table(table), version=run.master_versions[table])
        con.register(f"master_{name}", dt.to_pyarrow_table())
        assert dt.to_pyarrow_table().num_rows == ingested[name]["written"]
    for view, version in run.view_versions.items():
        con.register(
            view.split("/")[1], DeltaTable(lake.table(view), version=version).to_pyarrow_table()
        )

    expected = con.execute(
        """
        WITH dedup AS (
            SELECT * FROM master_orders
            QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY _offset, _partition) = 1
        )
        SELECT event_date, store_id, sku, SUM(quantity), SUM(quantity * unit_price), COUNT(*)
        FROM dedup GROUP BY ALL ORDER BY ALL
        """
    ).fetchall()
    got = con.execute(
        "SELECT date, store_id, sku, units, revenue, order_lines FROM daily_sales ORDER BY ALL"
    ).fetchall()
    assert [g[:4] + g[5:] for g in got] == [e[:4] + e[5:] for e in expected]
    assert [g[4] for g in got] == pytest.approx([e[4] for e in expected], rel=1e-9)
    assert sum(g[5] for g in got) == sent["orders"]  # every duplicate delivery dropped
    # Hourly sales: every order once, in its UTC hour (late events included).
    hourly = con.execute(
        "SELECT sum(order_lines), count(*) FILTER (WHERE hour <> date_trunc('hour', hour)) "
        "FROM hourly_sales"
    ).fetchall()[0]
    assert hourly == (sent["orders"], 0)

    reviews = con.execute("SELECT count(DISTINCT review_id) FROM master_reviews").fetchall()[0][0]
    assert reviews == sent["reviews"]
    assert con.execute("SELECT sum(reviews) FROM sentiment_by_sku").fetchall()[0][0] == reviews
    assert con.execute("SELECT count(*) FROM review_scores").fetchall()[0][0] == reviews
    series = {(g[2], g[1]) for g in got}  # (sku, store_id)
    # Every level: each series, each SKU and each store over the others, and the total.
    nodes = len(series) + len({k for k, _ in series}) + len({t for _, t in series}) + 1
    assert con.execute("SELECT count(*) FROM forecast_accuracy").fetchall()[0][0] == nodes
    per_level = dict(
        con.execute("SELECT level, count(*) FROM demand_forecast GROUP BY level").fetchall()
    )
    assert per_level["sku_store"] == 28 * len(series)
    assert sum(per_level.values()) == 28 * nodes
