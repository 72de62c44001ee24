"""lambdalake_reprocess: recompute every view from the master data, optionally with another
model setting.

Triggered by hand ("Trigger DAG w/ config") after a bug fix or a model change -
the reason a Lambda architecture keeps the immutable master data. Every batch run
recomputes every view over ALL of history (there are no incremental views to
patch), so a past date range is always recomputed: this DAG needs no range. Params:

* ``forecast_models`` (comma-separated model names, empty = the default
  setting): passed as ``--forecast-models ...``.

Tasks: ``batch_run`` -> ``dq_check`` -> ``publish``, the same commands and the
same data-quality gate as ``lambdalake_batch`` (no ingest: a reprocess reads
the master tables as they are). Empty params give a plain full recompute.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

from lambdalake.ops.airflow import lambdalake_command, quality_gate, task_defaults
from lambdalake.settings import Settings

settings = Settings()
RUN_ID = "{{ ti.xcom_pull(task_ids='batch_run') }}"

with DAG(
    dag_id="lambdalake_reprocess",
    description="Recompute every batch view from the master data, optionally with another model setting.",
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=task_defaults(retries=1),
    params={
        "forecast_models": Param(
            "",
            type="string",
            pattern="^[A-Za-z0-9_,.-]*$",
            description="Comma-separated forecast models; empty = the default setting.",
        ),
    },
    tags=["lambdalake", "batch", "backfill"],
    doc_md=__doc__,
) as dag:
    # Params reach the shell as environment variables; each flag only when its param is set.
    batch_run = BashOperator(
        task_id="batch_run",
        bash_command=(
            "set -euo pipefail; "
            "run_id=$("
            + lambdalake_command(
                settings,
                "batch",
                "run",
                '${FORECAST_MODELS:+--forecast-models "$FORECAST_MODELS"}',
            )
            + ' | tail -n 1); test -n "$run_id"; echo "$run_id"'
        ),
        env={
            "FORECAST_MODELS": "{{ params.forecast_models }}",
        },
        append_env=True,
        execution_timeout=timedelta(hours=6),
    )
    dq_check, publish = quality_gate(settings, RUN_ID)

    batch_run >> dq_check >> publish
