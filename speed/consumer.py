"""Kafka side of a speed worker: manual assignment, micro-batches, validation.

A :class:`Poller` thread owns the Kafka client (kafka-python by default, see
:mod:`speed.kafka_clients`; no consumer group): worker ``I/N`` takes partition
``p`` of each topic when ``p % N == I``.
It turns polls into micro-batches (up to ``max_records`` messages, or
``max_wait`` seconds once the main thread is free for the next one, and not
sooner than ``min_interval`` after the previous one) and hands
them to the worker's main thread through a small queue, which validates
(:func:`validate_polled`) and commits them: the Python-heavy Kafka fetching
overlaps with the DuckDB work of the previous micro-batch, which runs mostly
outside the GIL.

Positions are NOT kept here: the main thread tells the poller where to start
(:meth:`Poller.seek`) from the positions committed in the state, and filters
out anything below them, so what the poller has in flight is never trusted.

Operator's skips: while the client is stopped at a record batch it must not pass
(``halted_at``, see docs/kafka.md), the poller asks the lake whether an operator
passed that batch with ``lambdalake ingest --skip``
(:class:`lambdalake.kafka.skips.OperatorSkips`): right away, then after 1 s, 2 s,
4 s ... at most :data:`SKIP_CHECK_CAP_S` apart. If so, the client continues right
after the batch, and a micro-batch of its own, after everything polled before the
batch, carries the skip (``Polled.skipped``) and the position past it, for the main
thread to commit like any other.

Epochs: a seek backwards (the watermark went back, or a new connection) starts a
new epoch, and every micro-batch carries the epoch it was polled in. A batch
polled before the seek is discarded by the main thread, not committed: its
events above the seek target would otherwise move the positions past the events
between the target and them, which the re-read must deliver first.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import pyarrow as pa

from lambdalake.contract.lake import Lake
from lambdalake.errors import InvalidInput, Unreachable
from lambdalake.kafka.clients import quiet_client_logs, refusal
from lambdalake.kafka.columnar import PoisonBatch
from lambdalake.kafka.skips import OperatorSkips
from lambdalake.logs import get_logger
from lambdalake.settings import TOPICS, Settings
from speed.kafka_clients import KafkaClient, make_client

log = get_logger(__name__)

TP = tuple[str, int]
# A broker that is down or refuses us is asked again after 0.5 s, 1 s, 2 s ... at most
# this long apart.
RECONNECT_BACKOFF_CAP_S = 30.0
# While stopped at a batch, the lake is asked for an operator's skip of it after 0 s, 1 s,
# 2 s, 4 s ... at most this long apart: a look at two Delta logs, brought up to date
# incrementally (a data file is read only once ingest is past the batch). Kept well under
# the Kafka re-read's 60 s cap: finding the skip is what ends the stop.
SKIP_CHECK_CAP_S = 5.0


def owned_partitions(partitions: dict[str, list[int]], worker: tuple[int, int]) -> list[TP]:
    """The (topic, partition) pairs worker ``I/N`` takes: ``p % N == I`` (pure)."""
    i, n = worker
    return [(t, p) for t in sorted(partitions) for p in sorted(partitions[t]) if p % n == i]


@dataclass
class TopicBatch:
    """One topic's part of a micro-batch, validated."""

    valid: pa.Table  # the topic's fields + event_date + _partition + _offset
    rejected: pa.Table  # _partition, _offset, raw, reason


@dataclass
class RawMessages:
    values: list[bytes | None]
    partitions: list[int]
    offsets: list[int]


@dataclass
class Polled:
    """A micro-batch of raw messages, with the next offset it reached per partition."""

    raw: dict[str, RawMessages] = field(default_factory=dict)
    ends: dict[TP, int] = field(default_factory=dict)
    messages: int = 0
    first_at: float = 0.0  # monotonic time the first message was polled
    poll_seconds: float = 0.0
    epoch: int = 0  # the seek epoch it was polled in (see the module doc)
    # Batches passed because an operator skipped them; ``ends`` is past each.
    skipped: list[PoisonBatch] = field(default_factory=list)


@dataclass
class Assigned:
    """The poller connected and took these partitions; it waits for :meth:`Poller.seek`."""

    partitions: list[TP]


class Poller(threading.Thread):
    """Polls the owned partitions into micro-batches (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        worker: tuple[int, int],
        out: queue.Queue[Polled | Assigned],
        stop: threading.Event,
        *,
        max_records: int = 50_000,
        max_wait: float = 0.1,
        min_interval: float = 0.0,
        client: str = "kafka-python",
    ) -> None:
        super().__init__(name=f"speed-poller-{worker[0]}of{worker[1]}", daemon=True)
        self.settings = settings
        self.worker = worker
        self.out = out
        self.stop_event = stop
        self.max_records = max_records
        self.max_wait = max_wait
        # Consecutive micro-batches are handed over at least this far apart (seconds).
        self.min_interval = min_interval
        self._handed_at = 0.0
        self.client_name = client
        self._lock = threading.Lock()
        self._seek: dict[TP, int] = {}
        self._force_seek = False
        self._epoch = 0  # asked for by the last backwards seek
        self._polling_epoch = 0  # of the positions the client polls from now
        self._seek_given = threading.Event()
        self.client: KafkaClient | None = None
        self._positioned = False  # the client has its start positions
        self.assigned: list[TP] = []
        self._next: dict[TP, int] = {}  # the offset the client fetches next, per partition
        self.highwater: dict[TP, int] = {}
        self.connected = False
        self.last_fetch_at: float | None = None
        self.error: BaseException | None = None
        # Why the broker refused us (credentials or ACLs), one line, until a poll succeeds.
        self.refused: str | None = None
        self._poisoned_before = 0  # poison batches passed by clients since dropped
        self.skips = OperatorSkips(Lake(settings.lake_uri))
        self._skip_check_at = 0.0  # monotonic time of the next look for a skip
        self._skip_check_delay = 1.0

    @property
    def halted(self) -> str | None:
        """Why the client stopped polling a partition (a batch it must not pass), or None."""
        return getattr(self.client, "halted", None)

    @property
    def poisoned(self) -> int:
        """Poison batches passed since the worker started (every client so far)."""
        return self._poisoned_before + int(getattr(self.client, "poisoned", 0))

    # --- called from the main thread ------------------------------------------------------

    def seek(self, positions: dict[TP, int], *, backwards: bool = False) -> int:
        """Continue each partition at ``positions`` (forward only unless ``backwards``).

        Returns the epoch from which micro-batches follow this seek: a backwards seek
        starts a new one, so anything polled before it can be told apart."""
        with self._lock:
            self._seek.update(positions)
            self._force_seek = self._force_seek or backwards
            if backwards:
                self._epoch += 1
            epoch = self._epoch
        self._seek_given.set()
        return epoch

    # --- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by the main thread
            self.error = exc
            log.error("speed.poller_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._drop_client()

    def _run(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            if self.client is None:
                started = time.monotonic()
                try:
                    self._connect()
                except ValueError:
                    raise  # a configuration the worker cannot run with
                except Exception as exc:  # no broker (yet), or refused: retry with backoff
                    self.connected = False
                    if not self._refused(exc, "connect", started, delay):
                        log.warning(
                            "speed.broker_unreachable",
                            bootstrap=self.settings.bootstrap,
                            error=f"{type(exc).__name__}: {exc}",
                            retry_in=delay,
                        )
                    self.stop_event.wait(delay)
                    delay = min(delay * 2, RECONNECT_BACKOFF_CAP_S)
                    continue
                self._put(Assigned(list(self.assigned)))
                # Wait for the main thread's positions before the first poll.
                while not self._seek_given.wait(0.1):
                    if self.stop_event.is_set():
                        return
            client = self.client
            assert client is not None
            started = time.monotonic()
            try:
                self._apply_seeks(client)
                polled = self._collect(client)
                skipped = self._pass_operator_skip(client, polled.epoch)
            except client.errors as exc:
                # Start over with a new client; the main thread re-seeks it to the
                # committed positions, and anything polled twice is dropped there.
                if self._refused(exc, "fetch", started, delay):
                    self.stop_event.wait(delay)  # refused again right away otherwise
                    delay = min(delay * 2, RECONNECT_BACKOFF_CAP_S)
                else:
                    log.warning("speed.consumer_error", error=f"{type(exc).__name__}: {exc}")
                self._drop_client()
                continue
            # Reset by a poll, not by a connect: a refused fetch follows a good connect.
            delay = 0.5
            self.refused = None
            if polled.messages or polled.ends:
                self._put(polled)
                if polled.messages:
                    self._handed_at = time.monotonic()
            if skipped is not None:  # after everything polled before the batch
                self._put(skipped)

    def _pass_operator_skip(self, client: KafkaClient, epoch: int) -> Polled | None:
        """If the client is stopped at a batch an operator skipped, continue right after it
        and return a micro-batch of that alone: the skip, and the position past it (asked
        at the cadence of the module doc)."""
        halt = getattr(client, "halted_at", None)
        if halt is None:
            self._skip_check_at, self._skip_check_delay = 0.0, 1.0
            self.skips.close()  # the tables' snapshots are not kept while reading on
            return None
        now = time.monotonic()
        if now < self._skip_check_at:
            return None
        self._skip_check_at = now + self._skip_check_delay
        self._skip_check_delay = min(self._skip_check_delay * 2, SKIP_CHECK_CAP_S)
        try:
            skip = self.skips.find(halt)
        except Exception as exc:  # the lake unreadable now: stay stopped, ask again later
            log.warning("speed.skip_check_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        if skip is None or not client.pass_skipped(skip):  # type: ignore[attr-defined]
            return None
        self._skip_check_at, self._skip_check_delay = 0.0, 1.0
        tp = (skip.topic, skip.partition)
        self._next[tp] = skip.next_offset
        return Polled(ends={tp: skip.next_offset}, epoch=epoch, skipped=[skip])

    def _refused(self, exc: BaseException, action: str, started: float, delay: float) -> bool:
        """If ``exc`` (an attempt begun at ``started``) was the broker refusing us, say why
        (``refused``, ``speed.broker_refused`` in the log) and return True."""
        refused = refusal(exc, self.settings.bootstrap, action, started)
        if refused is None:
            return False
        self.refused = str(refused)
        log.error("speed.broker_refused", reason=self.refused, retry_in=delay)
        return True

    def _drop_client(self) -> None:
        self._poisoned_before = self.poisoned
        client, self.client = self.client, None
        self.connected = False
        self._positioned = False
        self._seek_given.clear()
        self._next.clear()
        with self._lock:
            self._seek.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _put(self, item: Polled | Assigned) -> None:
        while not self.stop_event.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _connect(self) -> None:
        client = make_client(self.client_name, self.settings)
        try:
            parts: dict[str, list[int]] = {}
            deadline = time.monotonic() + 15
            for topic in TOPICS:
                found = client.partitions(topic)
                while not found:
                    if time.monotonic() > deadline or self.stop_event.is_set():
                        raise Unreachable(f"topic {topic!r} not found on {self.settings.bootstrap}")
                    time.sleep(0.2)
                    found = client.partitions(topic)
                parts[topic] = found
            owned = owned_partitions(parts, self.worker)
            if not owned:
                raise InvalidInput(
                    f"worker {self.worker[0]}/{self.worker[1]} owns no partition of "
                    f"{parts}; use fewer workers"
                )
        except BaseException:
            client.close()
            raise
        self.client = client
        self.assigned = owned
        self.connected = True
        log.info(
            "speed.assigned",
            worker=f"{self.worker[0]}/{self.worker[1]}",
            partitions=owned,
            client=self.client_name,
        )

    def _apply_seeks(self, client: KafkaClient) -> None:
        with self._lock:
            seeks, self._seek = self._seek, {}
            force, self._force_seek = self._force_seek, False
            # Taken with the seeks: every batch polled from here on follows them.
            self._polling_epoch = self._epoch
        seeks = {tp: o for tp, o in seeks.items() if tp in self.assigned}
        if not self._positioned:
            client.start(self.assigned, seeks)
            self._next.update(seeks)
            self._positioned = True
            return
        for tp, offset in seeks.items():
            current = self._next.get(tp)
            if force or current is None or current < offset:
                client.seek(tp, offset)
                self._next[tp] = offset

    def _spacing(self, now: float) -> float:
        """Seconds until the next micro-batch may be handed over (<= 0: now)."""
        return self.min_interval - (now - self._handed_at)

    def _collect(self, client: KafkaClient) -> Polled:
        """Poll until ``max_records`` messages, ``max_wait`` seconds, or a quiet poll."""
        values: dict[str, list[bytes | None]] = {t: [] for t in TOPICS}
        parts: dict[str, list[int]] = {t: [] for t in TOPICS}
        offs: dict[str, list[int]] = {t: [] for t in TOPICS}
        polled = Polled(epoch=self._polling_epoch)
        t_start = time.monotonic()
        while polled.messages < self.max_records and not self.stop_event.is_set():
            now = time.monotonic()
            elapsed = now - (polled.first_at or t_start)
            # While the main thread is still busy with the previous micro-batch, keep
            # collecting instead of queueing small batches behind it: batches grow with
            # the load, and a message waits for at most one batch ahead of it. And not
            # sooner than min_interval after the previous one: a micro-batch costs about the
            # same whatever its size up to thousands of messages, so at a low rate a batch
            # per poll would keep a core busy for a handful of events each.
            spacing = self._spacing(now)
            ready = self.out.empty()
            if polled.messages and elapsed >= self.max_wait and ready and spacing <= 0:
                break
            timeout = 0.1 if not polled.messages else max(0.001, self.max_wait - elapsed)
            if polled.messages and spacing > 0:
                timeout = max(0.001, min(0.1, spacing))
            elif polled.messages and elapsed >= self.max_wait:
                timeout = 0.005  # waiting for the main thread: check back soon
            chunks = client.poll(timeout, self.max_records - polled.messages)
            if not chunks:
                caught_up = polled.messages and self.out.empty()
                if caught_up and self._spacing(time.monotonic()) <= 0:
                    break  # caught up: commit what we have now (freshness)
                if not polled.messages and time.monotonic() - t_start >= self.max_wait:
                    break
                continue
            if not polled.messages:
                polled.first_at = time.monotonic()
            self.last_fetch_at = time.monotonic()
            for c in chunks:
                values[c.topic].extend(c.values)
                offs[c.topic].extend(c.offsets)
                parts[c.topic].extend([c.partition] * len(c.offsets))
                key = (c.topic, c.partition)
                # The client's position: past transaction markers too, which hold no message.
                polled.ends[key] = max(polled.ends.get(key, 0), c.next_offset)
                self._next[key] = polled.ends[key]
                polled.messages += len(c.offsets)
        polled.poll_seconds = time.monotonic() - t_start
        self.highwater.update(client.highwater())
        polled.raw = {t: RawMessages(values[t], parts[t], offs[t]) for t in TOPICS if values[t]}
        return polled


def validate_polled(
    polled: Polled, max_event_bytes: int, max_future: timedelta
) -> dict[str, TopicBatch]:
    """Validate each topic's raw messages with the shared validator (vectorised).

    Runs on the worker's main thread: the validator works in DuckDB and Arrow,
    mostly outside the GIL, so it overlaps with the poller's next Kafka fetch."""
    from lambdalake.contract.validation import validate

    out: dict[str, TopicBatch] = {}
    for topic, msgs in polled.raw.items():
        result = validate(
            topic,
            msgs.values,
            pa.array(msgs.partitions, pa.int32()),
            pa.array(msgs.offsets, pa.int64()),
            max_event_bytes=max_event_bytes,
            max_future=max_future,
        )
        out[topic] = TopicBatch(valid=result.valid, rejected=result.rejected)
    return out


def quiet_kafka_logs() -> None:
    """kafka-python logs every reconnect attempt; the worker reports those itself
    (refusals included: :func:`lambdalake.kafka.clients.quiet_client_logs` keeps them seen)."""
    quiet_client_logs()
