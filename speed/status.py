"""What a speed worker reports about itself: offsets, lag, events held, health.

A :class:`StatusReporter` thread writes the status object to
``{speed_state_dir}/status/worker-I-of-N.json`` about once a second, atomically
(temporary file + rename), which is where ``lambdalake status`` and the serving
layer find workers. The same object is served by the query endpoint's
``status`` action.

Lag is the end offset of each owned partition minus the committed position.
Ends come from ListOffsets (one consumer kept for it, in a thread of its own)
every second, and from the high watermarks the consumer sees in its fetches in
between. ``lag_measured_at`` / ``lag_age_s`` say when the ends were last read
from the broker: a lag is only as current as that. When the broker cannot be
reached the last known ends stand, ``broker_unreachable`` is true and the age
grows, so nobody mistakes an old 0 for "caught up".
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lambdalake.kafka.clients import EndOffsetsReader
from lambdalake.logs import get_logger
from lambdalake.ops.net import accepts_connections

log = get_logger(__name__)

TP = tuple[str, int]


def status_path(state_dir: Path, worker: tuple[int, int]) -> Path:
    return Path(state_dir) / "status" / f"worker-{worker[0]}-of-{worker[1]}.json"


def write_atomically(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` with ``obj`` as JSON; readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, default=str, sort_keys=True))
    os.replace(tmp, path)


def nested(flat: dict[TP, int]) -> dict[str, dict[str, int]]:
    """``{(topic, p): n}`` -> ``{topic: {"p": n}}`` (JSON keys are strings)."""
    out: dict[str, dict[str, int]] = {}
    for (t, p), n in sorted(flat.items()):
        out.setdefault(t, {})[str(p)] = int(n)
    return out


def compute_lag(positions: dict[TP, int], ends: dict[TP, int]) -> dict[TP, int]:
    """End minus position per partition, never negative (pure)."""
    return {tp: max(0, ends.get(tp, pos) - pos) for tp, pos in positions.items()}


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO time in UTC (``...Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class StatusReporter(threading.Thread):
    """Writes the worker's status file every ``interval`` seconds (see the module doc).

    ``snapshot()`` returns the worker's own facts (offsets as ``{(topic, p): n}``
    plus anything else to publish); ``highwater()`` the consumer's latest fetch
    high watermarks; ``owned()`` the partitions to find ends for."""

    def __init__(
        self,
        path: Path,
        bootstrap: str,
        snapshot: Callable[[], dict[str, Any]],
        highwater: Callable[[], dict[TP, int]],
        stop: threading.Event,
        *,
        interval: float = 1.0,
        ends_every: float = 1.0,
        security: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(name="speed-status", daemon=True)
        self.path = path
        self.bootstrap = bootstrap
        self.snapshot = snapshot
        self.highwater = highwater
        self.stop_event = stop
        self.interval = interval
        self.ends_every = ends_every
        self.ends: dict[TP, int] = {}
        self.ends_measured_at: float | None = None  # wall time of the last ListOffsets read
        self._end_offsets = EndOffsetsReader(bootstrap, security=security)
        self.broker_unreachable = False
        self._next_ends = 0.0
        self._backoff = ends_every
        self._ends_thread: threading.Thread | None = None

    def probe(self) -> bool:
        """Check the broker answers (a TCP connect, at most 1 s); log changes."""
        ok = accepts_connections(self.bootstrap)
        if ok == self.broker_unreachable:  # the state changed
            if ok:
                log.info("speed.broker_reachable", bootstrap=self.bootstrap)
            else:
                log.warning("speed.broker_unreachable", bootstrap=self.bootstrap)
        self.broker_unreachable = not ok
        # Back off while the broker is down; probe every few seconds while it is up.
        self._backoff = self.ends_every if ok else min(self._backoff * 2, 30.0)
        self._next_ends = time.monotonic() + self._backoff
        return ok

    def refresh_ends(self, owned: list[TP]) -> None:
        """Read the ends of ``owned`` from the broker (may block up to a request timeout)."""
        if not owned:
            return
        asked_at = time.time()  # the ends are at least as recent as the question
        try:
            found = self._end_offsets.read(owned)
        except Exception as exc:  # the broker went away: the probe reports it
            log.debug("speed.end_offsets_failed", error=f"{type(exc).__name__}: {exc}")
            return
        for key, end in found.items():
            self.ends[key] = max(self.ends.get(key, 0), int(end))
        self.ends_measured_at = asked_at

    def _refresh_in_background(self, owned: list[TP]) -> None:
        # end_offsets can block for a request timeout when the broker dies mid-read: it
        # runs apart, so the status file keeps being written and the probe keeps probing.
        if self._ends_thread is not None and self._ends_thread.is_alive():
            return
        self._ends_thread = threading.Thread(
            target=self.refresh_ends, args=(owned,), name="speed-ends", daemon=True
        )
        self._ends_thread.start()

    def current(self) -> dict[str, Any]:
        """The status object now."""
        snap = self.snapshot()
        positions: dict[TP, int] = snap.pop("positions")
        for tp, hw in self.highwater().items():
            self.ends[tp] = max(self.ends.get(tp, 0), hw)
        lag = compute_lag(positions, self.ends)
        measured = self.ends_measured_at
        return {
            **snap,
            "offsets": nested(positions),
            "lag": nested(lag),
            "lag_measured_at": iso(measured),
            "lag_age_s": None if measured is None else round(max(0.0, time.time() - measured), 3),
            "ends": nested({tp: self.ends[tp] for tp in positions if tp in self.ends}),
            "broker_unreachable": self.broker_unreachable,
            "updated_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "pid": os.getpid(),
        }

    def write(self) -> dict[str, Any]:
        status = self.current()
        write_atomically(self.path, status)
        return status

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if time.monotonic() >= self._next_ends and self.probe():
                    self._refresh_in_background(list(self.snapshot().get("positions", {})))
                self.write()
            except Exception as exc:  # status must never take the worker down
                log.warning("speed.status_failed", error=f"{type(exc).__name__}: {exc}")
            self.stop_event.wait(self.interval)
        if self._ends_thread is not None:
            self._ends_thread.join(timeout=6)
        self._end_offsets.close()
