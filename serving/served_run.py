"""The batch side of serving: the views of the latest published run, in memory, per run.

A :class:`BatchCache` watches the ``runs`` table (a cheap Delta log check, at most
once per ``poll_seconds``, in a background thread) and, when a newer run is
published, loads the view versions that run pins into a fresh in-memory DuckDB
database (a :class:`BatchSnapshot`), then swaps it in atomically. Requests only
ever query the in-memory snapshot: the hot path never touches Delta files.

Tables of a snapshot (normalised names; missing views load as empty tables):

===================  ===============================================================
``<view>_<grain>``   each aggregate table of each view definition
                     (``lambdalake.contract.views``): ``period`` (an hour's start, a date, a
                     week's Monday), the dimensions, the measures; ``<view>`` alone for
                     its all-time table. Today ``sales_day``, ``sales_hour``,
                     ``sentiment_week`` and ``sentiment``. A run that does not publish
                     one of them (a run from before it existed) cannot answer it
                     (:class:`ViewMissing`); serving never reads ``master/orders``
``forecast``         sku, store_id, date, forecast, lower_80, upper_80, lower_95,
                     upper_95, model
``accuracy``         sku, store_id, model, mase, coverage_80, coverage_95,
                     n_train_days: each forecast series' backtest
                     (``views/forecast_accuracy``)
``review_scores``    review_id, sku, event_time, rating, sentiment, label: every
                     scored review of the run (SQL's ``review_scores``)
===================  ===============================================================
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from lambdalake.contract.lake import (
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_REVIEW_SCORES,
    Lake,
)
from lambdalake.contract.manifest import RunRecord, Watermark
from lambdalake.contract.views import (
    ALL,
    PERIOD_COLUMN,
    SALES,
    Granularity,
    ViewDef,
    aggregate_tables,
)
from lambdalake.errors import LambdalakeError
from lambdalake.logs import get_logger
from lambdalake.ops.status import latest_run
from lambdalake.settings import Settings
from serving.series import SeriesCache
from serving.tables import IndexedTable, index_key, merge_partials, select

log = get_logger(__name__)


def snapshot_table(view: ViewDef, granularity: Granularity | None) -> str:
    """The snapshot's table of a view at a grain: ``sales_day``; ``sentiment`` (all time)."""
    return view.name if granularity is None else f"{view.name}_{granularity}"


# snapshot table -> (view, grain, lake table), for every aggregate table.
AGGREGATES: dict[str, tuple[ViewDef, Granularity | None, str]] = {
    snapshot_table(v, g): (v, g, t) for v, g, t in aggregate_tables()
}

EMPTY_DDL = {
    **{name: v.duckdb_ddl(name, g) for name, (v, g, _) in AGGREGATES.items()},
    "forecast": "CREATE TABLE forecast (sku VARCHAR, store_id VARCHAR, date DATE, "
    "forecast DOUBLE, lower_80 DOUBLE, upper_80 DOUBLE, lower_95 DOUBLE, upper_95 DOUBLE, "
    "model VARCHAR)",
    "accuracy": "CREATE TABLE accuracy (sku VARCHAR, store_id VARCHAR, model VARCHAR, "
    "mase DOUBLE, coverage_80 DOUBLE, coverage_95 DOUBLE, n_train_days BIGINT)",
    # Every scored review of the run (for SQL; about 100 bytes a review in memory).
    "review_scores": "CREATE TABLE review_scores (review_id VARCHAR, sku VARCHAR, "
    "event_time TIMESTAMPTZ, rating INTEGER, sentiment DOUBLE, label VARCHAR)",
}

# How the forecast tables are filled from their (registered) Arrow source ``src``.
LOAD_SQL = {
    "forecast": "SELECT sku, store_id, CAST(date AS DATE) AS date, forecast, lower_80, "
    "upper_80, lower_95, upper_95, model FROM src ORDER BY sku, store_id, date",
    # NaN (a score the backtest could not give) as NULL: JSON has no NaN.
    "accuracy": "SELECT sku, store_id, model, CASE WHEN isnan(mase) THEN NULL ELSE mase END, "
    "CASE WHEN isnan(coverage_80) THEN NULL ELSE coverage_80 END, "
    "CASE WHEN isnan(coverage_95) THEN NULL ELSE coverage_95 END, n_train_days "
    "FROM src ORDER BY sku, store_id",
    "review_scores": "SELECT review_id, sku, event_time, rating, sentiment, label FROM src "
    "ORDER BY sku, review_id",
}
FORECAST_TABLES = {
    "forecast": VIEW_DEMAND_FORECAST,
    "accuracy": VIEW_FORECAST_ACCURACY,
    "review_scores": VIEW_REVIEW_SCORES,
}

# Period columns hourly views were written with before the column was named ``hour``.
_LEGACY_PERIOD = {"hour": ("period", "event_hour", "ts")}


def aggregate_load_sql(
    view: ViewDef, granularity: Granularity | None, columns: list[str], table: str
) -> str:
    """How a snapshot table of ``view`` is filled from its lake table (``src``): sorted by
    ``sku``, the other dimensions and the period (what the SKU and series indexes need)."""
    key = index_key(view)
    dims = [key, *(d for d in view.dimensions if d != key)]
    measures = ", ".join(m.name for m in view.measures)
    if granularity is None:
        return (
            f"SELECT {', '.join(view.dimensions)}, {measures} FROM src ORDER BY {', '.join(dims)}"
        )
    candidates = (PERIOD_COLUMN[granularity], *_LEGACY_PERIOD.get(granularity, ()))
    col = next((c for c in candidates if c in columns), None)
    if col is None:
        raise ValueError(f"{table} has no {granularity} column (columns: {columns})")
    ddb = "TIMESTAMPTZ" if granularity == "hour" else "DATE"
    return (
        f"SELECT CAST({col} AS {ddb}) AS period, {', '.join(view.dimensions)}, {measures} "
        f"FROM src ORDER BY {', '.join(dims)}, period"
    )


class ViewMissing(LambdalakeError, LookupError):
    """The served run does not publish the view table a question needs."""

    def __init__(self, table: str, run_id: str | None, hint: str) -> None:
        super().__init__(
            f"the served batch run {run_id} publishes no {table} view (a run from before "
            f"it existed); {hint}retry after the next batch run"
        )
        self.table = table
        self.run_id = run_id


@dataclass
class BatchSnapshot:
    """The views of one run, in memory (read-only, shared by every request thread)."""

    run: RunRecord | None
    tables: dict[str, IndexedTable]
    missing: frozenset[str] = frozenset()  # aggregate lake tables the run does not publish
    loaded_at: float = field(default_factory=time.time)
    series: SeriesCache = field(init=False)  # sales per (key, period), for point queries

    def __post_init__(self) -> None:
        self.series = SeriesCache(
            SALES,
            {
                g: self.tables[snapshot_table(SALES, g)].table
                for g in SALES.grains
                if g is not None  # every grain of sales is a period
            },
        )

    def require(self, view: ViewDef, granularity: Granularity | None, hint: str = "") -> None:
        """Raise :class:`ViewMissing` if the run does not publish ``view`` at that grain."""
        table = view.tables[granularity]
        if table in self.missing:
            raise ViewMissing(table, self.run_id, hint)

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    @property
    def watermark(self) -> Watermark:
        return self.run.watermark if self.run else {}

    def aggregate(
        self, view: ViewDef, granularity: Granularity | None, *, keys: list[str], **filters: Any
    ) -> list[dict[str, Any]]:
        """A view's partials at a grain (filtered as :meth:`partials` says) merged by ``keys``
        (``period`` and dimensions)."""
        return merge_partials(self.partials(view, granularity, **filters), keys, view)

    def partials(
        self,
        view: ViewDef,
        granularity: Granularity | None,
        *,
        sku: str | None,
        store_id: str | None = None,
        first: Any = None,
        last: Any = None,
        skus: Sequence[str] | None = None,
        stores: Sequence[str] | None = None,
    ) -> pa.Table:
        """The rows of a view's table at a grain, filtered by SKU (``sku``, or any of
        ``skus``), store (``store_id``, or any of ``stores``) and an inclusive period range;
        unmerged (Arrow; zero-copy slices where the SKU index allows)."""
        indexed = self.tables[snapshot_table(view, granularity)]
        table = indexed.rows_of(skus) if skus is not None else indexed.rows(sku)
        conditions: list[tuple[str, str, Any]] = [("store_id", "equal", store_id)]
        if stores is not None:
            conditions.append(("store_id", "is_in", pa.array(list(stores), pa.string())))
        if granularity is not None:
            conditions += [("period", "greater_equal", first), ("period", "less_equal", last)]
        return select(table, *conditions)

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
    missing: set[str] = set()
    if run is not None:
        views = run.view_versions
        for name, table in FORECAST_TABLES.items():
            if table in views:
                _fill(con, name, _read_delta(lake, table, int(views[table])), LOAD_SQL[name])
        for name, (view, grain, table) in AGGREGATES.items():
            if table not in views:
                if view.wins == "last":
                    # Reference data from before it was published: the run's watermark has
                    # no position for its topic, so the speed layer holds all of it.
                    continue
                # Serving never recomputes a view from master: an API replica's load time and
                # memory stay independent of history. Questions needing it are refused.
                missing.add(table)
                continue
            src = _read_delta(lake, table, int(views[table]))
            _fill(con, name, src, aggregate_load_sql(view, grain, src.column_names, table))
    keys = {name: index_key(view) for name, (view, _, _) in AGGREGATES.items()}
    tables = {
        name: IndexedTable.build(
            con.sql(f"SELECT * FROM {name}").to_arrow_table(), key=keys.get(name, "sku")
        )
        for name in EMPTY_DDL
    }
    con.close()
    snap = BatchSnapshot(run=run, tables=tables, missing=frozenset(missing))
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
    thread (``start()``) polls the runs table. ``refresh()`` reloads
    synchronously (used when a speed worker reports a newer watermark).
    """

    def __init__(self, settings: Settings, *, poll_seconds: float = 1.0) -> None:
        self.lake = Lake(settings.lake_uri)
        self.poll_seconds = poll_seconds
        self._snapshot: BatchSnapshot | None = None
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
            self.refresh()
            snap = self._snapshot
            assert snap is not None
        return snap

    def refresh(self) -> bool:
        """Reload if another run is now the latest published one; True when the snapshot
        changed. The runs table is read through the process's kept reader
        (:func:`~lambdalake.ops.status.latest_run`: only its new commits, its rows only at a
        new version), so the poll every second costs no re-open."""
        with self._load_lock:
            run = latest_run(self.lake)
            old = self._snapshot
            if old is not None and (old.run_id == (run.run_id if run else None)):
                return False
            started = time.monotonic()
            snap = load_snapshot(self.lake, run)
            self._snapshot = snap
            self.reloads += 1
            log.info(
                "serving.batch_loaded",
                run_id=snap.run_id,
                missing=sorted(snap.missing),
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
