"""An operator's skip: pass one record batch ingest is stopped at (``ingest --skip``).

Ingest stops at a record batch it must not pass by itself (see docs/kafka.md,
"Stopped at"): its extent is not certain, or a failed CRC lies inside an aborted
transaction's range. Only an operator can judge what it held; ``lambdalake ingest
--skip TOPIC/PARTITION@OFFSET`` is how they pass it. The skip is exact:

* ``OFFSET`` must be the partition's committed position (where ingest stands),
* reading there must stop at that offset, as ingest's read does (a batch ingest
  reads or passes by itself is never skipped),
* the batch's header must say where it ends, and nothing may contradict it (the
  next batch in the fetch starts there; the log ends at or after it).

The batch then becomes a :class:`~lambdalake.kafka.columnar.PoisonBatch` passed by
the operator, committed the way ingest commits any poison batch (see
:meth:`batch.ingest.Ingest.skip`): one quarantine row (``skipped_by_operator:<kind>``,
the whole batch as ``raw``, ``_offset`` = ``OFFSET``) and the positions past it.

>>> parse_skip("orders/0@10")
Skip(topic='orders', partition=0, offset=10)
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from kafka import TopicPartition

from batch.ingest_kafka import open_consumer
from lambdalake.errors import InvalidInput
from lambdalake.kafka.clients import Security
from lambdalake.kafka.columnar import DECODER_ERRORS, ChunkReader, PoisonBatch, UndecodableBatch

POLL_TIMEOUT_MS = 200
_SPEC = re.compile(r"^(?P<topic>[^/@\s]+)/(?P<partition>\d+)@(?P<offset>\d+)$")


class SkipRefused(InvalidInput):
    """A skip that is not exactly where ingest is stopped; nothing was written."""


@dataclass(frozen=True)
class Skip:
    """The record batch at (or containing) ``offset`` of ``topic``/``partition``."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


def parse_skip(spec: str) -> Skip:
    """``TOPIC/PARTITION@OFFSET`` as a :class:`Skip`; :class:`SkipRefused` otherwise."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise SkipRefused(
            f"--skip {spec!r} is not TOPIC/PARTITION@OFFSET (for example orders/0@10)"
        )
    return Skip(m["topic"], int(m["partition"]), int(m["offset"]))


def check_skips(
    skips: list[Skip],
    positions: dict[str, dict[int, int]],
    ends: dict[str, dict[int, int]],
) -> None:
    """Refuse (:class:`SkipRefused`) any skip that is not at its partition's committed
    position, before the end of its log, once per partition (pure)."""
    seen: set[tuple[str, int]] = set()
    for s in skips:
        if s.topic not in positions:
            raise SkipRefused(
                f"--skip {s}: no topic {s.topic!r} (ingest reads {sorted(positions)})"
            )
        if s.partition not in positions[s.topic]:
            raise SkipRefused(f"--skip {s}: {s.topic} has no partition {s.partition}")
        if (s.topic, s.partition) in seen:
            raise SkipRefused(f"--skip {s}: one skip per partition at a time")
        seen.add((s.topic, s.partition))
        committed = positions[s.topic][s.partition]
        if s.offset != committed:
            raise SkipRefused(
                f"--skip {s}: ingest's committed position on {s.topic}/{s.partition} is "
                f"{committed}, not {s.offset}; only the batch ingest is stopped at can be "
                "skipped (the offset in its error line or ingest.partition_halted). Nothing skipped"
            )
        end = ends.get(s.topic, {}).get(s.partition, 0)
        if s.offset >= end:
            raise SkipRefused(
                f"--skip {s}: offset {s.offset} is the end of the log ({end}); "
                "there is no batch to skip. Nothing skipped"
            )


def read_stopped_batch(
    bootstrap: str,
    skip: Skip,
    end: int,
    *,
    security: Security | None,
    timeout_s: float,
    stop: threading.Event,
) -> PoisonBatch:
    """Read ``skip``'s partition from its offset the way ingest does, and return the
    batch the read stops at as a batch passed by the operator. :class:`SkipRefused`
    if the read does not stop right there, or the batch's extent is unknown or runs
    past the log's ``end``."""
    consumer = open_consumer(bootstrap, security=security)
    try:
        reader = ChunkReader(consumer, component="ingest")
        if not reader.columnar:
            raise SkipRefused(
                f"--skip {skip}: kafka-python's own record decoder is in use here "
                "(ingest.fast_decoder_disabled), which does not say where a batch ends. "
                "Nothing skipped"
            )
        tp = TopicPartition(skip.topic, skip.partition)
        consumer.assign([tp])
        consumer.seek(tp, skip.offset)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                chunks = reader.poll(POLL_TIMEOUT_MS, 1)
            except UndecodableBatch as exc:
                return _skipped(skip, exc, end)
            except DECODER_ERRORS as exc:
                raise SkipRefused(f"--skip {skip}: {exc}. Nothing skipped") from exc
            if any(c.offsets or c.poisoned or c.next_offset > skip.offset for c in chunks):
                raise SkipRefused(
                    f"--skip {skip}: ingest is not stopped there: the read at offset "
                    f"{skip.offset} goes on by itself (run `lambdalake ingest`). Nothing skipped"
                )
            if stop.is_set() or time.monotonic() >= deadline:
                raise SkipRefused(
                    f"--skip {skip}: nothing could be read at offset {skip.offset} for "
                    f"{timeout_s:.0f} s (a transaction still open there?). Nothing skipped"
                )
    finally:
        consumer.close()


def _skipped(skip: Skip, exc: UndecodableBatch, end: int) -> PoisonBatch:
    reason = " ".join(exc.reason.split())
    if (exc.topic, exc.partition, exc.offset) != (skip.topic, skip.partition, skip.offset):
        raise SkipRefused(
            f"--skip {skip}: the read stopped at {exc.topic}/{exc.partition} offset "
            f"{exc.offset} instead ({reason}). Nothing skipped"
        )
    if exc.next_offset is None:
        raise SkipRefused(
            f"--skip {skip}: where the batch there ends cannot be told ({reason}), so it "
            "cannot be skipped exactly. Nothing skipped"
        )
    if exc.next_offset > end:
        raise SkipRefused(
            f"--skip {skip}: the batch's header says it ends at offset {exc.next_offset}, "
            f"past the end of the log ({end}): its header is corrupt too. Nothing skipped"
        )
    return exc.as_skipped()
