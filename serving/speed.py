"""The speed side of serving: partial aggregates from every speed worker, or who is missing.

Workers are found through ``settings.speed_endpoints`` (comma-separated
``grpc://HOST:PORT``) and the workers' status files
(``{speed_state_dir}/status/worker-*.json``, field ``query_endpoint``). Each is
asked for partials of events at offsets at or above the batch watermark
(``min_offsets``). A worker that cannot be reached makes the answer *degraded*:
its partitions are listed as missing — never a silent partial answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lambdalake.logs import get_logger
from lambdalake.manifest import Watermark
from lambdalake.settings import Settings
from lambdalake.speed_protocol import (
    SpeedAnswer,
    SpeedError,
    SpeedQuery,
    StaleWatermark,
    query_speed,
)
from lambdalake.views import ViewDef

log = get_logger(__name__)

WARN_EVERY_SECONDS = 30.0  # an unreachable worker is logged at most this often


@dataclass(frozen=True)
class SpeedFilter:
    """What a query selects: optional sku/store, an optional inclusive period range."""

    granularity: str | None = None  # "day" | "hour" | None (no period column)
    dimensions: tuple[str, ...] = ()  # group-by dimensions besides the period
    sku: str | None = None
    store_id: str | None = None
    first: datetime | None = None  # first period (inclusive), UTC
    last: datetime | None = None  # last period (inclusive), UTC


@dataclass
class SpeedResult:
    """Partials from the reachable workers, what they cover, and what is missing."""

    rows: list[dict[str, Any]] = field(default_factory=list)
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


class SpeedClient:
    """Asks every speed worker for partials; see the module docstring.

    Workers are asked in parallel. Partitions covered by two answers (a worker
    reachable under two addresses, or two live workers configured to overlap)
    are taken from the first answer only: the second is dropped, so nothing is
    ever counted twice.
    """

    def __init__(
        self, settings: Settings, *, timeout: float = 2.0, retry_after: float = 1.0
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self.retry_after = retry_after
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="speed-query")
        # endpoint -> monotonic time before which it is not asked again (it just failed)
        self._down_until: dict[str, float] = {}
        self._last_warned: dict[str, float] = {}

    def endpoints(self, statuses: Sequence[dict[str, Any]] | None = None) -> list[str]:
        found = parse_endpoints(self.settings.speed_endpoints)
        for st in status_files(self.settings) if statuses is None else statuses:
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
            answer: SpeedAnswer | SpeedError = query_speed(endpoint, q, timeout=self.timeout)
        except StaleWatermark as exc:
            return exc
        except SpeedError as exc:
            answer = exc
        except Exception as exc:  # e.g. something else (not a worker) listens there
            answer = SpeedError(f"speed worker {endpoint} failed: {type(exc).__name__}: {exc}")
        if isinstance(answer, SpeedError):
            self._down_until[endpoint] = time.monotonic() + self.retry_after
            if time.monotonic() - self._last_warned.get(endpoint, -1e9) > WARN_EVERY_SECONDS:
                self._last_warned[endpoint] = time.monotonic()
                log.warning("serving.speed_unreachable", endpoint=endpoint, error=str(answer))
        else:
            self._down_until.pop(endpoint, None)
        return answer

    def query(self, view: ViewDef, flt: SpeedFilter, min_offsets: Watermark) -> SpeedResult:
        """Partials of ``view`` over events at offsets >= ``min_offsets`` from every worker."""
        statuses = status_files(self.settings)
        q = to_speed_query(view, flt, min_offsets)
        endpoints = self.endpoints(statuses)
        if len(endpoints) == 1:
            answers = [self._ask(endpoints[0], q)]
        else:
            answers = list(self._pool.map(lambda ep: self._ask(ep, q), endpoints))
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
                    worker=answer.meta.worker,
                    partitions=sorted(owned & covered),
                )
                continue
            covered |= owned
            result.rows.extend(answer.table.to_pylist())
            for topic, parts in answer.offsets.items():
                if topic == view.topic:
                    result.offsets.setdefault(topic, {}).update(parts)
        parts = all_partitions(view.topic, self.settings, min_offsets, statuses)
        missing = [p for p in parts if p not in covered]
        if missing:
            result.missing[view.topic] = missing
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _bound(ts: datetime | None, granularity: str | None) -> str | None:
    if ts is None:
        return None
    return ts.date().isoformat() if granularity == "day" else ts.isoformat()


def to_speed_query(view: ViewDef, flt: SpeedFilter, min_offsets: Watermark) -> SpeedQuery:
    """The protocol request for ``flt`` (pure)."""
    return SpeedQuery(
        view=view.name,  # type: ignore[arg-type]
        granularity=(flt.granularity or "day"),  # type: ignore[arg-type]
        skus=(flt.sku,) if flt.sku is not None else None,
        stores=(flt.store_id,) if flt.store_id is not None else None,
        start=_bound(flt.first, flt.granularity),
        end=_bound(flt.last, flt.granularity),
        min_offsets=min_offsets,
    )
