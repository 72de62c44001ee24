"""One view definition drives every engine: the SQL it generates runs the same in DuckDB and
Spark, and merging partials over any split of the events equals aggregating them at once."""

from __future__ import annotations

import random

import duckdb
import pyarrow as pa
import pytest

from lambdalake.contract.views import SALES, SENTIMENT, aggregate_tables


def _orders(n: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    import datetime as dt

    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    times = [base + dt.timedelta(minutes=rng.randrange(0, 60 * 24 * 20)) for _ in range(n)]
    return pa.table(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "event_date": pa.array([t.date() for t in times], pa.date32()),
            "store_id": [f"s{rng.randrange(3)}" for _ in range(n)],
            "sku": [f"k{rng.randrange(5)}" for _ in range(n)],
            "quantity": [rng.choice([1, 1, 2, 3, -1]) for _ in range(n)],
            "unit_price": [rng.choice([1.5, 2.25, 10.0]) for _ in range(n)],
        }
    )


def _con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    return con


@pytest.mark.parametrize("granularity", ["day", "hour"])
def test_merging_partials_of_any_split_equals_aggregating_at_once(granularity: str) -> None:
    orders = _orders(2000, seed=7)
    con = _con()
    con.register("orders", orders)
    whole = con.execute(
        f"SELECT * FROM ({SALES.aggregate_sql('orders', granularity=granularity)}) ORDER BY ALL"
    ).fetchall()
    # Split the events at random cut points, aggregate each part, then merge the partials.
    rng = random.Random(3)
    cuts = sorted(rng.sample(range(1, orders.num_rows), 3))
    parts = [
        orders.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, orders.num_rows], strict=True)
    ]
    partials = []
    for i, part in enumerate(parts):
        con.register(f"p{i}", part)
        partials.append(f"({SALES.aggregate_sql(f'p{i}', granularity=granularity)})")
    union = " UNION ALL ".join(f"SELECT * FROM {p}" for p in partials)
    merged = con.execute(
        f"SELECT * FROM ({SALES.merge_sql(f'({union})', keys=['period', 'store_id', 'sku'])}) "
        "ORDER BY ALL"
    ).fetchall()
    assert len(merged) == len(whole)
    for a, b in zip(merged, whole, strict=True):
        assert a[:3] == b[:3] and a[3] == b[3] and a[5] == b[5]
        assert a[4] == pytest.approx(b[4], rel=1e-12)


def test_python_combine_matches_sql_merge() -> None:
    a = {"units": 3, "revenue": 4.5, "order_lines": 2}
    b = {"units": -1, "revenue": -1.5, "order_lines": 1}
    assert SALES.combine_rows(a, b) == {"units": 2, "revenue": 3.0, "order_lines": 3}
    assert SALES.combine_rows(a, {}) == a


def test_means_are_derived_after_merging_never_averaged() -> None:
    con = _con()
    # Two partials with different counts: the mean of means would be wrong.
    con.execute(
        "CREATE TABLE p AS SELECT * FROM (VALUES ('k', 1, 5, 0.5, 1, 0, 0), ('k', 3, 3, -0.3, 1, 1, 1)) "
        "t(sku, reviews, rating_sum, sentiment_sum, positive, neutral, negative)"
    )
    row = con.execute(SENTIMENT.merge_sql("p", keys=["sku"])).fetchall()[0]
    cols = [d[0] for d in con.execute(SENTIMENT.merge_sql("p", keys=["sku"])).description]
    got = dict(zip(cols, row, strict=True))
    assert got["reviews"] == 4
    assert got["mean_rating"] == pytest.approx(8 / 4)
    assert got["mean_sentiment"] == pytest.approx(0.2 / 4)
    assert SENTIMENT.derived[0].compute({"rating_sum": 8, "reviews": 4}) == 2.0
    assert SENTIMENT.derived[0].compute({"rating_sum": 0, "reviews": 0}) is None


def test_generated_sql_runs_identically_in_spark(spark) -> None:
    orders = _orders(500, seed=11)
    con = _con()
    con.register("orders", orders)
    sql = SALES.aggregate_sql("orders", granularity="hour")
    expected = sorted(
        (str(r[0].replace(tzinfo=None)), r[1], r[2], r[3], round(r[4], 6), r[5])
        for r in con.execute(sql).fetchall()
    )
    df = spark.createDataFrame(orders.to_pandas())
    df.createOrReplaceTempView("orders")
    got = sorted(
        (str(r[0]), r[1], r[2], int(r[3]), round(float(r[4]), 6), int(r[5]))
        for r in spark.sql(sql).collect()
    )
    assert got == expected


@pytest.mark.parametrize(
    ("view", "granularity", "table"),
    aggregate_tables(),
    ids=[t for _, _, t in aggregate_tables()],
)
def test_every_engine_types_a_measure_as_the_view_defines_it(view, granularity, table) -> None:
    """A measure's type is written once (``Measure.type``): the batch view's Delta schema,
    the speed layer's answers and the serving snapshot's empty table all carry it, for
    every table of every view definition."""
    from batch.publish import VIEW_SCHEMAS
    from lambdalake.contract.speed_protocol import answer_schema
    from serving.served_run import EMPTY_DDL, snapshot_table

    want = {m.name: m.type for m in view.measures}
    delta = VIEW_SCHEMAS[table]
    speed = answer_schema(view.name, granularity)
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    name = snapshot_table(view, granularity)
    con.execute(EMPTY_DDL[name])
    served = con.sql(f"SELECT * FROM {name}").to_arrow_table().schema
    for schema in (delta, speed, served):
        got = {name: str(schema.field(name).type) for name in want}
        assert got == {
            n: {"int64": "int64", "float64": "double", "string": "string"}[t]
            for n, t in want.items()
        }
    # The dimensions and period line up too (names and order), run_id and means aside.
    assert served.names == speed.names == [c for c, _ in view.partial_columns(granularity)]
