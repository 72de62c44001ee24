"""lambdalake_maintenance: quarantine retention, then compaction, checkpoints and vacuum.

* ``expire_quarantine``: ``lambdalake maintenance expire-quarantine --days N``
  deletes quarantined messages ingested more than N days ago (param
  ``quarantine_days``, default 30); the count is logged and returned as XCom.
* ``compact``: ``lambdalake maintenance compact --retention-hours H`` compacts,
  checkpoints and vacuums master, quarantine and view tables without changing
  their content. ``H`` (param ``retention_hours``) defaults to 168 (7 days) and
  cannot go below 24: readers pin older table versions (the served run's
  views, a batch run's master snapshot), and vacuum must not delete their files.

Both steps are idempotent: running them twice leaves the same tables. Hourly unless
``LAMBDALAKE_MAINTENANCE_SCHEDULE`` says otherwise: ingest's memory follows the master
tables' file count until a compaction (~26 KiB a file, a file per commit and event date).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

from lambdalake.ops.airflow import lambdalake_command, task_defaults
from lambdalake.settings import Settings

settings = Settings()

with DAG(
    dag_id="lambdalake_maintenance",
    description="Quarantine retention; compaction, checkpoints and vacuum of the lake.",
    schedule=settings.maintenance_schedule,
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=task_defaults(),
    params={
        "retention_hours": Param(
            168, type="integer", minimum=168, description="Vacuum files unreferenced this long."
        ),
        "quarantine_days": Param(
            30, type="integer", minimum=0, description="Keep quarantined messages this long."
        ),
    },
    tags=["lambdalake", "maintenance"],
    doc_md=__doc__,
) as dag:
    # Params reach the shell as environment variables, never pasted into the command line.
    expire_quarantine = BashOperator(
        task_id="expire_quarantine",
        bash_command="set -euo pipefail; "
        + lambdalake_command(
            settings, "maintenance", "expire-quarantine", '--days "$QUARANTINE_DAYS"'
        ),
        env={"QUARANTINE_DAYS": "{{ params.quarantine_days }}"},
        append_env=True,
        execution_timeout=timedelta(hours=1),
    )
    compact = BashOperator(
        task_id="compact",
        bash_command="set -euo pipefail; "
        + lambdalake_command(
            settings, "maintenance", "compact", '--retention-hours "$RETENTION_HOURS"'
        ),
        env={"RETENTION_HOURS": "{{ params.retention_hours }}"},
        append_env=True,
        execution_timeout=timedelta(hours=3),
    )

    expire_quarantine >> compact
