"""Write views with Spark, commit them to Delta with delta-rs, and record runs.

Each view is written in two steps, the way any Delta writer works:

1. Spark executors write Parquet files in parallel into ``<view>/<run_id>/``
   (the files are invisible to readers until step 2);
2. the driver commits them with delta-rs as one ``overwrite`` commit that adds
   exactly those files and removes the previous run's. The commit carries an
   app transaction ``(lambdalake-batch, run_seq)`` and the run id in its
   commit info, so committing the same run twice is a no-op that returns the
   version of the first commit.

The run becomes visible only when ``publish_run`` appends its ``published``
row to ``runs`` (``lambdalake.manifest``). Files of a run that failed before
its commit are never referenced; ``vacuum`` removes them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lambdalake.lake import (
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_REVIEW_SCORES,
    VIEW_SENTIMENT_BY_SKU,
    Lake,
)
from lambdalake.manifest import RUNS_SCHEMA, RunRecord

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

BATCH_APP_ID = "lambdalake-batch"
UTC_TS = pa.timestamp("us", tz="UTC")


def _f(name: str, t: pa.DataType) -> pa.Field:
    # Spark writes every column as OPTIONAL; the Delta schema says the same.
    return pa.field(name, t, nullable=True)


# The views' column contract (names, order and types), as committed to Delta.
VIEW_SCHEMAS: dict[str, pa.Schema] = {
    VIEW_DAILY_SALES: pa.schema(
        [
            _f("date", pa.date32()),
            _f("store_id", pa.string()),
            _f("sku", pa.string()),
            _f("units", pa.int64()),
            _f("revenue", pa.float64()),
            _f("order_lines", pa.int64()),
            _f("run_id", pa.string()),
        ]
    ),
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
    VIEW_SENTIMENT_BY_SKU: pa.schema(
        [
            _f("sku", pa.string()),
            _f("reviews", pa.int64()),
            _f("mean_rating", pa.float64()),
            _f("mean_sentiment", pa.float64()),
            _f("positive", pa.int64()),
            _f("neutral", pa.int64()),
            _f("negative", pa.int64()),
            _f("rating_sum", pa.int64()),
            _f("sentiment_sum", pa.float64()),
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


# --- Parquet file statistics for the add actions -------------------------------------------


def _stat_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and len(value) > 64:
        return None  # long strings are not worth a stat (and max may not be truncated)
    if isinstance(value, bytes):
        return None
    return value


def file_stats(metadata: Any) -> str:
    """Delta ``stats`` JSON (numRecords, min/max, null counts) from a Parquet footer."""
    schema = metadata.schema.to_arrow_schema()
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for ci, name in enumerate(schema.names):
        lo = hi = None
        n_null = 0
        complete = True
        for rg in range(metadata.num_row_groups):
            col = metadata.row_group(rg).column(ci)
            st = col.statistics
            if st is None or not st.has_null_count:
                complete = False
                break
            n_null += st.null_count
            if st.has_min_max:
                a, b = _stat_value(st.min), _stat_value(st.max)
                if a is not None:
                    lo = a if lo is None else min(lo, a)
                if b is not None:
                    hi = b if hi is None else max(hi, b)
        if not complete:
            continue
        nulls[name] = n_null
        if lo is not None and hi is not None:
            mins[name], maxs[name] = lo, hi
    return json.dumps(
        {"numRecords": metadata.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _list_parquet(view_uri: str, run_id: str) -> list[tuple[str, int, Any]]:
    """(relative path, size, footer) of each Parquet file Spark wrote for the run."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    fs, base = _filesystem(view_uri)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(f"{base}/{run_id}", recursive=False)):
        name = info.base_name
        if info.type != pafs.FileType.File or not name.endswith(".parquet"):
            continue
        if name.startswith((".", "_")):
            continue
        with fs.open_input_file(info.path) as f:
            meta = pq.ParquetFile(f).metadata
        out.append((f"{run_id}/{name}", int(info.size), meta))
    # Hadoop's local file system leaves .crc side files: never referenced, so drop them.
    if isinstance(fs, pafs.LocalFileSystem):
        for info in fs.get_file_info(pafs.FileSelector(f"{base}/{run_id}", recursive=False)):
            if info.base_name.endswith(".crc"):
                fs.delete_file(info.path)
    return sorted(out)


def committed_version(uri: str, run: RunIdentity, storage_options: Any = None) -> int | None:
    """The version at which ``run`` committed to the table at ``uri``, if it did."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
        return None
    dt = DeltaTable(uri, storage_options=storage_options)
    if (dt.transaction_version(BATCH_APP_ID) or -1) < run.seq:
        return None
    for entry in dt.history(limit=100):
        if entry.get("lambdalake.run_id") == run.run_id:
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

    Idempotent per run: if this run already committed the view, its version is returned.
    """
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import (
        AddAction,
        CommitProperties,
        Transaction,
        create_table_with_add_actions,
    )

    uri = lake.table(view)
    schema = VIEW_SCHEMAS[view]
    done = committed_version(uri, run, lake.storage_options)
    if done is not None:
        return done, _rows_at(uri, done, lake.storage_options)

    out = conform(df, schema)
    if files is not None:
        out = out.coalesce(max(1, files))
    target = f"{uri}/{run.run_id}"
    out.write.mode("overwrite").parquet(target if "://" in target else f"file://{target}")

    now_ms = int(time.time() * 1000)
    listed = _list_parquet(uri, run.run_id)
    actions = [
        AddAction(
            path=path,
            size=size,
            partition_values={},
            modification_time=now_ms,
            data_change=True,
            stats=file_stats(meta),
        )
        for path, size, meta in listed
    ]
    rows = sum(meta.num_rows for _, _, meta in listed)
    props = CommitProperties(
        custom_metadata={"lambdalake.run_id": run.run_id, "lambdalake.rows": rows},
        app_transactions=[Transaction(BATCH_APP_ID, run.seq)],
    )
    if DeltaTable.is_deltatable(uri, storage_options=lake.storage_options):
        DeltaTable(uri, storage_options=lake.storage_options).create_write_transaction(
            actions, mode="overwrite", schema=schema, commit_properties=props
        )
    else:
        create_table_with_add_actions(
            uri,
            Schema.from_arrow(schema),
            actions,
            mode="error",
            storage_options=lake.storage_options,
            commit_properties=props,
        )
    version = committed_version(uri, run, lake.storage_options)
    if version is None:  # pragma: no cover - delta-rs raised otherwise
        raise RuntimeError(f"commit of {view} for run {run.run_id} not found in its log")
    return version, rows


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
