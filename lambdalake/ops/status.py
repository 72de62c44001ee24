"""Freshness of the whole system, as one object: ``lambdalake status`` and ``GET /v1/status``.

Shape (the architecture page's contract)::

    {"batch": {"run_id", "published_at", "age_seconds", "watermark": {topic: {partition: offset}}},
     "speed": {"workers": [{"worker", "offsets", "lag", "events", "alive", ...}]},
     "quarantine": {topic: {reason: count}}}

Speed workers publish their part in small JSON files
(``{speed_state_dir}/status/worker-I-of-N.json``, written atomically about once
a second); a file older than ``STALE_SECONDS`` marks its worker not alive.

Lag: measured here, against the broker's end offsets read now (at most once a
second per process; ``lag_source: "broker"``), minus the positions in the
workers' files (positions only grow, so an older file over- rather than
under-states the lag). When the broker cannot be read, a worker's own lag
stands (``lag_source: "worker"``). Either way ``lag_measured_at`` and
``lag_age_s`` say when the ends behind the lag were read, so an old 0 is never
taken for "caught up".
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from lambdalake.contract.lake import QUARANTINE, RUNS, Lake
from lambdalake.contract.manifest import RunRecord, latest_of, runs_of, watermark_to_dict
from lambdalake.settings import Settings

if TYPE_CHECKING:
    from lambdalake.kafka.clients import Security

STALE_SECONDS = 15.0
ENDS_TTL_SECONDS = 1.0  # end offsets read at most this often per process
ENDS_FAILED_TTL_SECONDS = 5.0  # after a failed read, the broker is not asked again for this long
ENDS_TIMEOUT_SECONDS = 3.0

TP = tuple[str, int]


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z") if ts else None


class KeptTable:
    """A Delta table kept open between reads and brought up to date with
    ``update_incremental()``, which reads only the commits since the last read.

    Opening a table afresh reads every JSON commit since its last checkpoint (up to 99),
    each on a thread of delta-rs' blocking pool: a status read once a second kept tens of
    threads alive in the API (measured: 29 -> 107 threads in an hour's soak). A table that
    only reads this way keeps no more than its state (measured: 2,000 appends by another
    writer, the same RSS as re-opening it every 100 versions), so it is never re-opened
    for size. It is opened again when the table went away, when ``update_incremental``
    fails (the table was deleted and re-created at an older version) or after
    :meth:`drop` (the owner found it deleted and re-created meanwhile). Not thread-safe:
    its owner locks."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.table: Any = None
        self.opens = 0  # times the table was opened afresh

    def latest(self) -> Any:
        """The ``DeltaTable`` at its latest version, or ``None`` when there is no table."""
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            self.table = None
            return None
        if self.table is not None:
            try:
                self.table.update_incremental()
                return self.table
            except Exception:  # its log went backwards (deleted, re-created): open it again
                self.table = None
        self.table = DeltaTable(self.uri, storage_options=self.storage_options)
        self.opens += 1
        return self.table

    def drop(self) -> None:
        """Open the table afresh on the next :meth:`latest`."""
        self.table = None


class LatestRunReader:
    """:func:`~lambdalake.contract.manifest.latest_published_run` of one lake, for a
    process that asks often (thread-safe): the runs table is kept open (:class:`KeptTable`)
    and its rows are read again only when it has a new version. The record returned is
    shared by the callers until the next version: read it, do not change it."""

    def __init__(self, lake: Lake) -> None:
        self._kept = KeptTable(lake.table(RUNS), lake.storage_options)
        self._lock = threading.Lock()
        self._version: int | None = None
        self._latest: RunRecord | None = None
        self.reads = 0  # times the rows were read

    def latest(self) -> RunRecord | None:
        with self._lock:
            for again in (False, True):
                dt = self._kept.latest()
                if dt is None:
                    self._version, self._latest = None, None
                    return None
                version = int(dt.version())
                if version == self._version:
                    return self._latest
                try:
                    rows = dt.to_pyarrow_table()
                except FileNotFoundError:  # deleted and re-created: the files it lists are gone
                    if again:
                        raise
                    self._kept.drop()
                    continue
                self._latest = latest_of(runs_of(rows))
                self._version = version
                self.reads += 1
            return self._latest


T = TypeVar("T")


class _PerLake(Generic[T]):
    """One ``T`` per lake this process reads (a handful at most; tests open many)."""

    def __init__(self, make: Callable[[Lake], T], most: int = 8) -> None:
        self.make = make
        self.most = most
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[str, str], T] = OrderedDict()

    def get(self, lake: Lake) -> T:
        key = (lake.root, json.dumps(lake.storage_options or {}, sort_keys=True))
        with self._lock:
            kept = self._kept.get(key)
            if kept is None:
                kept = self._kept[key] = self.make(lake)
                while len(self._kept) > self.most:
                    self._kept.popitem(last=False)
            self._kept.move_to_end(key)
            return kept

    def __len__(self) -> int:
        return len(self._kept)


_RUN_READERS = _PerLake(LatestRunReader)


def latest_run(lake: Lake) -> RunRecord | None:
    """The lake's latest published run (:func:`~lambdalake.contract.manifest.latest_published_run`),
    read through this process's :class:`LatestRunReader` of the lake: for processes that
    ask every second or two (the status, the speed worker's run watcher)."""
    return _RUN_READERS.get(lake).latest()


def batch_status(lake: Lake, now: datetime) -> dict[str, Any]:
    run = latest_run(lake)
    if run is None:
        return {"run_id": None, "published_at": None, "age_seconds": None, "watermark": {}}
    published = run.published_at or run.started_at
    return {
        "run_id": run.run_id,
        "published_at": _iso(published),
        "age_seconds": round((now - published).total_seconds(), 3),
        "watermark": watermark_to_dict(run.watermark),
        "model_versions": run.model_versions,
    }


class _EndsCache:
    """The broker's end offsets, read at most every ``ENDS_TTL_SECONDS`` (thread-safe), with
    one Kafka client per broker kept between reads (:class:`~lambdalake.kafka.clients.EndOffsetsReader`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # bootstrap -> (monotonic time read, wall time asked, ends or None when it failed)
        self._cache: dict[str, tuple[float, float, dict[TP, int] | None]] = {}
        # (bootstrap, security) -> the kept client, and the thread of its last read
        self._readers: dict[tuple[str, str], tuple[Any, threading.Thread | None]] = {}

    def get(
        self, bootstrap: str, tps: set[TP], security: Security | None = None
    ) -> tuple[float, dict[TP, int]] | None:
        """``(wall time the ends were asked for, ends)``, or ``None`` when unreadable."""
        with self._lock:
            hit = self._cache.get(bootstrap)
            now = time.monotonic()
            if hit is not None:
                read_at, asked_at, cached = hit
                if cached is None and now - read_at < ENDS_FAILED_TTL_SECONDS:
                    return None
                if cached is not None and now - read_at < ENDS_TTL_SECONDS and tps <= set(cached):
                    return asked_at, cached
            asked_at = time.time()
            ends = self._read(bootstrap, tps, security)
            self._cache[bootstrap] = (time.monotonic(), asked_at, ends)
            return None if ends is None else (asked_at, ends)

    def _read(
        self, bootstrap: str, tps: set[TP], security: Security | None
    ) -> dict[TP, int] | None:
        from lambdalake.kafka.clients import EndOffsetsReader

        key = (bootstrap, json.dumps(sorted((security or {}).items()), default=str))
        reader, last = self._readers.get(key, (None, None))
        if last is not None and last.is_alive():
            return None  # the last read overran and still holds the client: not two at once
        if reader is None:
            reader = EndOffsetsReader(bootstrap, ENDS_TIMEOUT_SECONDS, security=security)
        ends, thread = _read_ends(reader, tps, ENDS_TIMEOUT_SECONDS)
        self._readers[key] = (reader, thread)
        return ends


def _read_ends(
    reader: Any, tps: set[TP], timeout: float
) -> tuple[dict[TP, int] | None, threading.Thread | None]:
    """ListOffsets for ``tps`` within ``timeout`` seconds through ``reader`` (an
    :class:`~lambdalake.kafka.clients.EndOffsetsReader`), or ``None``; and the thread that
    read.

    A client of an unreachable broker can block for many times its request timeout
    (35 s measured), so: a TCP probe first, then the read in a thread waited for at
    most ``timeout``; one that overruns is left to finish alone."""
    from lambdalake.ops.net import accepts_connections

    if not accepts_connections(reader.bootstrap, timeout=timeout / 2):
        return None, None
    found: dict[TP, int] = {}

    def read() -> None:
        found.update(reader.read(sorted(tps)))

    def guarded() -> None:
        try:
            read()
        except Exception:  # no broker after all: the workers' own lag stands
            found.clear()

    thread = threading.Thread(target=guarded, name="status-ends", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or set(found) < tps:
        return None, thread
    return dict(found), thread


_ENDS = _EndsCache()


def _owned(worker: dict[str, Any]) -> dict[TP, int]:
    return {
        (t, int(p)): int(o)
        for t, parts in (worker.get("offsets") or {}).items()
        for p, o in parts.items()
    }


def _age(now: datetime, ts: Any) -> float | None:
    try:
        return (now - datetime.fromisoformat(str(ts).replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None


def speed_status(
    status_dir: Path,
    now: datetime,
    bootstrap: str | None = None,
    security: Security | None = None,
) -> dict[str, Any]:
    """The workers' status files; with ``bootstrap`` (and the clients' ``security``
    settings), each lag measured against the broker's end offsets now (see the module doc)."""
    workers: list[dict[str, Any]] = []
    for path in sorted(status_dir.glob("worker-*.json")) if status_dir.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now, or not ours
        age = _age(now, info.get("updated_at"))
        info["alive"] = age is not None and age <= STALE_SECONDS
        info["status_age_seconds"] = None if age is None else round(age, 3)
        workers.append(info)
    measured = None
    if bootstrap and workers:
        wanted = {tp for w in workers for tp in _owned(w)}
        measured = _ENDS.get(bootstrap, wanted, security) if wanted else None
    for w in workers:
        if measured is not None:
            asked_at, ends = measured
            lag: dict[str, dict[str, int]] = {}
            for (t, p), pos in sorted(_owned(w).items()):
                lag.setdefault(t, {})[str(p)] = max(0, ends.get((t, p), pos) - pos)
            w["lag"] = lag
            w["lag_source"] = "broker"
            w["lag_measured_at"] = _iso(datetime.fromtimestamp(asked_at, UTC))
        else:
            w["lag_source"] = "worker"
        at = w.get("lag_measured_at")
        age = _age(now, at) if at else None
        w["lag_age_s"] = None if age is None else round(max(0.0, age), 3)
    total_lag = sum(
        int(n) for w in workers for parts in (w.get("lag") or {}).values() for n in parts.values()
    )
    return {"workers": workers, "total_lag": total_lag}


class QuarantineCounter:
    """Quarantine counts by (topic, reason), kept up to date incrementally (thread-safe).

    The quarantine table only grows (ingest appends a file per commit with bad events),
    so a count re-read from every file costs more with every hour of uptime: after a day
    at the demo's load, thousands of files per ``/v1/status``. This reads only the files
    added since the last call, from the table kept open (:class:`KeptTable`: only the new
    commits of its log are read); when one it counted is gone (an OPTIMIZE or an overwrite
    rewrote the table) it counts everything again, once. What it keeps is the counts (one
    per topic and reason), the paths it counted (the files the table itself lists in its
    log: some 150 bytes each) and the open table."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self._kept = KeptTable(lake.table(QUARANTINE), lake.storage_options)
        self._lock = threading.Lock()
        self._version: int | None = None
        self._files: frozenset[str] = frozenset()
        self._counts: dict[tuple[str, str], int] = {}
        self.files_read = 0  # data files read by the last call (0: nothing new)

    @property
    def opens(self) -> int:
        """Times the table was opened afresh (once, unless it was deleted or re-created)."""
        return self._kept.opens

    def counts(self) -> dict[str, dict[str, int]]:
        """``{topic: {reason: n}}`` at the table's latest version."""
        with self._lock:
            self.files_read = 0
            for again in (False, True):
                dt = self._kept.latest()
                if dt is None:
                    self._version, self._files, self._counts = None, frozenset(), {}
                    return {}
                if int(dt.version()) == self._version or self._count_new(dt, again):
                    break
            out: dict[str, dict[str, int]] = {}
            for (topic, reason), n in sorted(self._counts.items()):
                out.setdefault(topic, {})[reason] = n
            return out

    def _count_new(self, dt: Any, again: bool) -> bool:
        """Count the files added since the last version; ``False`` when the kept table turned
        out stale (a file it lists, one counted before, is not in storage: the table was
        deleted and re-created meanwhile), after which it is opened again."""
        import pyarrow.dataset as ds
        import pyarrow.fs as pa_fs

        dataset = dt.to_pyarrow_dataset()
        fragments = {f.path: f for f in dataset.get_fragments()}
        kept = next((path for path in fragments if path in self._files), None)
        if (
            not again
            and kept is not None
            and dataset.filesystem.get_file_info(kept).type == pa_fs.FileType.NotFound
        ):
            self._kept.drop()
            self._version = None
            return False
        if not self._files <= fragments.keys():  # rewritten: count it all again
            self._files, self._counts = frozenset(), {}
        added = [f for path, f in fragments.items() if path not in self._files]
        if added:
            table = ds.FileSystemDataset(
                added,
                schema=dataset.schema,
                format=dataset.format,
                filesystem=dataset.filesystem,
            ).to_table(columns=["_topic", "reason"])
            counts = dict(self._counts)
            if table.num_rows:
                grouped = table.group_by(["_topic", "reason"]).aggregate([("reason", "count")])
                for row in grouped.to_pylist():
                    key = (row["_topic"], row["reason"])
                    counts[key] = counts.get(key, 0) + int(row["reason_count"])
            self._counts = counts
            self.files_read = len(added)
        self._files = frozenset(fragments)
        self._version = int(dt.version())
        return True


_COUNTERS = _PerLake(QuarantineCounter)


def quarantine_counts(lake: Lake) -> dict[str, dict[str, int]]:
    """Quarantined events by topic and reason (this process's :class:`QuarantineCounter`
    of the lake: each call reads only the commits and files added since the previous one)."""
    return _COUNTERS.get(lake).counts()


def collect_status(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """The status object of the architecture page, read from the lake and the workers' files."""
    now = now or datetime.now(UTC)
    lake = Lake(settings.lake_uri)
    return {
        "batch": batch_status(lake, now),
        "speed": speed_status(
            settings.speed_state_dir / "status", now, settings.bootstrap, settings.kafka_security
        ),
        "quarantine": quarantine_counts(lake),
        "generated_at": _iso(now),
    }


class StatusCache:
    """:func:`collect_status` read at most once per ``ttl`` seconds, by one caller at a time.

    For the API: operators' dashboards and scripts poll ``/v1/status`` concurrently, and
    each read brings the runs and quarantine tables up to date (tens of ms alone, hundreds
    under load, and delta-rs' I/O threads for each concurrent read: the API's thread count
    grew with the pollers). Concurrent callers wait for the one read in progress and share its answer;
    ``generated_at`` says when it was read (and each lag its own ``lag_age_s``)."""

    def __init__(self, settings: Settings, ttl: float = 1.0) -> None:
        self.settings = settings
        self.ttl = ttl
        self._lock = threading.Lock()
        self._read_at = float("-inf")  # never: the first get() reads
        self._report: dict[str, Any] = {}
        self.reads = 0

    def get(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                self._report = collect_status(self.settings)
                self._read_at = time.monotonic()
                self.reads += 1
            return self._report


def render_status(report: dict[str, Any]) -> None:
    """The human form: a compact table of the same facts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    batch = report["batch"]
    t = Table(title="lambdalake status", show_header=True, header_style="bold")
    t.add_column("part")
    t.add_column("state")
    t.add_column("detail")
    if batch["run_id"]:
        wm = ", ".join(
            f"{topic} {sum(parts.values())}" for topic, parts in sorted(batch["watermark"].items())
        )
        t.add_row("batch", batch["run_id"], f"age {batch['age_seconds']:.0f} s; watermark {wm}")
    else:
        t.add_row("batch", "no published run", "run `lambdalake batch run`")
    workers = report["speed"]["workers"]
    if not workers:
        t.add_row("speed", "no workers", "run `lambdalake speed run`")
    for w in workers:
        lag = sum(int(n) for parts in (w.get("lag") or {}).values() for n in parts.values())
        held = ", ".join(f"{k} {v}" for k, v in sorted((w.get("events") or {}).items()))
        state = "alive" if w.get("alive") else "stale"
        age = w.get("lag_age_s")
        measured = "" if age is None else f" (measured {age:.0f} s ago)"
        detail = f"lag {lag}{measured}; held {held}"
        for key in ("broker_refused", "halted"):  # why it is not reading, if it is not
            if w.get(key):
                detail += f"; {key.replace('_', ' ')}: {w[key]}"
        skip = w.get("last_skipped_by_operator")
        if skip:  # a batch it passed because an operator skipped it (ingest --skip)
            detail += (
                f"; passed {skip.get('topic')}/{skip.get('partition')} "
                f"{skip.get('offsets')} ({skip.get('reason')}) at {skip.get('passed_at')}"
            )
        t.add_row(f"speed {w.get('worker')}", state, detail)
    q = report["quarantine"]
    if q:
        for topic, reasons in sorted(q.items()):
            top = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:4])
            t.add_row(f"quarantine {topic}", str(sum(reasons.values())), top)
    else:
        t.add_row("quarantine", "0", "")
    console.print(t)
