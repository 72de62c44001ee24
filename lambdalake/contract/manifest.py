"""The run-manifest protocol: how ingest positions, batch runs and readers meet in the lake.

Ingest positions
    Every ingest commit to ``master/<topic>`` (and to ``quarantine``) carries one
    Delta *app transaction* per topic partition it covers:
    ``app_id = ingest_app_id(topic, partition)``, ``version`` = the exclusive
    upper offset consumed (quarantined messages included). The position is thus
    committed atomically with the rows it produced, and a master snapshot (a
    Delta version) tells exactly which offsets it holds: that is the watermark a
    batch run records.

Runs
    The ``runs`` table has one row per run attempt and state change. A run is
    visible only once a row with ``status = 'published'`` is committed, after
    all of its view commits. Readers take the latest published run and pin the
    view versions it lists. Map-valued columns are JSON strings so any BI tool
    reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

INGEST_APP_PREFIX = "lambdalake-ingest"

Watermark = dict[str, dict[int, int]]  # topic -> partition -> exclusive upper offset


def ingest_app_id(topic: str, partition: int) -> str:
    return f"{INGEST_APP_PREFIX}/{topic}/{partition}"


def parse_ingest_app_id(app_id: str) -> tuple[str, int] | None:
    parts = app_id.split("/")
    if len(parts) != 3 or parts[0] != INGEST_APP_PREFIX:
        return None
    return parts[1], int(parts[2])


RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # running | published | failed
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("published_at", pa.timestamp("us", tz="UTC"), nullable=True),
        pa.field("master_versions", pa.string(), nullable=False),  # JSON {table: version}
        pa.field("watermark", pa.string(), nullable=False),  # JSON {topic: {partition: offset}}
        pa.field("view_versions", pa.string(), nullable=False),  # JSON {view table: version}
        pa.field("model_versions", pa.string(), nullable=False),  # JSON {model: version}
        pa.field("row_counts", pa.string(), nullable=False),  # JSON {name: n}
        pa.field("stage_seconds", pa.string(), nullable=False),  # JSON {stage: s}
        pa.field("notes", pa.string(), nullable=True),  # JSON list of strings
        pa.field("error", pa.string(), nullable=True),
    ]
)


def watermark_to_dict(wm: Watermark) -> dict[str, dict[str, int]]:
    """The JSON form of a watermark or any offsets per topic and partition (partition ids as
    strings, sorted): the one encoding the runs table, the speed protocol, status files and
    API answers use.

    >>> watermark_to_dict({"orders": {1: 5, 0: 7}})
    {'orders': {'0': 7, '1': 5}}
    """
    return {t: {str(p): int(o) for p, o in sorted(ps.items())} for t, ps in sorted(wm.items())}


def watermark_from_dict(raw: dict[str, Any] | None) -> Watermark:
    """The inverse of :func:`watermark_to_dict` (``None`` is empty)."""
    return {t: {int(p): int(o) for p, o in ps.items()} for t, ps in (raw or {}).items()}


def watermark_to_json(wm: Watermark) -> str:
    return json.dumps(watermark_to_dict(wm))


def watermark_from_json(text: str) -> Watermark:
    return watermark_from_dict(json.loads(text or "{}"))


@dataclass
class RunRecord:
    """One row of the ``runs`` table, with its JSON columns decoded."""

    run_id: str
    status: str
    started_at: datetime
    published_at: datetime | None = None
    master_versions: dict[str, int] = field(default_factory=dict)
    watermark: Watermark = field(default_factory=dict)
    view_versions: dict[str, int] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    row_counts: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "started_at": self.started_at,
            "published_at": self.published_at,
            "master_versions": json.dumps(self.master_versions, sort_keys=True),
            "watermark": watermark_to_json(self.watermark),
            "view_versions": json.dumps(self.view_versions, sort_keys=True),
            "model_versions": json.dumps(self.model_versions, sort_keys=True),
            "row_counts": json.dumps(self.row_counts, sort_keys=True),
            "stage_seconds": json.dumps(self.stage_seconds, sort_keys=True),
            "notes": json.dumps(self.notes),
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRecord:
        return cls(
            run_id=row["run_id"],
            status=row["status"],
            started_at=row["started_at"],
            published_at=row.get("published_at"),
            master_versions=json.loads(row["master_versions"] or "{}"),
            watermark=watermark_from_json(row["watermark"]),
            view_versions=json.loads(row["view_versions"] or "{}"),
            model_versions=json.loads(row["model_versions"] or "{}"),
            row_counts=json.loads(row["row_counts"] or "{}"),
            stage_seconds=json.loads(row["stage_seconds"] or "{}"),
            notes=json.loads(row.get("notes") or "[]"),
            error=row.get("error"),
        )


# --- reading the protocol (delta-rs) -------------------------------------------------------

MAX_PARTITIONS_PROBED = 4096


def ingest_positions(
    table_uri: str,
    topic: str,
    *,
    version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> dict[int, int]:
    """The ingest position per partition committed in ``table_uri`` at ``version``.

    Ingest writes an app transaction for *every* partition of the topic in each
    commit, so partitions are numbered densely from 0: probing stops at the
    first partition without one. An absent table means nothing consumed yet.
    """
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table_uri, storage_options=storage_options):
        return {}
    dt = DeltaTable(table_uri, version=version, storage_options=storage_options)
    positions: dict[int, int] = {}
    for p in range(MAX_PARTITIONS_PROBED):
        v = dt.transaction_version(ingest_app_id(topic, p))
        if v is None:
            break
        positions[p] = int(v)
    return positions


def read_runs(runs_uri: str, storage_options: dict[str, str] | None = None) -> list[RunRecord]:
    """Every row of the ``runs`` table, oldest first (empty if there is no table yet)."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(runs_uri, storage_options=storage_options):
        return []
    return runs_of(DeltaTable(runs_uri, storage_options=storage_options).to_pyarrow_table())


def runs_of(table: pa.Table) -> list[RunRecord]:
    """The rows of a read of the ``runs`` table, oldest first."""
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["started_at"], r.get("published_at") or r["started_at"]))
    return [RunRecord.from_row(r) for r in rows]


def latest_published_run(
    runs_uri: str, storage_options: dict[str, str] | None = None
) -> RunRecord | None:
    """The run readers serve: the most recently published one that was not withdrawn.

    A ``failed`` row recorded at or after a run's publication (a data-quality check
    may write one, with ``published_at`` = the time of the withdrawal) withdraws that
    run: readers fall back to the previous published run. A ``failed`` row from
    before the publication (an earlier attempt of the same run_id) does not.
    """
    return latest_of(read_runs(runs_uri, storage_options))


def latest_of(runs: list[RunRecord]) -> RunRecord | None:
    """The run :func:`latest_published_run` names, among ``runs`` (the rows of the table)."""
    failed_at: dict[str, datetime] = {}
    for r in runs:
        if r.status == "failed":
            at = r.published_at or r.started_at
            failed_at[r.run_id] = max(at, failed_at.get(r.run_id, at))
    published = [
        r
        for r in runs
        if r.status == "published"
        and not (r.run_id in failed_at and failed_at[r.run_id] >= (r.published_at or r.started_at))
    ]
    if not published:
        return None
    return max(published, key=lambda r: r.published_at or r.started_at)
