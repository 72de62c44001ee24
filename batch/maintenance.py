"""Lake maintenance: compact small files, checkpoint the log, vacuum old files.

Two engines do the same three steps (``--engine`` of ``lambdalake maintenance compact``):

``delta-rs`` (default)  delta-rs' ``optimize.compact``, ``create_checkpoint``,
                        ``cleanup_metadata`` and ``vacuum`` in this process: no JVM, the
                        faster one on one machine (docs/batch.md has the figures).
``spark``               delta-spark's ``OPTIMIZE``, a checkpoint and ``VACUUM ... RETAIN``
                        in a Spark session (``LAMBDALAKE_SPARK_MASTER``): the one for a
                        cluster, where the files are rewritten by the executors.

Both keep the tables at the protocol both libraries read (``batch.spark.DELTA_TABLE_DEFAULTS``).

Ingest commits a micro-batch every few seconds, so the master tables collect
many small files and log entries. :func:`compact` rewrites them without
changing what any table contains: compaction is a data-change-free rewrite
(``dataChange = false``), app transactions (the ingest positions) are table
state that survives it, and vacuum only deletes files that no snapshot within
the retention period references. Safe to run while ingest and batch runs go
on: compaction conflicts with no append, and readers pinned to an older
version keep their files for ``retention_hours``.

>>> compact(settings, retention_hours=168)  # doctest: +SKIP
{'master/orders': {'files_before': 412, 'files_after': 9, ...}, ...}
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from deltalake import DeltaTable

from lambdalake.contract.lake import (
    BATCH_VIEWS,
    MASTER_ORDERS,
    MASTER_REVIEWS,
    QUARANTINE,
    RUNS,
    Lake,
)
from lambdalake.errors import InvalidInput
from lambdalake.logs import get_logger
from lambdalake.settings import Settings, absolute_uri

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = get_logger(__name__)

Engine = Literal["delta-rs", "spark"]
ENGINES: tuple[Engine, ...] = ("delta-rs", "spark")

MAINTAINED_TABLES = (MASTER_ORDERS, MASTER_REVIEWS, QUARANTINE, *BATCH_VIEWS, RUNS)

# Delta's default ``delta.deletedFileRetentionDuration`` (7 days): vacuuming files
# younger than this could break a reader still on an older snapshot.
MIN_RETENTION_HOURS = 168


def compact_table(
    uri: str, *, retention_hours: int, storage_options: dict[str, str] | None = None
) -> dict[str, Any]:
    """Compact, checkpoint, clean up the log and vacuum one Delta table; return its stats."""
    t0 = time.monotonic()
    dt = DeltaTable(uri, storage_options=storage_options)
    version_before = dt.version()
    files_before = len(dt.file_uris())
    metrics = dt.optimize.compact()
    dt.update_incremental()
    dt.create_checkpoint()
    dt.cleanup_metadata()
    # full: also files no commit ever named (a failed delta-spark write leaves its Parquet
    # files at the table root), not only those removed since the last checkpoint.
    vacuumed = dt.vacuum(
        retention_hours=retention_hours, dry_run=False, enforce_retention_duration=True, full=True
    )
    dt.update_incremental()
    return {
        "version_before": version_before,
        "version_after": dt.version(),
        "files_before": files_before,
        "files_after": len(dt.file_uris()),
        "files_compacted": int(metrics.get("numFilesRemoved", 0)),
        "files_written": int(metrics.get("numFilesAdded", 0)),
        "files_vacuumed": len(vacuumed),
        "seconds": round(time.monotonic() - t0, 3),
    }


def compact_table_spark(
    spark: SparkSession,
    uri: str,
    *,
    retention_hours: int,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`compact_table` with delta-spark: OPTIMIZE, checkpoint, VACUUM (same stats)."""
    from batch.spark import spark_path

    t0 = time.monotonic()
    path = spark_path(uri)
    quoted = "delta.`" + path.replace("`", "``") + "`"
    dt = DeltaTable(uri, storage_options=storage_options)
    version_before = dt.version()
    files_before = len(dt.file_uris())
    metrics = spark.sql(f"OPTIMIZE {quoted}").collect()[0]["metrics"]
    # A checkpoint now (Delta writes one only every 10 commits), which also lets Spark
    # drop log entries older than delta.logRetentionDuration.
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, path).checkpoint()
    spark.sql(f"VACUUM {quoted} RETAIN {int(retention_hours)} HOURS").collect()
    dt = DeltaTable(uri, storage_options=storage_options)
    vacuumed = 0
    for entry in dt.history(limit=5):
        if entry.get("operation") == "VACUUM END":
            vacuumed = int(entry.get("operationMetrics", {}).get("numDeletedFiles", 0))
            break
    return {
        "version_before": version_before,
        "version_after": dt.version(),
        "files_before": files_before,
        "files_after": len(dt.file_uris()),
        "files_compacted": int(metrics["numFilesRemoved"]),
        "files_written": int(metrics["numFilesAdded"]),
        "files_vacuumed": vacuumed,
        "seconds": round(time.monotonic() - t0, 3),
    }


def compact(
    settings: Settings,
    *,
    retention_hours: int,
    engine: Engine = "delta-rs",
    spark: SparkSession | None = None,
) -> dict[str, dict[str, Any]]:
    """Maintain every Delta table of the lake that exists; return stats per table name.

    ``retention_hours`` below 168 (Delta's default retention) is refused with
    :class:`ValueError`: vacuum would delete files a pinned reader may still need.
    ``engine``: ``delta-rs`` or ``spark`` (a session is created and stopped unless
    ``spark`` is given).
    """
    if engine not in ENGINES:
        raise InvalidInput(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if retention_hours < MIN_RETENTION_HOURS:
        raise InvalidInput(
            f"--retention-hours {retention_hours} is below the tables' deleted-file "
            f"retention ({MIN_RETENTION_HOURS} h): vacuum could remove files that a batch "
            f"run pinned to an older snapshot still reads; use {MIN_RETENTION_HOURS} or more"
        )
    lake = Lake(settings.lake_uri)
    tables = [
        name
        for name in MAINTAINED_TABLES
        if DeltaTable.is_deltatable(lake.table(name), storage_options=lake.storage_options)
    ]
    stats: dict[str, dict[str, Any]] = {}
    if not tables:
        log.warning("maintenance.nothing", lake=settings.lake_uri, reason="no Delta tables found")
        return stats
    session = None
    if engine == "spark":
        from batch.spark import get_spark

        session = spark or get_spark(settings)
    try:
        for name in tables:
            uri = lake.table(name)
            log.info("maintenance.table", table=name, stage="start", engine=engine)
            if session is not None:
                stats[name] = compact_table_spark(
                    session,
                    uri,
                    retention_hours=retention_hours,
                    storage_options=lake.storage_options,
                )
            else:
                stats[name] = compact_table(
                    uri, retention_hours=retention_hours, storage_options=lake.storage_options
                )
            log.info("maintenance.table", table=name, stage="done", **stats[name])
    finally:
        if session is not None and spark is None:
            session.stop()
    return stats


def expire_quarantine(settings: Settings, days: int, *, now: datetime | None = None) -> int:
    """Delete quarantined messages ingested more than ``days`` days ago; returns how many.

    Deleting rewrites the affected files only; the ingest positions (app
    transactions) stay in the table's log. The files are removed from disk by
    the next ``lambdalake maintenance compact`` vacuum.
    """
    from lambdalake.contract import lake as L

    if days < 0:
        raise InvalidInput(f"retention must be >= 0 days, got {days}")
    lake = L.Lake(absolute_uri(settings.lake_uri))
    uri = lake.table(L.QUARANTINE)
    if not DeltaTable.is_deltatable(uri, storage_options=lake.storage_options):
        log.info("quarantine.retention", deleted=0, reason="no quarantine table")
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    stamp = cutoff.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    dt = DeltaTable(uri, storage_options=lake.storage_options)
    metrics = dt.delete(f"_ingested_at < '{stamp}'")
    deleted = int(metrics.get("num_deleted_rows", 0))
    log.info("quarantine.retention", deleted=deleted, older_than=stamp)
    return deleted
