"""From model events to the message sequence to send: serialisation, late events,
duplicate deliveries and bad messages. Pure (no Kafka): the same arguments give
the same messages, byte for byte, in the same order.

Exact fractions: after ``n`` valid events have been generated, exactly
``floor(f * n + 1/2)`` of them have been picked (late, duplicated) or added (bad)
for a fraction ``f`` (:class:`Quota`); ``f = 0`` picks none. Late events and
duplicate copies scheduled past the end of a history are sent after its last
day, so every picked event is sent and the totals are exact.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import orjson

from generator import model
from generator.faults import bad_message
from generator.model import DAY_MS, Catalog, DayEvents
from lambdalake.errors import InvalidInput

# (topic, key, value); a ``None`` value is a tombstone (one of the bad kinds).
Message = tuple[str, bytes, bytes | None]

PLAN_STREAM = 11  # seed stream of the late/duplicate/bad draws of a history day
LIVE_STREAM = 12
SOON_DUPLICATE_SHARE = 0.7  # the rest arrive days (history) or seconds (live) later
SOON_GAP_MESSAGES = 200  # a "soon" copy follows its original within this many messages
LATE_MAX_DAYS = 30
LATER_DUPLICATE_MAX_DAYS = 60
LIVE_LATER_DUPLICATE_S = (5.0, 60.0)


@dataclass(frozen=True)
class Fractions:
    """Shares of the valid events: sent late, sent twice, and bad messages added."""

    late: float = 0.0
    duplicate: float = 0.0
    bad: float = 0.0

    def __post_init__(self) -> None:
        for name in ("late", "duplicate", "bad"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0) or math.isnan(v):
                raise InvalidInput(f"{name}_fraction must be between 0 and 1, got {v}")


class Quota:
    """Exact running count: after ``n`` events, ``floor(fraction * n + 1/2)`` taken."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.seen = 0
        self.taken = 0

    def take(self, n_new: int) -> int:
        """How many of the ``n_new`` events just seen to pick (never more than ``n_new``)."""
        self.seen += n_new
        target = math.floor(self.fraction * self.seen + 0.5)
        k = max(0, min(n_new, target - self.taken))
        self.taken += k
        return k


@dataclass
class Counts:
    """Messages sent: valid distinct orders and reviews, re-sent copies, bad messages."""

    orders: int = 0
    reviews: int = 0
    duplicates: int = 0
    bad: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "orders": self.orders,
            "reviews": self.reviews,
            "duplicates": self.duplicates,
            "bad": self.bad,
        }


@dataclass
class Batch:
    """The messages of one history day (``day`` is ``None`` for the final tail)."""

    day: date | None
    messages: list[Message]


@dataclass
class _Valid:
    """A day's (or a live tick's) valid events in send order, with what bad messages need."""

    messages: list[Message]
    times: np.ndarray  # epoch ms as sent (the send order key)
    events: list[dict[str, object]]


def serialise(catalog: Catalog, orders: model.OrderLines, reviews: model.Reviews) -> _Valid:
    """Orders and reviews as messages, merged in event-time order (orders first on ties)."""
    od = model.order_dicts(catalog, orders)
    rd = model.review_dicts(catalog, reviews)
    skus = [s.encode() for s in catalog.sku]
    msgs: list[Message] = [
        ("orders", skus[s], orjson.dumps(d))
        for s, d in zip(orders.sku_idx.tolist(), od, strict=True)
    ]
    msgs += [
        ("reviews", skus[s], orjson.dumps(d))
        for s, d in zip(reviews.sku_idx.tolist(), rd, strict=True)
    ]
    times = np.concatenate([orders.time_ms, reviews.time_ms]).astype(np.int64)
    order = np.argsort(times, kind="stable").tolist()
    events = od + rd
    return _Valid([msgs[i] for i in order], times[order], [events[i] for i in order])


def _bad(
    valid: _Valid,
    n_bad: int,
    first_index: int,
    rng: np.random.Generator,
    rnd: random.Random,
    max_event_bytes: int,
) -> list[Message]:
    """``n_bad`` bad messages, each derived from a random valid event (with a new id)."""
    out: list[Message] = []
    if n_bad == 0 or not valid.messages:
        return out
    src = rng.integers(len(valid.messages), size=n_bad).tolist()
    ids = model.uuids(rng, n_bad)
    for k, (j, new_id) in enumerate(zip(src, ids, strict=True)):
        topic, key, _ = valid.messages[j]
        event = dict(valid.events[j])
        event["event_id" if topic == "orders" else "review_id"] = new_id
        out.append((topic, key, bad_message(first_index + k, topic, event, rnd, max_event_bytes)))
    return out


def _assemble(kept: list[Message], extras: list[tuple[float, Message]]) -> list[Message]:
    """``kept`` at positions 0..m-1 and each extra at its (fractional) position."""
    if not extras:
        return kept
    pos = np.concatenate([np.arange(len(kept), dtype=float), [p for p, _ in extras]])
    allm = kept + [m for _, m in extras]
    return [allm[i] for i in np.argsort(pos, kind="stable").tolist()]


def history(
    catalog: Catalog,
    first_day: date,
    days: int,
    fractions: Fractions,
    max_event_bytes: int,
    counts: Counts,
) -> Iterator[Batch]:
    """The messages of ``days`` days from ``first_day``, day by day, in event-time order.

    Exceptions to the order are deliberate: a late event (1-30 days, mostly a
    few) is sent when the stream reaches its event time plus the delay; a
    duplicate copy is sent within the next ~200 messages (70 %) or 1-60 days
    later at the same time of day; bad messages sit at random positions. What
    falls past the last day is sent in a final tail batch (``day=None``).
    ``counts`` is updated as batches are yielded.
    """
    day_list = [first_day + timedelta(days=k) for k in range(days)]
    expected = model.expected_lines(catalog, day_list)
    discount = model.promo_discount(catalog, day_list)
    late_q, dup_q, bad_q = Quota(fractions.late), Quota(fractions.duplicate), Quota(fractions.bad)
    # day index -> (time at which the stream reaches it, message), in scheduling order
    pending: dict[int, list[tuple[int, Message]]] = {}

    def schedule(day_index: int, at_ms: int, msg: Message) -> None:
        pending.setdefault(day_index, []).append((at_ms, msg))

    for k, day in enumerate(day_list):
        ev: DayEvents = model.generate_day(catalog, day, expected[k], discount[k])
        valid = serialise(catalog, ev.orders, ev.reviews)
        n = len(valid.messages)
        counts.orders += len(ev.orders)
        counts.reviews += len(ev.reviews)
        rng = model.day_rng(catalog.seed, day, PLAN_STREAM)
        times = valid.times.tolist()

        n_late = late_q.take(n)
        late_idx = rng.choice(n, size=n_late, replace=False).tolist() if n_late else []
        delays = np.minimum(rng.geometric(0.25, size=n_late), LATE_MAX_DAYS).tolist()
        late_delay = dict(zip(late_idx, delays, strict=True))
        for j, d in late_delay.items():
            schedule(k + d, times[j] + d * DAY_MS, valid.messages[j])
        is_late = np.zeros(n, dtype=bool)
        is_late[late_idx] = True
        kept_pos = (np.cumsum(~is_late) - 1).tolist()
        kept = [m for m, late in zip(valid.messages, is_late.tolist(), strict=True) if not late]
        kept_times = valid.times[~is_late]
        extras: list[tuple[float, Message]] = []

        n_dup = dup_q.take(n)
        dup_idx = rng.choice(n, size=n_dup, replace=False).tolist() if n_dup else []
        soon = (rng.random(n_dup) < SOON_DUPLICATE_SHARE).tolist()
        gaps = rng.integers(1, SOON_GAP_MESSAGES, size=n_dup).tolist()
        later = rng.integers(1, LATER_DUPLICATE_MAX_DAYS + 1, size=n_dup).tolist()
        for j, s, g, d in zip(dup_idx, soon, gaps, later, strict=True):
            msg = valid.messages[j]
            if j in late_delay:  # the copy travels with its late original, right after it
                d = late_delay[j]
                schedule(k + d, times[j] + d * DAY_MS, msg)
            elif s:
                extras.append((min(kept_pos[j] + g + 0.5, len(kept) - 0.5), msg))
            else:
                schedule(k + d, times[j] + d * DAY_MS, msg)
        counts.duplicates += n_dup

        n_bad = bad_q.take(n)
        rnd = random.Random(int(rng.integers(2**62)))
        bad = _bad(valid, n_bad, counts.bad, rng, rnd, max_event_bytes)
        spots = rng.uniform(-0.5, len(kept) - 0.5, size=len(bad)).tolist()
        extras += list(zip(spots, bad, strict=True))
        counts.bad += len(bad)

        for at_ms, msg in pending.pop(k, []):
            # After every kept event at or before the time the stream reaches it.
            extras.append((float(np.searchsorted(kept_times, at_ms, side="right")) - 0.25, msg))
        yield Batch(day, _assemble(kept, extras))

    tail = [msg for k in sorted(pending) for _, msg in pending[k]]
    yield Batch(None, tail)


class LiveStream:
    """Live events, a batch at a time: event times are the batch's wall-clock span.

    ``entropy`` (e.g. the start time in ns) keeps the ids of two live runs with the
    same seed apart; the catalog (SKUs, prices, stores) still comes from the seed.
    Late events carry an event time 1-30 days back; duplicate copies follow within
    the batch (70 %) or are held 5-60 s; :meth:`drain` returns those still held.
    """

    def __init__(
        self, catalog: Catalog, fractions: Fractions, max_event_bytes: int, entropy: int
    ) -> None:
        self.catalog = catalog
        self.max_event_bytes = max_event_bytes
        self.rng = np.random.default_rng([catalog.seed, LIVE_STREAM, entropy])
        self.rnd = random.Random(int(self.rng.integers(2**62)))
        self.late_q = Quota(fractions.late)
        self.dup_q = Quota(fractions.duplicate)
        self.bad_q = Quota(fractions.bad)
        self.counts = Counts()
        self._held: list[tuple[float, int, Message]] = []
        self._seq = 0
        self._day: date | None = None
        self._p = np.zeros(0)
        self._discount = np.zeros(0)

    def _today(self, day: date) -> None:
        if day != self._day:
            lam = model.expected_lines(self.catalog, [day])[0].ravel()
            self._p = lam / lam.sum()
            self._discount = model.promo_discount(self.catalog, [day])[0]
            self._day = day

    def batch(self, n: int, start_ms: int, end_ms: int, now: float) -> list[Message]:
        """``n`` valid events timed in ``[start_ms, end_ms)`` plus the extras due at ``now``
        (a monotonic clock reading, in seconds)."""
        rng, cat = self.rng, self.catalog
        day = date(1970, 1, 1) + timedelta(days=int(end_ms // DAY_MS))
        self._today(day)
        n_rev = int(rng.binomial(n, model.REVIEW_RATE / (1 + model.REVIEW_RATE)))
        n_ord = n - n_rev
        flat = rng.choice(len(self._p), size=n, p=self._p)
        sku_idx, store_idx = np.divmod(flat, cat.n_stores)
        times = np.sort(rng.integers(start_ms, max(start_ms + 1, end_ms), size=n))
        n_late = self.late_q.take(n)
        if n_late:
            late = rng.choice(n, size=n_late, replace=False)
            times[late] -= rng.integers(DAY_MS, LATE_MAX_DAYS * DAY_MS, size=n_late)
        # Orders and reviews interleave at random positions of the batch.
        is_rev = np.zeros(n, dtype=bool)
        is_rev[rng.choice(n, size=n_rev, replace=False)] = True
        lines = model.order_lines(
            cat, day, sku_idx[~is_rev], store_idx[~is_rev], times[~is_rev], rng, self._discount
        )
        revs = model.reviews(cat, sku_idx[is_rev], store_idx[is_rev], times[is_rev], rng)
        od = model.order_dicts(cat, lines)
        rd = model.review_dicts(cat, revs)
        skus = [s.encode() for s in cat.sku]
        oi, ri = (
            iter(zip(lines.sku_idx.tolist(), od, strict=True)),
            iter(zip(revs.sku_idx.tolist(), rd, strict=True)),
        )
        msgs: list[Message] = []
        events: list[dict[str, object]] = []
        for r in is_rev.tolist():
            s, d = next(ri) if r else next(oi)
            msgs.append(("reviews" if r else "orders", skus[s], orjson.dumps(d)))
            events.append(d)
        self.counts.orders += n_ord
        self.counts.reviews += n_rev
        extras: list[tuple[float, Message]] = []

        n_dup = self.dup_q.take(n)
        if n_dup:
            for j in rng.choice(n, size=n_dup, replace=False).tolist():
                if rng.random() < SOON_DUPLICATE_SHARE:
                    extras.append((j + float(rng.integers(1, SOON_GAP_MESSAGES)) + 0.5, msgs[j]))
                else:
                    at = now + float(rng.uniform(*LIVE_LATER_DUPLICATE_S))
                    heapq.heappush(self._held, (at, self._seq, msgs[j]))
                    self._seq += 1
            self.counts.duplicates += n_dup

        n_bad = self.bad_q.take(n)
        valid = _Valid(msgs, times, events)
        bad = _bad(valid, n_bad, self.counts.bad, rng, self.rnd, self.max_event_bytes)
        spots = rng.uniform(-0.5, n - 0.5, size=len(bad)).tolist()
        extras += list(zip(spots, bad, strict=True))
        self.counts.bad += len(bad)

        while self._held and self._held[0][0] <= now:
            extras.append((float(rng.uniform(-0.5, n)), heapq.heappop(self._held)[2]))
        return _assemble(msgs, extras)

    def drain(self) -> list[Message]:
        """The duplicate copies still held back, in release order (call once at the end)."""
        out = [m for _, _, m in sorted(self._held)]
        self._held.clear()
        return out
