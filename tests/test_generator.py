"""The event generator: realistic, deterministic, exact fractions, and fast enough.

Model properties are checked on the pure model (weekly seasonality, promotions,
ratings, text sentiment); the Kafka side against a real Tansu broker, comparing
the bytes that arrive with the pure stream's plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from generator import model
from generator.faults import KINDS
from generator.produce import GENERATED_TOPICS, run_history, run_live
from generator.stream import (
    REFERENCE_TOPICS,
    CatalogChanges,
    ChangeRates,
    Counts,
    Fractions,
    LiveStream,
    history,
)
from generator.text import CATEGORIES
from lambdalake.contract.events import EVENT_TOPICS as TOPICS  # the topics of events
from lambdalake.contract.validation import validate
from lambdalake.kafka.clients import end_offsets, ensure_topics, topic_partitions

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 256 * 1024


def plan(seed: int, skus: int, stores: int, first: date, days: int, fr: Fractions):
    counts = Counts()
    cat = model.make_catalog(seed, skus, stores)
    msgs = [m for b in history(cat, first, days, fr, MAX_BYTES, counts) for m in b.messages]
    return msgs, counts


def digest(msgs) -> str:
    h = hashlib.sha256()
    for topic, key, value in msgs:
        h.update(topic.encode() + b"\0" + key + b"\0" + (value or b"<null>") + b"\1")
    return h.hexdigest()


def event_ms(value: bytes) -> int:
    t = orjson.loads(value)["event_time"]
    if isinstance(t, int):
        return t
    return int(datetime.fromisoformat(t).timestamp() * 1000)


def generated_partitions(broker) -> list[TopicPartition]:
    """Every partition the generator writes, the reference topics created if still missing
    (the shared broker may not have them yet, and offsets are measured before a run)."""
    ensure_topics(broker.bootstrap, GENERATED_TOPICS, broker.partitions)
    return [TopicPartition(t, p) for t in GENERATED_TOPICS for p in range(broker.partitions)]


def consume(bootstrap: str, start: dict[TopicPartition, int] | None = None):
    """Every message of the generator's topics (events and reference data) from ``start``
    (default: the beginning) to the end:
    {(topic, partition): [(key, value, timestamp_ms), ...]} in offset order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(t, p) for t in GENERATED_TOPICS for p in topic_partitions(consumer, t)]
    ends = end_offsets(bootstrap, tps)
    consumer.assign(tps)
    out: dict[tuple[str, int], list] = {(tp.topic, tp.partition): [] for tp in tps}
    for tp in tps:
        consumer.seek(tp, (start or {}).get(tp, 0))
    deadline = time.monotonic() + 60
    pos = {tp: (start or {}).get(tp, 0) for tp in tps}
    while any(pos[tp] < ends[tp] for tp in tps) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500, max_records=50_000).items():
            for r in records:
                if r.offset < ends[tp]:
                    out[(tp.topic, tp.partition)].append((r.key, r.value, r.timestamp))
            if records:
                pos[tp] = records[-1].offset + 1
    consumer.close()
    return out


# The reference topics' contract (products, stores): required ids and names, optional text.
REFERENCE_FIELDS = {
    "products": {"sku": (True, 256), "category": (True, 256), "name": (False, 1000),
                 "brand": (False, 1000)},
    "stores": {"store_id": (True, 256), "region": (True, 256), "name": (False, 1000),
               "city": (False, 1000)},
}  # fmt: skip


def check_reference(topic: str, key: bytes, value: bytes) -> dict:
    """A reference message as the contract has it: keyed by its id, fields of the right size."""
    record = orjson.loads(value)
    spec = REFERENCE_FIELDS[topic]
    assert set(record) <= set(spec), record
    for name, (required, most) in spec.items():
        if required or name in record:
            assert isinstance(record[name], str) and 1 <= len(record[name]) <= most, record
    id_field = next(iter(spec))
    assert key == record[id_field].encode() and record[id_field] != "*"
    return record


def audit(messages: dict[tuple[str, int], list]) -> dict:
    """What arrived, judged by the contract: valid distinct, re-sent copies, bad, kinds, and
    the reference messages (each checked and counted)."""
    result: dict = {"orders": 0, "reviews": 0, "duplicates": 0, "bad": 0}
    result |= {"products": 0, "stores": 0}
    result["reasons"], result["valid"] = Counter(), []
    for (topic, _p), recs in messages.items():
        if topic in REFERENCE_TOPICS:
            for key, value, _ in recs:
                check_reference(topic, key, value)
            result[topic] += len(recs)
            continue
        values = [v for _, v, _ in recs]
        checked = validate(topic, values, [0] * len(values), list(range(len(values))))
        result["bad"] += checked.rejected.num_rows
        result["reasons"].update(checked.rejected.column("reason").to_pylist())
        bad_rows = set(checked.rejected.column("_offset").to_pylist())
        seen: set[bytes] = set()
        for i, v in enumerate(values):
            if i in bad_rows:
                continue
            if v in seen:
                result["duplicates"] += 1
            else:
                seen.add(v)
                result[topic] += 1
                result["valid"].append(v)
    return result


def late_events(recs: list, valid: set[bytes], slack_ms: int = 12 * 3_600_000) -> int:
    """Valid first-seen events more than ``slack_ms`` older than the newest one sent before."""
    newest, late, seen = -(2**62), 0, set()
    for _, v, _ in recs:
        if v in seen or v not in valid:
            continue
        seen.add(v)
        t = event_ms(v)
        if t < newest - slack_ms:
            late += 1
        newest = max(newest, t)
    return late


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes_in_any_process_and_another_seed_does_not() -> None:
    fr = Fractions(late=0.05, duplicate=0.05, bad=0.02)
    a, _ = plan(7, 12, 2, date(2025, 3, 1), 10, fr)
    b, _ = plan(7, 12, 2, date(2025, 3, 1), 10, fr)
    c, _ = plan(8, 12, 2, date(2025, 3, 1), 10, fr)
    assert a == b
    assert digest(a) != digest(c)
    # A fresh interpreter with another hash seed produces the very same bytes.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tests.test_generator import *; "
        "print(digest(plan(7, 12, 2, date(2025, 3, 1), 10, "
        "Fractions(late=0.05, duplicate=0.05, bad=0.02))[0]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert out.stdout.strip() == digest(a)


def test_a_days_events_do_not_depend_on_the_window() -> None:
    long, _ = plan(3, 10, 2, date(2025, 5, 1), 8, Fractions())
    short, _ = plan(3, 10, 2, date(2025, 5, 5), 4, Fractions())
    long, short = ([m for m in msgs if m[0] in TOPICS] for msgs in (long, short))
    tail = [m for m in long if event_ms(m[2]) >= datetime(2025, 5, 5, tzinfo=UTC).timestamp() * 1e3]
    assert tail == short and len(short) > 100


def test_history_is_in_event_time_order_except_the_late_events() -> None:
    for late in (0.0, 0.04):
        msgs, counts = plan(4, 15, 3, date(2025, 6, 1), 20, Fractions(late, 0.05, 0.02))
        msgs = [m for m in msgs if m[0] in TOPICS]
        by_topic: dict[tuple[str, int], list] = defaultdict(list)
        for topic, key, value in msgs:
            by_topic[(topic, 0)].append((key, value, 0))
        valid = set(audit(by_topic)["valid"])
        in_order = [(k, v, 0) for _, k, v in msgs]
        n = counts.orders + counts.reviews
        if late == 0:
            assert late_events(in_order, valid, slack_ms=0) == 0
        else:
            # All late events but those of the last days, whose delay runs past the end.
            assert 0.9 * late * n <= late_events(in_order, valid) <= int(late * n + 0.5)


# --- the realism of the model --------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_weeks():
    """Eight weeks of spring (no holiday) for 60 SKUs in 4 stores."""
    cat = model.make_catalog(11, 60, 4)
    days = [date(2025, 3, 3) + timedelta(days=k) for k in range(56)]
    return cat, [model.generate_day(cat, d) for d in days]


def test_weekends_sell_clearly_more_than_weekdays(eight_weeks) -> None:
    _, evs = eight_weeks
    units = {ev.day: int(ev.orders.quantity.sum()) for ev in evs}
    weekend = np.mean([u for d, u in units.items() if d.weekday() >= 5])
    weekday = np.mean([u for d, u in units.items() if d.weekday() < 5])
    assert weekend > 1.25 * weekday


def test_promotions_lower_the_price_and_lift_demand(eight_weeks) -> None:
    cat, evs = eight_weeks
    lifts = []
    for s in range(cat.n_skus):
        promo = np.array([ev.discount[s] > 0 for ev in evs])
        units = np.array([ev.orders.quantity[ev.orders.sku_idx == s].sum() for ev in evs])
        if 3 <= promo.sum() <= len(evs) - 3 and units.sum() > 50:
            lifts.append(units[promo].mean() / max(units[~promo].mean(), 1e-9))
        for ev in evs:
            prices = ev.orders.unit_price[ev.orders.sku_idx == s]
            if len(prices):
                expected = round(cat.base_price[s] * (1 - ev.discount[s]), 2)
                assert np.allclose(prices, expected)
    assert len(lifts) >= 10
    assert np.median(lifts) > 1.4


def test_demand_is_long_tailed_with_returns_and_sensible_volume(eight_weeks) -> None:
    cat, evs = eight_weeks
    lines = np.zeros((len(evs), cat.n_skus, cat.n_stores))
    for k, ev in enumerate(evs):
        np.add.at(lines[k], (ev.orders.sku_idx, ev.orders.store_idx), 1)
    selling_days = (lines > 0).mean(axis=0)  # share of days a (sku, store) sells
    assert (selling_days < 0.5).mean() > 0.15  # intermittent sellers
    per_sku = np.sort(lines.sum(axis=(0, 2)))[::-1]
    assert per_sku[: cat.n_skus // 10].sum() > 0.3 * per_sku.sum()  # a few SKUs dominate
    q = np.concatenate([ev.orders.quantity for ev in evs])
    assert 0.01 < (q < 0).mean() < 0.08 and (q != 0).all()
    # Defaults (1 year x 100 SKUs x 5 stores) expect 1-2 M order lines.
    big = model.make_catalog(42, 100, 5)
    year = [date(2025, 1, 1) + timedelta(days=k) for k in range(365)]
    assert 1_000_000 < model.expected_lines(big, year).sum() < 2_000_000
    n_reviews = sum(len(ev.reviews) for ev in evs)
    assert 20 < len(q) / n_reviews < 40


def test_holidays_lift_black_friday_and_the_christmas_run_up() -> None:
    cat = model.make_catalog(5, 30, 2)
    days = [date(2025, 11, 14), date(2025, 11, 28), date(2025, 12, 20), date(2025, 12, 25)]
    per_day = model.expected_lines(cat, days).sum(axis=(1, 2))
    plain, black_friday, run_up, christmas = per_day
    assert black_friday > 1.8 * plain and run_up > 1.2 * plain and christmas < 0.5 * plain


def test_event_times_use_every_format_and_mean_the_model_time() -> None:
    cat = model.make_catalog(2, 20, 6)
    ev = model.generate_day(cat, date(2025, 7, 1))
    times = [d["event_time"] for d in model.order_dicts(cat, ev.orders)]
    assert [event_ms(orjson.dumps({"event_time": t})) for t in times] == ev.orders.time_ms.tolist()
    kinds = Counter(
        "epoch_ms" if isinstance(t, int) else "Z" if t.endswith("Z") else t[-6:] for t in times
    )
    assert {"epoch_ms", "Z", "+01:00", "-05:00"} <= set(kinds)
    assert any(isinstance(t, str) and len(t) == 25 for t in times)  # to the second
    assert 0.8 < sum("currency" in d for d in model.order_dicts(cat, ev.orders)) / len(times) < 1


def test_ratings_follow_quality_and_text_sentiment_follows_ratings_loosely() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    cat = model.make_catalog(9, 40, 2)
    rng = np.random.default_rng(0)
    sku = rng.integers(0, cat.n_skus, 3000)
    revs = model.reviews(cat, sku, sku % 2, np.full(3000, 1_750_000_000_000), rng)
    means = np.array([revs.rating[sku == s].mean() for s in range(cat.n_skus)])
    assert np.corrcoef(means, cat.quality)[0, 1] > 0.8
    assert means.max() - means.min() > 1.0
    assert set(revs.rating.tolist()) == {1, 2, 3, 4, 5}

    vader = SentimentIntensityAnalyzer()
    compound = np.array([vader.polarity_scores(t)["compound"] for t in revs.text])
    r = np.corrcoef(compound, revs.rating)[0, 1]
    assert 0.3 < r < 0.95, r
    texts = [t.lower() for t in revs.text]
    high = [t for t, x in zip(texts, revs.rating, strict=True) if x >= 4]
    low = [t for t, x in zip(texts, revs.rating, strict=True) if x <= 2]
    assert any("not bad" in t or "can't complain" in t for t in high)  # positive negations
    assert any("not worth" in t or "would not" in t for t in low)  # negative negations
    assert any(" but " in t for t in low) and any(" but " in t for t in high)  # mixed
    assert max(len(t) for t in revs.text) <= 20_000
    assert 0.6 < sum(t is not None for t in revs.title) / len(revs.title) < 0.95


# --- the catalog (reference data) --------------------------------------------------------------


def test_the_catalog_names_every_sku_and_store_consistently_and_deterministically() -> None:
    cat = model.make_catalog(21, 40, 12)
    again = model.make_catalog(21, 40, 12)
    records = [model.product_record(cat, i) for i in range(cat.n_skus)]
    stores = [model.store_record(cat, j) for j in range(cat.n_stores)]
    assert records == [model.product_record(again, i) for i in range(40)]
    assert stores == [model.store_record(again, j) for j in range(12)]
    # SKU i is the same SKU whatever the catalog size; another seed names SKUs otherwise.
    small = model.make_catalog(21, 5, 2)
    assert [model.product_record(small, i) for i in range(5)] == records[:5]
    other = model.make_catalog(22, 40, 12)
    assert [model.product_record(other, i)["name"] for i in range(40)] != [
        r["name"] for r in records
    ]
    for i, r in enumerate(records):
        spec = CATEGORIES[int(cat.category[i])]
        # The category the orders' demand and review vocabulary come from, by name.
        assert r["category"] == spec.name
        assert r["brand"] in spec.brands
        line = r["name"].removeprefix(r["brand"] + " ").removesuffix(" " + cat.product[i])
        assert line in model.PRODUCT_LINES, r
        assert cat.product[i] in spec.products
        check_reference("products", r["sku"].encode(), orjson.dumps(r))
    assert len({r["name"] for r in records}) > 30
    for j, r in enumerate(stores):
        check_reference("stores", r["store_id"].encode(), orjson.dumps(r))
        assert r["region"] in model.REGIONS and r["city"] in r["name"]
        # The city is in the store's time zone: event times are written in its offset.
        k = j % len(model.STORE_OFFSETS_MIN)
        assert r["city"] in model.STORE_CITIES[k] and r["region"] == model.STORE_REGIONS[k]
    assert 4 <= len({r["region"] for r in stores}) <= 6
    assert len({r["name"] for r in stores}) == 12


def test_categories_have_distinct_demand_and_price_levels() -> None:
    cat = model.make_catalog(3, 1600, 1)
    by_cat = {c.name: np.flatnonzero(cat.category == k) for k, c in enumerate(CATEGORIES)}
    median_pop = {n: float(np.median(cat.popularity[ix])) for n, ix in by_cat.items()}
    median_price = {n: float(np.median(cat.base_price[ix])) for n, ix in by_cat.items()}
    # The busiest category sells clearly more than the quietest, in the order the levels say.
    spec = {c.name: c for c in CATEGORIES}
    assert median_pop["beauty"] > 2 * median_pop["outdoor"]
    levels = [spec[n].demand for n in median_pop]
    assert np.corrcoef(np.log(levels), np.log(list(median_pop.values())))[0, 1] > 0.8
    assert median_price["outdoor"] > 3 * median_price["beauty"]
    prices = [spec[n].median_price for n in median_price]
    assert np.corrcoef(prices, list(median_price.values()))[0, 1] > 0.95
    # The levels average 1: the volume the other tests expect stays.
    assert np.mean([c.demand for c in CATEGORIES]) == pytest.approx(1.0)


def test_history_sends_the_whole_catalog_before_any_order() -> None:
    msgs, counts = plan(6, 25, 4, date(2025, 4, 1), 3, Fractions(0.05, 0.05, 0.01))
    topics = [t for t, _, _ in msgs]
    first_event = min(topics.index("orders"), topics.index("reviews"))
    reference = msgs[:first_event]
    assert [t for t, _, _ in reference] == ["products"] * 25 + ["stores"] * 4
    assert set(topics[first_event:]) == set(TOPICS)  # nothing of the catalog comes later
    cat = model.make_catalog(6, 25, 4)
    assert [orjson.loads(v) for _, _, v in reference] == [
        model.product_record(cat, i) for i in range(25)
    ] + [model.store_record(cat, j) for j in range(4)]
    # Every SKU and store an order names is in the catalog sent before it.
    skus = {k for t, k, _ in reference if t == "products"}
    stores = {orjson.loads(v)["store_id"] for t, _, v in reference if t == "stores"}
    for t, k, v in msgs[first_event:]:
        if t == "orders" and v is not None and k in skus:
            try:
                event = orjson.loads(v)
            except orjson.JSONDecodeError:
                continue  # a bad message
            if isinstance(event, dict) and isinstance(event.get("store_id"), str):
                assert event["store_id"] in stores
    assert (counts.products, counts.stores) == (25, 4)


# --- live: the model's day, anomalies, catalog changes -----------------------------------------


def day_ms(day: date) -> int:
    return (day.toordinal() - model.ORDINAL_1970) * model.DAY_MS


def live_day(cat: model.Catalog, day: date, *, anomalies: bool, step_s: int = 600) -> list:
    """Every message a live run sends over ``day``, ticking every ``step_s`` seconds."""
    stream = LiveStream(cat, Fractions(), MAX_BYTES, entropy=1, anomalies=anomalies)
    start = day_ms(day)
    out = []
    for k in range(0, 86_400, step_s):
        out += stream.replay(start + k * 1000, start + (k + step_s) * 1000, 0.0)
    return out


def orders_per_hour(msgs) -> np.ndarray:
    hours = np.zeros(24)
    for t, _, v in msgs:
        if t == "orders":
            hours[(event_ms(v) // 3_600_000) % 24] += 1
    return hours


def test_live_sends_the_models_day_at_the_histories_rate_per_hour() -> None:
    cat = model.make_catalog(42, 100, 5)
    day = date(2025, 6, 11)  # a Wednesday, no holiday
    live = live_day(cat, day, anomalies=False)
    # Exactly the day a history would have: the same orders and reviews, ids and all.
    hist, _ = plan(42, 100, 5, day, 1, Fractions())
    assert sorted(v for t, _, v in live) == sorted(v for t, _, v in hist if t in TOPICS)
    # Each hour, as many orders as the history's mean for that hour on the same weekday
    # (the eight weeks before), within a tolerance for the day's own noise.
    weeks = [day - timedelta(weeks=w) for w in range(1, 9)]
    past = np.mean([orders_per_hour(plan(42, 100, 5, d, 1, Fractions())[0]) for d in weeks], 0)
    got = orders_per_hour(live)
    assert got.sum() == pytest.approx(past.sum(), rel=0.15)
    busy = past >= 100
    assert busy.sum() >= 12
    assert np.all(np.abs(got[busy] - past[busy]) <= 0.3 * past[busy]), (got, past)
    assert np.corrcoef(got, past)[0, 1] > 0.9
    # Well under one event per second on average: nothing like a fixed 300/s.
    assert len(live) / 86_400 < 0.1


def test_live_injects_the_days_anomalies_and_they_stand_out() -> None:
    cat = model.make_catalog(42, 100, 5)
    day = date(2025, 6, 11)
    found = model.anomalies(cat, day)
    assert found == model.anomalies(cat, day)  # deterministic from (seed, day)
    assert len(found) == 4
    expected = model.expected_lines(cat, [day])[0]
    plain = live_day(cat, day, anomalies=False)
    with_bursts = live_day(cat, day, anomalies=True)
    extra = Counter(
        (orjson.loads(v)["sku"], orjson.loads(v)["store_id"])
        for t, _, v in with_bursts
        if t == "orders"
    )
    extra.subtract(
        Counter((orjson.loads(v)["sku"], orjson.loads(v)["store_id"]) for t, _, v in plain
                if t == "orders")
    )  # fmt: skip
    bursts = Counter()
    for k, a in enumerate(found):
        # One per 6-hour slot, starting in its first two hours, lasting 20-40 minutes.
        offset = a.start_ms - day_ms(day)
        assert k * 6 * 3_600_000 <= offset <= (k * 6 + 2) * 3_600_000
        assert 20 * 60_000 <= a.end_ms - a.start_ms <= 40 * 60_000
        assert 12 <= a.factor <= 20
        normal = expected[a.sku_idx, a.store_idx]
        assert a.lines == max(20, round(a.factor * normal)) and a.lines >= 12 * normal
        # A busy-enough series, not one of the busiest: ranked in the day's top 20-40 %.
        rank = int((expected > normal).sum())
        assert 0.2 * expected.size - 1 <= rank < 0.4 * expected.size
        bursts[(cat.sku[a.sku_idx], cat.store_id[a.store_idx])] += a.lines
    assert +extra == bursts  # the extra order lines are exactly the bursts'
    # Timed inside their windows.
    windows = [(a.start_ms, a.end_ms) for a in found]
    plain_ids = {orjson.loads(v)["event_id"] for t, _, v in plain if t == "orders"}
    for t, _, v in with_bursts:
        if t == "orders" and orjson.loads(v)["event_id"] not in plain_ids:
            assert any(lo - 1000 <= event_ms(v) < hi for lo, hi in windows)


def test_live_renames_recategorises_and_moves_at_the_documented_rates() -> None:
    cat = model.make_catalog(8, 30, 6)
    counts = Counts()
    changes = CatalogChanges(cat, ChangeRates(), np.random.default_rng(4), counts)
    msgs = changes.due(60 * 60.0)  # an hour of wall clock
    products = [orjson.loads(v) for t, _, v in msgs if t == "products"]
    stores = [orjson.loads(v) for t, _, v in msgs if t == "stores"]
    assert 80 <= len(products) <= 160  # 2 a minute
    assert 1 <= len(stores) <= 15  # one every 10 minutes
    assert (counts.products, counts.stores) == (len(products), len(stores))
    for t, k, v in msgs:
        check_reference(t, k, v)
    base = {model.product_record(cat, i)["sku"]: model.product_record(cat, i) for i in range(30)}
    renamed = recategorised = 0
    last: dict[str, dict] = {}
    for p in products:
        before = last.get(p["sku"], base[p["sku"]])
        i = cat.sku.index(p["sku"])
        assert p["brand"] == before["brand"] and p["name"].endswith(cat.product[i])
        if p["name"] != before["name"]:
            renamed += 1
            assert p["category"] == before["category"]
        else:
            recategorised += 1
            assert p["category"] == {c.name: c.related for c in CATEGORIES}[before["category"]]
        last[p["sku"]] = p
    assert renamed > 2 * recategorised > 0
    home = {model.store_record(cat, j)["store_id"]: model.store_record(cat, j) for j in range(6)}
    moved: dict[str, str] = {}
    for st in stores:
        assert st["region"] != moved.get(st["store_id"], home[st["store_id"]]["region"])
        assert st["region"] in model.REGIONS and st["city"] == home[st["store_id"]]["city"]
        moved[st["store_id"]] = st["region"]
    # No change at all with zero rates.
    assert CatalogChanges(cat, ChangeRates(0, 0), np.random.default_rng(4), Counts()).due(1e9) == []


# --- to Kafka --------------------------------------------------------------------------------


def test_history_sends_the_planned_bytes_with_exact_fractions(fresh_broker, settings_for) -> None:
    fr = Fractions(late=0.03, duplicate=0.05, bad=0.01)
    args = dict(days=21, skus=15, stores=3, seed=5, end_date="2025-10-21")
    summary = run_history(
        settings_for(fresh_broker),
        **args,
        late_fraction=fr.late,
        duplicate_fraction=fr.duplicate,
        bad_fraction=fr.bad,
        processes=2,  # the path large histories take: partitions split between processes
    )
    got = consume(fresh_broker.bootstrap)

    # Exactly the bytes of the pure plan, in the plan's order within each partition.
    msgs, counts = plan(5, 15, 3, date(2025, 10, 1), 21, fr)
    expected: dict[tuple[str, int], list] = defaultdict(list)
    for topic, key, value in msgs:
        p = (murmur2(key) & 0x7FFFFFFF) % 4  # Kafka's default partitioner for keyed messages
        expected[(topic, p)].append((key, value))
    for tp, recs in got.items():
        assert [(k, v) for k, v, _ in recs] == expected[tp], tp
    assert summary == counts.as_dict()
    # The catalog went first: every product and store, before any order or review.
    stamps = {
        t: [ts for (tt, _), recs in got.items() if tt == t for _, _, ts in recs]
        for t in GENERATED_TOPICS
    }
    reference = stamps["products"] + stamps["stores"]
    assert len(stamps["products"]) == 15 and len(stamps["stores"]) == 3
    assert max(reference) <= min(stamps["orders"] + stamps["reviews"])

    # The counts hold when judged by the contract, and each is the exact fraction.
    seen = audit(got)
    n = seen["orders"] + seen["reviews"]
    assert {k: seen[k] for k in summary} == summary
    assert seen["duplicates"] == int(fr.duplicate * n + 0.5)
    assert seen["bad"] == int(fr.bad * n + 0.5)
    assert {r.split(":")[0] for r in seen["reasons"]} == set(KINDS)
    oversize = [v for recs in got.values() for _, v, _ in recs if v and len(v) > MAX_BYTES]
    assert oversize

    # Event-time order within each partition, except the late events (all of them
    # but those whose delay runs past the last day, which go last).
    late = sum(late_events(recs, set(seen["valid"])) for recs in got.values())
    assert 0.7 * fr.late * n <= late <= int(fr.late * n + 0.5)


def test_history_command_prints_the_summary_last(broker) -> None:
    tps = generated_partitions(broker)
    before = end_offsets(broker.bootstrap, tps)
    cmd = [sys.executable, "-m", "lambdalake.cli", "generate", "history"]
    args = ["--days", "14", "--skus", "10", "--stores", "2", "--bootstrap", broker.bootstrap]
    out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary) == {"orders", "reviews", "duplicates", "bad", "products", "stores"}
    assert summary["orders"] > 500 and summary["reviews"] > 0
    assert (summary["products"], summary["stores"]) == (10, 2)
    after = end_offsets(broker.bootstrap, tps)
    assert sum(after.values()) - sum(before.values()) == sum(summary.values())
    assert "history" in out.stderr  # the progress bar

    bad = subprocess.run(
        [*cmd, "--end-date", "2025-02-30", "--bootstrap", broker.bootstrap],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "lambdalake: error: --end-date must be a date YYYY-MM-DD, got '2025-02-30'"
    ]


def test_live_command_holds_the_rate(broker) -> None:
    tps = generated_partitions(broker)
    before = end_offsets(broker.bootstrap, tps)
    cmd = [sys.executable, "-m", "lambdalake.cli", "generate", "live", "--rate", "500"]
    args = ["--duration", "3", "--skus", "20", "--stores", "3", "--bootstrap", broker.bootstrap]
    started_ms = time.time() * 1000
    out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["orders"] + summary["reviews"] == 1500
    got = consume(broker.bootstrap, before)
    stamps = sorted(ts for recs in got.values() for _, _, ts in recs)
    assert len(stamps) == sum(summary.values())
    rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    assert 400 <= rate <= 600, rate
    # Event times are "now".
    times = [event_ms(v) for (t, _), recs in got.items() if t in TOPICS for _, v, _ in recs]
    assert started_ms - 1000 <= min(times) and max(times) <= time.time() * 1000


def test_live_with_faults_stops_on_request_and_sends_exact_fractions(broker, settings_for) -> None:
    tps = generated_partitions(broker)
    before = end_offsets(broker.bootstrap, tps)
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    started_ms = time.time() * 1000
    summary = run_live(
        settings_for(broker),
        rate=1000,
        duration=None,
        skus=20,
        stores=3,
        seed=1,
        late_fraction=0.1,
        duplicate_fraction=0.1,
        bad_fraction=0.02,
        stop=stop,
    )
    seen = audit(consume(broker.bootstrap, before))
    n = seen["orders"] + seen["reviews"]
    assert 500 <= n <= 2600  # ~2 s at 1000/s, less the time to connect
    assert {k: seen[k] for k in summary} == summary
    assert seen["duplicates"] == int(0.1 * n + 0.5) and seen["bad"] == int(0.02 * n + 0.5)
    # Exactly the late share carries event times 1-30 days back; the others are now.
    ages = [(started_ms - event_ms(v)) / 86_400_000 for v in seen["valid"]]
    late = [a for a in ages if a > 0.5]
    assert len(late) == int(0.1 * n + 0.5)
    assert all(1 - 1e-3 <= a <= 30.1 for a in late)
    assert all(-0.001 < a < 0.001 for a in ages if a <= 0.5)


def test_live_command_sends_the_models_day_so_far_and_catalog_changes(broker) -> None:
    """Default live: today's model events from midnight up to now (the history's rate, not a
    fixed load), the day's anomalies among them, and renames keyed by id."""
    tps = generated_partitions(broker)
    before = end_offsets(broker.bootstrap, tps)
    cmd = [sys.executable, "-m", "lambdalake.cli", "generate", "live", "--duration", "3"]
    args = ["--skus", "40", "--stores", "3", "--seed", "9", "--bootstrap", broker.bootstrap]
    args += ["--product-changes-per-min", "600", "--store-moves-per-min", "600"]
    started_ms = int(time.time() * 1000)
    out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    ended_ms = int(time.time() * 1000)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    got = consume(broker.bootstrap, before)
    seen = audit(got)
    assert {k: seen[k] for k in summary} == summary

    # The model's day, as a history has it (plus the anomalies), up to the end of the run.
    stream = LiveStream(model.make_catalog(9, 40, 3), Fractions(), MAX_BYTES, entropy=0)
    days = {datetime.fromtimestamp(ms / 1000, UTC).date() for ms in (started_ms, ended_ms)}
    planned: dict[str, int] = {}
    for day in days:
        orders, _, found = stream.day_plan(day)
        planned |= dict(zip(orders.event_id, orders.time_ms.tolist(), strict=True))
        bursts = model.anomaly_lines(stream.catalog, day, found).event_id
        assert len(found) == 4 and set(bursts) <= set(orders.event_id)
    sent = {orjson.loads(v)["event_id"]: event_ms(v) for v in seen["valid"] if b"event_id" in v}
    assert set(sent) <= set(planned)
    assert all(sent[e] == planned[e] for e in sent)
    midnight = started_ms - started_ms % model.DAY_MS
    due = {e for e, t in planned.items() if midnight <= t < started_ms}
    assert due <= set(sent)  # the day so far, sent at once
    assert {e for e, t in planned.items() if t >= ended_ms}.isdisjoint(sent)
    assert summary["orders"] == len(sent)
    # About 30 of each in 3 s at these rates (Poisson: a count outside 5-70 has odds of
    # 4e-9; at 120 store moves a minute, none in 3 s had odds of 1 in 400); keyed by their ids.
    assert 5 <= summary["products"] <= 70 and 5 <= summary["stores"] <= 70
    assert seen["products"] == summary["products"] and seen["stores"] == summary["stores"]


def test_the_api_docs_examples_name_the_demos_data() -> None:
    """The API docs' "Try it out" on `make demo` returns rows: the OpenAPI examples are a
    SKU, a store, a category and a region of the demo's catalog (its seed and default size),
    and dates in its history."""
    from datetime import timedelta

    from lambdalake.ops.demo import SEED
    from serving import params

    cat = model.make_catalog(SEED, 100, 5)  # `lambdalake demo`'s defaults
    assert params.EXAMPLE_SKU in cat.sku
    assert params.EXAMPLE_STORE in cat.store_id
    assert params.EXAMPLE_CATEGORY in {cat.category_name(i) for i in range(100)}
    assert params.EXAMPLE_REGION in set(cat.store_region)
    today = datetime.now(UTC).date()
    start, end = date.fromisoformat(params.EXAMPLE_START), date.fromisoformat(params.EXAMPLE_END)
    assert today - timedelta(days=365) < start <= end <= today


def test_live_injects_a_stock_out_of_a_busy_series() -> None:
    """One of the day's busiest series sells nothing from an early hour on (the alerts name it
    late in the day); before that hour, and in the history, it sells."""
    cat = model.make_catalog(42, 100, 5)
    day = date(2025, 6, 11)
    out = model.stockout(cat, day)
    assert out == model.stockout(cat, day)
    expected = model.expected_lines(cat, [day])[0]
    assert (expected > expected[out.sku_idx, out.store_idx]).sum() < 0.05 * expected.size
    assert 1 * 3_600_000 <= out.start_ms - day_ms(day) <= 4 * 3_600_000
    series = (cat.sku[out.sku_idx], cat.store_id[out.store_idx])

    def times(msgs: list) -> list[int]:
        return [
            event_ms(v)
            for t, _, v in msgs
            if t == "orders" and (orjson.loads(v)["sku"], orjson.loads(v)["store_id"]) == series
        ]

    plain = times(live_day(cat, day, anomalies=False))
    stocked_out = times(live_day(cat, day, anomalies=True))
    assert sum(t >= out.start_ms for t in plain) >= 10  # a busy series, normally
    assert not any(t >= out.start_ms for t in stocked_out)
    assert sorted(stocked_out) == sorted(t for t in plain if t < out.start_ms)
