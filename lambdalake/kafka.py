"""Kafka client helpers shared by every process: connect, create topics, find ends.

No consumer groups anywhere: consumers use manual partition assignment and keep
their positions in their own state (the lake or DuckDB), committed with the data.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

CLIENT_DEFAULTS: dict[str, object] = {
    "request_timeout_ms": 30_000,
}


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Return once a client can talk to ``bootstrap``; :class:`TimeoutError` otherwise."""
    deadline = time.monotonic() + max(timeout, 0.1)
    last: Exception | None = None
    while time.monotonic() < deadline:
        remaining_ms = max(100, int((deadline - time.monotonic()) * 1000))
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap,
                bootstrap_timeout_ms=remaining_ms,
                **CLIENT_DEFAULTS,
            )
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"no Kafka broker answering on {bootstrap} ({last})")


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **CLIENT_DEFAULTS)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(name=t, num_partitions=partitions, replication_factor=1)
            for t in topics
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()
    # Metadata propagates asynchronously; wait until every topic shows its partitions.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **CLIENT_DEFAULTS)
    try:
        deadline = time.monotonic() + 15
        for t in topics:
            while not consumer.partitions_for_topic(t):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {t} did not appear on {bootstrap}")
                time.sleep(0.1)
                consumer.topics()
    finally:
        consumer.close()


def list_topics(bootstrap: str) -> list[str]:
    """The names of every topic on ``bootstrap`` (internal ones such as
    ``__consumer_offsets`` included)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **CLIENT_DEFAULTS)
    try:
        return sorted(admin.list_topics())
    finally:
        admin.close()


def delete_topics(bootstrap: str, topics: Iterable[str], timeout: float = 30.0) -> None:
    """Delete ``topics`` (missing ones are ignored) and return once the broker no longer
    lists them, so they can be created again at once."""
    names = set(topics)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **CLIENT_DEFAULTS)
    try:
        names &= set(admin.list_topics())
        if not names:
            return
        with contextlib.suppress(UnknownTopicOrPartitionError):
            admin.delete_topics(sorted(names), timeout_ms=int(timeout * 1000))
        deadline = time.monotonic() + timeout
        while names & set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {sorted(names)} still listed on {bootstrap}")
            time.sleep(0.05)
    finally:
        admin.close()


def topic_partitions(consumer: KafkaConsumer, topic: str, timeout: float = 15.0) -> list[int]:
    """The partition ids of ``topic`` (waiting briefly for metadata)."""
    deadline = time.monotonic() + timeout
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic!r} not found")
        consumer.topics()
        time.sleep(0.1)


def end_offsets(
    bootstrap: str, partitions: Iterable[TopicPartition], timeout: float = 30.0
) -> dict[TopicPartition, int]:
    """One past the last offset of each partition: the broker's high watermark.

    ListOffsets(latest) with ``read_uncommitted``, so the end counts every record the
    log holds, transaction markers and records of open or aborted transactions
    included. A ``read_committed`` consumer never receives the markers or aborted
    records but its position moves past them, so a consumer that has read everything
    committed stands exactly at this end (after the last transaction completes).
    """
    tps = list(partitions)
    if not tps:
        return {}
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_uncommitted",
        **{**CLIENT_DEFAULTS, "request_timeout_ms": max(1_000, int(timeout * 1000))},
    )
    try:
        found = consumer.end_offsets(tps)
        return {tp: int(found[tp]) for tp in tps}
    finally:
        consumer.close()
