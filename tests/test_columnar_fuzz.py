"""Differential fuzzing of the columnar decoder against kafka-python's own record handling.

Hypothesis builds random partition logs the way brokers store them: record
batches with every codec, plain, idempotent and transactional producers,
commit and abort markers (with the fetch response's aborted-transaction list),
null keys and values, headers, values whose lengths need one- to three-byte
varints; a fetch may start anywhere, records are taken in random slices.

- Intact logs: :class:`ColumnarPartitionRecords` returns exactly the records,
  and reaches exactly the positions, of kafka-python's ``PartitionRecords``
  (``read_committed`` and ``read_uncommitted``).
- A flipped byte under a batch's CRC: the decoder returns every record of the
  other batches and none of that one; it passes the batch (reported as poison)
  only when the next batch confirms where it ends and no aborted transaction is
  open there, and otherwise stops at it (:class:`UndecodableBatch`).
- Bytes of a batch's records changed with the CRC made to match (a broken
  producer): per batch, the same records as kafka-python's decoder, or the
  batch reported as poison; never records kafka-python would refuse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher, IsolationLevel
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBase, DefaultRecordBatch
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.record.util import calc_crc32c

from lambdalake.kafka.columnar import (
    ColumnarPartitionRecords,
    PoisonBatch,
    UndecodableBatch,
    set_batch_attributes,
)

TP = TopicPartition("orders", 0)
HEADER_SIZE = DefaultRecordBase.HEADER_STRUCT.size
CONTROL_ATTRIBUTES = 0x30  # control | transactional
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- logs ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    start: int  # byte offsets in the log
    end: int
    base_offset: int
    next_offset: int
    control: bool
    transactional: bool


@dataclass
class Log:
    data: bytes
    batches: list[Batch]
    aborted: list[tuple[int, int]]  # (producer id, first offset)


def _value(size_and_fill: tuple[int, int] | None) -> bytes | None:
    if size_and_fill is None:
        return None
    size, fill = size_and_fill
    return bytes([fill]) * size


record_st = st.tuples(
    st.one_of(st.none(), st.binary(max_size=12)),  # key
    st.one_of(  # value: absent, empty, small, or long enough for 2- and 3-byte varints
        st.none(),
        st.tuples(
            st.one_of(st.integers(0, 130), st.sampled_from([8191, 8192, 16383, 16384, 20000])),
            st.integers(0, 255),
        ),
    ),
    st.lists(
        st.tuples(st.text(max_size=5), st.one_of(st.none(), st.binary(max_size=6))), max_size=3
    ),
)
action_st = st.one_of(
    st.tuples(
        st.just("plain"),
        st.integers(0, 4),
        st.booleans(),
        st.lists(record_st, min_size=1, max_size=12),
    ),
    st.tuples(
        st.just("txn"),
        st.integers(0, 4),
        st.integers(1, 3),
        st.lists(record_st, min_size=1, max_size=12),
    ),
    st.tuples(st.just("end"), st.integers(1, 3), st.booleans()),
)


def build_log(actions: list[tuple]) -> Log:
    """Record batches as a broker stores them: offsets in sequence, a marker ending
    each transaction, and the aborted-transaction list a fetch response carries."""
    data = bytearray()
    batches: list[Batch] = []
    aborted: list[tuple[int, int]] = []
    open_txns: dict[int, int] = {}  # producer id -> first offset
    offset = 0

    def add(
        records: list[tuple], codec: int, pid: int, transactional: bool, control: int = -1
    ) -> None:
        nonlocal offset
        builder = MemoryRecordsBuilder(
            magic=2,
            compression_type=codec,
            batch_size=1 << 24,
            offset=0,  # offset deltas from 0; the base offset is set below, as a broker does
            transactional=transactional,
            producer_id=pid,
            producer_epoch=0 if pid >= 0 else -1,
            base_sequence=0 if pid >= 0 else -1,
        )
        for i, (key, value, headers) in enumerate(records):
            if control >= 0:
                key, value, headers = struct.pack(">hh", 0, control), b"\0" * 6, []
            else:
                value = _value(value)
            builder.append(timestamp=1_700_000_000_000 + i, key=key, value=value, headers=headers)
        builder.close()
        raw = bytearray(builder.buffer())
        struct.pack_into(">q", raw, 0, offset)
        if control >= 0:
            set_batch_attributes(raw, CONTROL_ATTRIBUTES)
        batches.append(
            Batch(
                len(data),
                len(data) + len(raw),
                offset,
                offset + len(records),
                control >= 0,
                transactional,
            )
        )
        data.extend(raw)
        offset += len(records)

    def end(pid: int, commit: bool) -> None:
        first = open_txns.pop(pid)
        if not commit:
            aborted.append((pid, first))
        add([(None, None, [])], 0, pid, True, control=1 if commit else 0)

    for action in actions:
        if action[0] == "plain":
            _, codec, idempotent, records = action
            add(records, codec, 100 if idempotent else -1, False)
        elif action[0] == "txn":
            _, codec, pid, records = action
            open_txns.setdefault(pid, offset)
            add(records, codec, pid, True)
        elif action[1] in open_txns:
            end(action[1], action[2])
    for pid in list(open_txns):
        end(pid, True)
    return Log(bytes(data), batches, aborted)


def _aborted_list(log: Log) -> list:
    from kafka.protocol.old.fetch import AbortedTransaction

    return [AbortedTransaction(producer_id=p, first_offset=o) for p, o in log.aborted]


def fetched_from(log: Log, fetch_offset: int) -> bytes:
    """The log as a fetch at ``fetch_offset`` returns it: from the batch holding it on."""
    for b in log.batches:
        if b.next_offset > fetch_offset:
            return log.data[b.start :]
    return b""


# --- running the two decoders ----------------------------------------------------------------------


def partition_records(cls, data: bytes, fetch_offset: int, log: Log, committed: bool, **kw):
    level = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
    return cls(
        fetch_offset,
        TP,
        MemoryRecords(data),
        isolation_level=level,
        aborted_transactions=_aborted_list(log),
        **kw,
    )


def take_all(records, takes: list[int]) -> list[tuple]:
    out: list[tuple] = []
    for n in [*takes, None]:
        if not records:
            break
        got = records.take(n)
        out.extend(
            r if isinstance(r, tuple) and not hasattr(r, "topic") else (r.offset, r.value)
            for r in got
        )
        if n is None and records:
            records.take(None)  # an empty take past the last batch drains
    return out


def reference(data: bytes, fetch_offset: int, log: Log, committed: bool) -> tuple[list, int]:
    theirs = partition_records(Fetcher.PartitionRecords, data, fetch_offset, log, committed)
    records = [(r.offset, r.value) for r in theirs.take()] if theirs else []
    while theirs:
        more = theirs.take()
        records += [(r.offset, r.value) for r in more]
        if not more:
            break
    return records, theirs.next_fetch_offset


# --- intact logs -----------------------------------------------------------------------------------


@FUZZ
@given(
    actions=st.lists(action_st, min_size=1, max_size=10),
    fetch_at=st.floats(0, 1),
    committed=st.booleans(),
    takes=st.lists(st.integers(1, 40), max_size=6),
)
def test_intact_logs_decode_exactly_like_kafka_python(
    actions: list[tuple], fetch_at: float, committed: bool, takes: list[int]
) -> None:
    log = build_log(actions)
    assume(log.batches)
    last = log.batches[-1].next_offset
    fetch_offset = min(int(fetch_at * last), last - 1)
    data = fetched_from(log, fetch_offset)

    ours = partition_records(ColumnarPartitionRecords, data, fetch_offset, log, committed)
    theirs = partition_records(Fetcher.PartitionRecords, data, fetch_offset, log, committed)
    for n in [*takes, 1000, 1000, 1000]:
        if not theirs:  # kafka-python's fetcher takes only from undrained records
            break
        got = ours.take(n)
        want = [(r.offset, r.value) for r in theirs.take(n)]
        assert got == want
        assert ours.next_fetch_offset == theirs.next_fetch_offset
    rest = ours.take(None) if ours else []
    assert rest == []
    assert not ours and not theirs
    assert ours.next_fetch_offset == theirs.next_fetch_offset == last


# --- corrupt logs ----------------------------------------------------------------------------------


def decode_corrupt(data: bytes, fetch_offset: int, log: Log, committed: bool):
    """Our decoder on a corrupt log: the records, the poison batches, the stop (if any)."""
    poisoned: list[PoisonBatch] = []
    ours = partition_records(
        ColumnarPartitionRecords, data, fetch_offset, log, committed, on_poison=poisoned.append
    )
    records: list[tuple] = []
    stopped: UndecodableBatch | None = None
    while ours:
        try:
            records += ours.take(7)
        except UndecodableBatch as exc:
            stopped = exc
            break
    return records, poisoned, stopped, ours.next_fetch_offset


@FUZZ
@given(
    actions=st.lists(action_st, min_size=1, max_size=8),
    which=st.floats(0, 1),
    where=st.floats(0, 1),
    flip=st.integers(1, 255),
    committed=st.booleans(),
)
def test_a_flipped_byte_under_a_crc_is_passed_only_when_safe_and_never_read(
    actions: list[tuple], which: float, where: float, flip: int, committed: bool
) -> None:
    log = build_log(actions)
    assume(log.batches)
    i = min(int(which * len(log.batches)), len(log.batches) - 1)
    bad = log.batches[i]
    data = bytearray(log.data)
    covered = bad.start + DefaultRecordBase.ATTRIBUTES_OFFSET  # the CRC covers from here
    at = covered + min(int(where * (bad.end - covered)), bad.end - covered - 1)
    data[at] ^= flip
    last_offset_delta = range(covered + 2, covered + 6)  # the batch's extent itself

    want, _ = reference(log.data, 0, log, committed)  # the intact log
    got, poisoned, stopped, position = decode_corrupt(bytes(data), 0, log, committed)
    if stopped is not None:
        assert stopped.offset == bad.base_offset
        assert not poisoned
        assert got == [r for r in want if r[0] < bad.base_offset]
        assert position == bad.base_offset
        last_batch = i == len(log.batches) - 1
        txn_open = committed and any(
            first <= bad.next_offset - 1 and not _closed_before(log, pid, first, bad.base_offset)
            for pid, first in log.aborted
        )
        assert last_batch or txn_open or at in last_offset_delta, (
            "stopped although its extent and safety were certain"
        )
    else:
        assert [(p.offset, p.next_offset, p.reason) for p in poisoned] == [
            (bad.base_offset, bad.next_offset, "crc")
        ]
        assert poisoned[0].raw == bytes(data[bad.start : bad.end])
        assert got == [r for r in want if not bad.base_offset <= r[0] < bad.next_offset]
        assert position == log.batches[-1].next_offset


def _closed_before(log: Log, pid: int, first: int, offset: int) -> bool:
    """The aborted transaction of ``pid`` starting at ``first`` ended (its marker) before ``offset``."""
    return any(
        b.control and b.base_offset < offset and b.base_offset > first
        for b in log.batches
        if _producer_id(log, b) == pid
    )


def _producer_id(log: Log, b: Batch) -> int:
    return DefaultRecordBatch(log.data[b.start : b.end]).producer_id


@FUZZ
@given(
    actions=st.lists(
        st.tuples(
            st.just("plain"),
            st.integers(0, 4),
            st.booleans(),
            st.lists(record_st, min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=5,
    ),
    which=st.floats(0, 1),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 3),
)
def test_malformed_records_with_a_valid_crc_are_never_decoded_differently(
    actions: list[tuple], which: float, edits: list[tuple[float, int]], cut: int
) -> None:
    log = build_log(actions)
    assume(log.batches)
    i = min(int(which * len(log.batches)), len(log.batches) - 1)
    bad = log.batches[i]
    raw = bytearray(log.data[bad.start : bad.end])
    body = len(raw) - HEADER_SIZE
    for at, value in edits:
        raw[HEADER_SIZE + min(int(at * body), body - 1)] = value
    if cut and body > cut:  # or records cut short, the batch length following
        del raw[len(raw) - cut :]
        struct.pack_into(">i", raw, 8, len(raw) - DefaultRecordBase.AFTER_LEN_OFFSET)
    crc = calc_crc32c(memoryview(raw)[DefaultRecordBase.ATTRIBUTES_OFFSET :])
    struct.pack_into(">I", raw, DefaultRecordBase.CRC_OFFSET, crc)
    data = log.data[: bad.start] + bytes(raw) + log.data[bad.end :]

    # kafka-python's verdict on each batch alone (its fetcher stops at the first error).
    verdicts = []
    for b in log.batches:
        chunk = bytes(raw) if b is bad else log.data[b.start : b.end]
        try:
            verdicts.append([(r.offset, r.value) for r in DefaultRecordBatch(chunk)])
        except CorruptRecordError:
            verdicts.append(None)
        except Exception:  # kafka-python fails in other ways on some garbage
            verdicts.append(None)

    got, poisoned, stopped, _ = decode_corrupt(data, 0, log, False)
    assert stopped is None
    assert [p.offset for p in poisoned] in ([], [bad.base_offset])
    if verdicts[i] is None:
        assert poisoned, "records kafka-python refuses were decoded"
    expected = []
    for b, verdict in zip(log.batches, verdicts, strict=True):
        if b is bad and poisoned:
            continue
        expected += verdict or []
    assert got == expected


# --- the guard -------------------------------------------------------------------------------------


def test_the_decoder_replaces_kafka_pythons_only_while_its_self_check_passes(
    broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Internals that moved (here: a batch's record count read from elsewhere) make the
    self-check fail: the consumer keeps kafka-python's decoder, and reads correctly."""
    import kafka

    from lambdalake.kafka import columnar as kafka_columnar
    from lambdalake.kafka.columnar import ChunkReader, fast_decoder_supported

    def consumer() -> KafkaConsumer:
        return KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)

    fast_decoder_supported.cache_clear()
    try:
        c = consumer()
        assert ChunkReader(c, component="test").columnar
        assert c._fetcher.PartitionRecords.func is ColumnarPartitionRecords
        c.close()

        # Another version whose internals still pass the check: used.
        monkeypatch.setattr(kafka, "__version__", "3.1.0")
        fast_decoder_supported.cache_clear()
        c = consumer()
        assert ChunkReader(c, component="test").columnar
        c.close()

        # Internals that moved: kafka-python's own decoder stays, logged once.
        monkeypatch.setattr(DefaultRecordBatch, "records_count", property(lambda self: 0))
        monkeypatch.setattr(kafka_columnar, "_fallback_logged", False)
        fast_decoder_supported.cache_clear()
        c1, c2 = consumer(), consumer()
        assert not ChunkReader(c1, component="test").columnar
        assert not ChunkReader(c2, component="test").columnar
        assert c1._fetcher.PartitionRecords is Fetcher.PartitionRecords
        c1.close()
        c2.close()
    finally:
        fast_decoder_supported.cache_clear()
