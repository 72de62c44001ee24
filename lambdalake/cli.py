"""The ``lambdalake`` command line: one entry point, a sub-command per process.

Every command takes ``--bootstrap HOST:PORT`` and ``--lake URI`` (overriding the
settings) and exits non-zero with a one-line reason on failure. Results that
scripts rely on go to standard output (a JSON line, a run id); logs go to
standard error. Layer code is imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from lambdalake.errors import LambdalakeError
from lambdalake.memory import arrow_on_malloc, long_lived
from lambdalake.settings import Settings

app = typer.Typer(
    name="lambdalake",
    help="lambdalake: Lambda-architecture analytics for retail data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
generate_app = typer.Typer(help="Synthetic orders and reviews to Kafka.", no_args_is_help=True)
batch_app = typer.Typer(help="The Spark batch layer.", no_args_is_help=True)
speed_app = typer.Typer(help="The speed layer.", no_args_is_help=True)
maintenance_app = typer.Typer(help="Lake maintenance.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")
app.add_typer(batch_app, name="batch")
app.add_typer(speed_app, name="speed")
app.add_typer(maintenance_app, name="maintenance")

Bootstrap = Annotated[
    str | None,
    typer.Option("--bootstrap", help="Kafka HOST:PORT (overrides LAMBDALAKE_KAFKA_BOOTSTRAP)."),
]
LakeOpt = Annotated[
    str | None, typer.Option("--lake", help="Lake root URI (overrides LAMBDALAKE_LAKE_URI).")
]

T = TypeVar("T")


class UserError(LambdalakeError):
    """An error a user can act on: printed as one line, exit code 1."""


def _settings(bootstrap: str | None, lake: str | None) -> Settings:
    try:
        return Settings().with_overrides(bootstrap=bootstrap, lake=lake)  # type: ignore[call-arg]
    except Exception as exc:  # pydantic ValidationError and friends
        _fail(f"invalid settings: {exc}".replace("\n", " "))
        raise  # unreachable


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"lambdalake: error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn: Callable[[], T]) -> T:
    """Run a command body; the product's own failures (:class:`LambdalakeError`, see
    ``lambdalake.errors``), time-outs and missing files become a one-line reason and exit 1.
    Anything else is a bug: it keeps its traceback."""
    try:
        return fn()
    except (LambdalakeError, TimeoutError, FileNotFoundError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except ModuleNotFoundError as exc:
        _fail(f"not available yet: {exc.name} is not built in this version")
    raise AssertionError("unreachable")


def _load(module: str, name: str) -> Any:
    """Import a layer's entry point lazily; a layer not built yet is a one-line error."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            _fail(f"`{module}` is not built in this version yet")
        raise


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for loops that must finish cleanly."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


# --- broker -----------------------------------------------------------------------------


@app.command()
def broker(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 = a free one).")] = 9092,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Run the embedded Apache Kafka broker (KRaft, one node; data in HOME/broker) in the
    foreground."""
    from lambdalake.ops.broker import EmbeddedBroker

    settings = _settings(bootstrap, lake)
    stop = stop_event_on_signals()

    def body() -> None:
        with EmbeddedBroker.start(
            host,
            port,
            partitions=settings.partitions,
            log_dir=settings.home / "broker",
            jars_dir=settings.kafka_jars,
            heap=settings.broker_heap,
        ) as b:
            typer.echo(f"broker ready on {b.bootstrap}")
            while not stop.is_set():
                if b.process.poll() is not None:
                    raise UserError(f"the broker exited with code {b.process.returncode}")
                stop.wait(0.5)

    _run(body)


# --- generate ---------------------------------------------------------------------------

Frac = Annotated[float, typer.Option(min=0.0, max=1.0)]


@generate_app.command("history")
def generate_history(
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 365,
    skus: Annotated[int, typer.Option(min=1, help="Number of SKUs.")] = 100,
    stores: Annotated[int, typer.Option(min=1, help="Number of stores.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same events).")] = 42,
    end_date: Annotated[
        str | None, typer.Option(help="Last day of history, YYYY-MM-DD (default yesterday, UTC).")
    ] = None,
    late_fraction: Frac = 0.0,
    duplicate_fraction: Frac = 0.0,
    bad_fraction: Frac = 0.0,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Generate a realistic history of orders and reviews and produce it to Kafka."""
    run_history = _load("generator.produce", "run_history")

    settings = _settings(bootstrap, lake)
    summary = _run(
        lambda: run_history(
            settings,
            days=days,
            skus=skus,
            stores=stores,
            seed=seed,
            end_date=end_date,
            late_fraction=late_fraction,
            duplicate_fraction=duplicate_fraction,
            bad_fraction=bad_fraction,
        )
    )
    _print_json(summary)


@generate_app.command("live")
def generate_live(
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Fixed load in events per second, for benches (SKUs and stores drawn with "
            "today's demand mix, no anomalies). Default: the demand model's own rate, as in "
            "the history (a live day looks like a history day).",
        ),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="Seconds to run (default until stopped).")
    ] = None,
    skus: Annotated[int, typer.Option(min=1)] = 100,
    stores: Annotated[int, typer.Option(min=1)] = 5,
    seed: Annotated[int, typer.Option()] = 42,
    late_fraction: Frac = 0.0,
    duplicate_fraction: Frac = 0.0,
    bad_fraction: Frac = 0.0,
    anomalies: Annotated[
        bool,
        typer.Option(help="Inject the day's demand anomalies (model rate only; see generator/)."),
    ] = True,
    backfill: Annotated[
        bool, typer.Option(help="Model rate: first send today's events from midnight UTC.")
    ] = True,
    product_changes_per_min: Annotated[
        float, typer.Option(min=0.0, max=10_000.0, help="Product renames/re-categorisations.")
    ] = 2.0,
    store_moves_per_min: Annotated[
        float, typer.Option(min=0.0, max=10_000.0, help="Stores moved to another region.")
    ] = 0.1,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Produce live orders and reviews (at the demand model's rate unless --rate) and live
    changes to the catalog."""
    run_live = _load("generator.produce", "run_live")
    change_rates = _load("generator.stream", "ChangeRates")

    settings = _settings(bootstrap, lake)
    stop = stop_event_on_signals()
    summary = _run(
        lambda: run_live(
            settings,
            rate=rate,
            duration=duration,
            skus=skus,
            stores=stores,
            seed=seed,
            late_fraction=late_fraction,
            duplicate_fraction=duplicate_fraction,
            bad_fraction=bad_fraction,
            stop=stop,
            anomalies=anomalies,
            backfill=backfill,
            changes=change_rates(product_changes_per_min, store_moves_per_min),
        )
    )
    _print_json(summary)


# --- ingest and maintenance ---------------------------------------------------------------


@app.command()
def ingest(
    until_end: Annotated[
        bool, typer.Option("--until-end", help="Drain to the end offsets seen at start, then exit.")
    ] = False,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip",
            metavar="TOPIC/PARTITION@OFFSET",
            help="Pass the record batch ingest is stopped at (an operator's call, see "
            "docs/kafka.md): one quarantine row, positions past it (speed workers stopped "
            "there follow it within seconds); then exit, or drain with --until-end. OFFSET "
            "must be the partition's committed position. Repeatable.",
        ),
    ] = None,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Kafka to the master Delta tables, exactly once (invalid events to quarantine)."""
    run_ingest = _load("batch.ingest", "run_ingest")
    parse_skip = _load("batch.ingest_skip", "parse_skip")

    settings = _settings(bootstrap, lake)
    skips = _run(lambda: [parse_skip(s) for s in skip or []])
    if not until_end and not skips:
        long_lived()  # continuous ingest runs for weeks
    stop = stop_event_on_signals()
    summary = _run(lambda: run_ingest(settings, until_end=until_end, stop=stop, skip=skips))
    _print_json(summary)


@maintenance_app.command("compact")
def maintenance_compact(
    retention_hours: Annotated[
        int, typer.Option(min=0, help="Vacuum files unreferenced for longer than this.")
    ] = 168,
    engine: Annotated[
        str,
        typer.Option(
            help="delta-rs (in this process, no JVM) or spark (delta-spark OPTIMIZE and VACUUM "
            "on LAMBDALAKE_SPARK_MASTER)."
        ),
    ] = "delta-rs",
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Compact, checkpoint and vacuum the lake's tables without changing their content."""
    compact = _load("batch.maintenance", "compact")

    settings = _settings(bootstrap, lake)
    _print_json(_run(lambda: compact(settings, retention_hours=retention_hours, engine=engine)))


@maintenance_app.command("expire-quarantine")
def maintenance_expire_quarantine(
    days: Annotated[
        int, typer.Option(min=0, help="Keep quarantined messages this many days.")
    ] = 30,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Delete quarantined messages ingested longer ago than the retention."""
    expire = _load("batch.maintenance", "expire_quarantine")
    settings = _settings(bootstrap, lake)
    deleted = _run(lambda: expire(settings, days))
    _print_json({"deleted": deleted, "retention_days": days})


# --- batch, speed, serving -------------------------------------------------------------------


def _forecast_models_help() -> str:
    try:
        from batch.forecast_models import describe
    except ImportError:  # the batch layer is not installed here
        return "see docs/forecasting.md"
    return describe()


@batch_app.command("run")
def batch_run(
    forecast_models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated forecast models (batch/forecast_models.py): "
            + _forecast_models_help()
        ),
    ] = None,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """One Spark batch run over a pinned snapshot of the master tables, then publish.

    Prints the published run_id last; exits 0 only once the run is published."""
    run_batch = _load("batch.run", "run_batch")
    settings = _settings(bootstrap, lake)
    kwargs: dict[str, Any] = {}
    if forecast_models:
        kwargs["forecast_config"] = _forecast_config(forecast_models)
    run_id = _run(lambda: run_batch(settings, **kwargs))
    typer.echo(run_id)


RunIdOpt = Annotated[str, typer.Option("--run-id", help="The batch run to act on.")]


@batch_app.command("check")
def batch_check(run_id: RunIdOpt, bootstrap: Bootstrap = None, lake: LakeOpt = None) -> None:
    """Check a published run's views (the data-quality gate); on failure mark it failed, so
    readers fall back to the previous run, and exit 1 with the failures."""
    dq_check = _load("batch.quality", "dq_check")
    settings = _settings(bootstrap, lake)
    failures = _run(lambda: dq_check(settings, run_id))
    _print_json({"run_id": run_id, "ok": not failures, "failures": failures})
    if failures:
        _fail(f"run {run_id} failed {len(failures)} data-quality check(s): " + "; ".join(failures))


@batch_app.command("publish")
def batch_publish(run_id: RunIdOpt, bootstrap: Bootstrap = None, lake: LakeOpt = None) -> None:
    """Confirm a checked run is the one readers are served; print its run_id."""
    confirm = _load("batch.quality", "confirm_published")
    settings = _settings(bootstrap, lake)
    typer.echo(_run(lambda: confirm(settings, run_id)).run_id)


def _forecast_config(names: str) -> Any:
    """The ForecastConfig for ``names`` (the model registry decides; see its ``--help``)."""
    from batch import forecast_models

    try:
        return forecast_models.config_from_names(names)
    except forecast_models.UnknownModelError as exc:
        raise typer.BadParameter(str(exc), param_hint="--forecast-models") from None


def _parse_worker(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise typer.BadParameter(f"{spec!r} is not I/N (for example 0/2)") from None
    if n < 1 or not 0 <= i < n:
        raise typer.BadParameter(f"{spec!r}: need 0 <= I < N")
    return i, n


@speed_app.command("run")
def speed_run(
    worker: Annotated[
        str, typer.Option(help="I/N: this worker takes partitions p % N == I.")
    ] = "0/1",
    query_port: Annotated[
        int, typer.Option(help="Port of the Arrow Flight query endpoint (0 = a free one).")
    ] = 8815,
    query_host: Annotated[
        str, typer.Option(help="Address the query endpoint binds (0.0.0.0 = all).")
    ] = "127.0.0.1",
    advertise_host: Annotated[
        str | None,
        typer.Option(help="Host the API should use to reach this worker (default: the bind host)."),
    ] = None,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Run one speed worker: recent views from Kafka, pruned at the batch watermark."""
    run_worker = _load("speed.worker", "run_worker")
    i, n = _parse_worker(worker)
    settings = _settings(bootstrap, lake)
    long_lived()
    stop = stop_event_on_signals()
    _run(
        lambda: run_worker(
            settings,
            worker=(i, n),
            query_port=query_port,
            stop=stop,
            kafka_client=settings.speed_kafka_client,
            query_host=query_host,
            advertise_host=advertise_host,
        )
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default LAMBDALAKE_API_PORT).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="API processes on the port, each with its own caches (docs/serving.md)."
        ),
    ] = 1,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Run the serving API (FastAPI): batch and speed merged at the watermark."""
    arrow_on_malloc(sys.argv[1:])  # runs the command again, Arrow on malloc (lambdalake/memory.py)
    run_server = _load("serving.app", "serve")

    settings = _settings(bootstrap, lake)
    long_lived()
    _run(
        lambda: run_server(
            settings,
            host=host or settings.api_host,
            port=port or settings.api_port,
            workers=workers,
        )
    )


@app.command()
def status(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object instead of a table.")
    ] = False,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Freshness: latest run, watermark, speed lag, quarantine counts."""
    from lambdalake.ops.status import collect_status, render_status

    settings = _settings(bootstrap, lake)
    report = _run(lambda: collect_status(settings))
    if as_json:
        _print_json(report)
    else:
        render_status(report)


@app.command()
def sql(
    statement: Annotated[str, typer.Argument(help="One SELECT statement (DuckDB dialect).")],
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            help="The API's URL (default LAMBDALAKE_API_URL, else "
            "http://LAMBDALAKE_API_HOST:LAMBDALAKE_API_PORT).",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Default LAMBDALAKE_API_KEY.")
    ] = None,
    output: Annotated[
        str, typer.Option("--format", help="table (default), csv or json.")
    ] = "table",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 60.0,
) -> None:
    """SQL over the merged views of a running API (POST /v1/sql); see docs/sql.md."""
    from lambdalake.ops.sql_client import api_url, run_sql

    settings = _settings(None, None)
    _run(
        lambda: run_sql(
            statement,
            url=(api or api_url(settings)).rstrip("/"),
            api_key=api_key if api_key is not None else (settings.api_key or None),
            output=output,
            timeout=timeout,
        )
    )


@app.command()
def airflow(
    port: Annotated[int, typer.Option(help="Port of the Airflow UI.")] = 8080,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """Airflow standalone (UI, scheduler, DAG processor) with the project's dags/."""
    run_airflow = _load("lambdalake.ops.airflow", "run_airflow")

    settings = _settings(bootstrap, lake)
    _run(lambda: run_airflow(settings, port=port))


@app.command()
def demo(
    days: Annotated[int, typer.Option(min=1)] = 365,
    skus: Annotated[int, typer.Option(min=1)] = 100,
    stores: Annotated[int, typer.Option(min=1)] = 5,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Live events per second (a fixed load, for benches); 0: no live events. "
            "Default: the demand model's own rate, with its injected anomalies.",
        ),
    ] = None,
    bootstrap: Bootstrap = None,
    lake: LakeOpt = None,
) -> None:
    """The embedded default: broker, history, batch, speed worker, API and live events."""
    run_demo = _load("lambdalake.ops.demo", "run_demo")

    settings = _settings(bootstrap, lake)
    stop = stop_event_on_signals()
    _run(lambda: run_demo(settings, days=days, skus=skus, stores=stores, rate=rate, stop=stop))


def run_and_exit(typer_app: Any) -> None:
    """Run a Typer app, then leave with its exit code without interpreter teardown.

    Native thread pools (delta-rs' runtime, DuckDB, Arrow) were seen to abort a
    finished command at teardown ("terminate called without an active exception"),
    turning its exit code into -6. By the time a command returns, every write has
    committed and every child process it owns has stopped; output is flushed here.
    """
    code = 0
    try:
        typer_app()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    run_and_exit(app)


if __name__ == "__main__":
    main()
