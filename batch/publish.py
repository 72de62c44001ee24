"""Write views with delta-spark, and record runs.

Each view is one delta-spark ``overwrite`` write: Spark executors write the
Parquet files in parallel and the driver commits them as one Delta commit that
adds exactly those files and removes the previous run's. The commit carries
Delta's app transaction ``(txnAppId = lambdalake-batch, txnVersion = run_seq)``
and the run id as its ``userMetadata``, so writing the same run twice is a
no-op (Delta skips a write whose txnVersion is not newer) and
:func:`write_view` returns the version of the first commit.

The run becomes visible only when :func:`append_run` appends its ``published``
row to ``runs`` (``lambdalake.contract.manifest``, written with delta-rs like every
reader of it reads it). Files of a run that failed before its commit are never
referenced; vacuum removes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lambdalake.contract.lake import (
    RUNS,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_REVIEW_SCORES,
    Lake,
)
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord
from lambdalake.contract.views import PERIOD_COLUMN, Granularity, ViewDef, aggregate_tables

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

BATCH_APP_ID = "lambdalake-batch"
UTC_TS = pa.timestamp("us", tz="UTC")


def _f(name: str, t: pa.DataType) -> pa.Field:
    # Spark writes every column as OPTIONAL; the Delta schema says the same.
    return pa.field(name, t, nullable=True)


def _nullable(schema: pa.Schema) -> pa.Schema:
    # Spark writes every column as OPTIONAL; the Delta schema says the same.
    return pa.schema([f.with_nullable(True) for f in schema])


def aggregate_schema(view: ViewDef, granularity: Granularity | None) -> pa.Schema:
    """An aggregate view's schema, from its definition (``lambdalake.contract.views``): the period
    (named as ``PERIOD_COLUMN`` says), dimensions, measures, derived measures, ``run_id``."""
    return _nullable(
        view.arrow_schema(
            granularity,
            period_name=PERIOD_COLUMN[granularity] if granularity else "period",
            derived=True,
            extra=[("run_id", "string")],
        )
    )


# The views' column contract (names, order and types), as committed to Delta.
VIEW_SCHEMAS: dict[str, pa.Schema] = {
    **{table: aggregate_schema(view, grain) for view, grain, table in aggregate_tables()},
    VIEW_REVIEW_SCORES: pa.schema(
        [
            _f("review_id", pa.string()),
            _f("sku", pa.string()),
            _f("event_time", UTC_TS),
            _f("rating", pa.int32()),
            _f("sentiment", pa.float64()),
            _f("label", pa.string()),
            _f("model_version", pa.string()),
            _f("run_id", pa.string()),
        ]
    ),
    VIEW_DEMAND_FORECAST: pa.schema(
        [
            _f("sku", pa.string()),
            _f("store_id", pa.string()),
            _f("date", pa.date32()),
            _f("forecast", pa.float64()),
            _f("lower_80", pa.float64()),
            _f("upper_80", pa.float64()),
            _f("lower_95", pa.float64()),
            _f("upper_95", pa.float64()),
            _f("model", pa.string()),
            _f("level", pa.string()),
            _f("run_id", pa.string()),
        ]
    ),
    VIEW_FORECAST_ACCURACY: pa.schema(
        [
            _f("sku", pa.string()),
            _f("store_id", pa.string()),
            _f("model", pa.string()),
            _f("mase", pa.float64()),
            _f("smape", pa.float64()),
            _f("coverage_80", pa.float64()),
            _f("coverage_95", pa.float64()),
            _f("n_train_days", pa.int32()),
            _f("level", pa.string()),
            _f("run_id", pa.string()),
        ]
    ),
}


@dataclass(frozen=True)
class RunIdentity:
    """A run's id and the integer its Delta app transactions carry (µs since epoch)."""

    run_id: str
    seq: int
    started_at: datetime

    @classmethod
    def new(cls, now: datetime | None = None, suffix: str | None = None) -> RunIdentity:
        import uuid

        now = now or datetime.now(UTC)
        seq = int(now.timestamp() * 1_000_000)
        tag = suffix or uuid.uuid4().hex[:6]
        return cls(f"{now:%Y%m%dT%H%M%S}{now.microsecond:06d}Z-{tag}", seq, now)


def conform(df: DataFrame, schema: pa.Schema) -> DataFrame:
    """Select and cast ``df``'s columns to exactly the view schema (names, order, types)."""
    from pyspark.sql import functions as F

    from batch.snapshot import spark_type

    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ValueError(f"view is missing columns {missing}")
    return df.select(*(F.col(f.name).cast(spark_type(f.type)).alias(f.name) for f in schema))


def committed_version(uri: str, run: RunIdentity, storage_options: Any = None) -> int | None:
    """The version at which ``run`` committed to the table at ``uri``, if it did."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
        return None
    dt = DeltaTable(uri, storage_options=storage_options)
    if (dt.transaction_version(BATCH_APP_ID) or -1) < run.seq:
        return None
    for entry in dt.history(limit=100):
        # delta-spark records the run id as userMetadata (older runs committed with
        # delta-rs kept it in a custom commit-info key).
        if run.run_id in (entry.get("userMetadata"), entry.get("lambdalake.run_id")):
            return int(entry["version"])
    return None


def write_view(
    df: DataFrame,
    lake: Lake,
    view: str,
    run: RunIdentity,
    *,
    files: int | None = None,
) -> tuple[int, int]:
    """Write ``df`` as the whole content of ``view`` for ``run``; returns (version, rows).

    Idempotent per run: if this run already committed the view, its version is returned
    and nothing is written.
    """
    from batch.spark import spark_path

    uri = lake.table(view)
    done = committed_version(uri, run, lake.storage_options)
    if done is None:
        out = conform(df, VIEW_SCHEMAS[view])
        if files is not None:
            out = out.coalesce(max(1, files))
        (
            out.write.format("delta")
            .mode("overwrite")
            # A view is replaced whole: a run may change its columns.
            .option("overwriteSchema", "true")
            .option("txnAppId", BATCH_APP_ID)
            .option("txnVersion", run.seq)
            .option("userMetadata", run.run_id)
            .save(spark_path(uri))
        )
        done = committed_version(uri, run, lake.storage_options)
        if done is None:
            raise RuntimeError(
                f"{view}: the commit of run {run.run_id} is not in the table's log (another "
                f"run with a later start committed first?)"
            )
    return done, _rows_at(uri, done, lake.storage_options)


def _rows_at(uri: str, version: int, storage_options: Any) -> int:
    from deltalake import DeltaTable

    dt = DeltaTable(uri, version=version, storage_options=storage_options)
    return sum(int(a) for a in dt.get_add_actions(flatten=True).column("num_records").to_pylist())


# --- the runs table --------------------------------------------------------------------------


def append_run(lake: Lake, record: RunRecord) -> None:
    """Append one row (a state of ``record``) to the ``runs`` table."""
    from deltalake import write_deltalake

    table = pa.Table.from_pylist([record.to_row()], schema=RUNS_SCHEMA)
    write_deltalake(lake.table(RUNS), table, mode="append", storage_options=lake.storage_options)


def view_versions_readable(lake: Lake, versions: Mapping[str, int]) -> dict[str, int]:
    """Rows per view at the given versions (what a reader pinning them would see)."""
    return {v: _rows_at(lake.table(v), n, lake.storage_options) for v, n in versions.items()}
