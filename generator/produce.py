"""Produce generated orders and reviews to Kafka: ``lambdalake generate history|live``.

Messages are keyed by SKU (so a SKU's events keep their order in one partition)
and valued as JSON. kafka-python's producer spends most of its time in Python
per record, so the sender picks each key's partition once (murmur2, as Kafka's
default partitioner) and the producer is tuned for throughput: 1 MiB batches,
a 30 ms linger, no per-record metrics, idempotence kept on (acks=all, at most
5 requests in flight) so a retry never duplicates a message.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from datetime import UTC, date, datetime, timedelta
from multiprocessing import get_context
from typing import Any

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.partitioner.default import murmur2
from tqdm import tqdm

from generator.model import DAY_MS, REVIEW_RATE, expected_lines, make_catalog, stockout
from generator.stream import (
    REFERENCE_TOPICS,
    CatalogChanges,
    ChangeRates,
    Counts,
    Fractions,
    LiveStream,
    Message,
    catalog_messages,
    history,
)
from lambdalake.errors import InvalidInput, Unreachable
from lambdalake.kafka.clients import ensure_topics, new_client, wait_for_broker
from lambdalake.logs import get_logger
from lambdalake.settings import TOPICS, Settings

log = get_logger(__name__)

PRODUCER_CONFIG: dict[str, Any] = {
    "batch_size": 1 << 20,
    "linger_ms": 30,
    "metrics_enabled": False,
    "compression_type": None,  # lz4/zstd cost more CPU here than they save on loopback
    "request_timeout_ms": 30_000,
}
CONNECT_TIMEOUT_S = 15.0
FLUSH_TIMEOUT_S = 120.0
FIRST_DAY = date(2000, 1, 1)  # the contract rejects event times before 2000
LAST_DAY = date(2099, 12, 31)
LIVE_TICK_S = 0.05
CHANGES_STREAM = 13  # seed stream of the live catalog changes
# Every topic the generator writes: events, then reference data (main's TOPICS may list
# the reference topics too; each is named once).
GENERATED_TOPICS = tuple(dict.fromkeys(TOPICS + REFERENCE_TOPICS))
SMALL_HISTORY_MESSAGES = 300_000  # below this, starting a second process is not worth it
MAX_PROCESSES = 2


class _Sender:
    """One producer; picks partitions by key and remembers the first delivery error."""

    def __init__(self, settings: Settings, share: tuple[int, int] = (0, 1)) -> None:
        """``share = (i, n)``: send only the messages of partitions ``p`` with ``p % n == i``."""
        self.bootstrap = settings.bootstrap
        self.share = share
        max_request = max(1 << 20, 2 * settings.max_event_bytes)
        try:
            self.producer = new_client(
                KafkaProducer,
                bootstrap_servers=self.bootstrap,
                max_request_size=max_request,
                **settings.kafka_security,
                **PRODUCER_CONFIG,
            )
        except KafkaError as exc:
            raise Unreachable(f"could not connect a producer to {self.bootstrap}: {exc}") from exc
        self._partitions = {t: sorted(self._partitions_for(t)) for t in GENERATED_TOPICS}
        self._by_key: dict[tuple[str, bytes], int] = {}
        self.failed = 0
        self.first_error: BaseException | None = None

    def _partitions_for(self, topic: str) -> set[int]:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                parts = self.producer.partitions_for(topic)
            except KafkaTimeoutError:
                parts = None
            if parts:
                return set(parts)
            if time.monotonic() > deadline:
                raise Unreachable(f"topic {topic!r} has no partitions on {self.bootstrap}")
            time.sleep(0.1)

    def _partition(self, topic: str, key: bytes) -> int:
        p = self._by_key.get((topic, key))
        if p is None:
            parts = self._partitions[topic]
            p = self._by_key[(topic, key)] = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
        return p

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1
        if self.first_error is None:
            self.first_error = exc

    def send(self, messages: list[Message]) -> int:
        """Send the messages of this sender's share; returns how many that was."""
        send, part, on_error = self.producer.send, self._partition, self._on_error
        mine, ways = self.share
        n = 0
        for topic, key, value in messages:
            p = part(topic, key)
            if p % ways == mine:
                send(topic, value=value, key=key, partition=p).add_errback(on_error)
                n += 1
        if self.first_error is not None:
            self._raise()
        return n

    def _raise(self) -> None:
        raise Unreachable(
            f"{self.failed} message(s) were not delivered to {self.bootstrap}: "
            f"{type(self.first_error).__name__}: {self.first_error}"
        )

    def close(self) -> None:
        """Flush everything (raising if any message was not delivered) and close."""
        try:
            self.producer.flush(timeout=FLUSH_TIMEOUT_S)
        except KafkaTimeoutError as exc:
            raise Unreachable(
                f"messages were not acknowledged by {self.bootstrap} within {FLUSH_TIMEOUT_S:.0f} s"
            ) from exc
        finally:
            self.producer.close(timeout=5)
        if self.first_error is not None:
            self._raise()


def _connect(settings: Settings) -> _Sender:
    security = settings.kafka_security
    wait_for_broker(settings.bootstrap, timeout=CONNECT_TIMEOUT_S, security=security)
    ensure_topics(settings.bootstrap, GENERATED_TOPICS, settings.partitions, security=security)
    return _Sender(settings)


def history_window(days: int, end_date: str | None) -> tuple[date, date]:
    """``(first_day, last_day)`` of a history ending on ``end_date`` (default yesterday, UTC)."""
    if days < 1:
        raise InvalidInput(f"--days must be at least 1, got {days}")
    if end_date is None:
        last = datetime.now(UTC).date() - timedelta(days=1)
    else:
        try:
            last = date.fromisoformat(end_date)
        except ValueError:
            raise InvalidInput(f"--end-date must be a date YYYY-MM-DD, got {end_date!r}") from None
    first = last - timedelta(days=days - 1)
    if first < FIRST_DAY or last > LAST_DAY:
        raise InvalidInput(
            f"history {first}..{last} is outside {FIRST_DAY}..{LAST_DAY} (event times the "
            "contract accepts); use fewer --days or another --end-date"
        )
    return first, last


def _check_sizes(skus: int, stores: int) -> None:
    if skus < 1 or stores < 1:
        raise InvalidInput(f"--skus and --stores must be at least 1, got {skus} and {stores}")


def _history_share(
    settings: Settings,
    seed: int,
    skus: int,
    stores: int,
    first: date,
    days: int,
    fractions: Fractions,
    share: tuple[int, int],
    bar: tqdm | None = None,
) -> tuple[Counts, int]:
    """Generate the whole history and send one share of its partitions.

    Every share generates the same (deterministic) stream, so per-partition order
    is the stream's order whichever process sends it. Returns the stream's counts
    and the number of messages this share sent.
    """
    catalog = make_catalog(seed, skus, stores)
    sender = _Sender(settings, share)
    counts = Counts()
    sent = 0
    try:
        for batch in history(catalog, first, days, fractions, settings.max_event_bytes, counts):
            if batch.reference:
                continue  # the catalog: sent (and acknowledged) by run_history before any share
            sent += sender.send(batch.messages)
            if bar is not None and batch.day is not None:
                bar.update(1)
                bar.set_postfix(sent=sent, refresh=False)
    finally:
        sender.close()
    return counts, sent


def history_processes(settings: Settings, expected_messages: float) -> int:
    """How many processes send a history: one for small runs, else up to 2 (by CPUs).

    kafka-python spends ~30-60 us of Python per record, so the send dominates;
    a second process sending half of the partitions nearly halves a large run.
    """
    if expected_messages < SMALL_HISTORY_MESSAGES:
        return 1
    return max(1, min(MAX_PROCESSES, os.cpu_count() or 1, settings.partitions))


def run_history(
    settings: Settings,
    *,
    days: int,
    skus: int,
    stores: int,
    seed: int,
    end_date: str | None,
    late_fraction: float,
    duplicate_fraction: float,
    bad_fraction: float,
    processes: int | None = None,
) -> dict[str, int]:
    """Produce ``days`` days of history ending on ``end_date`` (default yesterday, UTC).

    Deterministic: the same arguments and seed send the same messages (keys and
    values, byte for byte, in the same order per partition). ``processes``
    (default: :func:`history_processes`) split the partitions between processes.
    Returns the counts of messages sent: ``{"orders", "reviews", "duplicates", "bad"}``.
    """
    first, last = history_window(days, end_date)
    _check_sizes(skus, stores)
    fractions = Fractions(late_fraction, duplicate_fraction, bad_fraction)
    catalog = make_catalog(seed, skus, stores)
    # The catalog first, acknowledged before any order is sent (by any process).
    sender = _connect(settings)
    try:
        reference = sender.send(catalog_messages(catalog))
    finally:
        sender.close()
    if processes is None:
        window = [first + timedelta(days=k) for k in range(days)]
        expected = float(expected_lines(catalog, window).sum()) * (1 + REVIEW_RATE)
        processes = history_processes(settings, expected)
    log.info(
        "generate.history.start",
        bootstrap=settings.bootstrap,
        first_day=str(first),
        last_day=str(last),
        skus=skus,
        stores=stores,
        seed=seed,
        processes=processes,
    )
    started = time.perf_counter()
    args = (settings, seed, skus, stores, first, days, fractions)
    with (
        ProcessPoolExecutor(processes - 1, mp_context=get_context("spawn"))
        if processes > 1
        else nullcontext()
    ) as pool:
        others = (
            [pool.submit(_history_share, *args, (i, processes)) for i in range(1, processes)]
            if pool is not None  # one process: no pool
            else []
        )
        with tqdm(total=days, unit="day", desc="history", file=sys.stderr, mininterval=0.5) as bar:
            counts, sent = _history_share(*args, (0, processes), bar)
        sent += sum(f.result()[1] for f in others) + reference
    seconds = time.perf_counter() - started
    log.info(
        "generate.history.done",
        **counts.as_dict(),
        messages=sent,
        seconds=round(seconds, 2),
        messages_per_s=round(sent / seconds) if seconds > 0 else None,
    )
    return counts.as_dict()


def run_live(
    settings: Settings,
    *,
    rate: float | None,
    duration: float | None,
    skus: int,
    stores: int,
    seed: int,
    late_fraction: float,
    duplicate_fraction: float,
    bad_fraction: float,
    stop: threading.Event,
    anomalies: bool = True,
    backfill: bool = True,
    changes: ChangeRates | None = None,
) -> dict[str, int]:
    """Produce live orders and reviews, timed now, and live changes to the catalog.

    ``rate=None`` (the default): the demand model's own day (:meth:`LiveStream.replay`),
    each event sent once its event time has come, so the live day looks like a history day;
    with ``anomalies``, the day's injected bursts too (:func:`generator.model.anomalies`);
    with ``backfill``, the day so far (from midnight UTC) is sent first, so today's totals
    are whole (its events have the ids a restart sends again: they count once).
    ``rate`` (events per second, for load tests): that many valid events per second drawn
    with today's demand mix (:meth:`LiveStream.batch`), no anomalies.

    Runs for ``duration`` seconds (``None``: until ``stop`` is set), sending every ~50 ms
    what is due; duplicates and bad messages come on top as fractions of the valid events.
    ``changes`` (default :class:`ChangeRates`) renames, re-categorises and moves. Held-back
    duplicate copies are sent and everything is flushed before returning the counts.
    """
    if rate is not None and not rate > 0:
        raise InvalidInput(f"--rate must be positive, got {rate}")
    if duration is not None and duration < 0:
        raise InvalidInput(f"--duration must not be negative, got {duration}")
    _check_sizes(skus, stores)
    fractions = Fractions(late_fraction, duplicate_fraction, bad_fraction)
    catalog = make_catalog(seed, skus, stores)
    sender = _connect(settings)
    entropy = time.time_ns()
    stream = LiveStream(
        catalog, fractions, settings.max_event_bytes, entropy=entropy, anomalies=anomalies
    )
    catalog_changes = CatalogChanges(
        catalog,
        changes or ChangeRates(),
        np.random.default_rng([seed, CHANGES_STREAM, entropy]),
        stream.counts,
    )
    now_ms = time.time_ns() // 1_000_000
    mode = "model" if rate is None else "rate"
    log.info(
        "generate.live.start",
        bootstrap=settings.bootstrap,
        mode=mode,
        rate=rate,
        duration=duration,
        expected_events_today=None if rate is not None else _expected_today(stream, now_ms),
    )
    if rate is None and anomalies:
        bursts = stream.day_plan(_day_of(now_ms))[2]
        for a in bursts:
            log.info(
                "generate.live.anomaly",
                sku=catalog.sku[a.sku_idx],
                store_id=catalog.store_id[a.store_idx],
                start=_iso(a.start_ms),
                end=_iso(a.end_ms),
                lines=a.lines,
                factor=round(a.factor, 2),
            )
        out = stockout(catalog, _day_of(now_ms), bursts=bursts)
        log.info(
            "generate.live.stockout",
            sku=catalog.sku[out.sku_idx],
            store_id=catalog.store_id[out.store_idx],
            start=_iso(out.start_ms),
        )
    started = time.monotonic()
    # The model's day starts at midnight (backfill) or now; a --rate run starts now.
    last_ms = (now_ms - now_ms % DAY_MS) if (rate is None and backfill) else now_ms
    owed_cap = max(1, int(rate or 1))  # never catch up more than a second of events at once
    sent = 0
    behind_logged = False
    try:
        while True:
            now = time.monotonic()
            elapsed = now - started
            final = stop.is_set() or (duration is not None and elapsed >= duration)
            if duration is not None:
                elapsed = min(elapsed, duration)
            now_ms = time.time_ns() // 1_000_000
            if rate is None:
                sender.send(stream.replay(last_ms, now_ms, now))
                last_ms = now_ms
            else:
                owed = int(rate * elapsed) - sent
                if owed > owed_cap:
                    if not behind_logged:
                        log.warning("generate.live.behind", owed=owed, rate=rate)
                        behind_logged = True
                    sent += owed - owed_cap  # skip what cannot be caught up
                    owed = owed_cap
                if owed > 0:
                    sender.send(stream.batch(owed, last_ms, now_ms, now))
                    last_ms = now_ms
                    sent += owed
            sender.send(catalog_changes.due(elapsed))
            if final:
                break
            stop.wait(LIVE_TICK_S)
        sender.send(stream.drain())
    finally:
        sender.close()
    counts = stream.counts.as_dict()
    log.info("generate.live.done", **counts, seconds=round(time.monotonic() - started, 2))
    return counts


def _day_of(ms: int) -> date:
    return date(1970, 1, 1) + timedelta(days=ms // DAY_MS)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _expected_today(stream: LiveStream, now_ms: int) -> dict[str, int]:
    """What the model's day holds: order lines (anomalies included) and reviews."""
    orders, reviews, _ = stream.day_plan(_day_of(now_ms))
    return {"orders": len(orders), "reviews": len(reviews)}
