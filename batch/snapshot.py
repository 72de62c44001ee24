"""Pin the master tables and read exactly that snapshot into Spark.

A pin is, per topic, the current Delta version of ``master/<topic>``, the
Parquet files delta-rs lists for that version, and the ingest position
committed with it (``lambdalake.contract.manifest.ingest_positions``): the watermark.
Spark then reads that version with Delta's own reader (``versionAsOf``), so
rows ingested while the run is going on are neither half-seen nor
double-counted, and any table feature delta-spark supports is honoured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from lambdalake.contract.events import KEY_BY_TOPIC, TOPICS
from lambdalake.contract.lake import MASTER_SCHEMA_BY_TOPIC, MASTER_TABLE_BY_TOPIC, Lake
from lambdalake.contract.manifest import Watermark, ingest_positions
from lambdalake.contract.views import dedup_rank_sql

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType


@dataclass(frozen=True)
class TablePin:
    topic: str
    uri: str
    version: int | None  # None: the table does not exist yet (nothing ingested)
    files: tuple[str, ...] = ()
    positions: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    pins: dict[str, TablePin]

    @property
    def master_versions(self) -> dict[str, int]:
        return {
            MASTER_TABLE_BY_TOPIC[t]: p.version
            for t, p in self.pins.items()
            if p.version is not None
        }

    @property
    def watermark(self) -> Watermark:
        return {t: dict(p.positions) for t, p in self.pins.items()}


def pin_table(lake: Lake, topic: str) -> TablePin:
    """The current version of ``master/<topic>``, its files and its ingest positions."""
    from deltalake import DeltaTable

    uri = lake.master(topic)
    if not DeltaTable.is_deltatable(uri, storage_options=lake.storage_options):
        return TablePin(topic, uri, None)
    dt = DeltaTable(uri, storage_options=lake.storage_options)
    version = dt.version()
    positions = ingest_positions(uri, topic, version=version, storage_options=lake.storage_options)
    return TablePin(topic, uri, version, tuple(dt.file_uris()), positions)


def pin_snapshot(lake: Lake, topics: tuple[str, ...] = TOPICS) -> Snapshot:
    return Snapshot({t: pin_table(lake, t) for t in topics})


# --- Spark ---------------------------------------------------------------------------------


def spark_type(t: pa.DataType) -> DataType:
    """The Spark SQL type matching an Arrow type of the lake's schemas."""
    from pyspark.sql import types as T

    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return T.StringType()
    if pa.types.is_int64(t):
        return T.LongType()
    if pa.types.is_int32(t):
        return T.IntegerType()
    if pa.types.is_float64(t):
        return T.DoubleType()
    if pa.types.is_date32(t):
        return T.DateType()
    if pa.types.is_timestamp(t):
        if t.tz is None:
            return T.TimestampNTZType()
        return T.TimestampType()
    if pa.types.is_binary(t):
        return T.BinaryType()
    if pa.types.is_boolean(t):
        return T.BooleanType()
    raise TypeError(f"no Spark type for Arrow {t}")


def spark_schema(schema: pa.Schema) -> StructType:
    from pyspark.sql import types as T

    return T.StructType([T.StructField(f.name, spark_type(f.type), True) for f in schema])


def read_pinned(spark: SparkSession, pin: TablePin) -> DataFrame:
    """The rows of a pinned master table: Delta's reader at the pinned version, typed as
    the lake's master schema."""
    from pyspark.sql import functions as F

    from batch.spark import spark_path

    schema = spark_schema(MASTER_SCHEMA_BY_TOPIC[pin.topic])
    if pin.version is None:
        return spark.createDataFrame([], schema)
    df = spark.read.format("delta").option("versionAsOf", pin.version).load(spark_path(pin.uri))
    return df.select(*(F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields))


def deduplicate(df: DataFrame, topic: str) -> DataFrame:
    """One row per event key: the first in the log wins (the shared rule,
    ``lambdalake.contract.views.dedup_rank_sql``: the lowest offset, then partition)."""
    from pyspark.sql import functions as F

    rank = F.expr(dedup_rank_sql(KEY_BY_TOPIC[topic]))
    return df.withColumn("_rank", rank).where("_rank = 1").drop("_rank")
