"""The speed side of serving: partial aggregates from every speed worker, or who is missing.

Workers are found through ``settings.speed_endpoints`` (comma-separated
``grpc://HOST:PORT``) and the workers' status files
(``{speed_state_dir}/status/worker-*.json``, field ``query_endpoint``). Each is
asked for partials of events at offsets at or above the batch watermark
(``min_offsets``). A worker that cannot be reached makes the answer *degraded*:
its partitions are listed as missing — never a silent partial answer.

Snapshot cache: rather than one worker query per API request, the client fetches
a worker's whole partial view (hourly, every SKU and store, offsets >= the
watermark) at most every ``cache_ttl`` seconds and answers requests from it
locally (SKU index, filters, the view's merge rules). Answers stay exact — their
``as_of.speed_offsets`` are the snapshot's — and at most ``cache_ttl`` older. A
view too large to fetch that often (more than ``cache_max_rows`` partial rows) is
queried per request instead.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from lambdalake.contract.manifest import Watermark
from lambdalake.contract.speed_protocol import (
    EventView,
    SpeedAnswer,
    SpeedError,
    SpeedQuery,
    StaleWatermark,
    connect,
    query_speed,
)
from lambdalake.contract.views import ViewDef
from lambdalake.logs import get_logger
from lambdalake.settings import Settings
from serving.series import KEY_SETS, SeriesCache, series_key
from serving.tables import IndexedTable, index_key, merge_partials, rollup, select

log = get_logger(__name__)

WARN_EVERY_SECONDS = 30.0  # an unreachable worker is logged at most this often


def _worker_down(exc: SpeedError) -> bool:
    """A transport failure (the worker answers nobody), not a failure of one request.
    Errors without a kind (older protocol) count as transport failures."""
    return bool(getattr(exc, "worker_down", True))


class WouldBlock(Exception):
    """Answering now needs a worker round trip, and the caller asked not to wait for one
    (the API's event loop: it retries the request on a worker thread)."""


@dataclass(frozen=True)
class SpeedFilter:
    """What a query selects: optional sku/store, an optional inclusive period range."""

    granularity: str | None = None  # "hour" | "day" | "week" | None (all time: no period)
    dimensions: tuple[str, ...] = ()  # group-by dimensions besides the period
    sku: str | None = None
    store_id: str | None = None
    first: datetime | None = None  # first period (inclusive), UTC
    last: datetime | None = None  # last period (inclusive), UTC
    skus: tuple[str, ...] | None = None  # several SKUs (with ``sku`` None)
    stores: tuple[str, ...] | None = None  # several stores (with ``store_id`` None)

    @property
    def sku_list(self) -> tuple[str, ...] | None:
        return self.skus if self.skus is not None else (None if self.sku is None else (self.sku,))

    @property
    def store_list(self) -> tuple[str, ...] | None:
        if self.stores is not None:
            return self.stores
        return None if self.store_id is None else (self.store_id,)


@dataclass
class SpeedResult:
    """Partials from the reachable workers, what they cover, and what is missing."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tables: list[pa.Table] = field(default_factory=list)  # ``whole`` answers: each worker's
    offsets: Watermark = field(default_factory=dict)  # topic -> partition -> exclusive upper
    missing: dict[str, list[int]] = field(default_factory=dict)  # topic -> partitions
    stale: bool = False  # a worker has pruned past the requested watermark

    @property
    def degraded(self) -> bool:
        return any(self.missing.values())


def parse_endpoints(text: str) -> list[str]:
    """``grpc://h:p, grpc://h2:p2`` -> the non-empty entries, as given."""
    return [e.strip() for e in text.split(",") if e.strip()]


def status_files(settings: Settings) -> list[dict[str, Any]]:
    """The workers' status files (unreadable ones skipped: they are being replaced)."""
    status_dir = Path(settings.speed_state_dir) / "status"
    out: list[dict[str, Any]] = []
    if not status_dir.is_dir():
        return out
    for path in sorted(status_dir.glob("worker-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def all_partitions(
    topic: str, settings: Settings, watermark: Watermark, statuses: Sequence[dict[str, Any]]
) -> list[int]:
    """Every partition of ``topic`` the answer should cover.

    The partitions the run's watermark (ingest records every partition of a
    topic) and the workers' status files know about; the configured partition
    count only when neither knows any (no run yet, no worker ever started).
    """
    parts = set(watermark.get(topic, {}))
    for st in statuses:
        parts |= {int(p) for p in (st.get("offsets") or {}).get(topic, {})}
    return sorted(parts or range(settings.partitions))


@dataclass(frozen=True)
class Partials:
    """One worker's contribution to an answer: merged partial rows and their coverage."""

    rows: list[dict[str, Any]]
    partitions: dict[str, list[int]]
    offsets: Watermark
    worker: str
    table: pa.Table | None = None  # a ``whole`` answer: every partial (or event) row


@dataclass(frozen=True)
class _Snapshot:
    fetched: float  # time.monotonic() of the fetch
    min_offsets: Watermark  # the watermark it was asked for
    answer: SpeedAnswer
    index: IndexedTable
    series: SeriesCache | None  # per-key series of a view with periods (built on first use)


def local_partials(index: IndexedTable, view: ViewDef, flt: SpeedFilter) -> list[dict[str, Any]]:
    """Filter a worker's partials (at the view's stored grain) to ``flt``, roll them up to
    its grain and merge them (pure)."""
    table = index.rows_of(flt.sku_list) if "sku" in view.dimensions else index.table
    stores = flt.store_list
    store = (
        ("store_id", "is_in", pa.array(stores, pa.string()))
        if stores is not None and "store_id" in view.dimensions
        else None
    )
    if flt.granularity is None:  # all time: the periods merge away
        table = select(table, *([store] if store else []))
        return merge_partials(table, list(view.dimensions), view)
    lo: Any = flt.first
    hi: Any = flt.last
    if flt.granularity != "hour":
        # A UTC hour lies in one UTC day, a day in one ISO week: periods roll up exactly.
        column = table.schema.get_field_index("period")
        table = table.set_column(column, "period", rollup(table["period"], flt.granularity))
        lo = lo.date() if lo is not None else None
        hi = hi.date() if hi is not None else None
    table = select(
        table,
        ("period", "greater_equal", lo),
        ("period", "less_equal", hi),
        *([store] if store else []),
    )
    return merge_partials(table, ["period", *view.dimensions], view)


def snapshot_partials(snap: _Snapshot, view: ViewDef, flt: SpeedFilter) -> list[dict[str, Any]]:
    """``local_partials`` of a cached snapshot; a question without group-by dimensions
    (one series: a SKU, a store, both or all) is read from the snapshot's series index,
    with ``period`` already the API's label."""
    if (
        snap.series is None
        or flt.dimensions
        or flt.granularity is None
        or flt.skus is not None
        or flt.stores is not None
    ):
        return local_partials(snap.index, view, flt)
    names, key = series_key(flt.sku, flt.store_id)
    series = snap.series.get(flt.granularity, names)
    return [
        {"period": label, **values} for label, values in series.points(key, flt.first, flt.last)
    ]


class SpeedClient:
    """Asks every speed worker for partials; see the module docstring.

    Workers are asked in parallel. Partitions covered by two answers (a worker
    reachable under two addresses, or two live workers configured to overlap)
    are taken from the first answer only: the second is dropped, so nothing is
    ever counted twice.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        timeout: float = 2.0,
        retry_after: float = 1.0,
        cache_ttl: float = 0.25,
        cache_max_rows: int = 200_000,
        status_ttl: float = 1.0,
        stale_grace: float = 0.25,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self.retry_after = retry_after
        self.cache_ttl = cache_ttl
        self.cache_max_rows = cache_max_rows
        self.status_ttl = status_ttl
        self.stale_grace = stale_grace
        self._status_cache: tuple[float, list[dict[str, Any]]] | None = None
        self._snapshots: dict[tuple[str, str], _Snapshot] = {}  # (endpoint, view) -> newest
        self._snapshot_locks: dict[tuple[str, str], threading.Lock] = {}
        self._too_big_until: dict[tuple[str, str], float] = {}
        self._locks_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="speed-query")
        # endpoint -> monotonic time before which it is not asked again (it just failed)
        self._down_until: dict[str, float] = {}
        self._last_warned: dict[str, float] = {}
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()

    def _query(self, endpoint: str, q: SpeedQuery) -> SpeedAnswer:
        # One Flight client per worker, reused: saves a gRPC channel set-up per query.
        with self._clients_lock:
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = connect(
                    endpoint, self.timeout, token=self.settings.speed_token or None
                )
        try:
            return query_speed(endpoint, q, timeout=self.timeout, client=client)
        except StaleWatermark:
            raise
        except SpeedError as exc:
            if _worker_down(exc):
                with self._clients_lock:  # a new connection next time
                    if self._clients.get(endpoint) is client:
                        del self._clients[endpoint]
            raise

    def statuses(self) -> list[dict[str, Any]]:
        """The workers' status files, read at most every ``status_ttl`` seconds (they are
        rewritten about once a second; reading them per request cost more than the query)."""
        cached = self._status_cache
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.status_ttl:
            return cached[1]
        found = status_files(self.settings)
        self._status_cache = (now, found)
        self._forget_all_but(set(self.endpoints(found)))
        return found

    def _forget_all_but(self, endpoints: set[str]) -> None:
        """Drop what is kept for workers no longer listed: their snapshots, Flight clients
        and timers. A worker restarted on another address (a new port, a new pod) rewrites
        its status file, so its old endpoint is never asked again; without this, each
        restart would leave a whole snapshot of every view and an open channel behind in
        every API process. A fetch in flight may put one back: the next status read (every
        ``status_ttl`` seconds) drops it."""
        for keyed in (self._snapshots, self._snapshot_locks, self._too_big_until):
            for key in [k for k in list(keyed) if k[0] not in endpoints]:
                keyed.pop(key, None)
        for timers in (self._down_until, self._last_warned):
            for endpoint in [e for e in list(timers) if e not in endpoints]:
                timers.pop(endpoint, None)
        with self._clients_lock:
            gone = [e for e in self._clients if e not in endpoints]
            clients = [self._clients.pop(e) for e in gone]
        for client in clients:
            with contextlib.suppress(Exception):  # a broken channel: nothing to close
                client.close()

    def endpoints(self, statuses: Sequence[dict[str, Any]] | None = None) -> list[str]:
        found = parse_endpoints(self.settings.speed_endpoints)
        for st in self.statuses() if statuses is None else statuses:
            ep = st.get("query_endpoint")
            if ep and str(ep) not in found:
                found.append(str(ep))
        return found

    def _ask(self, endpoint: str, q: SpeedQuery) -> SpeedAnswer | SpeedError:
        # A worker that just failed is not asked again for ``retry_after`` seconds, so a
        # dead or black-holed worker does not add its timeout to every request.
        if time.monotonic() < self._down_until.get(endpoint, 0.0):
            return SpeedError(f"speed worker {endpoint} failed less than {self.retry_after} s ago")
        try:
            answer: SpeedAnswer | SpeedError = self._query(endpoint, q)
        except StaleWatermark as exc:
            return exc
        except SpeedError as exc:
            answer = exc
        except Exception as exc:  # e.g. something else (not a worker) listens there
            answer = SpeedError(f"speed worker {endpoint} failed: {type(exc).__name__}: {exc}")
        if isinstance(answer, SpeedError) and not _worker_down(answer):
            # This one question failed (a bad request, the worker's own error): only its
            # answer lacks the worker. Others' answers must not turn degraded for it.
            log.warning("serving.speed_request_failed", endpoint=endpoint, error=str(answer))
        elif isinstance(answer, SpeedError):
            self._down_until[endpoint] = time.monotonic() + self.retry_after
            if time.monotonic() - self._last_warned.get(endpoint, -1e9) > WARN_EVERY_SECONDS:
                self._last_warned[endpoint] = time.monotonic()
                log.warning("serving.speed_unreachable", endpoint=endpoint, error=str(answer))
        else:
            self._down_until.pop(endpoint, None)
        return answer

    def _snapshot(
        self, endpoint: str, view: ViewDef, min_offsets: Watermark, *, block: bool = True
    ) -> _Snapshot | SpeedAnswer | SpeedError:
        """The worker's whole view (cached ``cache_ttl`` s), or a too-big answer, or the error.

        A snapshot older than ``cache_ttl`` but younger than ``cache_ttl + stale_grace``
        is still answered from, while one background fetch replaces it: under load no
        request waits for a worker round trip, and every answer's ``as_of`` says exactly
        what it covers. Older than that (or for another watermark), the request fetches
        itself — or, with ``block=False``, raises :class:`WouldBlock`. A failed fetch
        drops the snapshot: from then on answers say the worker is missing."""
        key = (endpoint, view.name)
        with self._locks_lock:
            lock = self._snapshot_locks.setdefault(key, threading.Lock())
        snap = self._snapshots.get(key)
        if snap is not None and snap.min_offsets == min_offsets:
            age = time.monotonic() - snap.fetched
            if age < self.cache_ttl:
                return snap
            if age < self.cache_ttl + self.stale_grace:
                if lock.acquire(blocking=False):  # nobody is refreshing it yet
                    try:
                        self._pool.submit(self._refresh_in_background, lock, key, view, min_offsets)
                    except RuntimeError:  # shutting down: no more fetches
                        lock.release()
                return snap
        if not block:
            raise WouldBlock(f"speed snapshot of {view.name} from {endpoint} needs a fetch")
        with lock:  # one fetch per worker and view at a time; the others reuse it
            snap = self._snapshots.get(key)
            if (
                snap is not None
                and time.monotonic() - snap.fetched < self.cache_ttl
                and snap.min_offsets == min_offsets
            ):
                return snap
            return self._refresh(key, endpoint, view, min_offsets)

    def _refresh_in_background(
        self, lock: threading.Lock, key: tuple[str, str], view: ViewDef, min_offsets: Watermark
    ) -> None:
        try:
            self._refresh(key, key[0], view, min_offsets)
        except Exception as exc:  # the next request fetches (and reports) it itself
            self._snapshots.pop(key, None)
            log.warning("serving.speed_refresh_failed", endpoint=key[0], error=str(exc))
        finally:
            lock.release()

    def _refresh(
        self, key: tuple[str, str], endpoint: str, view: ViewDef, min_offsets: Watermark
    ) -> _Snapshot | SpeedAnswer | SpeedError:
        """Fetch a new snapshot (the caller holds the key's lock)."""
        q = SpeedQuery(view=view.name, granularity=view.stored_grain, min_offsets=min_offsets)
        asked = time.monotonic()  # a snapshot's age counts from the question, not the answer
        answer = self._ask(endpoint, q)
        if isinstance(answer, SpeedError):
            self._snapshots.pop(key, None)
            return answer
        if answer.table.num_rows > self.cache_max_rows:
            self._too_big_until[key] = time.monotonic() + 60.0
            self._snapshots.pop(key, None)
            return answer
        snap = _Snapshot(
            fetched=asked,
            min_offsets=min_offsets,
            answer=answer,
            index=IndexedTable.build(answer.table, sort=True, key=index_key(view)),
            series=(
                SeriesCache(view, {g: answer.table for g in view.grains if g is not None})
                if view.stored_grain == "hour" and set(KEY_SETS[-1]) <= set(view.dimensions)
                else None
            ),
        )
        self._snapshots[key] = snap
        return snap

    def _partials(
        self,
        endpoint: str,
        view: ViewDef,
        flt: SpeedFilter,
        min_offsets: Watermark,
        *,
        block: bool = True,
        max_offsets: Watermark | None = None,
    ) -> Partials | SpeedError:
        """One worker's partials for ``flt``: from its snapshot, or asked directly (always
        for an answer bounded by ``max_offsets``: snapshots hold everything)."""
        key = (endpoint, view.name)
        use_cache = (
            not max_offsets
            and self.cache_ttl > 0
            and time.monotonic() >= self._too_big_until.get(key, 0.0)
        )
        if use_cache:
            got = self._snapshot(endpoint, view, min_offsets, block=block)
            if isinstance(got, SpeedError):
                return got
            if isinstance(got, _Snapshot):
                rows = snapshot_partials(got, view, flt)
                answer = got.answer
            else:  # too big to cache: filter this one fetch, ask per request from now on
                index = IndexedTable.build(got.table, sort=True, key=index_key(view))
                rows = local_partials(index, view, flt)
                answer = got
        else:
            if not block:
                raise WouldBlock(f"speed partials of {view.name} from {endpoint} need a query")
            direct = self._ask(endpoint, to_speed_query(view, flt, min_offsets, max_offsets))
            if isinstance(direct, SpeedError):
                return direct
            rows, answer = direct.table.to_pylist(), direct
        return Partials(rows, answer.partitions, answer.offsets, answer.meta.worker)

    def _whole(
        self,
        endpoint: str,
        view: ViewDef | EventView,
        min_offsets: Watermark,
        *,
        block: bool = True,
        max_offsets: Watermark | None = None,
    ) -> Partials | SpeedError:
        """One worker's every partial of ``view`` at its stored grain (its snapshot when
        cached), or every held event of an event view (always asked)."""
        if isinstance(view, ViewDef) and not max_offsets and self.cache_ttl > 0:
            got = self._snapshot(endpoint, view, min_offsets, block=block)
            if isinstance(got, SpeedError):
                return got
            answer = got.answer if isinstance(got, _Snapshot) else got
        else:
            if not block:
                raise WouldBlock(f"{view.name} from {endpoint} needs a query")
            grain = view.stored_grain if isinstance(view, ViewDef) else None
            q = SpeedQuery(
                view=view.name,
                granularity=grain,
                min_offsets=min_offsets,
                max_offsets=max_offsets or {},
            )
            direct = self._ask(endpoint, q)
            if isinstance(direct, SpeedError):
                return direct
            answer = direct
        return Partials([], answer.partitions, answer.offsets, answer.meta.worker, answer.table)

    def query(
        self,
        view: ViewDef | EventView,
        flt: SpeedFilter,
        min_offsets: Watermark,
        *,
        block: bool = True,
        max_offsets: Watermark | None = None,
        whole: bool = False,
    ) -> SpeedResult:
        """Partials of ``view`` over events at offsets >= ``min_offsets`` (and below
        ``max_offsets``, when given) from every worker.

        ``block=False``: answer from cached snapshots only, or raise :class:`WouldBlock`.
        ``whole``: every partial at the view's stored grain (``flt`` unused), or every held
        event of an :class:`EventView`, as Arrow tables (``SpeedResult.tables``)."""
        statuses = self.statuses()
        endpoints = self.endpoints(statuses)

        def one(ep: str) -> Partials | SpeedError:
            if whole:
                return self._whole(ep, view, min_offsets, block=block, max_offsets=max_offsets)
            assert isinstance(view, ViewDef)
            return self._partials(ep, view, flt, min_offsets, block=block, max_offsets=max_offsets)

        if len(endpoints) == 1 or not block:  # nothing to wait for in parallel
            answers = [one(ep) for ep in endpoints]
        else:
            answers = list(self._pool.map(one, endpoints))
        result = SpeedResult()
        covered: set[int] = set()
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if isinstance(answer, StaleWatermark):
                result.stale = True
                log.info("serving.speed_stale", endpoint=endpoint, worker_run=answer.run_id)
                continue
            if isinstance(answer, SpeedError):
                continue  # its partitions end up in ``missing``
            owned = {int(p) for p in answer.partitions.get(view.topic, [])}
            if owned & covered:
                log.warning(
                    "serving.speed_overlap",
                    endpoint=endpoint,
                    worker=answer.worker,
                    partitions=sorted(owned & covered),
                )
                continue
            covered |= owned
            result.rows.extend(answer.rows)
            if answer.table is not None:
                result.tables.append(answer.table)
            for topic, parts in answer.offsets.items():
                if topic == view.topic:
                    result.offsets.setdefault(topic, {}).update(parts)
        partitions = all_partitions(view.topic, self.settings, min_offsets, statuses)
        absent = [p for p in partitions if p not in covered]
        if absent:
            result.missing[view.topic] = absent
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients.values():
                with contextlib.suppress(Exception):  # a broken channel: nothing to close
                    client.close()
            self._clients.clear()


def _bound(ts: datetime | None, granularity: str | None) -> str | None:
    if ts is None:
        return None
    return ts.isoformat() if granularity == "hour" else ts.date().isoformat()


def to_speed_query(
    view: ViewDef,
    flt: SpeedFilter,
    min_offsets: Watermark,
    max_offsets: Watermark | None = None,
) -> SpeedQuery:
    """The protocol request for ``flt`` (pure)."""
    return SpeedQuery(
        view=view.name,
        granularity=flt.granularity,  # type: ignore[arg-type]
        skus=flt.sku_list,
        stores=flt.store_list,
        start=_bound(flt.first, flt.granularity),
        end=_bound(flt.last, flt.granularity),
        min_offsets=min_offsets,
        max_offsets=max_offsets or {},
    )
