"""Kafka side of ingest: a manually assigned consumer that hands back columns, not records.

kafka-python decodes every record into a ``ConsumerRecord`` in pure Python, which
caps a consumer at roughly 50-60k messages/s on this class of machine: less
than ingest's target on its own. :class:`ColumnarPartitionRecords` replaces the
per-record decoding of record-batch format v2 (every broker since Kafka 0.11,
Tansu included) with a tight loop that only extracts offset and value, and
yields plain ``(offset, value)`` tuples. Batch-level handling (CRC check,
decompression, control batches, aborted transactions) stays kafka-python's
own. It plugs into the consumer's fetcher through the ``PartitionRecords``
class attribute of kafka-python 3.0.x; with any other version the consumer
keeps kafka-python's decoder (correct, slower) and says so in the log.

No consumer groups: partitions are assigned by hand and positions come from
the lake (see :mod:`batch.ingest`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kafka
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import KafkaError

from lambdalake.kafka import CLIENT_DEFAULTS, end_offsets, ensure_topics, topic_partitions
from lambdalake.logs import get_logger

log = get_logger(__name__)

Positions = dict[str, dict[int, int]]  # topic -> partition -> next offset to consume

# Sized for throughput: one fetch brings up to 16 MiB per partition, 64 MiB in all.
FETCH_MAX_BYTES = 64 * 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024

FAST_DECODER_VERSIONS = ("3.0.",)


def _zigzag_varint(buf: bytearray, pos: int) -> tuple[int, int]:
    """Decode one zigzag varint at ``pos``; return it and the position after it."""
    b = buf[pos]
    pos += 1
    value = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
    return (value >> 1) ^ -(value & 1), pos


def decode_batch_records(buf: bytearray, pos: int, count: int, base_offset: int) -> list[tuple]:
    """``(offset, value)`` of the ``count`` records of an (uncompressed) v2 record batch.

    ``buf[pos:]`` holds the records. Only the length, offset delta, key length
    and value are decoded; the timestamp, key and headers are skipped.
    """
    out: list[tuple] = []
    append = out.append
    for _ in range(count):
        # Record => Length Attributes TimestampDelta OffsetDelta Key Value Headers.
        # The single-byte case of each varint is inlined: it is the common one.
        b = buf[pos]
        if b < 0x80:
            length = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            length, pos = _zigzag_varint(buf, pos)
        end = pos + length
        pos += 1  # attributes (unused)
        while buf[pos] & 0x80:  # timestamp delta (unused)
            pos += 1
        pos += 1
        b = buf[pos]
        if b < 0x80:
            delta = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            delta, pos = _zigzag_varint(buf, pos)
        b = buf[pos]
        if b < 0x80:
            key_len = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            key_len, pos = _zigzag_varint(buf, pos)
        if key_len > 0:
            pos += key_len
        b = buf[pos]
        if b < 0x80:
            value_len = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            value_len, pos = _zigzag_varint(buf, pos)
        append((base_offset + delta, bytes(buf[pos : pos + value_len]) if value_len >= 0 else None))
        pos = end
    return out


class ColumnarPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's per-fetch record iterator, yielding ``(offset, value)`` tuples."""

    def _maybe_skip_record(self, record: tuple) -> bool:
        # A fetch can start inside a batch (compressed batches come whole).
        return bool(record[0] < self.fetch_offset)

    def _unpack_records(
        self, tp: TopicPartition, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[tuple]:
        # Mirrors kafka-python 3.0's own _unpack_records; only the per-record part differs.
        from kafka.consumer.fetcher import IsolationLevel
        from kafka.errors import CorruptRecordError

        batch = records.next_batch()
        last_batch = None
        while batch is not None:
            last_batch = batch
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"Record batch for partition {tp} at offset {batch.base_offset} "
                    "failed crc check"
                )
            if batch.magic != 2:
                # Legacy message formats (pre Kafka 0.11): kafka-python's decoder.
                for record in batch:
                    self.records_read += 1
                    self.bytes_read += record.size_in_bytes
                    self.next_fetch_offset = record.offset + 1
                    yield (record.offset, record.value)
                batch = records.next_batch()
                continue
            self.leader_epoch = batch.leader_epoch
            if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
                self._consume_aborted_transactions_up_to(batch.last_offset)
                if self._contains_abort_marker(batch):
                    self.aborted_producer_ids.discard(batch.producer_id)
                elif self._is_batch_aborted(batch):
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                batch = records.next_batch()
                continue
            batch._maybe_uncompress()
            decoded = decode_batch_records(
                batch._buffer, batch._pos, batch.records_count, batch.base_offset
            )
            self.records_read += len(decoded)
            self.bytes_read += batch.size_in_bytes
            for record in decoded:
                self.next_fetch_offset = record[0] + 1
                yield record
            batch = records.next_batch()
        if last_batch is not None and last_batch.magic == 2:
            # Past records removed by compaction, as kafka-python does.
            self.next_fetch_offset = last_batch.next_offset
        self.drain()


def fast_decoder_supported() -> bool:
    return kafka.__version__.startswith(FAST_DECODER_VERSIONS) and hasattr(
        Fetcher, "PartitionRecords"
    )


@dataclass
class Chunk:
    """Messages of one topic partition from one poll, as columns."""

    topic: str
    partition: int
    offsets: list[int]
    values: list[bytes | None]


def records_to_chunk(tp: TopicPartition, records: list[Any]) -> Chunk:
    """Columns from a poll's records (tuples from the fast decoder, or ConsumerRecords)."""
    if records and isinstance(records[0], tuple) and not hasattr(records[0], "topic"):
        offsets, values = zip(*records, strict=True)
        return Chunk(tp.topic, tp.partition, list(offsets), list(values))
    return Chunk(tp.topic, tp.partition, [r.offset for r in records], [r.value for r in records])


class BrokerUnreachable(TimeoutError):
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
        try:
            result = what()
            backoff.reset()
            return result
        except (KafkaError, OSError, TimeoutError) as exc:
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


def open_consumer(bootstrap: str, *, connect_timeout_s: float = 5.0) -> KafkaConsumer:
    """A consumer without group, sized for throughput, with the columnar decoder plugged in.

    ``auto_offset_reset='none'``: a position outside the log is an error to
    report (the broker lost data), never a silent jump.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
        fetch_max_wait_ms=200,
        bootstrap_timeout_ms=int(connect_timeout_s * 1000),
        reconnect_backoff_max_ms=5_000,
        **CLIENT_DEFAULTS,
    )
    if fast_decoder_supported():
        consumer._fetcher.PartitionRecords = ColumnarPartitionRecords
    else:
        log.warning(
            "ingest.fast_decoder_disabled",
            kafka_python=kafka.__version__,
            reason="untested kafka-python version; using its own (slower) record decoder",
        )
    return consumer


def discover_partitions(
    bootstrap: str, topics: tuple[str, ...], partitions: int
) -> dict[str, list[int]]:
    """The partition ids of each topic, creating missing topics (as the broker does on
    first use) with ``partitions`` partitions."""
    ensure_topics(bootstrap, topics, partitions)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **CLIENT_DEFAULTS)
    try:
        return {t: topic_partitions(consumer, t) for t in topics}
    finally:
        consumer.close()


def true_end_offsets(bootstrap: str, parts: dict[str, list[int]]) -> Positions:
    """One past the last record of every partition (see :func:`lambdalake.kafka.end_offsets`)."""
    tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
    ends = end_offsets(bootstrap, tps)
    out: Positions = {t: {} for t in parts}
    for tp, end in ends.items():
        out[tp.topic][tp.partition] = int(end)
    return out


def probe_broker(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Return if a broker answers a metadata request within about ``timeout_s``;
    raise a :class:`KafkaError` (or :class:`OSError`) otherwise."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        bootstrap_timeout_ms=int(timeout_s * 1000),
        **{**CLIENT_DEFAULTS, "request_timeout_ms": max(int(timeout_s * 1000), 1_000)},
    )
    try:
        admin.list_topics()
    finally:
        admin.close()
