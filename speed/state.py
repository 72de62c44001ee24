"""A speed worker's state in one DuckDB file: held events, recent views, positions.

Everything a micro-batch changes is committed in ONE DuckDB transaction with the
Kafka positions it consumed, which is what makes the worker exactly-once: after
a crash the file holds the state of the last committed micro-batch and the
positions to resume from, nothing more and nothing less.

Tables
    ``held_orders``, ``held_reviews``
        The valid, deduplicated events at or above the batch watermark (reviews
        carry ``sentiment``/``label`` from the current model). Pruning is by offset.
    ``known_orders``, ``known_reviews``
        Ids already counted elsewhere: by the published batch run (master rows
        below its watermark, ingested within the dedup horizon) or by this worker
        before a prune. A new event whose id is here is a duplicate.
    ``partials_sales``, ``partials_sentiment``
        Pre-aggregated views: an append-only log of per-micro-batch partials built
        with the shared view definitions (sales by hour, store and SKU; reviews per
        SKU), compacted with the views' merge rules from time to time.
    ``positions``
        Next offset per owned topic partition.
    ``meta``
        Run applied (id, watermark, master versions read, sentiment model version).
    ``invalid``
        Skipped invalid events: one count per (topic, reason), bounded by the
        validator's reasons (metrics).

Only the worker's main thread writes; queries read through cursors of a small
pool (DuckDB MVCC), so a query never blocks a commit and always sees one
committed micro-batch.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from lambdalake.contract.events import (
    EVENT_DATE,
    FIELDS_BY_TOPIC,
    KEY_BY_TOPIC,
    REFERENCE_TOPICS,
    TOPICS,
    timed,
)
from lambdalake.contract.manifest import Watermark, watermark_from_json, watermark_to_json
from lambdalake.contract.speed_protocol import (
    EVENT_VIEWS,
    AnswerMeta,
    EventView,
    SpeedQuery,
    answer_schema,
    parse_bound,
    stale_watermark_error,
    topic_of,
)
from lambdalake.contract.views import (
    DUCKDB_TYPES,
    ROLLUP_EXPR,
    VIEWS,
    VIEWS_BY_TOPIC,
    ViewDef,
    dedup_rank_sql,
)
from lambdalake.errors import InvalidInput
from speed.id_index import IdHashIndex, IndexChanges, hashes_of

HELD = {t: f"held_{t}" for t in TOPICS}
KNOWN = {t: f"known_{t}" for t in TOPICS}
# One table of partials per view (a topic may feed several), at the view's finest grain;
# answers roll them up to the grain asked (lambdalake.contract.views.ROLLUP_EXPR).
PARTIALS = {name: f"partials_{name}" for name in VIEWS}
SCHEMA_VERSION = "2"
# Read cursors kept open at most (queries beyond this wait for one to be free).
MAX_READERS = 8
# What the state writes between checkpoints; DuckDB holds it in memory until then.
CHECKPOINT_THRESHOLD = "16MB"
# A scratch table is created again once this many rows went through it: DuckDB keeps the
# rows a DELETE removed from a temporary table (they are never checkpointed), so one kept
# for the connection grew by every event ever consumed (~115 bytes each, measured).
SCRATCH_ROWS_MAX = 100_000

SCORE_FIELDS = [pa.field("sentiment", pa.float64()), pa.field("label", pa.string())]


def held_schema(topic: str) -> pa.Schema:
    """Columns of a held event: the topic's fields, ``event_date`` (timed topics), lineage,
    scores (reviews)."""
    fields = [
        *FIELDS_BY_TOPIC[topic],
        *([EVENT_DATE] if timed(topic) else []),
        pa.field("_partition", pa.int32(), nullable=False),
        pa.field("_offset", pa.int64(), nullable=False),
    ]
    if topic == "reviews":
        fields += SCORE_FIELDS
    return pa.schema(fields)


def partials_sql(view: ViewDef, source: str) -> str:
    """The view definition's aggregate over ``source`` at its stored (finest) grain."""
    return view.aggregate_sql(source, granularity=view.stored_grain)


def partial_keys(view: ViewDef) -> list[str]:
    return (["period"] if view.has_period else []) + list(view.dimensions)


@dataclass
class BatchInput:
    """One micro-batch for :meth:`SpeedState.commit_batch`.

    ``valid``: per topic, validated events (reviews already scored), all at or
    above the committed position of their partition. ``ends``: the next offset
    per (topic, partition) the micro-batch consumed (invalid messages included).
    ``invalid``: skipped events counted by (topic, reason)."""

    valid: dict[str, pa.Table] = field(default_factory=dict)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    invalid: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class BatchResult:
    held: dict[str, int]  # events newly held per topic
    duplicates: dict[str, int]  # dropped as duplicates per topic
    seconds: float


@dataclass
class RunApply:
    """A published run, prepared for :meth:`SpeedState.apply_run`.

    ``known_ids``: per topic, a table ``(id, seen_at)`` of ids the run counted
    (master rows below its watermark within the horizon), or a Parquet file of
    them; ``replace_known`` says
    whether they replace the known ids or add to them (an incremental load).
    ``scores``: when the sentiment model changed, ``(_partition, _offset,
    sentiment, label)`` for every held review at or above the new watermark."""

    run_id: str
    watermark: Watermark
    master_versions: dict[str, int]
    model_version: str | None
    known_ids: Mapping[str, pa.Table | Path]
    replace_known: bool
    scores: pa.Table | None = None
    reset: bool = False  # the watermark went backwards: drop everything, re-consume


@dataclass
class Applied:
    """What the state is pruned at (the run it applied)."""

    run_id: str | None = None
    watermark: Watermark = field(default_factory=dict)
    master_versions: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None
    # After a reset: per partition, the position reached before it. Until a partition
    # is back there, answers leave it out (the caller reports it missing: degraded).
    reread_until: Watermark = field(default_factory=dict)

    def rereading(self, positions: Mapping[tuple[str, int], int]) -> Watermark:
        """The owned partitions not yet re-read to where they were before a reset."""
        out: Watermark = {}
        for t, parts in self.reread_until.items():
            for p, target in parts.items():
                if (t, p) in positions and positions[(t, p)] < target:
                    out.setdefault(t, {})[p] = target
        return out


def _now() -> datetime:
    return datetime.now(UTC)


class SpeedState:
    """The DuckDB state of one worker. Writes from one thread; reads from any."""

    def __init__(
        self,
        path: Path,
        worker: tuple[int, int],
        *,
        memory_limit: str | None = None,
        checkpoint_threshold: str = CHECKPOINT_THRESHOLD,
        threads: int = 1,
        max_readers: int = MAX_READERS,
    ):
        self.path = Path(path)
        self.worker = worker
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path))
        self._configure(self.con)
        # What is written since the last checkpoint stays in memory as well as in the WAL
        # (DuckDB's memory follows the WAL's size), so the threshold bounds the state's
        # memory; the WAL replays on open after a crash.
        self.con.execute("SET checkpoint_threshold = ?", [checkpoint_threshold])
        # One DuckDB thread: micro-batches are small statements (parallelism costs more
        # than it gains), and the other core is the poller's.
        self.con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit}'")
        # Read cursors are pooled, not per thread: the Flight server runs each request on
        # a thread of gRPC's that Python sees as new, so a per-thread cursor leaked one
        # cursor (~27 KiB and its buffers) per request.
        self.max_readers = max(1, int(max_readers))
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursor_cond = threading.Condition()
        self._scratch_rows: dict[str, int] = {}  # rows put in each topic's scratch tables
        self._create_schema()
        # In-memory hashes of the ids a micro-batch deduplicates against (see id_index):
        # a micro-batch joins a table only when one of its ids may be in it.
        self._known_index = {
            t: IdHashIndex(KNOWN[t], "id") for t in TOPICS if t not in REFERENCE_TOPICS
        }
        self._held_index = {
            t: IdHashIndex(HELD[t], KEY_BY_TOPIC[t]) for t in TOPICS if t not in REFERENCE_TOPICS
        }
        self._load_indexes()
        self.applied = self._read_applied(self.con)
        self.positions = self._read_positions(self.con)
        self._partial_rows = {v: self._count(PARTIALS[v]) for v in VIEWS}
        self._compacted_rows = dict(self._partial_rows)

    # --- setup ---------------------------------------------------------------------------

    @staticmethod
    def _configure(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("SET TimeZone = 'UTC'")

    def _create_schema(self) -> None:
        con = self.con
        con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute(
            "CREATE TABLE IF NOT EXISTS positions (topic VARCHAR, partition INTEGER, "
            "next_offset BIGINT, PRIMARY KEY (topic, partition))"
        )
        self._create_invalid()
        for topic in TOPICS:
            with _registered(con, "empty", held_schema(topic).empty_table()):
                con.execute(f"CREATE TABLE IF NOT EXISTS {HELD[topic]} AS SELECT * FROM empty")
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {KNOWN[topic]} (id VARCHAR, seen_at TIMESTAMPTZ)"
            )
            for view in VIEWS_BY_TOPIC[topic]:
                self._create_partials(view)
            self._create_scratch(topic)
        layout = f"{self.worker[0]}/{self.worker[1]}"
        row = con.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
        if row is None:
            con.execute(
                "INSERT INTO meta VALUES ('layout', ?), ('schema_version', ?)",
                [layout, SCHEMA_VERSION],
            )
        elif row[0] != layout:
            raise InvalidInput(
                f"{self.path} holds the state of worker {row[0]}, not {layout}; "
                "use the worker's own file or another LAMBDALAKE_SPEED_DIR"
            )

    def _create_scratch(self, topic: str) -> None:
        """The topic's per-micro-batch scratch tables (temporary: this connection only),
        new and empty. Kept across micro-batches (no catalog change per batch) until
        ``SCRATCH_ROWS_MAX`` rows went through them (see :meth:`_bound_scratch`)."""
        self.con.execute(
            f"CREATE OR REPLACE TEMP TABLE cand_{topic} AS SELECT * FROM {HELD[topic]} LIMIT 0"
        )
        self.con.execute(
            f"CREATE OR REPLACE TEMP TABLE conf_{topic} "
            "(id VARCHAR, hp INTEGER, ho BIGINT, new_wins BOOLEAN)"
        )
        self._scratch_rows[topic] = 0

    def _bound_scratch(self, topics: list[str]) -> None:
        """Create a topic's scratch tables again once ``SCRATCH_ROWS_MAX`` rows went through
        them: what DELETE removes from a temporary table stays stored until it is dropped."""
        for topic in topics:
            if self._scratch_rows[topic] >= SCRATCH_ROWS_MAX:
                self._create_scratch(topic)

    def scratch_rows_stored(self) -> dict[str, int]:
        """Rows each scratch table physically stores, deleted ones included (bounded by
        about ``SCRATCH_ROWS_MAX`` plus one micro-batch)."""
        out = {}
        for topic in TOPICS:
            for table in (f"cand_{topic}", f"conf_{topic}"):
                row = self.con.execute(
                    "SELECT coalesce(sum(count), 0) FROM pragma_storage_info(?) "
                    "WHERE column_path = '[0]'",
                    [f"temp.{table}"],
                ).fetchone()
                out[table] = int(row[0]) if row else 0
        return out

    def _create_partials(self, view: ViewDef) -> None:
        """The view's partials table; rebuilt from the held events when a file from before
        holds it in another shape (a view gained a grain, a measure): partials are a
        function of the held events, so nothing is lost."""
        con = self.con
        table = PARTIALS[view.name]
        expected = [name for name, _ in view.partial_columns(view.stored_grain)]
        found = [
            r[0]
            for r in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
                "ORDER BY column_index",
                [table],
            ).fetchall()
        ]
        if found == expected:
            return
        if found:
            con.execute(f"DROP TABLE {table}")
        con.execute(f"CREATE TABLE {table} AS {partials_sql(view, HELD[view.topic])}")

    def _create_invalid(self) -> None:
        """``invalid``: one row per (topic, reason) with its count, updated in place.

        Files from before kept one row per micro-batch (a table that grew forever and
        was scanned every second); they are folded into counts on open."""
        con = self.con
        con.execute(
            "CREATE TABLE IF NOT EXISTS invalid "
            "(topic VARCHAR, reason VARCHAR, n BIGINT, PRIMARY KEY (topic, reason))"
        )
        keyed = _one(
            con,
            "SELECT count(*) FROM duckdb_constraints() "
            "WHERE table_name = 'invalid' AND constraint_type = 'PRIMARY KEY'",
        )[0]
        if keyed:
            return
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                "CREATE TABLE invalid_counts "
                "(topic VARCHAR, reason VARCHAR, n BIGINT, PRIMARY KEY (topic, reason))"
            )
            con.execute(
                "INSERT INTO invalid_counts SELECT topic, reason, sum(n) FROM invalid GROUP BY ALL"
            )
            con.execute("DROP TABLE invalid")
            con.execute("ALTER TABLE invalid_counts RENAME TO invalid")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _load_indexes(self) -> None:
        for index in (*self._known_index.values(), *self._held_index.values()):
            index.load(self.con)

    def _count(self, table: str) -> int:
        return int(_one(self.con, f"SELECT count(*) FROM {table}")[0])

    @staticmethod
    def _read_applied(con: duckdb.DuckDBPyConnection) -> Applied:
        rows = dict(con.execute("SELECT key, value FROM meta").fetchall())
        return Applied(
            run_id=rows.get("run_id"),
            watermark=watermark_from_json(rows.get("watermark") or "{}"),
            master_versions=json.loads(rows.get("master_versions") or "{}"),
            model_version=rows.get("model_version"),
            reread_until=watermark_from_json(rows.get("reread_until") or "{}"),
        )

    @staticmethod
    def _read_positions(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, int], int]:
        rows = con.execute("SELECT topic, partition, next_offset FROM positions").fetchall()
        return {(t, int(p)): int(o) for t, p, o in rows}

    def close(self) -> None:
        with self._cursor_cond:
            for cur in self._cursors:
                with suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()
            self._idle.clear()
        try:
            self.con.execute("CHECKPOINT")
        finally:
            self.con.close()

    # --- positions --------------------------------------------------------------------------

    def start_positions(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Where to resume each partition: max(own committed position, watermark)."""
        return {
            (t, p): max(self.positions.get((t, p), 0), self.applied.watermark.get(t, {}).get(p, 0))
            for t, p in tps
        }

    def register_partitions(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Record the owned partitions (at their start positions); return those positions."""
        start = self.start_positions(tps)
        missing = [(t, p, o) for (t, p), o in start.items() if (t, p) not in self.positions]
        if missing:
            self.con.executemany("INSERT INTO positions VALUES (?, ?, ?)", missing)
            for t, p, o in missing:
                self.positions[(t, p)] = o
        return start

    def threshold(self, topic: str, partition: int) -> int:
        """Events of ``partition`` below this offset are already accounted for."""
        return max(
            self.positions.get((topic, partition), 0),
            self.applied.watermark.get(topic, {}).get(partition, 0),
        )

    def keep_mask(self, topic: str, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Which of these (partition, offset) pairs are new to the state (vectorised)."""
        if len(partitions) == 0:
            return np.zeros(0, dtype=bool)
        top = int(partitions.max()) + 1
        limits = np.array([self.threshold(topic, p) for p in range(top)], dtype=np.int64)
        return offsets >= limits[partitions]

    # --- the hot path -------------------------------------------------------------------------

    def commit_batch(self, batch: BatchInput) -> BatchResult:
        """Add a micro-batch's events to the views and advance positions, atomically."""
        t0 = time.perf_counter()
        con = self.con
        held: dict[str, int] = {}
        dups: dict[str, int] = {}
        changes = IndexChanges()
        self._bound_scratch([t for t, tb in batch.valid.items() if tb.num_rows])
        con.execute("BEGIN TRANSACTION")
        try:
            for topic, table in batch.valid.items():
                if table.num_rows:
                    held[topic], dups[topic] = self._add_events(topic, table, changes)
            new_positions = dict(self.positions)
            for tp, end in batch.ends.items():
                new_positions[tp] = max(new_positions.get(tp, 0), end)
            changed = [
                (t, p, o) for (t, p), o in new_positions.items() if self.positions.get((t, p)) != o
            ]
            if changed:
                # One statement of literals: a per-row executemany costs ~ms per row here,
                # and registering a table for a few rows more than the statement itself.
                # Topics are the contract's names, partitions and offsets integers.
                if unknown := {t for t, _, _ in changed} - set(TOPICS):
                    raise InvalidInput(f"positions of unknown topics {sorted(unknown)}")
                values = ", ".join(f"('{t}', {int(p)}, {int(o)})" for t, p, o in changed)
                con.execute(
                    f"INSERT INTO positions VALUES {values} "
                    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset"
                )
            if batch.invalid:
                counts = pa.table(
                    {
                        "topic": pa.array([t for t, _ in batch.invalid], pa.string()),
                        "reason": pa.array([r for _, r in batch.invalid], pa.string()),
                        "n": pa.array(list(batch.invalid.values()), pa.int64()),
                    }
                )
                with _registered(con, "invalid_in", counts):
                    con.execute(
                        "INSERT INTO invalid SELECT * FROM invalid_in ON CONFLICT (topic, reason) "
                        "DO UPDATE SET n = invalid.n + excluded.n"
                    )
            compact = [v for t in held for v in VIEWS_BY_TOPIC[t] if self._needs_compaction(v)]
            for view in compact:
                self._compact_partials(view)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            self._partial_rows = {v: self._count(PARTIALS[v]) for v in VIEWS}
            raise
        changes.apply(con)
        self.positions = new_positions
        return BatchResult(held=held, duplicates=dups, seconds=time.perf_counter() - t0)

    def _add_events(self, topic: str, table: pa.Table, changes: IndexChanges) -> tuple[int, int]:
        """Dedup one topic's events against held and known ids; append; update partials.

        Within the batch and against held events the lowest (offset, partition)
        wins; an id already known (counted by the batch run or pruned) is a duplicate.
        Reference data is held whole (every message is a version of its id's record; the
        views keep the last). Returns events held and duplicates; what changed in held
        ids goes to ``changes``.

        The joins against ``known_*`` and ``held_*`` run only when a hash of the batch's
        ids is in their index (``speed.id_index``): they read the whole table. A batch of
        distinct ids found in neither (most of them) is appended without the scratch tables.
        """
        con = self.con
        if topic in REFERENCE_TOPICS:
            names = held_schema(topic).names
            with _registered(con, "batch_in", table.select(names)):
                con.execute(f"INSERT INTO {HELD[topic]} BY NAME SELECT * FROM batch_in")
            for view in VIEWS_BY_TOPIC[topic]:
                with _registered(con, "batch_in", table.select(names)):
                    added = _one(
                        con, f"INSERT INTO {PARTIALS[view.name]} {partials_sql(view, 'batch_in')}"
                    )
                self._partial_rows[view.name] += int(added[0])
            return table.num_rows, 0
        key = KEY_BY_TOPIC[topic]
        held, known = HELD[topic], KNOWN[topic]
        names = held_schema(topic).names
        # Scratch tables live for the connection (no catalog change per micro-batch).
        cand, conf = f"cand_{topic}", f"conf_{topic}"
        with _registered(con, "batch_in", table.select(names)):
            hashes = hashes_of(con, f"SELECT hash({key}) AS h FROM batch_in")
            maybe_known = self._known_index[topic].maybe(hashes).any()
            maybe_held = self._held_index[topic].maybe(hashes).any()
            if not maybe_known and not maybe_held and len(np.unique(hashes)) == len(hashes):
                # The common case: ids distinct (their hashes are) and new to the held and the
                # known events. Nothing to deduplicate: the batch goes in as it is.
                return self._append_new(topic, "batch_in", changes), 0
            con.execute(f"DELETE FROM {cand}")
            self._scratch_rows[topic] += table.num_rows
            con.execute(
                f"""INSERT INTO {cand} SELECT * FROM batch_in b
                {f"WHERE NOT EXISTS (SELECT 1 FROM {known} k WHERE k.id = b.{key})" if maybe_known else ""}
                QUALIFY {dedup_rank_sql(key)} = 1"""
            )
        n_conf = n_wins = 0
        if maybe_held:
            con.execute(f"DELETE FROM {conf}")
            con.execute(
                f"""INSERT INTO {conf}
                SELECT c.{key} AS id, h._partition AS hp, h._offset AS ho,
                       (c._offset < h._offset OR (c._offset = h._offset AND c._partition < h._partition))
                       AS new_wins
                FROM {cand} c JOIN {held} h ON h.{key} = c.{key}"""
            )
            n_conf, n_wins = _one(
                con, f"SELECT count(*), count(*) FILTER (WHERE new_wins) FROM {conf}"
            )
        if n_conf:
            con.execute(
                f"DELETE FROM {cand} WHERE {key} IN (SELECT id FROM {conf} WHERE NOT new_wins)"
            )
        if not n_wins:
            n_new = self._append_new(topic, cand, changes)
            return n_new, table.num_rows - n_new
        # A lower offset of an id we hold arrived late from another partition: it replaces
        # the held one, and the partials are rebuilt (rare).
        con.execute(
            f"DELETE FROM {held} h USING {conf} c WHERE c.new_wins "
            "AND h._partition = c.hp AND h._offset = c.ho"
        )
        con.execute(f"INSERT INTO {held} BY NAME SELECT * FROM {cand}")
        n_new = int(_one(con, f"SELECT count(*) FROM {cand}")[0])
        changes.reload(self._held_index[topic])
        for view in VIEWS_BY_TOPIC[topic]:
            self._rebuild_partials(view)
        return n_new - int(n_wins), table.num_rows - n_new + int(n_wins)

    def _append_new(self, topic: str, source: str, changes: IndexChanges) -> int:
        """Hold ``source``'s events, none of them a duplicate, and add their partials;
        returns how many."""
        key = KEY_BY_TOPIC[topic]
        new_held = hashes_of(
            self.con,
            f"INSERT INTO {HELD[topic]} BY NAME SELECT * FROM {source} RETURNING hash({key}) AS h",
        )
        changes.added(self._held_index[topic], new_held)
        if len(new_held):
            for view in VIEWS_BY_TOPIC[topic]:
                added = _one(
                    self.con, f"INSERT INTO {PARTIALS[view.name]} {partials_sql(view, source)}"
                )
                self._partial_rows[view.name] += int(added[0])
        return len(new_held)

    def _needs_compaction(self, view: ViewDef) -> bool:
        return self._partial_rows[view.name] > 2 * self._compacted_rows[view.name] + 100_000

    def _compact_partials(self, view: ViewDef) -> None:
        """Merge the partials log with the view's merge rules (same answers, fewer rows)."""
        partials = PARTIALS[view.name]
        keys = partial_keys(view)
        self.con.execute(
            f"CREATE OR REPLACE TEMP TABLE merged AS "
            f"{view.merge_sql(partials, keys=keys, derive=False)}"
        )
        self.con.execute(f"DELETE FROM {partials}")
        self.con.execute(f"INSERT INTO {partials} BY NAME SELECT * FROM merged")
        self.con.execute("DROP TABLE merged")
        n = self._count(partials)
        self._partial_rows[view.name] = self._compacted_rows[view.name] = n

    def _rebuild_partials(self, view: ViewDef) -> None:
        partials = PARTIALS[view.name]
        self.con.execute(f"DELETE FROM {partials}")
        self.con.execute(f"INSERT INTO {partials} {partials_sql(view, HELD[view.topic])}")
        n = self._count(partials)
        self._partial_rows[view.name] = self._compacted_rows[view.name] = n

    # --- runs -------------------------------------------------------------------------------

    def held_reviews_from(self, watermark: Watermark) -> pa.Table:
        """Held reviews at or above ``watermark`` (to re-score with a new model)."""
        with _registered(self.con, "wm", _watermark_table("reviews", watermark)):
            return self.con.sql(
                f"""SELECT h._partition, h._offset, h.text, h.title FROM {HELD["reviews"]} h
                LEFT JOIN wm w ON w.partition = h._partition
                WHERE h._offset >= coalesce(w.offset, 0)"""
            ).to_arrow_table()

    def apply_run(self, run: RunApply, dedup_hours: int, now: datetime | None = None) -> None:
        """Prune to a run's watermark, load the ids it counted, re-score, atomically."""
        now = now or _now()
        con = self.con
        changes = IndexChanges()
        con.execute("BEGIN TRANSACTION")
        try:
            for topic in TOPICS:
                self._apply_run_topic(topic, run, now, changes)
            if run.scores is not None and run.scores.num_rows:
                scores = run.scores.select(["_partition", "_offset", "sentiment", "label"])
                with _registered(con, "scores", scores):
                    con.execute(
                        f"""UPDATE {HELD["reviews"]} AS h
                        SET sentiment = s.sentiment, label = s.label FROM scores s
                        WHERE h._partition = s._partition AND h._offset = s._offset"""
                    )
            self._expire_known(now - timedelta(hours=dedup_hours), changes)
            for view in VIEWS.values():
                self._rebuild_partials(view)
            # Owned partitions resume at max(own position, watermark); after a reset
            # (the watermark went backwards) exactly at the watermark.
            new_positions = {
                (t, p): max(0 if run.reset else o, run.watermark.get(t, {}).get(p, 0))
                for (t, p), o in self.positions.items()
            }
            # What a reset re-reads: up to where each partition was (or was still
            # re-reading to, after two resets in a row); partitions already there drop out.
            reread: dict[tuple[str, int], int] = {
                (t, p): o
                for t, ps in self.applied.reread_until.items()
                for p, o in ps.items()
                if new_positions.get((t, p), 0) < o
            }
            if run.reset:
                for tp, o in self.positions.items():
                    if new_positions[tp] < o:
                        reread[tp] = max(reread.get(tp, 0), o)
            reread_until: Watermark = {}
            for (t, p), o in sorted(reread.items()):
                reread_until.setdefault(t, {})[p] = o
            con.execute("DELETE FROM positions")
            if new_positions:
                con.executemany(
                    "INSERT INTO positions VALUES (?, ?, ?)",
                    [(t, p, o) for (t, p), o in sorted(new_positions.items())],
                )
            meta = {
                "run_id": run.run_id,
                "watermark": watermark_to_json(run.watermark),
                "master_versions": json.dumps(run.master_versions, sort_keys=True),
                "model_version": run.model_version,
                "reread_until": watermark_to_json(reread_until),
            }
            con.executemany(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(meta.items()),
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        changes.apply(con)
        self.positions = new_positions
        self.applied = Applied(
            run_id=run.run_id,
            watermark={t: dict(ps) for t, ps in run.watermark.items()},
            master_versions=dict(run.master_versions),
            model_version=run.model_version,
            reread_until=reread_until,
        )

    def _apply_run_topic(
        self, topic: str, run: RunApply, now: datetime, changes: IndexChanges
    ) -> None:
        con = self.con
        key = KEY_BY_TOPIC[topic]
        held, known = HELD[topic], KNOWN[topic]
        with _registered(con, "wm", _watermark_table(topic, run.watermark)):
            if topic in REFERENCE_TOPICS:  # no ids to know: held versions below it go
                if run.reset:
                    con.execute(f"DELETE FROM {held}")
                con.execute(
                    f"DELETE FROM {held} h USING wm w WHERE w.partition = h._partition "
                    "AND h._offset < w.offset"
                )
                return
            held_index, known_index = self._held_index[topic], self._known_index[topic]
            if run.reset:
                con.execute(f"DELETE FROM {held}")
                con.execute(f"DELETE FROM {known}")
                changes.reload(held_index)
                changes.reload(known_index)
            elif run.replace_known:
                con.execute(f"DELETE FROM {known}")
                changes.reload(known_index)
            ids = run.known_ids.get(topic)
            insert = (
                f"INSERT INTO {known} SELECT id, max(seen_at) FROM {{}} n "
                f"WHERE NOT EXISTS (SELECT 1 FROM {known} k WHERE k.id = n.id) GROUP BY id "
                "RETURNING hash(id) AS h"
            )
            if isinstance(ids, Path):  # spilled by the run watcher: streamed by DuckDB
                changes.added(
                    known_index, hashes_of(con, insert.format("read_parquet(?)"), [str(ids)])
                )
            elif ids is not None and ids.num_rows:
                with _registered(con, "new_ids", ids.select(["id", "seen_at"])):
                    changes.added(known_index, hashes_of(con, insert.format("new_ids")))
            # Pruned events leave the views but their ids stay known until the horizon passes.
            pruned = hashes_of(
                con,
                f"""INSERT INTO {known}
                SELECT h.{key}, ? FROM {held} h JOIN wm w ON w.partition = h._partition
                WHERE h._offset < w.offset
                  AND NOT EXISTS (SELECT 1 FROM {known} k WHERE k.id = h.{key})
                RETURNING hash(id) AS h""",
                [now],
            )
            changes.added(known_index, pruned)
            changes.removed(
                held_index,
                hashes_of(
                    con,
                    f"DELETE FROM {held} h USING wm w WHERE w.partition = h._partition "
                    f"AND h._offset < w.offset RETURNING hash(h.{key}) AS h",
                ),
            )
            # An id the run counted (from any partition) is not ours to count again.
            changes.removed(
                held_index,
                hashes_of(
                    con,
                    f"DELETE FROM {held} h USING {known} k WHERE k.id = h.{key} "
                    f"RETURNING hash(h.{key}) AS h",
                ),
            )

    def expire_known(self, dedup_hours: int, now: datetime | None = None) -> None:
        """Forget known ids older than the dedup horizon (cheap; call now and then)."""
        changes = IndexChanges()
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._expire_known((now or _now()) - timedelta(hours=dedup_hours), changes)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        changes.apply(self.con)

    def _expire_known(self, horizon: datetime, changes: IndexChanges) -> None:
        for topic in TOPICS:
            gone = hashes_of(
                self.con,
                f"DELETE FROM {KNOWN[topic]} WHERE seen_at < ? RETURNING hash(id) AS h",
                [horizon],
            )
            if topic in self._known_index:
                changes.removed(self._known_index[topic], gone)

    # --- reads (any thread) ---------------------------------------------------------------------

    @property
    def cursor_count(self) -> int:
        """Read cursors open now (at most ``max_readers``)."""
        with self._cursor_cond:
            return len(self._cursors)

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read cursor of the pool for the block (waits while ``max_readers`` are busy)."""
        with self._cursor_cond:
            while not self._idle and len(self._cursors) >= self.max_readers:
                self._cursor_cond.wait()
            if self._idle:
                cur = self._idle.pop()
            else:
                cur = self.con.cursor()
                self._configure(cur)
                self._cursors.append(cur)
        try:
            yield cur
        finally:
            with self._cursor_cond:
                if cur in self._cursors:  # not closed by close() meanwhile
                    self._idle.append(cur)
                self._cursor_cond.notify()

    @contextmanager
    def snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read transaction: every read inside sees the same committed state."""
        with self.cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            finally:
                cur.execute("ROLLBACK")

    def counts(self) -> dict[str, Any]:
        """Events held per topic, invalid counts by topic and reason, and the rows of
        every table (to see that none grows without bound), from one snapshot."""
        tables = ["invalid", "positions", *HELD.values(), *KNOWN.values(), *PARTIALS.values()]
        with self.snapshot() as cur:
            rows = {t: int(_one(cur, f"SELECT count(*) FROM {t}")[0]) for t in tables}
            invalid: dict[str, dict[str, int]] = {}
            for t, r, n in cur.execute(
                "SELECT topic, reason, n FROM invalid ORDER BY ALL"
            ).fetchall():
                invalid.setdefault(t, {})[r] = int(n)
            # DuckDB's own account of its memory (buffer pool and the rest), in bytes.
            duckdb_bytes = int(
                _one(cur, "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()")[0]
            )
        events = {t: rows[HELD[t]] for t in TOPICS}
        return {"events": events, "invalid": invalid, "rows": rows, "duckdb_bytes": duckdb_bytes}

    def query(self, q: SpeedQuery) -> tuple[pa.Table, AnswerMeta]:
        """Answer a :class:`SpeedQuery` from one consistent snapshot (see the protocol).

        Partitions being re-read after a reset are left out of the answer (rows,
        ``partitions``, ``offsets``) and listed in ``rereading``."""
        topic = topic_of(q.view)
        with self.snapshot() as cur:
            applied = self._read_applied(cur)
            positions = self._read_positions(cur)
            rereading = applied.rereading(positions)
            owned = sorted(p for t, p in positions if t == topic)
            pruned = applied.watermark.get(topic, {})
            asked = q.min_offsets.get(topic, {})
            lows = {p: int(asked.get(p, 0)) for p in owned}
            stale = {p: (lows[p], pruned.get(p, 0)) for p in owned if lows[p] < pruned.get(p, 0)}
            if stale:
                detail = ", ".join(
                    f"{topic}[{p}] asked from {lo}, pruned to {wm}" for p, (lo, wm) in stale.items()
                )
                raise stale_watermark_error(
                    applied.run_id,
                    applied.watermark,
                    f"worker is at run {applied.run_id}; {detail}",
                )
            skipped = rereading.get(topic, {})
            lows = {p: lo for p, lo in lows.items() if p not in skipped}
            bound = q.max_offsets.get(topic, {})
            held_to = {p: positions[(topic, p)] for p in lows}
            short = {p: (held_to[p], int(bound[p])) for p in lows if held_to[p] < bound.get(p, 0)}
            if short:
                detail = ", ".join(
                    f"{topic}[{p}] held up to {h}, asked up to {b}" for p, (h, b) in short.items()
                )
                raise stale_watermark_error(
                    applied.run_id, applied.watermark, f"worker does not hold {detail}"
                )
            highs = {p: min(held_to[p], int(bound.get(p, held_to[p]))) for p in lows}
            # Held events filtered by offset (and partition) when the stored partials
            # cover more than asked: a caller at a newer run, partitions left out, or an
            # answer bounded from above.
            exact = (
                bool(skipped)
                or any(lows[p] > pruned.get(p, 0) for p in lows)
                or any(highs[p] < held_to[p] for p in lows)
            )
            if q.view in EVENT_VIEWS:
                sql, params = _events_sql(EVENT_VIEWS[q.view], q, HELD[topic])
            else:
                view = VIEWS[q.view]
                sql, params = _answer_sql(view, q, HELD[topic], PARTIALS[view.name], exact)
            lows_tbl = pa.table(
                {
                    "partition": pa.array(list(lows), pa.int32()),
                    "low": pa.array(list(lows.values()), pa.int64()),
                    "high": pa.array([highs[p] for p in lows], pa.int64()),
                }
            )
            with _registered(cur, "lows_tbl", lows_tbl):
                table = cur.sql(sql, params=params).to_arrow_table()
        table = table.cast(answer_schema(q.view, q.grain))
        meta = AnswerMeta(
            worker=f"{self.worker[0]}/{self.worker[1]}",
            run_id=applied.run_id,
            watermark=applied.watermark,
            min_offsets={topic: lows},
            offsets={topic: highs},
            partitions={
                t: sorted(p for tt, p in positions if tt == t and p not in rereading.get(t, {}))
                for t in TOPICS
                if any(tt == t for tt, _ in positions)  # the topics this worker owns
            },
            model_version=applied.model_version if topic == "reviews" else None,
            exact_filter=exact,
            rereading=rereading,
        )
        return table, meta


@contextmanager
def _registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    """``table`` visible to SQL on ``con`` as ``name`` for the block."""
    con.register(name, table)
    try:
        yield
    finally:
        con.unregister(name)


def _one(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    """The single row of ``sql`` (a count, an INSERT's row count)."""
    rows = con.execute(sql).fetchall()  # fetched to the end: the result is complete
    if len(rows) != 1:
        raise RuntimeError(f"{len(rows)} rows from {sql!r}, expected one")
    return tuple(rows[0])


def _watermark_table(topic: str, watermark: Watermark) -> pa.Table:
    parts = watermark.get(topic, {})
    return pa.table(
        {
            "partition": pa.array(list(parts), pa.int32()),
            "offset": pa.array(list(parts.values()), pa.int64()),
        }
    )


# Bounds past the ends of the calendar clamp here (no event can lie beyond them).
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


def _utc(ts: datetime) -> datetime:
    """``ts`` in UTC, clamped to the representable range (year 1 to 9999)."""
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+05:00 is before year 1 in UTC
        return EARLIEST if ts.year == 1 else LATEST


def _plus(ts: datetime, delta: timedelta) -> datetime:
    try:
        return ts + delta
    except OverflowError:
        return LATEST


def period_bounds(
    granularity: str, start: str | None, end: str | None
) -> tuple[datetime | None, datetime | None]:
    """Inclusive period bounds as a half-open ``[lo, hi)`` range of instants (UTC): hour
    starts for hours, day starts for days, Mondays for weeks, first days for months (a date
    or time selects its period).

    Dates near the ends of the calendar clamp (``end=9999-12-31`` has no upper
    bound); a bound that is not an ISO date or date-time is a ``ValueError``."""

    def day_start(d: date) -> datetime:
        """The start of the day-or-coarser period holding ``d``."""
        if granularity == "week":
            d = d - timedelta(days=d.weekday())
        elif granularity == "month":
            d = d.replace(day=1)
        return datetime(d.year, d.month, d.day, tzinfo=UTC)

    def after(start: datetime) -> datetime:
        """The start of the next period."""
        if granularity == "month":
            if start.year == 9999 and start.month == 12:
                return LATEST
            return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        step = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}
        return _plus(start, step[granularity])

    lo = hi = None
    if start:
        s = parse_bound(start)
        if isinstance(s, datetime):
            s = _utc(s)
            lo = (
                s.replace(minute=0, second=0, microsecond=0)
                if granularity == "hour"
                else day_start(s.date())
            )
        else:
            lo = day_start(s)
    if end:
        e = parse_bound(end)
        if isinstance(e, datetime):
            e = _utc(e)
            if granularity == "hour":
                hi = after(e.replace(minute=0, second=0, microsecond=0))
            else:
                hi = after(day_start(e.date()))
        elif granularity == "hour":  # a bare date includes its whole day
            hi = _plus(datetime(e.year, e.month, e.day, tzinfo=UTC), timedelta(days=1))
        else:
            hi = after(day_start(e))
    if hi == LATEST:
        hi = None  # nothing lies beyond the last representable instant
    return lo, hi


def _events_sql(view: EventView, q: SpeedQuery, held: str) -> tuple[str, list[Any]]:
    """SQL for an event view's answer: the held events in each partition's offset range."""
    sql = (
        f"SELECT {', '.join(view.schema.names)} FROM {held} h "
        "JOIN lows_tbl l ON l.partition = h._partition "
        "WHERE h._offset >= l.low AND h._offset < l.high"
    )
    params: list[Any] = []
    if q.skus is not None:
        sql += " AND list_contains(?::VARCHAR[], sku)" if q.skus else " AND false"
        params = [list(q.skus)] if q.skus else []
    return sql + " ORDER BY h._partition, h._offset", params


def _answer_sql(
    view: ViewDef, q: SpeedQuery, held: str, partials: str, exact: bool
) -> tuple[str, list[Any]]:
    """SQL for an answer: stored partials (or an exact aggregate of held events
    filtered by offset), filtered, rolled up to the granularity, merged."""
    if exact:
        source = f"({partials_sql(view, f'(SELECT h.* FROM {held} h JOIN lows_tbl l ON l.partition = h._partition WHERE h._offset >= l.low AND h._offset < l.high)')})"
    else:
        source = partials
    where: list[str] = []
    params: list[Any] = []
    for name, ids in (("sku", q.skus), ("store_id", q.stores)):
        if ids is None or name not in view.dimensions:
            continue
        if ids:
            where.append(f"list_contains(?::VARCHAR[], {name})")
            params.append(list(ids))
        else:  # an empty list selects nothing
            where.append("false")
    cols = list(view.dimensions) + view.measure_names
    keys = list(view.dimensions)
    bounds: list[str] = []
    if q.granularity is not None:
        # Rolled up from the stored grain (a period lies in one period of any coarser grain).
        cols = [f"{ROLLUP_EXPR[q.granularity].format(c='period')} AS period", *cols]
        keys = ["period", *keys]
        lo, hi = period_bounds(q.granularity, q.start, q.end)
        if lo is not None:
            bounds.append("period >= ?")
        if hi is not None:
            bounds.append("period < ?")
        params += [b for b in (lo, hi) if b is not None]
    inner = f"SELECT {', '.join(cols)} FROM {source} AS s"
    if where:
        inner += " WHERE " + " AND ".join(where)
    if bounds:
        inner = f"SELECT * FROM ({inner}) WHERE " + " AND ".join(bounds)
    merged = view.merge_sql(f"({inner})", keys=keys, derive=False)
    out = [*keys] + [f"CAST({m.name} AS {DUCKDB_TYPES[m.type]}) AS {m.name}" for m in view.measures]
    return f"SELECT {', '.join(out)} FROM ({merged}) ORDER BY ALL", params


def invalid_totals(invalid: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """``{topic: {reason: n}}`` summed over topics to ``{reason: n}``."""
    out: dict[str, int] = {}
    for reasons in invalid.values():
        for r, n in reasons.items():
            out[r] = out.get(r, 0) + int(n)
    return out
