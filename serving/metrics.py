"""Prometheus metrics of the API: request latency, speed lag, batch age, quarantine counts.

Each app has its own registry (several apps can live in one process, as in tests).
Freshness gauges are computed at scrape time from the same sources as
``lambdalake status`` — the batch snapshot in memory, the workers' status
files, and the quarantine table (read at most every ``QUARANTINE_TTL`` seconds).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lambdalake.contract.lake import Lake
from lambdalake.memory import heap
from lambdalake.ops.status import quarantine_counts, speed_status
from lambdalake.settings import Settings
from serving.served_run import BatchCache

QUARANTINE_TTL = 10.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REFUSAL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class FreshnessCollector(Collector):
    """Batch age, speed lag and quarantine counts, read when Prometheus scrapes."""

    def __init__(self, settings: Settings, batch: BatchCache) -> None:
        self.settings = settings
        self.batch = batch
        self._quarantine: tuple[float, dict[str, dict[str, int]]] = (0.0, {})
        self._lock = threading.Lock()

    def _quarantine_counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            at, counts = self._quarantine
            if time.monotonic() - at > QUARANTINE_TTL:
                try:
                    counts = quarantine_counts(Lake(self.settings.lake_uri))
                except Exception:  # a metric must never break the scrape
                    counts = {}
                self._quarantine = (time.monotonic(), counts)
            return counts

    def collect(self) -> Iterator[Any]:
        now = datetime.now(UTC)
        snap = self.batch.current()
        age = GaugeMetricFamily(
            "lambdalake_batch_age_seconds",
            "Seconds since the served batch run was published (absent: no run).",
            labels=["run_id"],
        )
        if snap.run is not None:
            published = snap.run.published_at or snap.run.started_at
            age.add_metric([snap.run.run_id], (now - published).total_seconds())
        yield age

        lag = GaugeMetricFamily(
            "lambdalake_speed_lag_messages",
            "Messages behind the end of each partition, per speed worker.",
            labels=["worker", "topic", "partition"],
        )
        alive = GaugeMetricFamily(
            "lambdalake_speed_worker_alive", "1 if the worker's status is fresh.", labels=["worker"]
        )
        status = speed_status(self.settings.speed_state_dir / "status", now)
        for w in status["workers"]:
            name = str(w.get("worker"))
            alive.add_metric([name], 1.0 if w.get("alive") else 0.0)
            for topic, parts in (w.get("lag") or {}).items():
                for part, n in parts.items():
                    lag.add_metric([name, topic, str(part)], float(n))
        yield lag
        yield alive

        quarantine = GaugeMetricFamily(
            "lambdalake_quarantine_events", "Events in quarantine.", labels=["topic", "reason"]
        )
        for topic, reasons in self._quarantine_counts().items():
            for reason, n in reasons.items():
                quarantine.add_metric([topic, reason], float(n))
        yield quarantine

        process_heap = heap()
        if process_heap is not None:  # glibc: growth in "free" is fragmentation, not a leak
            family = GaugeMetricFamily(
                "lambdalake_process_heap_bytes",
                "This process's malloc heap: bytes in use, free but retained, and mmapped.",
                labels=["state"],
            )
            for state, n in process_heap.items():
                family.add_metric([state], float(n))
            yield family
        # Memory beside malloc's account: Arrow's pool (a reload's Delta reads) and Python's
        # object allocator, so a growing RSS can be placed.
        arrow = GaugeMetricFamily(
            "lambdalake_arrow_allocated_bytes",
            "Bytes allocated from Arrow's default memory pool, by backend.",
            labels=["backend"],
        )
        pool = pa.default_memory_pool()
        arrow.add_metric([pool.backend_name], float(pool.bytes_allocated()))
        yield arrow
        yield GaugeMetricFamily(
            "lambdalake_python_allocated_blocks",
            "Memory blocks Python's object allocator holds (sys.getallocatedblocks()).",
            value=float(sys.getallocatedblocks()),
        )


class ApiMetrics:
    """The registry of one app and the instruments request handling updates."""

    def __init__(self, settings: Settings, batch: BatchCache) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "lambdalake_api_request_seconds",
            "Request latency by route.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.degraded = Counter(
            "lambdalake_api_degraded_answers",
            "Answers given with a speed worker unreachable.",
            ["route"],
            registry=self.registry,
        )
        self.refused = Counter(
            "lambdalake_api_refused_requests",
            "Requests refused with 503 by admission control, by reason "
            "(arrival, queue_delay, queue_full, queue_timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.refusal_wait = Histogram(
            "lambdalake_api_refusal_wait_seconds",
            "From a refused request's bytes reaching the machine to its 503 (server's clock).",
            buckets=REFUSAL_BUCKETS,
            registry=self.registry,
        )
        self.sql_statements = Counter(
            "lambdalake_sql_statements",
            "SQL statements by outcome (ok, refused, failed, timeout, memory, busy).",
            ["outcome"],
            registry=self.registry,
        )
        self.sql_running = Gauge(
            "lambdalake_sql_running",
            "SQL statements being answered now in this process.",
            registry=self.registry,
        )
        self.sql_seconds = Histogram(
            "lambdalake_sql_statement_seconds",
            "Time to answer a SQL statement (merge inputs, run, encode), by outcome.",
            ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(FreshnessCollector(settings, batch))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.latency.labels(method, route, str(status)).observe(seconds)

    def on_refused(self, reason: str, waited: float) -> None:
        """Admission control refused a request after it ``waited`` seconds (see
        :mod:`serving.admission`)."""
        self.refused.labels(reason).inc()
        self.refusal_wait.observe(waited)


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
