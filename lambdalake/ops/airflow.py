"""Airflow for lambdalake: the shared environment, the DAGs' commands, ``lambdalake airflow``.

The DAGs in ``dags/`` are thin schedules: every task runs a ``lambdalake``
command, the data-quality gate included (``lambdalake batch check`` /
``batch publish``, in :mod:`batch.quality`), with ``--bootstrap``/``--lake`` taken
from the same settings object, so a run by hand and a run by Airflow are the same thing.

This module is imported by the DAG files at parse time: it imports nothing
heavier than the settings at module level (delta-rs, DuckDB and psutil are
imported inside the functions that use them).

Pieces:

* :func:`airflow_env` - the environment every Airflow process of ours runs with
  (``AIRFLOW_HOME`` under the state directory, this repo's ``dags/``, SQLite,
  no examples) plus the settings as ``LAMBDALAKE_*`` variables for the tasks.
* :func:`lambdalake_command` - the shell command a task runs.
* :func:`quality_gate` - the ``dq_check`` -> ``publish`` tasks.
* :func:`run_airflow` - ``lambdalake airflow``: Airflow standalone until Ctrl-C/SIGTERM.

>>> from lambdalake.settings import Settings, absolute_uri
>>> env = airflow_env(Settings(home="/tmp/ll", lake_uri="/tmp/lake"), port=8080, base={})
>>> env["AIRFLOW_HOME"], env["LAMBDALAKE_LAKE_URI"]
('/tmp/ll/airflow', '/tmp/lake')
"""

from __future__ import annotations

import contextlib
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
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lambdalake.errors import Unreachable
from lambdalake.logs import get_logger
from lambdalake.settings import Settings, absolute_uri

if TYPE_CHECKING:
    pass

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO_ROOT / "dags"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)
ADMIN_USER = "admin"
DAG_IDS = ("lambdalake_batch", "lambdalake_maintenance", "lambdalake_reprocess")

# --- the environment ------------------------------------------------------------------------


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
            value = absolute_uri(str(value))
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
    flags = ["--lake", shlex.quote(absolute_uri(settings.lake_uri))]
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
        + lambdalake_command(settings, "batch", "check", "--run-id", f'"{run_id}"'),
        retries=0,
        execution_timeout=timedelta(minutes=30),
    )
    publish = BashOperator(
        task_id="publish",
        bash_command="set -euo pipefail; "
        + lambdalake_command(settings, "batch", "publish", "--run-id", f'"{run_id}"'),
        execution_timeout=timedelta(minutes=10),
    )
    dq_check >> publish
    return dq_check, publish


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
                raise Unreachable(f"Airflow did not answer on port {port} in {ready_timeout:.0f} s")
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


# --- python -m lambdalake.ops.airflow env: the environment for an Airflow CLI by hand ------------


def _helper_app() -> Any:
    import typer

    app = typer.Typer(
        help="The Airflow environment of lambdalake's DAGs (for running airflow by hand).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    # Defaults carry the options (not Annotated aliases): this module postpones annotations,
    # and typer must resolve them from module globals.
    def settings_of(bootstrap: str | None, lake: str | None) -> Settings:
        return Settings().with_overrides(bootstrap=bootstrap, lake=lake)  # type: ignore[call-arg]

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

    return app


def main() -> None:
    from lambdalake.cli import run_and_exit

    run_and_exit(_helper_app())


if __name__ == "__main__":
    main()
