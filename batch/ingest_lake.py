"""Lake side of ingest: lineage columns, replay filtering, and the position-carrying commits.

The protocol (see :mod:`lambdalake.manifest`): every commit to ``master/<topic>``
carries one Delta app transaction per partition of the topic,
``ingest_app_id(topic, p) -> next offset``, so the rows and the position they
advance to land in one atomic commit. ``quarantine`` (both topics, one table)
carries the same app ids with its own positions, so each table's commit is
idempotent on its own:

* ingest writes quarantine first, then master;
* on restart it resumes from master's positions, and drops rejected rows whose
  offset is below quarantine's own position (they were committed before the
  crash), so a replayed micro-batch never writes a quarantine row twice;
* each writer keeps the :class:`DeltaTable` it read its positions from and
  commits through it, so a second ingest committing the same app ids in the
  meantime makes delta-rs fail the commit (``ConcurrentTransaction``) instead
  of duplicating rows.

The transforms here are pure functions of Arrow tables; the writers are the I/O edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from lambdalake.lake import MASTER_SCHEMA_BY_TOPIC, QUARANTINE, QUARANTINE_SCHEMA, UTC_TS, Lake
from lambdalake.manifest import ingest_app_id, ingest_positions

Positions = dict[str, dict[int, int]]  # topic -> partition -> next offset to consume

MASTER_PARTITION_BY = ["event_date"]


class ConcurrentIngestError(ValueError):
    """Another writer committed ingest positions to the same table meanwhile.

    A ``ValueError`` so the command line reports it as a one-line reason."""


# --- pure transforms ----------------------------------------------------------------------


def _lineage(topic: str, n: int, ingested_at: datetime) -> dict[str, pa.Array]:
    return {
        "_topic": pa.repeat(pa.scalar(topic, pa.string()), n),
        "_ingested_at": pa.repeat(pa.scalar(ingested_at, UTC_TS), n),
    }


def master_rows(valid: pa.Table, topic: str, ingested_at: datetime) -> pa.Table:
    """Valid events (the validator's ``valid`` table) as ``master/<topic>`` rows.

    Adds ``_topic`` and ``_ingested_at``, orders and types the columns as the
    master schema says (``lambdalake.lake.MASTER_SCHEMA_BY_TOPIC``).
    """
    schema = MASTER_SCHEMA_BY_TOPIC[topic]
    extra = _lineage(topic, valid.num_rows, ingested_at)
    columns = [
        extra[f.name] if f.name in extra else valid.column(f.name).combine_chunks().cast(f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def quarantine_rows(
    rejected: pa.Table, topic: str, ingested_at: datetime, committed: dict[int, int]
) -> pa.Table:
    """Rejected messages as ``quarantine`` rows, without those already in the table.

    ``committed`` is quarantine's own position per partition of ``topic``:
    rejected messages below it were written by an earlier (replayed) batch.
    """
    if rejected.num_rows and committed:
        top = max(committed) + 1
        thresholds = pa.array([committed.get(p, 0) for p in range(top)], pa.int64())
        part = rejected.column("_partition").combine_chunks().cast(pa.int32())
        # Partitions beyond those with a position have none (0): index them safely.
        known = pc.less(part, pa.scalar(top, pa.int32()))
        idx = pc.if_else(known, part, pa.scalar(0, pa.int32()))
        floor = pc.if_else(known, pc.take(thresholds, idx), pa.scalar(0, pa.int64()))
        rejected = rejected.filter(pc.greater_equal(rejected.column("_offset"), floor))
    extra = _lineage(topic, rejected.num_rows, ingested_at)
    columns = [
        extra[f.name] if f.name in extra else rejected.column(f.name).combine_chunks().cast(f.type)
        for f in QUARANTINE_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=QUARANTINE_SCHEMA)


def position_transactions(topic: str, positions: dict[int, int]) -> list[Transaction]:
    return [Transaction(ingest_app_id(topic, p), int(o)) for p, o in sorted(positions.items())]


# --- the tables -----------------------------------------------------------------------------


@dataclass
class PositionedTable:
    """One Delta table that ingest appends to, with the positions it has committed.

    ``positions`` covers the topics this table receives: one topic for a master
    table, both for quarantine.
    """

    uri: str
    schema: pa.Schema
    partition_by: list[str] | None
    positions: Positions
    storage_options: dict[str, str] | None = None
    table: DeltaTable | None = None

    @classmethod
    def open(
        cls,
        uri: str,
        schema: pa.Schema,
        topics: list[str],
        *,
        partition_by: list[str] | None,
        storage_options: dict[str, str] | None,
    ) -> PositionedTable:
        """Open (creating it empty if absent) and read the committed positions."""
        if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
            write_deltalake(
                uri,
                # Not schema.empty_table(): that imports pandas (a second at start-up).
                pa.Table.from_batches([], schema=schema),
                mode="append",
                partition_by=partition_by,
                storage_options=storage_options,
            )
        table = DeltaTable(uri, storage_options=storage_options)
        version = table.version()
        positions = {
            t: ingest_positions(uri, t, version=version, storage_options=storage_options)
            for t in topics
        }
        return cls(uri, schema, partition_by, positions, storage_options, table)

    def version(self) -> int:
        assert self.table is not None
        return int(self.table.version())

    def append(self, rows: pa.Table, new_positions: Positions) -> int:
        """Append ``rows`` with ``new_positions`` (every partition of each topic given)
        in one commit; returns the new table version."""
        assert self.table is not None
        txns = [t for topic, ps in new_positions.items() for t in position_transactions(topic, ps)]
        try:
            write_deltalake(
                self.table,
                rows,
                mode="append",
                partition_by=self.partition_by,
                commit_properties=CommitProperties(app_transactions=txns),
            )
        except CommitFailedError as exc:
            if "Concurrent transaction" in str(exc):
                raise ConcurrentIngestError(
                    f"another ingest committed to {self.uri} at the same time; run one "
                    "ingest process per lake (this one stops; nothing was written twice)"
                ) from exc
            raise
        for topic, ps in new_positions.items():
            self.positions.setdefault(topic, {}).update(ps)
        return self.version()


def open_tables(
    lake: Lake, topics: list[str]
) -> tuple[dict[str, PositionedTable], PositionedTable]:
    """The master table of each topic and the quarantine table, with their positions."""
    masters = {
        t: PositionedTable.open(
            lake.master(t),
            MASTER_SCHEMA_BY_TOPIC[t],
            [t],
            partition_by=MASTER_PARTITION_BY,
            storage_options=lake.storage_options,
        )
        for t in topics
    }
    quarantine = PositionedTable.open(
        lake.table(QUARANTINE),
        QUARANTINE_SCHEMA,
        topics,
        partition_by=None,
        storage_options=lake.storage_options,
    )
    return masters, quarantine
