"""``airflow dags test lambdalake_batch`` end to end, and the data-quality gate on a real run.

A broker of our own gets a small generated history; Airflow (SQLite, a
temporary AIRFLOW_HOME, the environment of ``lambdalake airflow``) runs the
batch DAG once: ingest -> Spark batch run -> data-quality check -> publish.
The published run must cover everything on the topics, and its task logs
must show the stage lines. The lake it leaves is shared with
``test_bi_views.py`` (built once per test session, see :func:`published_lake`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake
from kafka import TopicPartition

from batch.quality import check_run
from lambdalake.contract.lake import RUNS, VIEW_DEMAND_FORECAST, Lake
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord, latest_published_run, read_runs
from lambdalake.kafka.clients import end_offsets
from lambdalake.ops.airflow import airflow_env
from lambdalake.ops.broker import EmbeddedBroker
from lambdalake.settings import TOPICS, Settings

BIN = Path(sys.executable).parent
# Small but real: 3 SKUs x 2 stores over 5 weeks, with redeliveries and invalid messages.
HISTORY = ["generate", "history", "--days", "35", "--skus", "3", "--stores", "2", "--seed", "7"]
HISTORY += ["--duplicate-fraction", "0.02", "--bad-fraction", "0.02"]


@dataclass(frozen=True)
class PublishedLake:
    """What one ``airflow dags test lambdalake_batch`` left behind."""

    settings: Settings
    generated: dict[str, int]
    end_offsets: dict[str, dict[int, int]]
    returncode: int
    output: str
    seconds: float


_BUILT: dict[str, PublishedLake] = {}


def published_lake(tmp_path_factory: pytest.TempPathFactory) -> PublishedLake:
    """Run the batch DAG once per test session over a fresh broker; returns what it left."""
    if "lake" in _BUILT:
        return _BUILT["lake"]
    root = tmp_path_factory.mktemp("dag_batch")
    with EmbeddedBroker.start(port=0, partitions=4, log_dir=root / "broker") as broker:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            kafka_bootstrap=broker.bootstrap,
            lake_uri=str(root / "lake"),
            home=root / "home",
            partitions=4,
            spark_master="local[2]",
            spark_driver_memory="1g",
        )
        env = airflow_env(settings, base=os.environ)
        env["LAMBDALAKE_LOG_LEVEL"] = "INFO"  # the stage lines must reach the task logs
        gen = subprocess.run(
            [str(BIN / "lambdalake"), *HISTORY, "--bootstrap", broker.bootstrap],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert gen.returncode == 0, gen.stderr[-2000:]
        generated = json.loads(gen.stdout.strip().splitlines()[-1])
        migrate = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True
        )
        assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
        started = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", "lambdalake_batch"],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds = time.monotonic() - started
        ends = end_offsets(
            broker.bootstrap, [TopicPartition(t, p) for t in TOPICS for p in range(4)]
        )
    built = PublishedLake(
        settings=settings,
        generated=generated,
        end_offsets={t: {p: ends[TopicPartition(t, p)] for p in range(4)} for t in TOPICS},
        returncode=proc.returncode,
        output=proc.stdout + proc.stderr,
        seconds=seconds,
    )
    _BUILT["lake"] = built
    return built


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> PublishedLake:
    return published_lake(tmp_path_factory)


@pytest.mark.slow
def test_the_batch_dag_publishes_a_run_covering_every_event(built: PublishedLake) -> None:
    assert built.returncode == 0, built.output[-6000:]
    assert "DagRun Finished: dag_id=lambdalake_batch" in built.output
    runs_uri = Lake(built.settings.lake_uri).table(RUNS)
    served = latest_published_run(runs_uri)
    assert served is not None

    # ingest --until-end drained the topics: the run's watermark is their end (a partition
    # that never held a message has no position yet: offset 0 either way).
    def held(w: dict) -> dict:
        return {t: {p: o for p, o in ps.items() if o} for t, ps in w.items()}

    assert held(served.watermark) == held(built.end_offsets)
    assert sum(built.end_offsets["orders"].values()) > 0
    # The publish task confirmed this very run; the check found nothing wrong.
    assert re.search(rf"publish\.served .*run_id={served.run_id}", built.output)
    assert check_run(built.settings, served.run_id) == []
    assert [r.status for r in read_runs(runs_uri)] == ["running", "published"]


@pytest.mark.slow
def test_task_logs_show_each_stage(built: PublishedLake) -> None:
    out = built.output
    assert '"orders": {"written":' in out  # ingest's summary line
    for stage in ("pin", "read", "daily_sales", "review_scores", "forecast", "publish"):
        assert f"stage={stage}" in out, stage
    assert "dq.done failures=0 ok=True" in out


def _spoil_forecast(lake: Lake, good: RunRecord) -> RunRecord:
    """Publish a run whose forecasts went negative: what a buggy model change would do."""
    uri = lake.table(VIEW_DEMAND_FORECAST)
    table = DeltaTable(uri, version=good.view_versions[VIEW_DEMAND_FORECAST]).to_pyarrow_table()
    forecast = table.column("forecast")
    mask = pa.array([i == 0 for i in range(table.num_rows)])
    table = table.set_column(
        table.schema.get_field_index("forecast"),
        "forecast",
        pc.if_else(mask, pa.scalar(-3.0), forecast),
    )
    write_deltalake(uri, table, mode="overwrite")
    now = datetime.now(UTC)
    bad = replace(
        good,
        run_id="bad-run",
        started_at=now,
        published_at=now,
        view_versions={**good.view_versions, VIEW_DEMAND_FORECAST: DeltaTable(uri).version()},
    )
    write_deltalake(
        lake.table(RUNS), pa.Table.from_pylist([bad.to_row()], schema=RUNS_SCHEMA), mode="append"
    )
    return bad


@pytest.mark.slow
def test_a_failing_quality_check_leaves_the_previous_run_served(
    built: PublishedLake, tmp_path: Path
) -> None:
    assert built.returncode == 0, built.output[-3000:]
    copy = tmp_path / "lake"
    shutil.copytree(built.settings.lake_uri, copy)  # the shared lake stays as the DAG left it
    lake = Lake(str(copy))
    good = latest_published_run(lake.table(RUNS))
    assert good is not None
    _spoil_forecast(lake, good)
    assert latest_published_run(lake.table(RUNS)).run_id == "bad-run"

    cli = [str(BIN / "lambdalake"), "batch"]
    check = subprocess.run(
        [*cli, "check", "--run-id", "bad-run", "--lake", str(copy)],
        capture_output=True,
        text=True,
    )
    publish = subprocess.run(
        [*cli, "publish", "--run-id", "bad-run", "--lake", str(copy)],
        capture_output=True,
        text=True,
    )
    status = subprocess.run(
        [str(BIN / "lambdalake"), "status", "--json", "--lake", str(copy)],
        capture_output=True,
        text=True,
    )

    assert check.returncode == 1
    assert "negative forecast" in check.stderr
    assert publish.returncode == 1
    assert "not the served run" in publish.stderr
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["batch"]["run_id"] == good.run_id
