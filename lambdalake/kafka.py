"""Kafka client helpers shared by every process: connect, create topics, find true ends.

No consumer groups anywhere: consumers use manual partition assignment and keep
their positions in their own state (the lake or DuckDB), committed with the data.

Tansu's ListOffsets(latest) was seen to answer the base offset of a partition's
last record batch rather than one past its last record, so :func:`end_offsets`
finds the end by reading from the reported one; with a real Kafka the read
returns nothing and the reported end stands.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

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
    """One past the last record of each partition, found by reading (see module doc)."""
    tps = list(partitions)
    if not tps:
        return {}
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        **CLIENT_DEFAULTS,
    )
    try:
        consumer.assign(tps)
        reported = consumer.end_offsets(tps)
        ends = {tp: int(reported[tp]) for tp in tps}
        for tp in tps:
            consumer.seek(tp, ends[tp])
        pending = set(tps)
        deadline = time.monotonic() + timeout
        quiet_polls = 0
        # Read until every partition has returned nothing twice in a row.
        while pending and time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=100, max_records=100_000)
            if not got:
                quiet_polls += 1
                if quiet_polls >= 2:
                    break
                continue
            quiet_polls = 0
            for tp, records in got.items():
                if records:
                    ends[tp] = max(ends[tp], records[-1].offset + 1)
        return ends
    finally:
        consumer.close()
