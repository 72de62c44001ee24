"""The batch side of serving: the views of the latest published run, in memory, per run.

A :class:`BatchCache` watches the ``runs`` table (a cheap Delta log check, at most
once per ``poll_seconds``, in a background thread) and, when a newer run is
published, loads the view versions that run pins into a fresh in-memory DuckDB
database (a :class:`BatchSnapshot`), then swaps it in atomically. Requests only
ever query the in-memory snapshot: the hot path never touches Delta files.

Tables of a snapshot (normalised names; missing views load as empty tables):

=============  ====================================================================
``sales_day``   period DATE, store_id, sku, units, revenue, order_lines
``sales_hour``  period TIMESTAMPTZ (hour start), store_id, sku, units, revenue,
                order_lines — from ``views/hourly_sales``; a run without that
                view cannot answer hours (:class:`HourlyMissing`), serving never
                reads ``master/orders``
``forecast``    sku, store_id, date, forecast, lower_80, upper_80, lower_95,
                upper_95, model
``sentiment``   sku, reviews, rating_sum, sentiment_sum, positive, neutral, negative
``accuracy``    sku, store_id, model, mase, coverage_80, coverage_95, n_train_days:
                each forecast series' backtest (``views/forecast_accuracy``)
=============  ====================================================================
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from lambdalake.lake import (
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_HOURLY_SALES,
    VIEW_SENTIMENT_BY_SKU,
    Lake,
)
from lambdalake.logs import get_logger
from lambdalake.manifest import RunRecord, Watermark, latest_published_run
from lambdalake.settings import Settings
from lambdalake.views import ALL, SALES, SENTIMENT
from serving.series import SeriesCache
from serving.tables import IndexedTable, merge_partials, select

log = get_logger(__name__)

SALES_MEASURES = ", ".join(m.name for m in SALES.measures)
SENTIMENT_MEASURES = ", ".join(m.name for m in SENTIMENT.measures)

EMPTY_DDL = {
    "sales_day": SALES.duckdb_ddl("sales_day", "day"),
    "sales_hour": SALES.duckdb_ddl("sales_hour", "hour"),
    "forecast": "CREATE TABLE forecast (sku VARCHAR, store_id VARCHAR, date DATE, "
    "forecast DOUBLE, lower_80 DOUBLE, upper_80 DOUBLE, lower_95 DOUBLE, upper_95 DOUBLE, "
    "model VARCHAR)",
    "sentiment": SENTIMENT.duckdb_ddl("sentiment", None),
    "accuracy": "CREATE TABLE accuracy (sku VARCHAR, store_id VARCHAR, model VARCHAR, "
    "mase DOUBLE, coverage_80 DOUBLE, coverage_95 DOUBLE, n_train_days BIGINT)",
}

# How each snapshot table is filled from its (registered) Arrow source ``src``.
LOAD_SQL = {
    "sales_day": f"SELECT CAST(date AS DATE) AS period, store_id, sku, {SALES_MEASURES} "
    "FROM src ORDER BY sku, store_id, period",
    "forecast": "SELECT sku, store_id, CAST(date AS DATE) AS date, forecast, lower_80, "
    "upper_80, lower_95, upper_95, model FROM src ORDER BY sku, store_id, date",
    "sentiment": f"SELECT sku, {SENTIMENT_MEASURES} FROM src ORDER BY sku",
    # NaN (a score the backtest could not give) as NULL: JSON has no NaN.
    "accuracy": "SELECT sku, store_id, model, CASE WHEN isnan(mase) THEN NULL ELSE mase END, "
    "CASE WHEN isnan(coverage_80) THEN NULL ELSE coverage_80 END, "
    "CASE WHEN isnan(coverage_95) THEN NULL ELSE coverage_95 END, n_train_days "
    "FROM src ORDER BY sku, store_id",
}


def _hour_load_sql(columns: list[str]) -> str:
    col = next((c for c in ("period", "hour", "event_hour", "ts") if c in columns), None)
    if col is None:
        raise ValueError(f"{VIEW_HOURLY_SALES} has no hour column (columns: {columns})")
    return (
        f"SELECT CAST({col} AS TIMESTAMPTZ) AS period, store_id, sku, {SALES_MEASURES} "
        "FROM src ORDER BY sku, store_id, period"
    )


class HourlyMissing(LookupError):
    """The served run publishes no hourly sales view: hour answers cannot be given."""

    def __init__(self, run_id: str | None) -> None:
        super().__init__(
            f"no hourly sales in the served batch run {run_id}: it publishes no "
            f"{VIEW_HOURLY_SALES} view (a run from before hourly views); ask for "
            "granularity=day, or retry after the next batch run"
        )
        self.run_id = run_id


@dataclass
class BatchSnapshot:
    """The views of one run, in memory (read-only, shared by every request thread)."""

    run: RunRecord | None
    tables: dict[str, IndexedTable]
    hourly_source: str  # "view" | "missing" (the run has no hourly view) | "none" (no run)
    loaded_at: float = field(default_factory=time.time)
    series: SeriesCache = field(init=False)  # sales per (key, period), for point queries

    def __post_init__(self) -> None:
        self.series = SeriesCache(
            SALES,
            {"day": self.tables["sales_day"].table, "hour": self.tables["sales_hour"].table},
        )

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    @property
    def watermark(self) -> Watermark:
        return self.run.watermark if self.run else {}

    def sales(
        self,
        granularity: str,
        *,
        keys: list[str],
        sku: str | None,
        store_id: str | None,
        first: Any,
        last: Any,
    ) -> list[dict[str, Any]]:
        """Sales partials merged by ``keys`` (``period`` plus dimensions), filtered."""
        table = self.tables["sales_day" if granularity == "day" else "sales_hour"].rows(sku)
        table = select(
            table,
            ("period", "greater_equal", first),
            ("period", "less_equal", last),
            ("store_id", "equal", store_id),
        )
        return merge_partials(table, keys, SALES)

    def sentiment(self, sku: str | None) -> list[dict[str, Any]]:
        return merge_partials(self.tables["sentiment"].rows(sku), ["sku"], SENTIMENT)

    def accuracy(self, sku: str, store_id: str) -> list[dict[str, Any]]:
        """The backtest of one forecast series (``ALL`` for a key an aggregate sums over)."""
        table = select(self.tables["accuracy"].rows(sku), ("store_id", "equal", store_id))
        return table.to_pylist()

    def bottom_accuracy(self, sku: str) -> list[dict[str, Any]]:
        """The backtest of each (sku, store) series of ``sku``, by store."""
        table = select(self.tables["accuracy"].rows(sku), ("store_id", "not_equal", ALL))
        return table.sort_by([("store_id", "ascending")]).to_pylist()

    def forecast_node(
        self, sku: str, store_id: str, *, first: Any, last: Any
    ) -> list[dict[str, Any]]:
        """One forecast series' rows by date: a (sku, store), or an aggregate level's node
        (``ALL`` for the key it sums over)."""
        table = select(
            self.tables["forecast"].rows(sku),
            ("store_id", "equal", store_id),
            ("date", "greater_equal", first),
            ("date", "less_equal", last),
        )
        return table.sort_by([("date", "ascending")]).to_pylist()

    def forecast(
        self, sku: str | None, *, store_id: str | None, first: Any, last: Any
    ) -> list[dict[str, Any]]:
        """Forecast rows of (sku, store) series (``None``: any), sorted by sku, store, date;
        aggregate levels' rows are not among them."""
        table = self.tables["forecast"].rows(sku)
        table = select(
            table,
            ("sku", "not_equal", ALL),
            ("store_id", "not_equal", ALL),
            ("date", "greater_equal", first),
            ("date", "less_equal", last),
            ("store_id", "equal", store_id),
        )
        order = [("sku", "ascending"), ("store_id", "ascending"), ("date", "ascending")]
        return table.sort_by(order).to_pylist()


def _read_delta(lake: Lake, table: str, version: int, columns: list[str] | None = None) -> pa.Table:
    from deltalake import DeltaTable

    dt = DeltaTable(lake.table(table), version=version, storage_options=lake.storage_options)
    return dt.to_pyarrow_dataset().to_table(columns=columns)


def load_snapshot(lake: Lake, run: RunRecord | None) -> BatchSnapshot:
    """Load the views ``run`` pins (all empty for ``None``) into memory."""
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone='UTC'")
    for ddl in EMPTY_DDL.values():
        con.execute(ddl)
    hourly = "none"
    if run is not None:
        views = run.view_versions
        for name, view in (
            ("sales_day", VIEW_DAILY_SALES),
            ("forecast", VIEW_DEMAND_FORECAST),
            ("sentiment", VIEW_SENTIMENT_BY_SKU),
            ("accuracy", VIEW_FORECAST_ACCURACY),
        ):
            if view in views:
                _fill(con, name, _read_delta(lake, view, int(views[view])), LOAD_SQL[name])
        if VIEW_HOURLY_SALES in views:
            src = _read_delta(lake, VIEW_HOURLY_SALES, int(views[VIEW_HOURLY_SALES]))
            _fill(con, "sales_hour", src, _hour_load_sql(src.column_names))
            hourly = "view"
        else:
            # Serving never scans master/orders: an API replica's load time and memory stay
            # independent of history. Hour questions are refused for such a run (HourlyMissing).
            hourly = "missing"
    tables = {
        name: IndexedTable.build(con.sql(f"SELECT * FROM {name}").to_arrow_table())
        for name in EMPTY_DDL
    }
    con.close()
    snap = BatchSnapshot(run=run, tables=tables, hourly_source=hourly)
    snap.series.warm()  # before the snapshot is swapped in: no request pays for it
    return snap


def _fill(con: duckdb.DuckDBPyConnection, table: str, src: pa.Table, select_sql: str) -> None:
    con.register("src", src)
    try:
        con.execute(f"INSERT INTO {table} {select_sql}")
    finally:
        con.unregister("src")


class BatchCache:
    """The current :class:`BatchSnapshot`, reloaded when a newer run is published.

    ``current()`` never blocks on a reload once a snapshot exists; a background
    thread (``start()``) polls the runs table. ``refresh(force=True)`` reloads
    synchronously (used when a speed worker reports a newer watermark).
    """

    def __init__(self, settings: Settings, *, poll_seconds: float = 1.0) -> None:
        self.lake = Lake(settings.lake_uri)
        self.poll_seconds = poll_seconds
        self._snapshot: BatchSnapshot | None = None
        self._runs_version: int | None = None
        self._runs_table: Any = None
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        """A snapshot is in memory (``current()`` returns without loading)."""
        return self._snapshot is not None

    def current(self) -> BatchSnapshot:
        snap = self._snapshot
        if snap is None:
            self.refresh(force=True)
            snap = self._snapshot
            assert snap is not None
        return snap

    def _runs_changed(self) -> bool:
        """Cheap: has the runs table got a new Delta version since the last check?"""
        from deltalake import DeltaTable

        uri = self.lake.table(RUNS)
        if self._runs_table is None:
            if not DeltaTable.is_deltatable(uri, storage_options=self.lake.storage_options):
                return self._runs_version is not None
            self._runs_table = DeltaTable(uri, storage_options=self.lake.storage_options)
        else:
            self._runs_table.update_incremental()
        version = int(self._runs_table.version())
        return version != self._runs_version

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if a newer run was published (or ``force``); True when the snapshot changed."""
        with self._load_lock:
            if not force and self._snapshot is not None and not self._runs_changed():
                return False
            if force:
                self._runs_changed()  # bring the version marker up to date
            version = None if self._runs_table is None else int(self._runs_table.version())
            run = latest_published_run(self.lake.table(RUNS), self.lake.storage_options)
            old = self._snapshot
            self._runs_version = version
            if old is not None and (old.run_id == (run.run_id if run else None)):
                return False
            started = time.monotonic()
            snap = load_snapshot(self.lake, run)
            self._snapshot = snap
            self.reloads += 1
            log.info(
                "serving.batch_loaded",
                run_id=snap.run_id,
                hourly=snap.hourly_source,
                seconds=round(time.monotonic() - started, 3),
            )
            return True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # keep serving the old run; say why in logs/metrics
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("serving.batch_reload_failed", error=self.last_error)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="batch-cache", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
