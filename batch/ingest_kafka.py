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


def _zigzag_varint(buf: bytes, pos: int) -> tuple[int, int]:
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


def decode_batch_records(buf: bytes, pos: int, count: int, base_offset: int) -> list[tuple]:
    """``(offset, value)`` of the ``count`` records of an (uncompressed) v2 record batch.

    ``buf[pos:]`` holds the records. Only the offset delta, key length and value
    are decoded; the length, attributes and timestamp are skipped, and so are
    the headers (through the record's length, when there are any).
    """
    out: list[tuple] = []
    append = out.append
    for _ in range(count):
        # Record => Length Attributes TimestampDelta OffsetDelta Key Value Headers, the
        # integers as zigzag varints. The one- and two-byte cases are inlined: they
        # are the common ones, and this loop is ingest's hottest code.
        start = pos
        while buf[pos] & 0x80:  # length
            pos += 1
        pos += 2  # the length's last byte, attributes
        while buf[pos] & 0x80:  # timestamp delta
            pos += 1
        pos += 1
        b = buf[pos]
        if b < 0x80:
            delta = (b >> 1) ^ -(b & 1)
            pos += 1
        elif buf[pos + 1] < 0x80:
            v = (b & 0x7F) | (buf[pos + 1] << 7)
            delta = (v >> 1) ^ -(v & 1)
            pos += 2
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
        elif buf[pos + 1] < 0x80:
            v = (b & 0x7F) | (buf[pos + 1] << 7)
            value_len = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            value_len, pos = _zigzag_varint(buf, pos)
        if value_len >= 0:
            append((base_offset + delta, buf[pos : pos + value_len]))
            pos += value_len
        else:
            append((base_offset + delta, None))
        if buf[pos] == 0:  # no headers
            pos += 1
        else:
            length, pos = _zigzag_varint(buf, start)
            pos += length
    return out


class ColumnarPartitionRecords(Fetcher.PartitionRecords):
    """The records of one fetched partition, decoded a record batch at a time.

    ``take(n)`` returns ``(offset, value)`` tuples by slicing whole decoded
    batches, instead of kafka-python's generator step per record. The parent's
    ``record_iterator`` is only the not-yet-drained flag here; batch-level rules
    (CRC, control batches, aborted transactions, a fetch starting inside a
    batch, the next offset past a compacted batch) are kafka-python 3.0's own.
    """

    def __init__(self, fetch_offset: int, tp: TopicPartition, records: Any, **kwargs: Any):
        super().__init__(fetch_offset, tp, records, **kwargs)
        self.next_fetch_offset: int = fetch_offset
        self._batches = self._decoded_batches(tp, records)
        self._pending: list[tuple] = []
        self._pending_at = 0
        self._pending_next = fetch_offset

    def _decoded_batches(self, tp: TopicPartition, records: Any) -> Iterator[tuple[list, int]]:
        """Each record batch's records (from the fetch offset on) and the offset after it."""
        from kafka.consumer.fetcher import IsolationLevel
        from kafka.errors import CorruptRecordError

        while (batch := records.next_batch()) is not None:
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"Record batch for partition {tp} at offset {batch.base_offset} "
                    "failed crc check"
                )
            if batch.magic != 2:
                # Legacy message formats (before Kafka 0.11): kafka-python's decoder.
                decoded = [(r.offset, r.value) for r in batch]
                self.bytes_read += batch.size_in_bytes
                next_offset = decoded[-1][0] + 1 if decoded else self.next_fetch_offset
            else:
                self.leader_epoch = batch.leader_epoch
                next_offset = batch.next_offset
                if (
                    self.isolation_level == IsolationLevel.READ_COMMITTED
                    and batch.has_producer_id()
                ):
                    self._consume_aborted_transactions_up_to(batch.last_offset)
                    if self._contains_abort_marker(batch):
                        self.aborted_producer_ids.discard(batch.producer_id)
                    elif self._is_batch_aborted(batch):
                        yield [], next_offset
                        continue
                if batch.is_control_batch:
                    yield [], next_offset
                    continue
                batch._maybe_uncompress()
                # bytes, not kafka-python's bytearray: slicing bytes copies a value once.
                decoded = decode_batch_records(
                    bytes(batch._buffer), batch._pos, batch.records_count, batch.base_offset
                )
                self.bytes_read += batch.size_in_bytes
            if decoded and decoded[0][0] < self.fetch_offset:
                # A fetch can start inside a batch (compressed batches come whole).
                decoded = [r for r in decoded if r[0] >= self.fetch_offset]
            self.records_read += len(decoded)
            yield decoded, next_offset

    def take(self, n: int | None = None) -> list[tuple]:
        self._maybe_raise_next_inline_exception()
        records: list[tuple] = []
        while self.record_iterator is not None and (n is None or len(records) < n):
            if self._pending_at >= len(self._pending):
                try:
                    self._pending, self._pending_next = next(self._batches)
                except StopIteration:
                    self.drain()
                    break
                except Exception as exc:
                    if not records:
                        raise
                    self._next_inline_exception = exc  # raised by the next take()
                    break
                self._pending_at = 0
                if not self._pending:  # a control or aborted batch: skip past it
                    self.next_fetch_offset = max(self.next_fetch_offset, self._pending_next)
                    continue
            end = len(self._pending)
            if n is not None:
                end = min(end, self._pending_at + n - len(records))
            records.extend(self._pending[self._pending_at : end])
            self._pending_at = end
            self.next_fetch_offset = (
                self._pending[end - 1][0] + 1 if end < len(self._pending) else self._pending_next
            )
        return records


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
        # Two comprehensions: about 4x faster than zip(*records) on 50k tuples.
        return Chunk(tp.topic, tp.partition, [r[0] for r in records], [r[1] for r in records])
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
    report (the broker lost data), never a silent jump. ``read_committed``: the
    records of aborted transactions never reach the lake; transaction markers
    still advance the positions.
    """
    consumer = KafkaConsumer(
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
