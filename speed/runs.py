"""Following the batch layer: the latest published run, the ids it counted, its model.

A :class:`RunWatcher` thread polls the ``runs`` table (every ~1.5 s; a small
Delta table) and, when a run newer than the one the state applied is published,
prepares everything the main thread needs to apply it in one transaction
(:class:`speed.state.RunApply`):

* the ids the run counted: master rows below its watermark, read at the master
  version the run pinned, ingested within the dedup horizon. Master tables are
  append-only, so when the state already holds the ids of an older version only
  the files added since are read;
* the sentiment model version it published (loaded here, off the hot path).

Re-scoring the held reviews needs the state, so the main thread does it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.contracts import KEY_BY_TOPIC
from lambdalake.lake import MASTER_TABLE_BY_TOPIC, RUNS, Lake
from lambdalake.logs import get_logger
from lambdalake.manifest import RunRecord, Watermark, latest_published_run
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
    known_ids: dict[str, pa.Table]
    replace_known: bool
    model_version: str | None
    model: Any  # a lambdalake.sentiment.SentimentModel, or None if unchanged
    reset: bool


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


def batch_counted_ids(
    lake: Lake,
    topic: str,
    *,
    version: int,
    watermark: dict[int, int],
    since: datetime,
    base_version: int | None = None,
) -> pa.Table:
    """Ids of master rows below ``watermark`` ingested at or after ``since``.

    Reads the master table at ``version``; with ``base_version`` only the files
    added after it (the table is append-only). Columns ``id``, ``seen_at``
    (the row's ``_ingested_at``)."""
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    uri = lake.table(MASTER_TABLE_BY_TOPIC[topic])
    if not DeltaTable.is_deltatable(uri, storage_options=lake.storage_options):
        return IDS_SCHEMA.empty_table()
    dt = DeltaTable(uri, version=version, storage_options=lake.storage_options)
    dataset = dt.to_pyarrow_dataset()
    if base_version is not None and base_version <= version:
        old = DeltaTable(uri, version=base_version, storage_options=lake.storage_options)
        old_paths = {f.path for f in old.to_pyarrow_dataset().get_fragments()}
        fragments = [f for f in dataset.get_fragments() if f.path not in old_paths]
        if not fragments:
            return IDS_SCHEMA.empty_table()
        dataset = ds.FileSystemDataset(
            fragments, schema=dataset.schema, format=dataset.format, filesystem=dataset.filesystem
        )
    key = KEY_BY_TOPIC[topic]
    table = dataset.to_table(
        columns=[key, "_partition", "_offset", "_ingested_at"],
        filter=ds.field("_ingested_at") >= pa.scalar(since, pa.timestamp("us", tz="UTC")),
    )
    if table.num_rows and watermark:
        top = max(max(watermark) + 1, int(pc.max(table["_partition"]).as_py()) + 1)
        limits = np.zeros(top, dtype=np.int64)
        for p, o in watermark.items():
            limits[p] = o
        parts = table["_partition"].to_numpy()
        mask = table["_offset"].to_numpy() < limits[parts]
        table = table.filter(pa.array(mask))
    elif table.num_rows:
        table = table.slice(0, 0)  # no watermark: nothing is below it
    return pa.table(
        {"id": table[key], "seen_at": table["_ingested_at"].cast(pa.timestamp("us", tz="UTC"))},
        schema=IDS_SCHEMA,
    )


def prepare_run(
    settings: Settings,
    run: RunRecord,
    *,
    applied_watermark: Watermark,
    applied_master_versions: dict[str, int],
    applied_model_version: str | None,
    now: datetime | None = None,
) -> PreparedRun:
    """Everything needed to apply ``run`` to a state that applied the given run."""
    lake = Lake(settings.lake_uri)
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=settings.dedup_hours)
    reset = watermark_went_back(applied_watermark, run.watermark)
    known: dict[str, pa.Table] = {}
    incremental = not reset
    for topic in TOPICS:
        name = MASTER_TABLE_BY_TOPIC[topic]
        version = run.master_versions.get(name)
        base = applied_master_versions.get(name)
        if version is None or settings.dedup_hours == 0:
            known[topic] = IDS_SCHEMA.empty_table()
            continue
        if base is None or base > version:
            incremental = False
    for topic in TOPICS:
        name = MASTER_TABLE_BY_TOPIC[topic]
        pinned = run.master_versions.get(name)
        if topic in known or pinned is None:
            continue
        known[topic] = batch_counted_ids(
            lake,
            topic,
            version=int(pinned),
            watermark=run.watermark.get(topic, {}),
            since=since,
            base_version=applied_master_versions.get(name) if incremental else None,
        )
    model_version = model_version_of(run)
    model = None
    if model_version != applied_model_version or reset:
        model = load_model(lake, model_version)
    return PreparedRun(
        run=run,
        base_master_versions=dict(applied_master_versions),
        known_ids=known,
        replace_known=not incremental,
        model_version=model_version,
        model=model,
        reset=reset,
    )


class RunWatcher(threading.Thread):
    """Polls the runs table; keeps the newest run prepared for the main thread.

    The main thread calls :meth:`take` between micro-batches and tells the
    watcher what it applied with :meth:`applied`."""

    def __init__(self, settings: Settings, stop: threading.Event, interval: float = 1.5):
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

    def applied(
        self,
        run_id: str | None,
        watermark: Watermark,
        master_versions: dict[str, int],
        model_version: str | None,
    ) -> None:
        with self._lock:
            self._applied = (run_id, watermark, dict(master_versions), model_version)
            if self._ready is not None and self._ready.run.run_id == run_id:
                self._ready = None
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
        if ready is None or ready.run.run_id == applied[0]:
            return None
        if ready.base_master_versions != applied[2]:
            self._prepared_for = None  # prepared against another state: prepare again
            self._wake.set()
            return None
        return ready

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
            run = latest_published_run(lake.table(RUNS), lake.storage_options)
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
            )
        except Exception as exc:  # retried on the next poll
            self._report(f"preparing run {run.run_id} failed: {type(exc).__name__}: {exc}")
            return
        self.error = None
        with self._lock:
            self._ready = prepared
            self._prepared_for = tag
        log.info(
            "speed.run_prepared",
            run_id=run.run_id,
            ids={t: tbl.num_rows for t, tbl in prepared.known_ids.items()},
            incremental=not prepared.replace_known,
            model_version=prepared.model_version,
        )

    def _report(self, message: str) -> None:
        if message != self.error:
            log.warning("speed.runs_unavailable", error=message)
        self.error = message
