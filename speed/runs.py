"""Following the batch layer: the latest published run, the ids it counted, its model.

A :class:`RunWatcher` thread polls the ``runs`` table (every ~1.5 s; a small
Delta table) and, when a run newer than the one the state applied is published,
prepares everything the main thread needs to apply it in one transaction
(:class:`speed.state.RunApply`):

* the ids the run counted: master rows below its watermark, read at the master
  version the run pinned, ingested within the dedup horizon. Master tables are
  append-only, so when the state already holds the ids of an older version only
  the files added since are read. They are streamed, a record batch at a time,
  into a Parquet file of ids under ``{speed_state_dir}/prepared/`` that the main
  thread loads with DuckDB: memory stays bounded however many ids 48 hours hold
  (measured in docs/speed.md);
* the sentiment model version it published (loaded here, off the hot path).

Re-scoring the held reviews needs the state, so the main thread does it.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lambdalake.contract.events import KEY_BY_TOPIC, REFERENCE_TOPICS
from lambdalake.contract.lake import MASTER_TABLE_BY_TOPIC, Lake
from lambdalake.contract.manifest import RunRecord, Watermark
from lambdalake.logs import get_logger
from lambdalake.ops.status import latest_run
from lambdalake.settings import TOPICS, Settings

log = get_logger(__name__)

IDS_SCHEMA = pa.schema(
    [pa.field("id", pa.string()), pa.field("seen_at", pa.timestamp("us", tz="UTC"))]
)
SENTIMENT_MODEL = "sentiment"


@dataclass
class PreparedRun:
    """A published run with what applying it needs (built off the hot path)."""

    run: RunRecord
    base_master_versions: dict[str, int]  # the ids in the state were read at these
    known_ids: dict[str, pa.Table | Path]  # a table, or a Parquet file of (id, seen_at)
    known_counts: dict[str, int]
    replace_known: bool
    model_version: str | None
    model: Any  # a lambdalake.sentiment.SentimentModel, or None if unchanged
    reset: bool

    def discard(self) -> None:
        """Delete the files of ids it prepared (after applying it, or when replaced)."""
        for ids in self.known_ids.values():
            if isinstance(ids, Path):
                ids.unlink(missing_ok=True)


def model_version_of(run: RunRecord | None) -> str | None:
    """The sentiment model version a run published (``None`` = the lexicon model)."""
    if run is None:
        return None
    return run.model_versions.get(SENTIMENT_MODEL)


def load_model(lake: Lake, version: str | None) -> Any:
    """The sentiment model of ``version``; the lexicon model for ``None``."""
    from lambdalake.sentiment import SentimentModel, lexicon_model

    if version is None:
        return lexicon_model()
    return SentimentModel.load(lake, version)


def watermark_went_back(old: Watermark, new: Watermark) -> bool:
    """True when any partition's new watermark is below the old one (pure)."""
    return any(new.get(t, {}).get(p, 0) < o for t, parts in old.items() for p, o in parts.items())


def counted_id_batches(
    lake: Lake,
    topic: str,
    *,
    version: int,
    watermark: dict[int, int],
    since: datetime,
    base_version: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Ids of master rows below ``watermark`` ingested at or after ``since``, a record
    batch at a time (``id``, ``seen_at``: the row's ``_ingested_at``).

    Reads the master table at ``version``; with ``base_version`` only the files
    added after it (the table is append-only)."""
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    uri = lake.table(MASTER_TABLE_BY_TOPIC[topic])
    if not watermark or not DeltaTable.is_deltatable(uri, storage_options=lake.storage_options):
        return  # no watermark: nothing is below it
    dt = DeltaTable(uri, version=version, storage_options=lake.storage_options)
    dataset = dt.to_pyarrow_dataset()
    if base_version is not None and base_version <= version:
        old = DeltaTable(uri, version=base_version, storage_options=lake.storage_options)
        old_paths = {f.path for f in old.to_pyarrow_dataset().get_fragments()}
        fragments = [f for f in dataset.get_fragments() if f.path not in old_paths]
        if not fragments:
            return
        dataset = ds.FileSystemDataset(
            fragments, schema=dataset.schema, format=dataset.format, filesystem=dataset.filesystem
        )
    key = KEY_BY_TOPIC[topic]
    limits = np.zeros(max(watermark) + 1, dtype=np.int64)
    for p, o in watermark.items():
        limits[p] = o
    scanner = dataset.scanner(
        columns=[key, "_partition", "_offset", "_ingested_at"],
        filter=ds.field("_ingested_at") >= pa.scalar(since, pa.timestamp("us", tz="UTC")),
        # One file and a couple of batches in memory at a time (not 4 files x 16 batches).
        fragment_readahead=1,
        batch_readahead=2,
    )
    for batch in scanner.to_batches():
        if not batch.num_rows:
            continue
        parts = batch["_partition"].to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = batch["_offset"].to_numpy(zero_copy_only=False)
        # Partitions the watermark does not name have nothing below it.
        known_part = parts < len(limits)
        below = np.zeros(len(parts), dtype=bool)
        below[known_part] = offsets[known_part] < limits[parts[known_part]]
        if not below.any():
            continue
        kept = batch.filter(pa.array(below))
        yield pa.record_batch(
            [kept[key], kept["_ingested_at"].cast(pa.timestamp("us", tz="UTC"))],
            schema=IDS_SCHEMA,
        )


def batch_counted_ids(
    lake: Lake,
    topic: str,
    *,
    version: int,
    watermark: dict[int, int],
    since: datetime,
    base_version: int | None = None,
) -> pa.Table:
    """:func:`counted_id_batches` as one table (small reads, tests)."""
    return pa.Table.from_batches(
        list(
            counted_id_batches(
                lake,
                topic,
                version=version,
                watermark=watermark,
                since=since,
                base_version=base_version,
            )
        ),
        schema=IDS_SCHEMA,
    )


def write_counted_ids(batches: Iterator[pa.RecordBatch], path: Path) -> int:
    """Stream ``batches`` into a Parquet file at ``path``; the number of ids written."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with pq.ParquetWriter(path, IDS_SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
            n += batch.num_rows
    return n


def prepare_run(
    settings: Settings,
    run: RunRecord,
    *,
    applied_watermark: Watermark,
    applied_master_versions: dict[str, int],
    applied_model_version: str | None,
    now: datetime | None = None,
    spill_dir: Path | None = None,
) -> PreparedRun:
    """Everything needed to apply ``run`` to a state that applied the given run.

    With ``spill_dir`` the ids go to Parquet files there (bounded memory),
    otherwise into tables."""
    lake = Lake(settings.lake_uri)
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=settings.dedup_hours)
    reset = watermark_went_back(applied_watermark, run.watermark)
    known: dict[str, pa.Table | Path] = {}
    counts: dict[str, int] = {}
    incremental = not reset
    for topic in TOPICS:
        name = MASTER_TABLE_BY_TOPIC[topic]
        version = run.master_versions.get(name)
        base = applied_master_versions.get(name)
        # Reference data is not deduplicated: no ids to know.
        if version is None or settings.dedup_hours == 0 or topic in REFERENCE_TOPICS:
            known[topic] = IDS_SCHEMA.empty_table()
            counts[topic] = 0
            continue
        if base is None or base > version:
            incremental = False
    for topic in TOPICS:
        name = MASTER_TABLE_BY_TOPIC[topic]
        pinned = run.master_versions.get(name)
        if topic in known or pinned is None:
            continue
        batches = counted_id_batches(
            lake,
            topic,
            version=int(pinned),
            watermark=run.watermark.get(topic, {}),
            since=since,
            base_version=applied_master_versions.get(name) if incremental else None,
        )
        if spill_dir is None:
            table = pa.Table.from_batches(list(batches), schema=IDS_SCHEMA)
            known[topic], counts[topic] = table, table.num_rows
        else:
            path = spill_dir / f"{topic}-{uuid.uuid4().hex}.parquet"
            known[topic], counts[topic] = path, write_counted_ids(batches, path)
            # The allocator keeps freed read buffers; a worker keeps running for days.
            pa.default_memory_pool().release_unused()
    model_version = model_version_of(run)
    model = None
    if model_version != applied_model_version or reset:
        model = load_model(lake, model_version)
    return PreparedRun(
        run=run,
        base_master_versions=dict(applied_master_versions),
        known_ids=known,
        known_counts=counts,
        replace_known=not incremental,
        model_version=model_version,
        model=model,
        reset=reset,
    )


class RunWatcher(threading.Thread):
    """Polls the runs table; keeps the newest run prepared for the main thread.

    The main thread calls :meth:`take` between micro-batches, applies the run,
    :meth:`PreparedRun.discard` s it, and tells the watcher what it applied with
    :meth:`applied`. ``spill_dir``: where prepared ids are streamed to (a folder of
    this worker's own)."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        interval: float = 1.5,
        spill_dir: Path | None = None,
    ):
        super().__init__(name="speed-runs", daemon=True)
        self.settings = settings
        self.stop_event = stop
        self.interval = interval
        self._lock = threading.Lock()
        self._applied: tuple[str | None, Watermark, dict[str, int], str | None] = (
            None,
            {},
            {},
            None,
        )
        self._ready: PreparedRun | None = None
        self._prepared_for: tuple[str, str] | None = None
        self._wake = threading.Event()
        self.latest: RunRecord | None = None
        self.error: str | None = None
        # Prepared ids are spilled here, one folder per worker (a crash leaves files of no
        # use: cleared at start); None keeps them in memory.
        self.spill_dir = spill_dir
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)

    def applied(
        self,
        run_id: str | None,
        watermark: Watermark,
        master_versions: dict[str, int],
        model_version: str | None,
    ) -> None:
        stale = None
        with self._lock:
            self._applied = (run_id, watermark, dict(master_versions), model_version)
            if self._ready is not None and self._ready.run.run_id == run_id:
                stale, self._ready = self._ready, None
        if stale is not None:
            stale.discard()
        self._wake.set()

    @property
    def prepared_run_id(self) -> str | None:
        """The run prepared and waiting for the main thread, if any."""
        with self._lock:
            return self._ready.run.run_id if self._ready is not None else None

    def take(self) -> PreparedRun | None:
        """The prepared newest run, if it is newer than the applied one and still valid."""
        with self._lock:
            ready, self._ready = self._ready, None
            applied = self._applied
        if ready is None:
            return None
        if ready.run.run_id == applied[0]:
            ready.discard()
            return None
        if ready.base_master_versions != applied[2]:
            ready.discard()
            self._prepared_for = None  # prepared against another state: prepare again
            self._wake.set()
            return None
        return ready  # the caller applies it, then discards its files

    def check_now(self) -> PreparedRun | None:
        """Look up the latest run and prepare it synchronously (at start)."""
        self._poll_once()
        return self.take()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._poll_once()
            self._wake.wait(self.interval)
            self._wake.clear()

    def _poll_once(self) -> None:
        lake = Lake(self.settings.lake_uri)
        try:
            run = latest_run(lake)  # the runs table kept open: only new commits are read
        except Exception as exc:  # an unreadable lake must not stop the worker
            self._report(f"reading runs failed: {type(exc).__name__}: {exc}")
            return
        self.latest = run
        with self._lock:
            applied = self._applied
        if run is None and applied[0] is not None:
            # The applied run was withdrawn and no other is published: back to holding
            # everything from offset 0 (a reset, since the watermark goes back).
            run = RunRecord(run_id=None, status="withdrawn", started_at=datetime.now(UTC))  # type: ignore[arg-type]
        if run is None or run.run_id == applied[0]:
            return
        tag = (run.run_id, repr(sorted(applied[2].items())))
        if self._prepared_for == tag:
            return
        try:
            prepared = prepare_run(
                self.settings,
                run,
                applied_watermark=applied[1],
                applied_master_versions=applied[2],
                applied_model_version=applied[3],
                spill_dir=self.spill_dir,
            )
        except Exception as exc:  # retried on the next poll
            self._report(f"preparing run {run.run_id} failed: {type(exc).__name__}: {exc}")
            return
        self.error = None
        with self._lock:
            replaced, self._ready = self._ready, prepared
            self._prepared_for = tag
        if replaced is not None:
            replaced.discard()
        log.info(
            "speed.run_prepared",
            run_id=run.run_id,
            ids=prepared.known_counts,
            incremental=not prepared.replace_known,
            model_version=prepared.model_version,
        )

    def _report(self, message: str) -> None:
        if message != self.error:
            log.warning("speed.runs_unavailable", error=message)
        self.error = message
