"""The data-quality gate of a published batch run, and its publish step.

``lambdalake batch check --run-id R`` (what the DAGs' ``dq_check`` task runs, and what a
person runs by hand) reads the views at the versions run R pinned (delta-rs + DuckDB) and
checks them (:func:`check_run`); on any failure it demotes the run with a ``failed`` row in
``runs``, so readers fall back to the previous run (:func:`demote_run`), and exits 1 with the
failures. ``lambdalake batch publish --run-id R`` confirms the checked run is the one served
(:func:`confirm_published`).

The checks derive from the contract: every published view and its key
(``lambdalake.contract.lake.PUBLISHED_VIEWS``), every aggregate table's event count
(``lambdalake.contract.views``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from lambdalake.contract.lake import Lake
from lambdalake.contract.manifest import RunRecord
from lambdalake.errors import OperationFailed
from lambdalake.logs import get_logger
from lambdalake.settings import Settings, absolute_uri

log = get_logger(__name__)


def view_keys() -> dict[str, tuple[str, ...]]:
    """The views every run publishes, and the key columns none of their rows may leave empty."""
    from lambdalake.contract import lake as L

    return {v.table: v.key for v in L.PUBLISHED_VIEWS}


def unique_key_views() -> tuple[str, ...]:
    """Views whose key must be unique: a duplicate key double-counts in every reader's sum."""
    from lambdalake.contract import lake as L

    return tuple(v.table for v in L.PUBLISHED_VIEWS if v.unique)


FORECAST_BOUNDS = ("lower_95", "lower_80", "forecast", "upper_80", "upper_95")
SENTIMENT_LABELS = ("positive", "neutral", "negative")
# Float noise allowed when comparing bounds.
EPSILON = 1e-9


def _lookup(mapping: Mapping[str, Any], table: str) -> Any:
    """A table's entry in a run's JSON map, keyed ``views/x`` or ``x`` (both are seen)."""
    if table in mapping:
        return mapping[table]
    return mapping.get(table.split("/", 1)[-1])


def _published_record(runs: list[RunRecord], run_id: str) -> RunRecord | None:
    mine = [r for r in runs if r.run_id == run_id and r.status == "published"]
    return max(mine, key=lambda r: r.published_at or r.started_at) if mine else None


class _Pinned:
    """Tables at the versions a run pinned, registered in one DuckDB connection."""

    def __init__(self, lake: Lake) -> None:
        import duckdb

        self.lake = lake
        self.con: duckdb.DuckDBPyConnection = duckdb.connect()
        self.con.execute("SET TimeZone='UTC'")
        self._datasets: list[Any] = []  # keep Arrow datasets alive while DuckDB scans them

    def register(self, alias: str, table: str, version: int) -> list[str]:
        """Register ``table`` at ``version`` as ``alias``; returns its column names."""
        from deltalake import DeltaTable

        dt = DeltaTable(
            self.lake.table(table), version=int(version), storage_options=self.lake.storage_options
        )
        dataset = dt.to_pyarrow_dataset()
        self._datasets.append(dataset)
        self.con.register(alias, dataset)
        return list(dataset.schema.names)

    def one(self, sql: str) -> tuple[Any, ...]:
        row = self.con.execute(sql).fetchone()
        assert row is not None  # aggregate queries always return a row
        return tuple(row)

    def close(self) -> None:
        self.con.close()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def check_run(settings: Settings, run_id: str) -> list[str]:
    """Check the views a published run pinned; returns the failures (empty = good).

    Checks: every view is listed and readable at its pinned version; no key
    column is null and keys that must be unique are; the row counts the run
    recorded match the tables; every aggregate table of every view definition
    (``lambdalake.contract.views``) counts exactly the events the run recorded reading (its
    ``COUNT(*)`` measure summed), and between the distinct and the total events of the
    pinned master snapshot (deduplication happens within a horizon, so the exact number
    lies in that range); ``review_scores`` likewise against the reviews; forecasts are finite, not negative, and their bounds
    ordered ``lower_95 <= lower_80 <= forecast <= upper_80 <= upper_95``;
    sentiment lies in [-1, 1] with a known label.
    """
    from lambdalake.contract import lake as L
    from lambdalake.contract.manifest import read_runs

    lake = L.Lake(absolute_uri(settings.lake_uri))
    run = _published_record(read_runs(lake.table(L.RUNS), lake.storage_options), run_id)
    if run is None:
        return [f"run {run_id} has no published row in the runs table"]

    failures: list[str] = []
    pinned = _Pinned(lake)
    try:
        columns: dict[str, list[str]] = {}
        for table in L.MASTER_TABLE_BY_TOPIC.values():  # events and reference data
            version = _lookup(run.master_versions, table)
            if version is None or version < 0:
                continue  # no events of that topic yet: nothing to compare with
            try:
                columns[table] = pinned.register(_alias(table), table, version)
            except Exception as exc:
                failures.append(f"{table} v{version} (pinned by the run) unreadable: {exc}")
        for table in view_keys():
            version = _lookup(run.view_versions, table)
            if version is None:
                failures.append(f"{table}: not listed in the run's view_versions")
                continue
            try:
                columns[table] = pinned.register(_alias(table), table, version)
            except Exception as exc:
                failures.append(f"{table} v{version} unreadable: {exc}")
        failures += _check_keys(pinned, columns)
        failures += _check_recorded_counts(pinned, columns, run.row_counts)
        failures += _check_counts_against_master(pinned, columns, run.row_counts)
        failures += _check_forecast(pinned, columns)
        failures += _check_sentiment(pinned, columns)
    finally:
        pinned.close()
    return failures


def _alias(table: str) -> str:
    return table.replace("/", "__")


def _check_keys(pinned: _Pinned, columns: dict[str, list[str]]) -> list[str]:
    failures: list[str] = []
    for table, keys in view_keys().items():
        if table not in columns:
            continue
        missing = [k for k in keys if k not in columns[table]]
        if missing:
            failures.append(f"{table}: missing key column(s) {', '.join(missing)}")
            continue
        a = _alias(table)
        nulls = " OR ".join(f"{_q(k)} IS NULL" for k in keys)
        (n,) = pinned.one(f"SELECT count(*) FROM {a} WHERE {nulls}")
        if n:
            failures.append(f"{table}: {n} row(s) with a null key ({', '.join(keys)})")
        if table in unique_key_views():
            cols = ", ".join(_q(k) for k in keys)
            (dups,) = pinned.one(
                f"SELECT count(*) FROM (SELECT {cols} FROM {a} GROUP BY {cols} HAVING count(*) > 1)"
            )
            if dups:
                failures.append(f"{table}: {dups} duplicated key(s) ({', '.join(keys)})")
    return failures


def _check_recorded_counts(
    pinned: _Pinned, columns: dict[str, list[str]], recorded: Mapping[str, int]
) -> list[str]:
    failures: list[str] = []
    for table in view_keys():
        expected = _lookup(recorded, table)
        if table not in columns or expected is None:
            continue
        (n,) = pinned.one(f"SELECT count(*) FROM {_alias(table)}")
        if n != int(expected):
            failures.append(f"{table}: {n} rows, the run recorded {expected}")
    return failures


def _check_counts_against_master(
    pinned: _Pinned, columns: dict[str, list[str]], recorded: Mapping[str, int]
) -> list[str]:
    from lambdalake.contract import lake as L
    from lambdalake.contract.events import KEY_BY_TOPIC
    from lambdalake.contract.views import aggregate_tables

    failures: list[str] = []

    def master_counts(table: str, key: str) -> tuple[int, int]:
        if table not in columns:
            return 0, 0
        total, distinct = pinned.one(f"SELECT count(*), count(DISTINCT {key}) FROM {_alias(table)}")
        return int(total), int(distinct)

    masters = {
        topic: master_counts(table, KEY_BY_TOPIC[topic])
        for topic, table in L.MASTER_TABLE_BY_TOPIC.items()
    }
    # Every aggregate table counts each deduplicated event the run read once, at any grain.
    for view, _grain, table in aggregate_tables():
        cols = columns.get(table)
        if cols is None:
            continue
        if view.event_count not in cols:
            failures.append(f"{table}: no {view.event_count} column")
            continue
        (n,) = pinned.one(f"SELECT coalesce(sum({view.event_count}), 0) FROM {_alias(table)}")
        total, distinct = masters[view.topic]
        if not distinct <= int(n) <= total:
            failures.append(
                f"{table}: {n} {view.event_count}, the master snapshot holds "
                f"{distinct} distinct of {total}"
            )
        read = recorded.get(view.topic)  # the deduplicated events the run read
        if read is not None and int(read) != int(n):
            failures.append(f"{table}: {n} {view.event_count}, the run read {read} {view.topic}")

    total, distinct = masters["reviews"]
    if L.VIEW_REVIEW_SCORES in columns:
        (scores,) = pinned.one(f"SELECT count(*) FROM {_alias(L.VIEW_REVIEW_SCORES)}")
        if not distinct <= int(scores) <= total:
            failures.append(
                f"{L.VIEW_REVIEW_SCORES}: {scores} rows, the master snapshot holds "
                f"{distinct} distinct reviews of {total}"
            )
        read = recorded.get("reviews")
        if read is not None and int(read) != int(scores):
            failures.append(f"{L.VIEW_REVIEW_SCORES}: {scores} rows, the run read {read} reviews")
    return failures


def _check_forecast(pinned: _Pinned, columns: dict[str, list[str]]) -> list[str]:
    from lambdalake.contract import lake as L

    cols = columns.get(L.VIEW_DEMAND_FORECAST)
    if cols is None:
        return []
    missing = [c for c in FORECAST_BOUNDS if c not in cols]
    if missing:
        return [f"{L.VIEW_DEMAND_FORECAST}: missing column(s) {', '.join(missing)}"]
    a = _alias(L.VIEW_DEMAND_FORECAST)
    failures: list[str] = []
    not_finite = " OR ".join(f"{c} IS NULL OR isnan({c}) OR isinf({c})" for c in FORECAST_BOUNDS)
    (n,) = pinned.one(f"SELECT count(*) FROM {a} WHERE {not_finite}")
    if n:
        failures.append(f"{L.VIEW_DEMAND_FORECAST}: {n} row(s) with a missing or non-finite value")
    (n,) = pinned.one(f"SELECT count(*) FROM {a} WHERE forecast < 0")
    if n:
        failures.append(f"{L.VIEW_DEMAND_FORECAST}: {n} negative forecast(s)")
    pairs = list(itertools.pairwise(FORECAST_BOUNDS))
    disorder = " OR ".join(f"{lo} > {hi} + {EPSILON}" for lo, hi in pairs)
    (n,) = pinned.one(f"SELECT count(*) FROM {a} WHERE {disorder}")
    if n:
        failures.append(
            f"{L.VIEW_DEMAND_FORECAST}: {n} row(s) with bounds out of order "
            f"({' <= '.join(FORECAST_BOUNDS)})"
        )
    if "level" in cols:
        failures += _check_forecast_levels(pinned, a)
    return failures


def _check_forecast_levels(pinned: _Pinned, a: str) -> list[str]:
    """The levels add up: each SKU's, each store's and the total forecast equal the sum of
    their (sku, store) series, day by day (relative tolerance 1e-6)."""
    from lambdalake.contract import lake as L

    failures = []
    for level, keys in (("sku", "sku"), ("store", "store_id"), ("total", "NULL")):
        (n,) = pinned.one(
            f"""
            SELECT count(*) FROM (
                SELECT {keys} AS k, date, sum(forecast) AS summed FROM {a}
                WHERE level = 'sku_store' GROUP BY ALL
            ) b JOIN (SELECT {keys} AS k, date, forecast FROM {a} WHERE level = '{level}') t
            ON b.k IS NOT DISTINCT FROM t.k AND b.date = t.date
            WHERE abs(t.forecast - b.summed) > 1e-6 * greatest(1.0, abs(b.summed))
            """
        )
        if n:
            failures.append(
                f"{L.VIEW_DEMAND_FORECAST}: {n} {level}-level row(s) that are not the sum of "
                "their (sku, store) forecasts"
            )
    return failures


def _check_sentiment(pinned: _Pinned, columns: dict[str, list[str]]) -> list[str]:
    from lambdalake.contract import lake as L

    cols = columns.get(L.VIEW_REVIEW_SCORES)
    if cols is None:
        return []
    failures: list[str] = []
    a = _alias(L.VIEW_REVIEW_SCORES)
    if "sentiment" in cols:
        (n,) = pinned.one(
            f"SELECT count(*) FROM {a} WHERE sentiment IS NULL OR isnan(sentiment) "
            "OR sentiment < -1 OR sentiment > 1"
        )
        if n:
            failures.append(f"{L.VIEW_REVIEW_SCORES}: {n} sentiment score(s) outside [-1, 1]")
    if "label" in cols:
        labels = ", ".join(f"'{x}'" for x in SENTIMENT_LABELS)
        (n,) = pinned.one(
            f"SELECT count(*) FROM {a} WHERE label IS NULL OR label NOT IN ({labels})"
        )
        if n:
            failures.append(f"{L.VIEW_REVIEW_SCORES}: {n} row(s) with an unknown label")
    return failures


def demote_run(
    settings: Settings, run_id: str, failures: list[str], *, now: datetime | None = None
) -> bool:
    """Append a ``failed`` row for a published run, so readers fall back to the previous run.

    The row copies the run's published row, with ``status = 'failed'``, the
    failures in ``error`` and ``published_at`` = the time of the demotion (a
    state change later than the publication). Returns ``False`` (and writes
    nothing) when the run was already demoted or was never published.
    """
    from deltalake import write_deltalake

    from lambdalake.contract import lake as L
    from lambdalake.contract.manifest import RUNS_SCHEMA, read_runs

    lake = L.Lake(absolute_uri(settings.lake_uri))
    runs_uri = lake.table(L.RUNS)
    runs = read_runs(runs_uri, lake.storage_options)
    published = _published_record(runs, run_id)
    if published is None:
        return False
    published_at = published.published_at or published.started_at
    if any(
        r.run_id == run_id
        and r.status == "failed"
        and (r.published_at or r.started_at) >= published_at
        for r in runs
    ):
        return False
    now = now or datetime.now(UTC)
    demoted = replace(
        published,
        status="failed",
        published_at=max(now, published_at + timedelta(microseconds=1)),
        error="data-quality check failed: " + "; ".join(failures),
        notes=[*published.notes, "demoted by the data-quality check"],
    )
    import pyarrow as pa

    write_deltalake(
        runs_uri,
        pa.Table.from_pylist([demoted.to_row()], schema=RUNS_SCHEMA),
        mode="append",
        storage_options=lake.storage_options,
    )
    return True


def dq_check(settings: Settings, run_id: str) -> list[str]:
    """Check a run (:func:`check_run`); on failure demote it (:func:`demote_run`).

    Returns the failures; logs one line per failure and the outcome.
    """
    started = time.monotonic()
    log.info("dq.start", run_id=run_id)
    failures = check_run(settings, run_id)
    for failure in failures:
        log.error("dq.failure", run_id=run_id, failure=failure)
    if failures:
        demoted = demote_run(settings, run_id, failures)
        log.error("dq.demoted" if demoted else "dq.not_demoted", run_id=run_id)
    log.info(
        "dq.done",
        run_id=run_id,
        ok=not failures,
        failures=len(failures),
        seconds=round(time.monotonic() - started, 3),
    )
    return failures


def confirm_published(settings: Settings, run_id: str) -> RunRecord:
    """The publish step: ``run_id`` must be the run readers are served now.

    ``lambdalake batch run`` commits the ``published`` row itself; this step
    confirms (idempotently) that the checked run is the one served and logs
    its watermark and view versions. Raises ``ValueError`` otherwise.
    """
    from lambdalake.contract import lake as L
    from lambdalake.contract.manifest import latest_published_run, watermark_to_json

    lake = L.Lake(absolute_uri(settings.lake_uri))
    served = latest_published_run(lake.table(L.RUNS), lake.storage_options)
    if served is None or served.run_id != run_id:
        raise OperationFailed(
            f"run {run_id} is not the served run (served: {served.run_id if served else 'none'})"
        )
    log.info(
        "publish.served",
        run_id=served.run_id,
        published_at=str(served.published_at),
        watermark=watermark_to_json(served.watermark),
        view_versions=json.dumps(served.view_versions, sort_keys=True),
    )
    return served
