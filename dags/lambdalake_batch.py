"""lambdalake_batch: ingest -> batch run -> data-quality check -> publish, on a schedule.

A thin schedule: each task runs the product's own command with the settings'
``--bootstrap``/``--lake`` (see the rendered command in the task's log or the
"Rendered Template" tab), so running the same lines by hand is the same run.

* ``ingest``: ``lambdalake ingest --until-end`` - Kafka to the master tables,
  exactly once, up to the end offsets seen at start (re-running adds nothing twice).
* ``batch_run``: ``lambdalake batch run`` - one Spark run over a pinned master
  snapshot; it publishes its views and prints the run_id (the task's XCom).
* ``dq_check``: ``lambdalake batch check --run-id R`` - checks the run's
  pinned views; a failing run is marked ``failed`` in the ``runs`` table so
  readers fall back to the previous published run, and the DAG run fails.
* ``publish``: ``lambdalake batch publish --run-id R`` - confirms the checked run is the one served and logs its
  watermark and view versions.

Schedule: ``LAMBDALAKE_BATCH_SCHEDULE`` (default ``@hourly``); no catch-up, one
run at a time (a batch run always covers the whole master snapshot, so missed
intervals need no replay). Design notes: docs/airflow.md.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from lambdalake.ops.airflow import lambdalake_command, quality_gate, task_defaults
from lambdalake.settings import Settings

settings = Settings()
RUN_ID = "{{ ti.xcom_pull(task_ids='batch_run') }}"

with DAG(
    dag_id="lambdalake_batch",
    description="Ingest, recompute the batch views, check them, publish.",
    schedule=settings.batch_schedule,
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=task_defaults(),
    tags=["lambdalake", "batch"],
    doc_md=__doc__,
) as dag:
    ingest = BashOperator(
        task_id="ingest",
        bash_command="set -euo pipefail; " + lambdalake_command(settings, "ingest", "--until-end"),
        execution_timeout=timedelta(hours=1),
    )
    # stdout of `batch run` ends with the run_id; logs (stderr) stream to the task log as
    # they come, and the run_id is echoed last so it becomes the XCom.
    batch_run = BashOperator(
        task_id="batch_run",
        bash_command=(
            "set -euo pipefail; "
            f"run_id=$({lambdalake_command(settings, 'batch', 'run')} | tail -n 1); "
            'test -n "$run_id"; echo "$run_id"'
        ),
        retries=2,
        execution_timeout=timedelta(hours=3),
    )
    dq_check, publish = quality_gate(settings, RUN_ID)

    ingest >> batch_run >> dq_check >> publish
