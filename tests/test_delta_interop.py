"""delta-spark (the batch layer) and delta-rs (every Python process) read what the other writes.

Real tables on disk, a real Spark session with delta-spark's jars: views written by Spark are
read by delta-rs and by DuckDB (over delta-rs), master tables written by delta-rs (as ingest
writes them) are read by Spark's Delta reader, and time travel gives each side's old versions
on the other side. Spark's automatic checkpoints are read by delta-rs too, app transactions
(the ingest positions, the runs' idempotency keys) included.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from pyspark.sql import functions as F

from batch.publish import BATCH_APP_ID, VIEW_SCHEMAS, RunIdentity, write_view
from batch.snapshot import pin_table, read_pinned
from batch.spark import DELTA_TABLE_DEFAULTS, DeltaJarsMissing, delta_jars, spark_path
from batch.synthetic import SalesSpec, synthetic_orders, write_master
from lambdalake.contract.lake import MASTER_ORDERS, VIEW_DAILY_SALES, VIEW_HOURLY_SALES, Lake
from lambdalake.contract.manifest import ingest_app_id, ingest_positions

SALES_DDL = "date date, store_id string, sku string, units long, revenue double, order_lines long"


def sales_rows(run: int, n: int) -> list[tuple]:
    return [(date(2026, 1, 1 + d), f"S{run}", "A", run * 100 + d, 1.5 * d, 1) for d in range(n)]


def run_at(i: int) -> RunIdentity:
    # Increasing start times: each run's app-transaction version is newer than the last.
    return RunIdentity.new(datetime(2026, 2, 1, 0, 0, i, tzinfo=UTC), suffix=f"r{i}")


def as_set(table: pa.Table, columns: list[str]) -> set[tuple]:
    return set(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


def test_protocol_defaults_are_the_ones_delta_rs_supports(spark) -> None:
    conf = spark.sparkContext.getConf()
    for key, value in DELTA_TABLE_DEFAULTS.items():
        assert conf.get(f"spark.databricks.delta.properties.defaults.{key}") == value
    assert conf.get("spark.sql.extensions") == "io.delta.sql.DeltaSparkSessionExtension"


def test_missing_jars_say_make_install_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DeltaJarsMissing) as err:
        delta_jars(tmp_path / "nowhere")
    message = str(err.value)
    assert "make install" in message and "\n" not in message
    assert any(Path(j).name.startswith("delta-spark_") for j in delta_jars())


def test_a_view_spark_writes_reads_the_same_in_delta_rs_and_duckdb_at_every_version(
    spark, tmp_path: Path
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    uri = lake.table(VIEW_DAILY_SALES)
    runs = [run_at(i) for i in range(4)]
    # A checkpoint every 2 commits (Delta's default is 10): delta-rs must read Spark's.
    interval = "spark.databricks.delta.properties.defaults.checkpointInterval"
    spark.conf.set(interval, "2")
    try:
        for i, run in enumerate(runs):
            df = spark.createDataFrame(sales_rows(i, 3 + i % 4), SALES_DDL)
            version, rows = write_view(df.withColumn("run_id", F.lit(run.run_id)), lake,
                                       VIEW_DAILY_SALES, run)  # fmt: skip
            assert (version, rows) == (i, 3 + i % 4)
    finally:
        spark.conf.unset(interval)

    dt = DeltaTable(uri)
    protocol = dt.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert not protocol.reader_features and not protocol.writer_features
    assert (Path(uri) / "_delta_log" / "00000000000000000002.checkpoint.parquet").exists()
    assert dt.version() == 3
    assert dt.schema().to_arrow() == VIEW_SCHEMAS[VIEW_DAILY_SALES]
    # The idempotency key survives the checkpoint, as delta-rs reads it.
    assert dt.transaction_version(BATCH_APP_ID) == runs[-1].seq

    cols = ["date", "store_id", "sku", "units", "revenue", "order_lines", "run_id"]
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    for version in range(4):
        rows = sales_rows(version, 3 + version % 4)
        expected = {(*r, runs[version].run_id) for r in rows}
        via_rs = DeltaTable(uri, version=version).to_pyarrow_table()
        assert as_set(via_rs, cols) == expected
        assert set(via_rs.column("run_id").to_pylist()) == {runs[version].run_id}
        con.register("v", DeltaTable(uri, version=version).to_pyarrow_dataset())
        got = set(con.execute(f"SELECT {', '.join(cols)} FROM v").fetchall())
        assert got == expected
        con.unregister("v")
    # Spark's own time travel agrees (before and after its checkpoint).
    for version in (0, 3):
        via_spark = spark.read.format("delta").option("versionAsOf", version).load(spark_path(uri))
        got = {tuple(r) for r in via_spark.select(*cols).collect()}
        assert got == as_set(DeltaTable(uri, version=version).to_pyarrow_table(), cols)


def test_an_hourly_view_keeps_utc_hours_across_the_writers(spark, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    hour = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # a DST change in Europe: UTC must not move
    df = spark.createDataFrame(
        [(hour, "S1", "A", 3, 7.5, 2)],
        "hour timestamp, store_id string, sku string, units long, revenue double, order_lines long",
    )
    run = run_at(1)
    write_view(df.withColumn("run_id", F.lit(run.run_id)), lake, VIEW_HOURLY_SALES, run)
    table = DeltaTable(lake.table(VIEW_HOURLY_SALES)).to_pyarrow_table()
    assert table.schema.field("hour").type == pa.timestamp("us", tz="UTC")
    assert table.column("hour").to_pylist() == [hour]
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    con.register("h", table)
    assert con.execute("SELECT hour::VARCHAR FROM h").fetchone() == ("2026-03-29 01:00:00+00",)


def test_a_master_delta_rs_writes_reads_in_spark_by_version(spark, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    spec = SalesSpec(days=20, skus=3, stores=2, seed=3)
    first, second = synthetic_orders(spec), synthetic_orders(SalesSpec(days=5, skus=2, seed=4))
    write_master(lake, "orders", first, partitions=spec.partitions, commits=2)
    pin_v1 = pin_table(lake, "orders")
    write_master(lake, "orders", second, partitions=spec.partitions)
    pin_v2 = pin_table(lake, "orders")
    assert (pin_v1.version, pin_v2.version) == (1, 2)

    protocol = DeltaTable(lake.table(MASTER_ORDERS)).protocol()
    assert not protocol.reader_features  # nothing Spark's reader would need beyond v1

    keys = ["event_id", "_partition", "_offset"]
    for pin in (pin_v1, pin_v2):
        via_spark = read_pinned(spark, pin)
        got = {tuple(r) for r in via_spark.select(*keys).collect()}
        via_rs = DeltaTable(pin.uri, version=pin.version).to_pyarrow_table()
        assert got == as_set(via_rs, keys)
        assert dict(via_spark.dtypes)["event_date"] == "date"
        assert dict(via_spark.dtypes)["event_time"] == "timestamp"
    assert read_pinned(spark, pin_v1).count() == first.num_rows
    assert read_pinned(spark, pin_v2).count() == first.num_rows + second.num_rows


def test_delta_rs_appends_after_spark_compacts_and_both_keep_the_positions(
    spark, tmp_path: Path
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    spec = SalesSpec(days=10, skus=2, stores=2, seed=5)
    orders = synthetic_orders(spec)
    write_master(lake, "orders", orders, partitions=spec.partitions, commits=6)
    uri = lake.master("orders")
    before = ingest_positions(uri, "orders")

    spark.sql(f"OPTIMIZE delta.`{spark_path(uri)}`").collect()
    compacted = DeltaTable(uri)
    assert compacted.version() == 6
    assert ingest_positions(uri, "orders") == before  # txn actions are table state
    assert compacted.to_pyarrow_table().num_rows == orders.num_rows

    # Ingest (delta-rs) goes on appending to the table Spark last committed to.
    extra = orders.slice(0, 5)
    write_deltalake(uri, extra, mode="append", partition_by=["event_date"])
    via_spark = spark.read.format("delta").load(spark_path(uri))
    assert via_spark.count() == orders.num_rows + 5
    old = spark.read.format("delta").option("versionAsOf", 2).load(spark_path(uri)).count()
    assert old == DeltaTable(uri, version=2).to_pyarrow_table().num_rows < orders.num_rows
    assert DeltaTable(uri).transaction_version(ingest_app_id("orders", 0)) == before[0]
