"""Kafka side of ingest: a manually assigned consumer that hands back columns, not records.

Ingest reads the consumer through the shared :class:`~lambdalake.kafka.columnar.ChunkReader`:
the columnar decoder (``(offset, value)`` columns instead of kafka-python's
per-record ``ConsumerRecord`` objects, which alone would cap ingest below its
target), positions past transaction markers, and poison batches passed over
(quarantined) or stopped at (see docs/kafka.md).

No consumer groups: partitions are assigned by hand and positions come from
the lake (see :mod:`batch.ingest`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from lambdalake.errors import Unreachable
from lambdalake.kafka.clients import (
    Security,
    client_args,
    end_offsets,
    ensure_topics,
    new_client,
    raise_if_refused,
    topic_partitions,
)
from lambdalake.logs import get_logger

log = get_logger(__name__)

Positions = dict[str, dict[int, int]]  # topic -> partition -> next offset to consume

# Sized for throughput: one fetch brings up to 16 MiB per partition, 64 MiB in all.
FETCH_MAX_BYTES = 64 * 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024


class BrokerUnreachable(Unreachable):
    """The broker did not answer within the allowed time (a :class:`TimeoutError`)."""


@dataclass
class Backoff:
    """Exponential backoff with a cap; ``deadline`` (monotonic) bounds the total wait."""

    initial: float = 0.5
    cap: float = 30.0
    deadline: float | None = None
    attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        if self.deadline is not None:
            delay = max(0.0, min(delay, self.deadline - time.monotonic()))
        return delay

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def reset(self) -> None:
        self.attempt = 0


def with_broker_retry(
    what: Callable[[], Any],
    *,
    bootstrap: str,
    backoff: Backoff,
    stop: Any,
    action: str,
) -> Any:
    """Call ``what`` until it succeeds, logging each failure and waiting with backoff.

    Raises :class:`BrokerUnreachable` once the backoff's deadline passes, and
    returns ``None`` if ``stop`` is set while waiting.
    """
    while True:
        started = time.monotonic()
        try:
            result = what()
            backoff.reset()
            return result
        except (KafkaError, OSError, TimeoutError) as exc:
            # Answered, and refused: retrying cannot help.
            raise_if_refused(exc, bootstrap, action, started)
            if backoff.expired():
                raise BrokerUnreachable(
                    f"Kafka broker {bootstrap} unreachable while trying to {action} "
                    f"({type(exc).__name__}: {exc}); gave up after {backoff.attempt} attempts. "
                    "Everything consumed so far is committed; run ingest again once the "
                    "broker is up."
                ) from exc
            delay = backoff.next_delay()
            log.warning(
                "ingest.broker_unreachable",
                bootstrap=bootstrap,
                action=action,
                attempt=backoff.attempt,
                delay_s=round(delay, 2),
                error=f"{type(exc).__name__}: {exc}",
            )
            if stop.wait(delay):
                return None


def open_consumer(
    bootstrap: str, *, connect_timeout_s: float = 5.0, security: Security | None = None
) -> KafkaConsumer:
    """A consumer without group, sized for throughput (wrap it in a ``ChunkReader``).

    ``auto_offset_reset='none'``: a position outside the log is an error to
    report (the broker lost data), never a silent jump. ``read_committed``: the
    records of aborted transactions never reach the lake; transaction markers
    still advance the positions.
    """
    consumer = new_client(
        KafkaConsumer,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",
        isolation_level="read_committed",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
        fetch_max_wait_ms=200,
        bootstrap_timeout_ms=int(connect_timeout_s * 1000),
        reconnect_backoff_max_ms=5_000,
        **client_args(security),
    )
    return consumer


def discover_partitions(
    bootstrap: str,
    topics: tuple[str, ...],
    partitions: int,
    *,
    security: Security | None = None,
) -> dict[str, list[int]]:
    """The partition ids of each topic, creating missing topics (as the broker does on
    first use) with ``partitions`` partitions."""
    ensure_topics(bootstrap, topics, partitions, security=security)
    consumer = new_client(KafkaConsumer, bootstrap_servers=bootstrap, **client_args(security))
    try:
        return {t: topic_partitions(consumer, t) for t in topics}
    finally:
        consumer.close()


def true_end_offsets(
    bootstrap: str, parts: dict[str, list[int]], *, security: Security | None = None
) -> Positions:
    """One past the last record of every partition (see :func:`lambdalake.kafka.clients.end_offsets`)."""
    tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
    ends = end_offsets(bootstrap, tps, security=security)
    out: Positions = {t: {} for t in parts}
    for tp, end in ends.items():
        out[tp.topic][tp.partition] = int(end)
    return out


def probe_broker(
    bootstrap: str, timeout_s: float = 3.0, *, security: Security | None = None
) -> bool:
    """``True`` if a broker answers a metadata request within about ``timeout_s``;
    raise a :class:`KafkaError` (or :class:`OSError`) otherwise. (Not ``None``: under
    :func:`with_broker_retry`, ``None`` means "stopped while waiting".)"""
    admin = new_client(
        KafkaAdminClient,
        bootstrap_servers=bootstrap,
        bootstrap_timeout_ms=int(timeout_s * 1000),
        **client_args(security, request_timeout_ms=max(int(timeout_s * 1000), 1_000)),
    )
    try:
        admin.list_topics()
    finally:
        admin.close()
    return True
