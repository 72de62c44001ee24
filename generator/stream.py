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
from generator.text import CATEGORIES
from lambdalake.errors import InvalidInput

# (topic, key, value); a ``None`` value is a tombstone (one of the bad kinds).
Message = tuple[str, bytes, bytes | None]

# Reference data: the catalog, one message per SKU and per store, keyed by its id; the last
# message of a key wins. Sent before any order of a history; live sends changes.
PRODUCTS, STORES = "products", "stores"
REFERENCE_TOPICS = (PRODUCTS, STORES)

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
    """Messages sent: valid distinct orders and reviews, re-sent copies, bad messages, and
    reference messages (``products``, ``stores``: the catalog, or live changes to it)."""

    orders: int = 0
    reviews: int = 0
    duplicates: int = 0
    bad: int = 0
    products: int = 0
    stores: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "orders": self.orders,
            "reviews": self.reviews,
            "duplicates": self.duplicates,
            "bad": self.bad,
            "products": self.products,
            "stores": self.stores,
        }


def product_message(record: dict[str, object]) -> Message:
    return (PRODUCTS, str(record["sku"]).encode(), orjson.dumps(record))


def store_message(record: dict[str, object]) -> Message:
    return (STORES, str(record["store_id"]).encode(), orjson.dumps(record))


def catalog_messages(catalog: Catalog) -> list[Message]:
    """Every product, then every store, of ``catalog`` (their reference messages)."""
    return [product_message(model.product_record(catalog, i)) for i in range(catalog.n_skus)] + [
        store_message(model.store_record(catalog, j)) for j in range(catalog.n_stores)
    ]


@dataclass
class Batch:
    """The messages of one history day (``day`` is ``None`` for the catalog, which comes
    first with ``reference`` set, and for the final tail)."""

    day: date | None
    messages: list[Message]
    reference: bool = False


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

    The first batch (``day=None``) is the catalog: every ``products`` and ``stores``
    message, before any order. Exceptions to the order are deliberate: a late event (1-30 days, mostly a
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
    reference = catalog_messages(catalog)
    counts.products += catalog.n_skus
    counts.stores += catalog.n_stores
    yield Batch(None, reference, reference=True)

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


@dataclass(frozen=True)
class ChangeRates:
    """How often live changes the catalog (Poisson arrivals, per minute of wall clock)."""

    products_per_min: float = 2.0  # a rename or (one in four) a re-categorisation
    stores_per_min: float = 0.1  # a store moved to another region

    def __post_init__(self) -> None:
        for name in ("products_per_min", "stores_per_min"):
            v = getattr(self, name)
            if not (0.0 <= v <= 10_000.0) or math.isnan(v):
                raise InvalidInput(f"{name} must be between 0 and 10000, got {v}")


RECATEGORISE_SHARE = 0.25
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}


class CatalogChanges:
    """Live changes to the reference data, as full ``products``/``stores`` messages.

    A product change renames the SKU (its brand and product stay, the product line changes:
    "Kestrel Lite webcam" -> "Kestrel Pro webcam") or, one change in four, moves it to its
    category's related category (apparel -> sports, ...); a store change moves the store to
    another region. ``counts.products``/``counts.stores`` count the messages.
    """

    def __init__(
        self, catalog: Catalog, rates: ChangeRates, rng: np.random.Generator, counts: Counts
    ) -> None:
        self.catalog, self.rates, self.rng, self.counts = catalog, rates, rng, counts
        self.category = [catalog.category_name(i) for i in range(catalog.n_skus)]
        self.name = list(catalog.name)
        self.region = list(catalog.store_region)
        self._next_product = self._gap(rates.products_per_min)
        self._next_store = self._gap(rates.stores_per_min)

    def _gap(self, per_min: float) -> float:
        return math.inf if per_min <= 0 else float(self.rng.exponential(60.0 / per_min))

    def due(self, elapsed_s: float) -> list[Message]:
        """The changes due by ``elapsed_s`` seconds since the start, in order."""
        out: list[Message] = []
        while self._next_product <= elapsed_s:
            out.append(self._product_change())
            self._next_product += self._gap(self.rates.products_per_min)
        while self._next_store <= elapsed_s:
            out.append(self._store_change())
            self._next_store += self._gap(self.rates.stores_per_min)
        return out

    def _product_change(self) -> Message:
        cat, rng = self.catalog, self.rng
        i = int(rng.integers(cat.n_skus))
        if rng.random() < RECATEGORISE_SHARE:
            self.category[i] = CATEGORY_BY_NAME[self.category[i]].related
        else:
            names = [f"{cat.brand[i]} {line} {cat.product[i]}" for line in model.PRODUCT_LINES]
            names = [n for n in names if n != self.name[i]]
            self.name[i] = names[int(rng.integers(len(names)))]
        self.counts.products += 1
        record = model.product_record(cat, i)
        return product_message({**record, "category": self.category[i], "name": self.name[i]})

    def _store_change(self) -> Message:
        j = int(self.rng.integers(self.catalog.n_stores))
        others = [r for r in model.REGIONS if r != self.region[j]]
        self.region[j] = others[int(self.rng.integers(len(others)))]
        self.counts.stores += 1
        return store_message({**model.store_record(self.catalog, j), "region": self.region[j]})


class LiveStream:
    """Live events, a batch at a time, in one of two modes.

    - :meth:`replay` (the default of ``generate live``): the demand model's own day, as a
      history would have it (:func:`model.generate_day` for the UTC day: the same events,
      ids included), plus the day's injected anomalies (:func:`model.anomalies`), each
      event sent once its event time has come. The rate is the model's for that hour.
    - :meth:`batch` (``--rate``, for benches): ``n`` events timed in the batch's wall-clock
      span, SKUs and stores drawn with today's demand mix, new ids each run.

    ``entropy`` (e.g. the start time in ns) keeps the ids of two ``--rate`` runs with the
    same seed apart, and seeds the fault draws; the catalog (SKUs, prices, stores) still
    comes from the seed. Late events carry an event time 1-30 days back; duplicate copies
    follow within the batch (70 %) or are held 5-60 s; :meth:`drain` returns those still held.
    """

    def __init__(
        self,
        catalog: Catalog,
        fractions: Fractions,
        max_event_bytes: int,
        entropy: int,
        *,
        anomalies: bool = True,
    ) -> None:
        self.catalog = catalog
        self.max_event_bytes = max_event_bytes
        self.anomalies = anomalies
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
        self._plans: dict[date, tuple[model.OrderLines, model.Reviews, list[model.Anomaly]]] = {}

    def _today(self, day: date) -> None:
        if day != self._day:
            lam = model.expected_lines(self.catalog, [day])[0].ravel()
            self._p = lam / lam.sum()
            self._discount = model.promo_discount(self.catalog, [day])[0]
            self._day = day

    def day_plan(self, day: date) -> tuple[model.OrderLines, model.Reviews, list[model.Anomaly]]:
        """The order lines (with the anomalies' when injected) and reviews of ``day``, each
        sorted by event time, and the day's anomalies."""
        plan = self._plans.get(day)
        if plan is None:
            ev = model.generate_day(self.catalog, day)
            found = model.anomalies(self.catalog, day, ev.expected) if self.anomalies else []
            orders = ev.orders
            if found:
                extra = model.anomaly_lines(self.catalog, day, found, ev.discount)
                orders = model.concat(orders, extra)
            if self.anomalies:  # and a stock-out: one busy series stops selling
                out = model.stockout(self.catalog, day, ev.expected, found)
                sold = ~(
                    (orders.sku_idx == out.sku_idx)
                    & (orders.store_idx == out.store_idx)
                    & (orders.time_ms >= out.start_ms)
                )
                orders = model.take(orders, np.flatnonzero(sold))
            orders = model.take(orders, np.argsort(orders.time_ms, kind="stable"))
            revs = model.take(ev.reviews, np.argsort(ev.reviews.time_ms, kind="stable"))
            plan = self._plans[day] = (orders, revs, found)
            for d in [d for d in self._plans if d < day - timedelta(days=1)]:
                del self._plans[d]
        return plan

    def replay(self, start_ms: int, end_ms: int, now: float) -> list[Message]:
        """The model's events with event time in ``[start_ms, end_ms)`` (any days), with late
        events, duplicates and bad messages by the fractions, plus the extras due at ``now``."""
        out: list[Message] = []
        day = date(1970, 1, 1) + timedelta(days=int(start_ms // DAY_MS))
        while True:
            day_start = (day.toordinal() - model.ORDINAL_1970) * DAY_MS
            if day_start >= end_ms:
                break
            orders, revs, _ = self.day_plan(day)
            lo, hi = max(start_ms, day_start), min(end_ms, day_start + DAY_MS)
            o = model.take(orders, np.arange(*np.searchsorted(orders.time_ms, [lo, hi])))
            r = model.take(revs, np.arange(*np.searchsorted(revs.time_ms, [lo, hi])))
            n = len(o) + len(r)
            n_late = self.late_q.take(n)
            if n_late:  # sent now, with an event time 1-30 days back (whole seconds)
                late = self.rng.choice(n, size=n_late, replace=False)
                back = self.rng.integers(DAY_MS // 1000, LATE_MAX_DAYS * DAY_MS // 1000, n_late)
                shift = np.zeros(n, dtype=np.int64)
                shift[late] = back * 1000
                o.time_ms = o.time_ms - shift[: len(o)]
                r.time_ms = r.time_ms - shift[len(o) :]
            if n:
                self.counts.orders += len(o)
                self.counts.reviews += len(r)
                out += self._with_faults(serialise(self.catalog, o, r), now)
            day += timedelta(days=1)
        return out + self._release(now)

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
        out = self._with_faults(_Valid(msgs, times, events), now)
        return out + self._release(now)

    def _with_faults(self, valid: _Valid, now: float) -> list[Message]:
        """``valid``'s messages with this share of duplicates (in place or held back) and bad
        messages added at random positions."""
        rng, msgs = self.rng, valid.messages
        n = len(msgs)
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
        bad = _bad(valid, n_bad, self.counts.bad, rng, self.rnd, self.max_event_bytes)
        spots = rng.uniform(-0.5, n - 0.5, size=len(bad)).tolist()
        extras += list(zip(spots, bad, strict=True))
        self.counts.bad += len(bad)
        return _assemble(msgs, extras)

    def _release(self, now: float) -> list[Message]:
        """Held-back duplicate copies due at ``now``."""
        due: list[Message] = []
        while self._held and self._held[0][0] <= now:
            due.append(heapq.heappop(self._held)[2])
        return due

    def drain(self) -> list[Message]:
        """The duplicate copies still held back, in release order (call once at the end)."""
        out = [m for _, _, m in sorted(self._held)]
        self._held.clear()
        return out
