"""The Kafka clients a speed worker can poll with, behind one small interface.

``kafka-python`` (the default, a project dependency) parses record batches in
pure Python; it is read through the shared columnar decoder
(:class:`lambdalake.kafka.columnar.ChunkReader`), which extracts only offsets
and values instead of building a ``ConsumerRecord`` per message, and reports
positions past transaction markers and poison batches. ``confluent-kafka``
(librdkafka, optional: ``pip install confluent-kafka``) parses in C. Both are
used the same way: manual assignment (no consumer group is ever joined),
``read_committed`` (aborted transactions never reach the speed layer),
positions given by the worker, nothing committed to Kafka.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Protocol

from lambdalake.errors import InvalidInput
from lambdalake.kafka.columnar import (
    HALT_ERRORS,
    Chunk,
    ChunkReader,
    PoisonBatch,
    UndecodableBatch,
    read_past,
)
from lambdalake.logs import get_logger
from lambdalake.settings import Settings

log = get_logger(__name__)

TP = tuple[str, int]
CLIENTS = ("kafka-python", "confluent-kafka")
# A batch that stops the consumer (see docs/kafka.md) is read again after 1 s, 2 s, 4 s ...
# at most this long apart: never a reconnect loop.
HALT_BACKOFF_CAP_S = 60.0


class KafkaClient(Protocol):
    """What the poller needs from a Kafka client."""

    errors: tuple[type[BaseException], ...]  # failures after which to start over

    def partitions(self, topic: str) -> list[int]: ...
    def start(self, tps: list[TP], positions: dict[TP, int]) -> None: ...
    def seek(self, tp: TP, offset: int) -> None: ...
    def poll(self, timeout: float, max_records: int) -> list[Chunk]: ...
    def highwater(self) -> dict[TP, int]: ...
    def close(self) -> None: ...


def make_client(name: str, settings: Settings) -> KafkaClient:
    """A connected client (``kafka-python`` or ``confluent-kafka``)."""
    if name == "kafka-python":
        return KafkaPythonClient(settings)
    if name == "confluent-kafka":
        return ConfluentClient(settings)
    raise InvalidInput(f"unknown Kafka client {name!r}; expected one of {', '.join(CLIENTS)}")


class KafkaPythonClient:
    """kafka-python through the columnar :class:`ChunkReader`.

    A poison batch is skipped and counted (``poisoned``; ingest is the one
    quarantine writer). A batch that must not be passed over stops polling:
    ``poll`` returns nothing until a backoff delay has passed (``halted`` says
    why, ``halted_at`` where), then reads it again, without reconnecting. An
    operator's skip of that batch is passed with :meth:`pass_skipped`; a seek of
    the stopped partition ends the stop too (it is read again from there)."""

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        from lambdalake.kafka.clients import new_client

        self.errors: tuple[type[BaseException], ...] = (KafkaError,)
        self.consumer = new_client(
            KafkaConsumer,
            bootstrap_servers=settings.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_wait_ms=100,  # bounds freshness when caught up
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            reconnect_backoff_max_ms=5_000,
            request_timeout_ms=30_000,
            bootstrap_timeout_ms=5_000,
            **settings.kafka_security,
        )
        self.reader = ChunkReader(self.consumer, component="speed")
        self.poisoned = 0  # poison batches skipped
        self.halted: str | None = None  # why polling stopped, while it is stopped
        # Where (the columnar decoder's stop; None with kafka-python's own decoder, which
        # does not say which batch failed: such a stop is never passed by a skip).
        self.halted_at: UndecodableBatch | None = None
        self._halt_attempt = 0
        self._halt_until = 0.0

    def partitions(self, topic: str) -> list[int]:
        found = self.consumer.partitions_for_topic(topic)
        if not found:
            self.consumer.topics()  # refresh metadata for the next attempt
        return sorted(found or [])

    def start(self, tps: list[TP], positions: dict[TP, int]) -> None:
        from kafka import TopicPartition

        self.consumer.assign([TopicPartition(t, p) for t, p in tps])
        for tp, offset in positions.items():
            self.seek(tp, offset)

    def seek(self, tp: TP, offset: int) -> None:
        from kafka import TopicPartition

        self.consumer.seek(TopicPartition(*tp), offset)
        at = self.halted_at
        if at is not None and (at.topic, at.partition) == tp:
            self._resume()  # read from the new position now, not after the backoff

    def pass_skipped(self, skip: PoisonBatch) -> bool:
        """Pass the batch polling is stopped at, which an operator skipped (``skip``, from
        :class:`lambdalake.kafka.skips.OperatorSkips`): continue right after it. False,
        and nothing done, unless it is exactly the batch this client is stopped at."""
        at = self.halted_at
        if at is None or (at.topic, at.partition, at.offset, at.next_offset) != (
            skip.topic,
            skip.partition,
            skip.offset,
            skip.next_offset,
        ):
            return False
        self.seek((skip.topic, skip.partition), skip.next_offset)
        return True

    def _resume(self) -> None:
        self._halt_attempt = 0
        self._halt_until = 0.0
        self.halted = None
        self.halted_at = None

    def poll(self, timeout: float, max_records: int) -> list[Chunk]:
        wait = self._halt_until - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout))
            return []
        try:
            chunks = self.reader.poll(max(1, int(timeout * 1000)), max_records)
        except HALT_ERRORS as exc:
            delay = min(HALT_BACKOFF_CAP_S, 2.0**self._halt_attempt)
            self._halt_attempt += 1
            self._halt_until = time.monotonic() + delay
            self.halted = " ".join(str(exc).split())
            self.halted_at = exc if isinstance(exc, UndecodableBatch) else None
            log.error("speed.partition_halted", reason=self.halted, retry_in_s=delay)
            return []
        if read_past(self.halted_at, chunks):
            self._resume()
        for chunk in chunks:
            for p in chunk.poisoned:
                self.poisoned += 1
                log.warning("speed.poison_batch", **p.log_fields())
        return chunks

    def highwater(self) -> dict[TP, int]:
        out: dict[TP, int] = {}
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is not None:
                out[(tp.topic, tp.partition)] = int(hw)
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class ConfluentClient:
    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Consumer, KafkaException

        self.errors: tuple[type[BaseException], ...] = (KafkaException,)
        self._log = logging.getLogger("speed.librdkafka")
        self._log.setLevel(logging.CRITICAL)  # reconnects are reported by the worker
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap,
                # Required by librdkafka; never joined: partitions are assigned manually.
                "group.id": "lambdalake-speed-unused",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 100,
                "fetch.max.bytes": 64 * 1024 * 1024,
                "max.partition.fetch.bytes": 8 * 1024 * 1024,
                "reconnect.backoff.max.ms": 5_000,
                "logger": self._log,
                **settings.kafka_security_librdkafka,
                "error_cb": lambda err: None,
            }
        )
        self.assigned: list[TP] = []
        # Fail like kafka-python when nothing answers (a KafkaException after 5 s).
        self.consumer.list_topics(timeout=5)

    def partitions(self, topic: str) -> list[int]:
        meta = self.consumer.list_topics(topic, timeout=5)
        found = meta.topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    def start(self, tps: list[TP], positions: dict[TP, int]) -> None:
        from confluent_kafka import TopicPartition

        self.assigned = list(tps)
        self.consumer.assign([TopicPartition(t, p, positions.get((t, p), 0)) for t, p in tps])

    def seek(self, tp: TP, offset: int) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException:
            # Not fetching yet: assign again, this partition at ``offset``, the others
            # where they are.
            current = {
                (x.topic, x.partition): x.offset
                for x in self.consumer.position([TopicPartition(t, p) for t, p in self.assigned])
            }
            current[tp] = offset
            self.consumer.assign(
                [TopicPartition(t, p, max(current.get((t, p), 0), 0)) for t, p in self.assigned]
            )

    def poll(self, timeout: float, max_records: int) -> list[Chunk]:
        from confluent_kafka import KafkaError, KafkaException

        msgs = self.consumer.consume(num_messages=max_records, timeout=timeout)
        chunks: dict[TP, Chunk] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            key = (m.topic(), m.partition())
            chunk = chunks.get(key)
            if chunk is None:
                chunk = chunks[key] = Chunk(key[0], key[1], [], [])
            chunk.offsets.append(m.offset())
            chunk.values.append(m.value())
        return list(chunks.values())

    def highwater(self) -> dict[TP, int]:
        from confluent_kafka import TopicPartition

        out: dict[TP, int] = {}
        for t, p in self.assigned:
            with contextlib.suppress(Exception):
                _, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
                if high is not None and high >= 0:
                    out[(t, p)] = int(high)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close()
