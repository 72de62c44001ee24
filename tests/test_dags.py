"""The DAG files: they parse without errors, fast, with no heavy imports, and schedule what we mean.

Parsing happens in a subprocess with the same Airflow environment ``lambdalake
airflow`` uses (:func:`lambdalake.ops.airflow.airflow_env`), so the import is timed
cold and ``sys.modules`` shows exactly what a DAG file pulled in.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from lambdalake.cli import app as cli_app
from lambdalake.ops.airflow import airflow_env
from lambdalake.settings import Settings

HEAVY = ("pyspark", "deltalake", "duckdb", "polars", "statsforecast", "sklearn", "batch")

PARSE = r"""
import json, sys, time
t0 = time.monotonic()
from airflow.dag_processing.dagbag import DagBag
t1 = time.monotonic()
bag = DagBag()
t2 = time.monotonic()
out = {
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "airflow_import_s": t1 - t0,
    "parse_s": t2 - t1,
    "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)),
    "dags": {},
}
for dag in bag.dags.values():
    out["dags"][dag.dag_id] = {
        "schedule": str(dag.schedule),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "params": sorted(dag.params.keys()),
        "tasks": {
            t.task_id: {
                "command": t.bash_command,
                "env": t.env,
                "retries": t.retries,
                "backoff": t.retry_exponential_backoff,
                "upstream": sorted(t.upstream_task_ids),
                "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
            }
            for t in dag.tasks
        },
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dagbag")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        home=tmp / "home",
        lake_uri=str(tmp / "lake"),
        kafka_bootstrap="kafka.example:9092",
        batch_schedule="*/30 * * * *",
        maintenance_schedule="17 * * * *",
    )
    env = airflow_env(settings)
    code = f"HEAVY = {HEAVY!r}\n" + PARSE
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["lake"] = str(tmp / "lake")
    return result


def test_every_dag_file_imports_without_errors(parsed: dict) -> None:
    assert parsed["import_errors"] == {}
    assert set(parsed["dags"]) == {
        "lambdalake_batch",
        "lambdalake_maintenance",
        "lambdalake_reprocess",
    }


def test_parsing_is_fast_and_imports_nothing_heavy(parsed: dict) -> None:
    assert parsed["heavy"] == []
    assert parsed["parse_s"] < 5.0, parsed["parse_s"]


def test_batch_dag_schedule_and_task_chain(parsed: dict) -> None:
    dag = parsed["dags"]["lambdalake_batch"]
    assert dag["schedule"] == "*/30 * * * *"  # LAMBDALAKE_BATCH_SCHEDULE, via the settings
    assert dag["catchup"] is False
    assert dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert tasks["ingest"]["upstream"] == []
    assert tasks["batch_run"]["upstream"] == ["ingest"]
    assert tasks["dq_check"]["upstream"] == ["batch_run"]
    assert tasks["publish"]["upstream"] == ["dq_check"]
    assert "lambdalake ingest --until-end" in tasks["ingest"]["command"]
    assert "lambdalake batch run" in tasks["batch_run"]["command"]
    # The gate is the product's own command, the one a person runs by hand.
    assert "lambdalake batch check --run-id" in tasks["dq_check"]["command"]
    assert "lambdalake batch publish --run-id" in tasks["publish"]["command"]


def test_tasks_retry_with_exponential_backoff_except_the_quality_verdict(parsed: dict) -> None:
    for dag_id, dag in parsed["dags"].items():
        for task_id, task in dag["tasks"].items():
            assert task["timeout"], f"{dag_id}.{task_id} has no execution timeout"
            if task_id == "dq_check":
                assert task["retries"] == 0
            else:
                assert task["retries"] >= 1, f"{dag_id}.{task_id}"
                assert task["backoff"] == 2.0, f"{dag_id}.{task_id}"


def test_every_task_passes_the_settings_bootstrap_and_lake(parsed: dict) -> None:
    for dag in parsed["dags"].values():
        for task in dag["tasks"].values():
            assert "--bootstrap kafka.example:9092" in task["command"]
            assert f"--lake {parsed['lake']}" in task["command"]


def test_maintenance_and_reprocess_take_their_params_from_the_environment(parsed: dict) -> None:
    maintenance = parsed["dags"]["lambdalake_maintenance"]
    assert maintenance["schedule"] == "17 * * * *"  # LAMBDALAKE_MAINTENANCE_SCHEDULE
    assert maintenance["params"] == ["quarantine_days", "retention_hours"]
    assert maintenance["tasks"]["compact"]["upstream"] == ["expire_quarantine"]
    reprocess = parsed["dags"]["lambdalake_reprocess"]
    assert reprocess["schedule"] == "None"
    assert reprocess["params"] == ["forecast_models"]
    batch_run = reprocess["tasks"]["batch_run"]
    # Params are never pasted into the shell text: they arrive as environment variables.
    assert "params." not in batch_run["command"]
    assert batch_run["env"]["FORECAST_MODELS"] == "{{ params.forecast_models }}"


def _cli_options(words: list[str]) -> set[str] | None:
    """Options of ``lambdalake WORDS...`` (``None`` if there is no such sub-command)."""
    command = typer.main.get_command(cli_app)
    for word in words:
        # Typer vendors its own click: groups are recognised by their `commands` mapping.
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return None
    return {opt for p in command.params for opt in p.opts if opt.startswith("--")}


def lambdalake_invocations(command: str) -> list[tuple[list[str], set[str]]]:
    """(sub-command words, flags) of every ``.../lambdalake ...`` call in a shell command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";|&()")
    lexer.whitespace_split = True
    calls: list[tuple[list[str], set[str]]] = []
    current: tuple[list[str], set[str]] | None = None
    for token in lexer:
        if token.endswith("/lambdalake"):
            current = ([], set())
            calls.append(current)
        elif current is not None and set(token) <= set(";|&()"):
            current = None  # the end of that command
        elif current is not None:
            words, flags = current
            flags |= set(re.findall(r"^--[a-z][a-z0-9-]*", token))
            if not flags and re.fullmatch(r"[a-z][a-z-]*", token):
                words.append(token)
    return calls


def test_every_lambdalake_call_in_the_dags_is_a_real_command_with_real_flags(
    parsed: dict,
) -> None:
    missing = []
    for dag_id, dag in parsed["dags"].items():
        for task_id, task in dag["tasks"].items():
            for words, flags in lambdalake_invocations(task["command"]):
                options = _cli_options(words)
                if options is None:
                    missing.append(f"{dag_id}.{task_id}: no command `lambdalake {' '.join(words)}`")
                elif flags - options:
                    missing.append(
                        f"{dag_id}.{task_id}: `lambdalake {' '.join(words)}` lacks "
                        f"{sorted(flags - options)}"
                    )
    assert missing == []


def test_the_airflow_environment_helper_exists(parsed: dict) -> None:
    for step in ("env",):
        proc = subprocess.run(
            [sys.executable, "-m", "lambdalake.ops.airflow", step, "--help"],
            capture_output=True,
            text=True,
            env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent)},
        )
        assert proc.returncode == 0, proc.stderr
        assert "--lake" in proc.stdout
