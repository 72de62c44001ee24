"""Lake side of ingest: lineage columns, replay filtering, and the position-carrying commits.

The protocol (see :mod:`lambdalake.contract.manifest`): every commit to ``master/<topic>``
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
  of duplicating rows; the loser drops that micro-batch and resumes from the
  tables' positions as they now are, as after a crash (two ingests started by
  mistake both run to the end, each commit exact).

Files per commit. A Delta table partitioned by ``event_date`` gets at least one
file per date in every commit, and delta-rs holds one open writer per date while
it writes (about 0.2 MiB each): a micro-batch spread over 3,000 dates wrote
3,000 files in one commit and took 635 MiB. :func:`plan_commits` cuts a
micro-batch whose valid rows span more than ``max_dates`` dates into several
commits, each an offset *prefix* per partition carrying the positions it
reaches: every commit is a consistent snapshot (a batch run may pin any of
them; its watermark says exactly what it holds) and a crash between them
resumes at the last one, as after any commit. Rows are taken in event-date
order across partitions (a k-way merge), so a backfill sent in time order (or
a store's backlog, clustered by date) is cut into runs of consecutive dates
and writes no more files in total than one commit would.

Dates interleaved at random in offset order cannot be cut that way: every
prefix holds nearly every date, so bounding a commit's dates multiplies the
files (measured: 50,000 rows over 3,000 random dates became 187 commits and
47,818 files in 157 s, against one commit of 3,000 files in 3 s). When a cut
would write more than ``MAX_FILES_FACTOR`` times the files of one commit, the
micro-batch is committed whole: its files (and writer memory) are then bounded
by the dates the validator accepts, 2000-01-01 to one day ahead.

The transforms here are pure functions of Arrow tables; the writers are the I/O edge.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from lambdalake.contract.lake import (
    MASTER_PARTITION_BY,
    MASTER_SCHEMA_BY_TOPIC,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    UTC_TS,
    Lake,
)
from lambdalake.contract.manifest import ingest_app_id, ingest_positions
from lambdalake.errors import OperationFailed
from lambdalake.logs import get_logger

log = get_logger(__name__)

Positions = dict[str, dict[int, int]]  # topic -> partition -> next offset to consume

# Dates (so files, and delta-rs' open partition writers) one master commit may hold.
DEFAULT_MAX_DATES_PER_COMMIT = 256
# A cut into commits that would write more files than this many times one commit's is
# not made (dates interleaved at random; see the module docstring).
MAX_FILES_FACTOR = 2


# A DeltaTable object that commits keeps something of every commit: measured with delta-rs
# (600-byte-row appends, 1,500 commits), +57 KB per commit, about 300 MiB an hour at one
# commit every 2 s; reloading it every 50 commits, at its own version, keeps only the
# table's state (+31 MiB over those 1,500 commits, its 1,500 files included).
RELOAD_EVERY_COMMITS = 50


class ConcurrentIngestError(OperationFailed):
    """Another writer committed ingest positions to the same table meanwhile.

    Nothing of the failed commit was written. :meth:`batch.ingest.Ingest.run` reads
    the tables again and goes on from their positions (as after a crash)."""


# --- pure transforms ----------------------------------------------------------------------


def _lineage(topic: str, n: int, ingested_at: datetime) -> dict[str, pa.Array]:
    return {
        "_topic": pa.repeat(pa.scalar(topic, pa.string()), n),
        "_ingested_at": pa.repeat(pa.scalar(ingested_at, UTC_TS), n),
    }


def master_rows(valid: pa.Table, topic: str, ingested_at: datetime) -> pa.Table:
    """Valid events (the validator's ``valid`` table) as ``master/<topic>`` rows.

    Adds ``_topic`` and ``_ingested_at``, orders and types the columns as the
    master schema says (``lambdalake.contract.lake.MASTER_SCHEMA_BY_TOPIC``).
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


def plan_commits(
    rows: pa.Table, end: dict[int, int], max_dates: int, date_column: str = "event_date"
) -> list[tuple[pa.Table, dict[int, int]]]:
    """Cut one micro-batch's master rows into commits of at most ``max_dates`` dates.

    ``rows`` hold ``_partition``, ``_offset`` and ``date_column``; ``end`` is the
    position (next offset) the micro-batch reaches in every partition. Returns
    ``(rows, positions)`` per commit, in commit order: each commit's rows are, per
    partition, the offsets from the previous commit's position up to its own, the
    positions cover every partition of ``end``, and the last ones are ``end``. One
    commit (the rows as given) when they span ``max_dates`` dates or fewer, or when
    cutting them would write more than ``MAX_FILES_FACTOR`` times as many files.

    >>> t = pa.table({"_partition": [0, 0, 0], "_offset": [5, 6, 9], "event_date": [1, 2, 3]})
    >>> [(c.column("_offset").to_pylist(), p) for c, p in plan_commits(t, {0: 10}, 2)]
    [([5, 6], {0: 9}), ([9], {0: 10})]
    """
    if max_dates < 1:
        raise ValueError(f"max_dates must be at least 1, got {max_dates}")
    distinct = pc.count_distinct(rows.column(date_column)).as_py() if rows.num_rows else 0
    if distinct <= max_dates:
        return [(rows, dict(end))]
    plan = _cut(rows, end, max_dates, date_column, max_files=MAX_FILES_FACTOR * distinct)
    return plan or [(rows, dict(end))]


def _cut(
    rows: pa.Table, end: dict[int, int], max_dates: int, date_column: str, max_files: int
) -> list[tuple[pa.Table, dict[int, int]]] | None:
    """:func:`plan_commits`' cut: offset prefixes of at most ``max_dates`` dates each, or
    None if they would write more than ``max_files`` files in all."""
    order = pc.sort_indices(rows, [("_partition", "ascending"), ("_offset", "ascending")])
    rows = rows.take(order)
    parts = rows.column("_partition").to_pylist()
    offsets = rows.column("_offset").to_pylist()
    dates = rows.column(date_column).cast(pa.int32()).to_pylist()
    # Per partition: [first row, end row) in the sorted rows, and a cursor.
    bounds: dict[int, list[int]] = {}
    for i, p in enumerate(parts):
        bounds.setdefault(p, [i, i])[1] = i + 1
    cursor = {p: b[0] for p, b in bounds.items()}

    def take_known(p: int, known: set[int]) -> None:
        i, stop = cursor[p], bounds[p][1]
        while i < stop and dates[i] in known:
            i += 1
        cursor[p] = i

    plan: list[tuple[pa.Table, dict[int, int]]] = []
    files = 0
    while any(cursor[p] < bounds[p][1] for p in bounds):
        first = dict(cursor)
        known: set[int] = set()
        heads = [(dates[cursor[p]], p) for p in bounds if cursor[p] < bounds[p][1]]
        heapq.heapify(heads)
        while heads:  # the earliest date at any partition's head, next
            date, p = heapq.heappop(heads)
            if date not in known and len(known) == max_dates:
                break
            known.add(date)
            take_known(p, known)
            if cursor[p] < bounds[p][1]:
                heapq.heappush(heads, (dates[cursor[p]], p))
        for p in bounds:  # a head may have become known after its partition moved on
            take_known(p, known)
        files += len(known)
        if files > max_files:
            return None
        taken = [
            pa.array(range(first[p], cursor[p]), pa.int64())
            for p in sorted(bounds)
            if cursor[p] > first[p]
        ]
        positions = {
            p: offsets[cursor[p]] if p in bounds and cursor[p] < bounds[p][1] else e
            for p, e in end.items()
        }
        plan.append((rows.take(pa.concat_arrays(taken)), positions))
    return plan


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
    max_dates_per_commit: int = DEFAULT_MAX_DATES_PER_COMMIT
    reload_every: int = RELOAD_EVERY_COMMITS
    _commits: int = 0

    @classmethod
    def open(
        cls,
        uri: str,
        schema: pa.Schema,
        topics: list[str],
        *,
        partition_by: list[str] | None,
        storage_options: dict[str, str] | None,
        max_dates_per_commit: int = DEFAULT_MAX_DATES_PER_COMMIT,
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
        return cls(
            uri, schema, partition_by, positions, storage_options, table, max_dates_per_commit
        )

    def version(self) -> int:
        assert self.table is not None
        return int(self.table.version())

    def append(self, rows: pa.Table, new_positions: Positions) -> int:
        """Append ``rows`` with ``new_positions`` (every partition of each topic given);
        returns the new table version.

        One commit, or for a partitioned table whose rows span more than
        ``max_dates_per_commit`` dates, several (one topic's rows only): see
        :func:`plan_commits`."""
        if not self.partition_by or len(new_positions) != 1:
            return self._commit(rows, new_positions)
        [(topic, end)] = new_positions.items()
        plan = plan_commits(rows, end, self.max_dates_per_commit, self.partition_by[0])
        if len(plan) > 1:
            log.info(
                "ingest.split_commit",
                table=self.uri,
                rows=rows.num_rows,
                commits=len(plan),
                max_dates_per_commit=self.max_dates_per_commit,
            )
        version = self.version()
        for part, positions in plan:
            version = self._commit(part, {topic: positions})
        return version

    def _commit(self, rows: pa.Table, new_positions: Positions) -> int:
        """Append ``rows`` with ``new_positions`` in one commit."""
        assert self.table is not None
        txns = [t for topic, ps in new_positions.items() for t in position_transactions(topic, ps)]
        known = self.table.version()
        try:
            write_deltalake(
                self.table,
                rows,
                mode="append",
                partition_by=self.partition_by,
                commit_properties=CommitProperties(app_transactions=txns),
            )
        except CommitFailedError as exc:
            # Any conflict means another writer moved the table past the version this
            # one read: a second ingest (its positions transaction, or its creating the
            # empty table at the same moment, which shows as "Metadata changed").
            latest = DeltaTable(self.uri, storage_options=self.storage_options).version()
            if latest > known:
                raise ConcurrentIngestError(
                    f"another ingest committed to {self.uri} at the same time (nothing "
                    "of this commit was written); run one ingest process per lake"
                ) from exc
            raise
        for topic, ps in new_positions.items():
            self.positions.setdefault(topic, {}).update(ps)
        self._commits += 1
        if self._commits % self.reload_every == 0:
            # Pinned at our own last version: a rival's commit after it still conflicts.
            self.table = DeltaTable(
                self.uri, version=self.table.version(), storage_options=self.storage_options
            )
        return self.version()


def open_tables(
    lake: Lake, topics: list[str], *, max_dates_per_commit: int = DEFAULT_MAX_DATES_PER_COMMIT
) -> tuple[dict[str, PositionedTable], PositionedTable]:
    """The master table of each topic and the quarantine table, with their positions."""
    masters = {
        t: PositionedTable.open(
            lake.master(t),
            MASTER_SCHEMA_BY_TOPIC[t],
            [t],
            partition_by=MASTER_PARTITION_BY[t],
            storage_options=lake.storage_options,
            max_dates_per_commit=max_dates_per_commit,
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
