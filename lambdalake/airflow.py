"""Airflow for lambdalake: the shared environment, the DAGs' commands, the data-quality gate.

The DAGs in ``dags/`` are thin schedules: every task runs a ``lambdalake``
command (or ``python -m lambdalake.airflow ...`` for the few steps that exist
only for schedules), with ``--bootstrap``/``--lake`` taken from the same
settings object, so a run by hand and a run by Airflow are the same thing.

This module is imported by the DAG files at parse time: it imports nothing
heavier than the settings at module level (delta-rs, DuckDB and psutil are
imported inside the functions that use them).

Pieces:

* :func:`airflow_env` - the environment every Airflow process of ours runs with
  (``AIRFLOW_HOME`` under the state directory, this repo's ``dags/``, SQLite,
  no examples) plus the settings as ``LAMBDALAKE_*`` variables for the tasks.
* :func:`lambdalake_command` / :func:`helper_command` - the shell commands tasks run.
* :func:`check_run` / :func:`dq_check` - the data-quality check of a published
  run; a failing run is demoted by a ``failed`` row in the ``runs`` table.
* :func:`confirm_published` - the publish step: the checked run is the served one.
* :func:`expire_quarantine` - quarantine retention.
* :func:`run_airflow` - ``lambdalake airflow``: Airflow standalone until Ctrl-C/SIGTERM.

>>> from lambdalake.settings import Settings
>>> env = airflow_env(Settings(home="/tmp/ll", lake_uri="/tmp/lake"), port=8080, base={})
>>> env["AIRFLOW_HOME"], env["LAMBDALAKE_LAKE_URI"]
('/tmp/ll/airflow', '/tmp/lake')
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lambdalake.logs import get_logger
from lambdalake.settings import Settings

if TYPE_CHECKING:
    import duckdb

    from lambdalake.lake import Lake
    from lambdalake.manifest import RunRecord

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO_ROOT / "dags"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)
ADMIN_USER = "admin"
DAG_IDS = ("lambdalake_batch", "lambdalake_maintenance", "lambdalake_reprocess")

# --- the environment ------------------------------------------------------------------------


def _absolute_uri(uri: str) -> str:
    """A local lake path made absolute (tasks run in a temporary directory); URIs unchanged."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def airflow_home(settings: Settings) -> Path:
    """``AIRFLOW_HOME`` of the local Airflow: ``<home>/airflow``, absolute."""
    return (Path(settings.home).expanduser() / "airflow").resolve()


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``LAMBDALAKE_*`` variables, paths absolute: what a task process reads.

    Unset optional fields are left out, so the task falls back to the same defaults.
    """
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if name == "lake_uri":
            value = _absolute_uri(str(value))
        elif isinstance(value, Path):
            value = value.expanduser().resolve()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"LAMBDALAKE_{name.upper()}"] = str(value)
    return env


def airflow_env(
    settings: Settings, *, port: int = 8080, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every Airflow process we start (standalone, ``airflow dags test``).

    ``base`` defaults to this process's environment. Airflow gets its home under
    the state directory, this repo's ``dags/``, SQLite, the LocalExecutor, the
    simple auth manager with one ``admin`` user, and the API on 127.0.0.1:``port``;
    the tasks get the settings as ``LAMBDALAKE_*`` variables and this virtualenv
    first on ``PATH`` (the ``airflow`` and ``lambdalake`` executables).
    """
    home = airflow_home(settings)
    env = dict(os.environ if base is None else base)
    env.update(settings_env(settings))
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # Tasks are whole Spark jobs and runs are serial: a few worker processes suffice
            # (the default of 32 idle workers costs memory for nothing).
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            # Tasks reach the execution API through the base URL: it must follow the port.
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            # Do not phone home, do not nag: this is a local tool.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "SCARF_ANALYTICS": "false",
            "DO_NOT_TRACK": "true",
        }
    )
    return env


# --- the commands tasks run -----------------------------------------------------------------


def task_defaults(*, retries: int = 3) -> dict[str, Any]:
    """``default_args`` of the DAGs: retries with exponential backoff (1, 2, 4 ... min, <= 30)."""
    return {
        "owner": "lambdalake",
        "depends_on_past": False,
        "retries": retries,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }


def _flags(settings: Settings) -> list[str]:
    flags = ["--lake", shlex.quote(_absolute_uri(settings.lake_uri))]
    if settings.kafka_bootstrap:
        flags = ["--bootstrap", shlex.quote(settings.kafka_bootstrap), *flags]
    return flags


def lambdalake_executable() -> str:
    """The ``lambdalake`` console script of this interpreter (else the one on ``PATH``)."""
    beside = Path(sys.executable).with_name("lambdalake")
    if beside.exists():
        return str(beside)
    return shutil.which("lambdalake") or "lambdalake"


def lambdalake_command(settings: Settings, *args: str) -> str:
    """A shell command running ``lambdalake ARGS --bootstrap ... --lake ...``.

    ``args`` are inserted as written (they may hold Jinja templates), the
    settings' values are quoted.

    >>> lambdalake_command(Settings(lake_uri="/l", kafka_bootstrap="k:9092"), "ingest")
    ... # doctest: +ELLIPSIS
    '.../lambdalake ingest --bootstrap k:9092 --lake /l'
    """
    return " ".join([shlex.quote(lambdalake_executable()), *args, *_flags(settings)])


def quality_gate(settings: Settings, run_id: str) -> tuple[Any, Any]:
    """The ``dq_check`` -> ``publish`` tasks every batch-producing DAG ends with.

    Call inside a ``with DAG(...)`` block; ``run_id`` is the template of the run
    to check. A failed check is a verdict on the data, not a flaky failure: it is
    never retried.
    """
    from airflow.providers.standard.operators.bash import BashOperator

    dq_check = BashOperator(
        task_id="dq_check",
        bash_command="set -euo pipefail; "
        + helper_command(settings, "dq-check", "--run-id", f'"{run_id}"'),
        retries=0,
        execution_timeout=timedelta(minutes=30),
    )
    publish = BashOperator(
        task_id="publish",
        bash_command="set -euo pipefail; "
        + helper_command(settings, "publish", "--run-id", f'"{run_id}"'),
        execution_timeout=timedelta(minutes=10),
    )
    dq_check >> publish
    return dq_check, publish


def helper_command(settings: Settings, *args: str) -> str:
    """A shell command running ``python -m lambdalake.airflow ARGS --bootstrap ... --lake ...``."""
    return " ".join(
        [shlex.quote(sys.executable), "-m", "lambdalake.airflow", *args, *_flags(settings)]
    )


# --- data quality ----------------------------------------------------------------------------


def view_keys() -> dict[str, tuple[str, ...]]:
    """The views every run publishes, and the key columns none of their rows may leave empty."""
    from lambdalake import lake as L

    return {v.table: v.key for v in L.PUBLISHED_VIEWS}


def unique_key_views() -> tuple[str, ...]:
    """Views whose key must be unique: a duplicate key double-counts in every reader's sum."""
    from lambdalake import lake as L

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
    (``lambdalake.views``) counts exactly the events the run recorded reading (its
    ``COUNT(*)`` measure summed), and between the distinct and the total events of the
    pinned master snapshot (deduplication happens within a horizon, so the exact number
    lies in that range); ``review_scores`` likewise against the reviews; forecasts are finite, not negative, and their bounds
    ordered ``lower_95 <= lower_80 <= forecast <= upper_80 <= upper_95``;
    sentiment lies in [-1, 1] with a known label.
    """
    from lambdalake import lake as L
    from lambdalake.manifest import read_runs

    lake = L.Lake(_absolute_uri(settings.lake_uri))
    run = _published_record(read_runs(lake.table(L.RUNS), lake.storage_options), run_id)
    if run is None:
        return [f"run {run_id} has no published row in the runs table"]

    failures: list[str] = []
    pinned = _Pinned(lake)
    try:
        columns: dict[str, list[str]] = {}
        for table in (L.MASTER_ORDERS, L.MASTER_REVIEWS):
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
    from lambdalake import lake as L
    from lambdalake.contracts import KEY_BY_TOPIC
    from lambdalake.views import aggregate_tables

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
    from lambdalake import lake as L

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
    from lambdalake import lake as L

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
    from lambdalake import lake as L

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

    from lambdalake import lake as L
    from lambdalake.manifest import RUNS_SCHEMA, read_runs

    lake = L.Lake(_absolute_uri(settings.lake_uri))
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
    from lambdalake import lake as L
    from lambdalake.manifest import latest_published_run, watermark_to_json

    lake = L.Lake(_absolute_uri(settings.lake_uri))
    served = latest_published_run(lake.table(L.RUNS), lake.storage_options)
    if served is None or served.run_id != run_id:
        raise ValueError(
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


def expire_quarantine(settings: Settings, days: int, *, now: datetime | None = None) -> int:
    """Delete quarantined messages ingested more than ``days`` days ago; returns how many.

    Deleting rewrites the affected files only; the ingest positions (app
    transactions) stay in the table's log. The files are removed from disk by
    the next ``lambdalake maintenance compact`` vacuum.
    """
    from deltalake import DeltaTable

    from lambdalake import lake as L

    if days < 0:
        raise ValueError(f"retention must be >= 0 days, got {days}")
    lake = L.Lake(_absolute_uri(settings.lake_uri))
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


# --- lambdalake airflow ----------------------------------------------------------------------


def password_file(settings: Settings) -> Path:
    """Where the simple auth manager writes the generated passwords (JSON ``{user: pw}``)."""
    return airflow_home(settings) / "simple_auth_manager_passwords.json.generated"


def read_login(settings: Settings) -> tuple[str, str] | None:
    """``(user, password)`` of the generated admin login, once Airflow has written it."""
    try:
        passwords = json.loads(password_file(settings).read_text() or "{}")
    except (OSError, ValueError):
        return None
    password = passwords.get(ADMIN_USER)
    return (ADMIN_USER, password) if password else None


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _api_healthy(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2
        ) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop_process_tree(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """Stop Airflow standalone and every process below it.

    SIGINT first (standalone then terminates its components and waits), then
    SIGTERM and SIGKILL for whatever is left; the descendants are listed before
    the parent goes, since orphans can no longer be found through it.
    """
    import psutil

    def tree() -> list[psutil.Process]:
        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    descendants = {p.pid: p for p in tree()}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            descendants.update({p.pid: p for p in tree()})
            time.sleep(0.2)
    left = [p for p in descendants.values() if p.is_running()]
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, left = psutil.wait_procs(left, timeout=10)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    # Anything still in our session's process group (started after the last listing).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_airflow(
    settings: Settings,
    *,
    port: int,
    stop: threading.Event | None = None,
    ready_timeout: float = 300.0,
) -> None:
    """``lambdalake airflow``: Airflow standalone with ``dags/`` until Ctrl-C or SIGTERM.

    Prints the UI URL and the generated login on standard output once the API
    server answers; Airflow's own output goes to standard error. Stopping ends
    every process it started.
    """
    from lambdalake.cli import UserError

    if not _port_is_free(port):
        raise UserError(f"port {port} is in use: pass --port with a free one")
    airflow_bin = Path(sys.executable).with_name("airflow")
    if not airflow_bin.exists():
        raise UserError("Airflow is not installed in this environment: run `make install`")
    env = airflow_env(settings, port=port)
    home = airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    if stop is None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: stop.set())

    log.info("airflow.start", home=str(home), dags=str(DAGS_FOLDER), port=port)
    # A session of its own: Ctrl-C reaches us only, and we stop Airflow in order.
    proc = subprocess.Popen(
        [str(airflow_bin), "standalone"],
        env=env,
        cwd=str(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line.decode("utf-8", "replace"))
            sys.stderr.flush()

    forwarder = threading.Thread(target=forward, name="airflow-output", daemon=True)
    forwarder.start()
    try:
        deadline = time.monotonic() + ready_timeout
        login = None
        while not stop.is_set():
            if proc.poll() is not None:
                raise UserError(f"Airflow exited with code {proc.returncode} (its output is above)")
            login = read_login(settings)
            if login and _api_healthy(port):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Airflow did not answer on port {port} in {ready_timeout:.0f} s"
                )
            stop.wait(1.0)
        if login and not stop.is_set():
            sys.stdout.write(
                f"Airflow UI: http://127.0.0.1:{port}\n"
                f"login: {login[0]} / {login[1]}  (stored in {password_file(settings)})\n"
                f"DAGs: {', '.join(DAG_IDS)} (new DAGs start paused: unpause them in the UI)\n"
            )
            sys.stdout.flush()
            log.info("airflow.ready", url=f"http://127.0.0.1:{port}", user=login[0])
        while not stop.is_set():
            if proc.poll() is not None:
                raise UserError(f"Airflow exited with code {proc.returncode}")
            stop.wait(0.5)
    finally:
        log.info("airflow.stopping")
        _stop_process_tree(proc)
        forwarder.join(timeout=5)
        log.info("airflow.stopped")


# --- python -m lambdalake.airflow: the schedule-only steps --------------------------------------


def _helper_app() -> Any:
    import typer

    app = typer.Typer(
        help="Steps the lambdalake DAGs run besides the lambdalake CLI.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    # Defaults carry the options (not Annotated aliases): this module postpones annotations,
    # and typer must resolve them from module globals.
    def settings_of(bootstrap: str | None, lake: str | None) -> Settings:
        return Settings().with_overrides(bootstrap=bootstrap, lake=lake)  # type: ignore[call-arg]

    def fail(message: str) -> None:
        typer.echo(f"lambdalake: error: {message}", err=True)
        raise typer.Exit(1)

    run_id_opt = typer.Option(..., "--run-id", help="The batch run to act on.")
    bootstrap_opt = typer.Option(None, "--bootstrap", help="Kafka HOST:PORT.")
    lake_opt = typer.Option(None, "--lake", help="Lake root URI.")

    @app.command("env")
    def env_cmd(
        port: int = typer.Option(8080, "--port", help="Port of the Airflow API server."),
        bootstrap: str | None = bootstrap_opt,
        lake: str | None = lake_opt,
    ) -> None:
        """Print `export` lines of the Airflow environment: eval "$(python -m ... env)"."""
        env = airflow_env(settings_of(bootstrap, lake), port=port, base={})
        env.pop("PATH", None)
        for key, value in sorted(env.items()):
            typer.echo(f"export {key}={shlex.quote(value)}")
        typer.echo(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"')

    @app.command("dq-check")
    def dq_check_cmd(
        run_id: str = run_id_opt, bootstrap: str | None = bootstrap_opt, lake: str | None = lake_opt
    ) -> None:
        """Check a published run's views; on failure mark it failed (readers fall back)."""
        failures = dq_check(settings_of(bootstrap, lake), run_id)
        typer.echo(json.dumps({"run_id": run_id, "ok": not failures, "failures": failures}))
        if failures:
            fail(
                f"run {run_id} failed {len(failures)} data-quality check(s): " + "; ".join(failures)
            )

    @app.command("publish")
    def publish_cmd(
        run_id: str = run_id_opt, bootstrap: str | None = bootstrap_opt, lake: str | None = lake_opt
    ) -> None:
        """Confirm the checked run is the one served; print its run_id."""
        try:
            served = confirm_published(settings_of(bootstrap, lake), run_id)
        except ValueError as exc:
            fail(str(exc))
            return
        typer.echo(served.run_id)

    @app.command("expire-quarantine")
    def expire_quarantine_cmd(
        days: int = typer.Option(30, "--days", min=0, help="Keep this many days."),
        bootstrap: str | None = bootstrap_opt,
        lake: str | None = lake_opt,
    ) -> None:
        """Delete quarantined messages older than the retention."""
        deleted = expire_quarantine(settings_of(bootstrap, lake), days)
        typer.echo(json.dumps({"deleted": deleted, "retention_days": days}))

    return app


def main() -> None:
    from lambdalake.cli import run_and_exit

    run_and_exit(_helper_app())


if __name__ == "__main__":
    main()
