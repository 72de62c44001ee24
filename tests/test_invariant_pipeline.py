"""The Lambda invariant, end to end, on random streams.

The real pipeline runs: a broker of the test's own, ``run_ingest(--until-end)``,
Spark batch runs (``run_batch``) at random cut points, two speed workers as
subprocesses (``lambdalake speed run --worker I/2``) that are killed with
SIGKILL and restarted, and the serving API over real HTTP. The test produces
every event itself — late ones (weeks back), out of order, in three time
formats, duplicates (of events already in a batch run too), conflicting
duplicates (same id, other payload: the lowest offset wins) and bad events —
and remembers the (partition, offset) Kafka gave each one. Reference data too:
products and stores, re-categorised and moved between regions along the way
(the last message of an id wins, for all history), with ids it never describes.

After each step, many random queries (sku, store, ranges, day and hour) must
equal a recompute, done here in DuckDB from the events the test produced, over
exactly the offsets the answer says it covers (``as_of``: the run's watermark,
then the speed offsets); and, once the workers have caught up, those offsets
must be every offset produced. A degraded answer (a worker down) must list the
dead worker's partitions and still be exact for what it covers.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow as pa
import pytest
from kafka import KafkaProducer

from lambdalake.settings import Settings
from serving.app import create_app, free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("LAMBDALAKE_INVARIANT_SEED", "20240517"))
SKUS = [f"sku-{i:02d}" for i in range(8)]
STORES = ["st-1", "st-2", "st-3"]
TOPICS = ("orders", "reviews", "products", "stores")
CATEGORIES = ["cat-a", "cat-b", "cat-c"]
REGIONS = ["north", "south"]
PARTITIONS = 4
WORKERS = 2
QUERIES_PER_CHECK = 40
SPEED_CACHE_TTL = 0.25
SPEED_STALE_GRACE = 0.25  # a snapshot is answered from this much longer while it is refreshed
CATCH_UP_TIMEOUT = 90.0
REVIEW_TEXTS = [
    ("Great product, works really well", "Love it"),
    ("Terrible. Broke after one day, very disappointed", "Awful"),
    ("It is okay, nothing special", None),
    ("Excellent quality and fast delivery, highly recommend", "Excellent"),
    ("Bad fit and poor material, would not buy again", "Poor"),
    ("Average. Does the job.", ""),
]

Watermark = dict[str, dict[int, int]]


# --- what the test produced ----------------------------------------------------------------


@dataclass
class Sent:
    """One message the test produced, and what a correct consumer makes of it."""

    topic: str
    value: bytes | None
    event: dict[str, Any] | None  # the canonical valid event; None = invalid message
    partition: int = -1
    offset: int = -1


class EventLog:
    """Produces messages and records the (partition, offset) Kafka assigned to each."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
        self.sent: list[Sent] = []
        self._pending: list[tuple[Sent, Any]] = []

    def send(self, topic: str, key: str, value: bytes | None, event: dict[str, Any] | None) -> Sent:
        s = Sent(topic, value, event)
        self._pending.append((s, self.producer.send(topic, key=key.encode(), value=value)))
        self.sent.append(s)
        return s

    def flush(self) -> None:
        self.producer.flush()
        for s, fut in self._pending:
            md = fut.get(timeout=30)
            s.partition, s.offset = md.partition, md.offset
        self._pending.clear()

    def ends(self) -> Watermark:
        out: Watermark = {t: {p: 0 for p in range(PARTITIONS)} for t in TOPICS}
        for s in self.sent:
            out[s.topic][s.partition] = max(out[s.topic][s.partition], s.offset + 1)
        return out

    def valid(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic and s.event is not None]

    def close(self) -> None:
        self.producer.close()


def encode_time(ts: datetime, style: int) -> Any:
    """RFC 3339 in UTC, RFC 3339 with another offset, or epoch milliseconds."""
    if style == 0:
        return ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == 1:
        return ts.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    if style == 2:
        return ts.astimezone(timezone(timedelta(hours=-7))).isoformat()
    return int(ts.timestamp() * 1000)


class Generator:
    """Random orders and reviews, valid and not, relative to ``now``."""

    def __init__(self, log: EventLog, rng: random.Random, now: datetime) -> None:
        self.log = log
        self.rng = rng
        self.now = now.replace(microsecond=0)
        self.n = 0

    def _time(self, days_back: tuple[float, float]) -> datetime:
        lo, hi = days_back
        ts = self.now - timedelta(seconds=self.rng.uniform(lo * 86_400, hi * 86_400))
        if self.rng.random() < 0.15:  # right around a UTC midnight: day bucketing must be UTC
            midnight = datetime(ts.year, ts.month, ts.day, tzinfo=UTC)
            ts = midnight + timedelta(seconds=self.rng.choice([-1, 0, 1, 59, -59]))
        return min(ts.replace(microsecond=0), self.now)

    def order(self, days_back: tuple[float, float] = (0, 30), **fixed: Any) -> Sent:
        self.n += 1
        ts = fixed.pop("event_time", None) or self._time(days_back)
        event = {
            "event_id": f"o-{SEED}-{self.n}",
            "event_time": ts,
            "store_id": self.rng.choice(STORES),
            "sku": self.rng.choice(SKUS),
            "quantity": self.rng.choice([1, 1, 1, 2, 2, 3, 5, -1]),
            "unit_price": round(self.rng.uniform(0.5, 120.0), 2),
        }
        event.update(fixed)
        return self.send_order(event)

    def send_order(self, event: dict[str, Any], *, style: int | None = None) -> Sent:
        payload = {**event, "event_time": encode_time(event["event_time"], self._style(style))}
        if self.rng.random() < 0.5:
            payload["currency"] = "USD"  # optional: USD by default
        return self.log.send("orders", event["sku"], json.dumps(payload).encode(), event)

    def review(self, days_back: tuple[float, float] = (0, 30)) -> Sent:
        self.n += 1
        text, title = self.rng.choice(REVIEW_TEXTS)
        event = {
            "review_id": f"r-{SEED}-{self.n}",
            "event_time": self._time(days_back),
            "sku": self.rng.choice(SKUS),
            "rating": self.rng.randint(1, 5),
            "title": title,
            "text": text,
        }
        return self.send_review(event)

    def send_review(self, event: dict[str, Any]) -> Sent:
        payload = {**event, "event_time": encode_time(event["event_time"], self._style(None))}
        if payload["title"] is None:
            del payload["title"]
        return self.log.send("reviews", event["sku"], json.dumps(payload).encode(), event)

    def product(self, sku: str, *, category: str | None = None) -> Sent:
        """A product's record (keyed by SKU): its category, sometimes a name and brand."""
        event = {"sku": sku, "category": category or self.rng.choice(CATEGORIES)}
        if self.rng.random() < 0.5:
            event |= {"name": f"name of {sku}", "brand": self.rng.choice(["acme", "globex"])}
        return self.log.send("products", sku, json.dumps(event).encode(), event)

    def store(self, store_id: str, *, region: str | None = None) -> Sent:
        event = {"store_id": store_id, "region": region or self.rng.choice(REGIONS)}
        return self.log.send("stores", store_id, json.dumps(event).encode(), event)

    def bad_reference(self) -> Sent:
        """A reference message that is not one (quarantined, never a record)."""
        sku = self.rng.choice(SKUS)
        topic, value = self.rng.choice(
            [
                ("products", json.dumps({"sku": sku}).encode()),  # no category
                ("products", json.dumps({"sku": sku, "category": ""}).encode()),
                ("stores", json.dumps({"store_id": "st-1", "region": 5}).encode()),
                ("stores", b"{"),
            ]
        )
        return self.log.send(topic, sku if topic == "products" else "st-1", value, None)

    def catalog_changes(self, n: int) -> None:
        """``n`` random re-categorisations, new products and store moves (some invalid)."""
        for _ in range(n):
            r = self.rng.random()
            if r < 0.6:
                self.product(self.rng.choice(SKUS))
            elif r < 0.85:
                self.store(self.rng.choice(STORES))
            else:
                self.bad_reference()
        self.log.flush()

    def _style(self, style: int | None) -> int:
        return self.rng.randrange(4) if style is None else style

    def redeliver(self, s: Sent) -> Sent:
        """The same message again (a producer retry): counted once."""
        assert s.event is not None
        key = s.event["sku"]
        return self.log.send(s.topic, key, s.value, s.event)

    def conflicting_duplicate(self, s: Sent) -> Sent:
        """Same id, another quantity, later offset: the first delivery must win."""
        assert s.event is not None and s.topic == "orders"
        other = {**s.event, "quantity": s.event["quantity"] + 7}
        return self.send_order(other)

    def bad(self) -> Sent:
        topic = self.rng.choice(["orders", "orders", "reviews"])
        sku = self.rng.choice(SKUS)
        ts = encode_time(self._time((0, 3)), 0)
        self.n += 1
        if topic == "orders":
            base = {
                "event_id": f"bad-{self.n}",
                "event_time": ts,
                "store_id": "st-1",
                "sku": sku,
                "quantity": 1,
                "unit_price": 1.0,
            }
            value = self.rng.choice(
                [
                    b"{not json",
                    None,  # a tombstone
                    json.dumps({**base, "quantity": 0}).encode(),
                    json.dumps({**base, "unit_price": -3.0}).encode(),
                    json.dumps({**base, "quantity": "3"}).encode(),
                    json.dumps({**base, "event_time": "yesterday"}).encode(),
                    json.dumps({k: v for k, v in base.items() if k != "sku"}).encode(),
                    json.dumps([base]).encode(),
                ]
            )
        else:
            base = {"review_id": f"bad-{self.n}", "event_time": ts, "sku": sku, "rating": 4}
            value = self.rng.choice(
                [
                    json.dumps({**base, "rating": 6, "text": "x"}).encode(),
                    json.dumps(base).encode(),  # no text
                    b"\xff\xfe",
                ]
            )
        return self.log.send(topic, sku, value, None)

    def _pool(self, old_pool: list[Sent] | None, topic: str | None) -> list[Sent]:
        pool = old_pool if old_pool is not None else self.log.sent
        return [s for s in pool if s.event is not None and topic in (None, s.topic)]

    def _redeliver_one(self, old_pool: list[Sent] | None) -> Sent:
        """Redeliver an event from ``old_pool`` (default: anything sent so far)."""
        pool = self._pool(old_pool, None)
        return self.redeliver(self.rng.choice(pool)) if pool else self.order()

    def _conflict_one(self, old_pool: list[Sent] | None) -> Sent:
        pool = self._pool(old_pool, "orders")
        return self.conflicting_duplicate(self.rng.choice(pool)) if pool else self.order()

    def mixed(
        self,
        *,
        orders: int,
        reviews: int,
        late: int = 0,
        redeliveries: int = 0,
        conflicts: int = 0,
        bad: int = 0,
        recent: tuple[float, float] = (0, 2),
        old_pool: list[Sent] | None = None,
    ) -> None:
        """A shuffled mix: recent events, weeks-late ones, duplicates and bad messages."""
        actions: list[Any] = [lambda: self.order(recent)] * orders
        actions += [lambda: self.review(recent)] * reviews
        actions += [lambda: self.order((14, 40))] * late
        actions += [self.bad] * bad
        actions += [lambda: self._redeliver_one(old_pool)] * redeliveries
        actions += [lambda: self._conflict_one(old_pool)] * conflicts
        self.rng.shuffle(actions)
        for act in actions:
            act()
        self.log.flush()


# --- the independent recompute (DuckDB over what the test produced) --------------------------


def covered(s: Sent, as_of: dict[str, Any]) -> bool:
    """Is this message inside what an answer says it covers (batch, then speed offsets)?"""
    p = str(s.partition)
    wm = as_of["watermark"].get(s.topic, {}).get(p, 0)
    speed = as_of["speed_offsets"].get(s.topic, {}).get(p)
    return s.offset < wm or (speed is not None and wm <= s.offset < speed)


class Recompute:
    """The expected answers for a given coverage, from the test's own event log."""

    def __init__(self, log: EventLog, as_of: dict[str, Any]) -> None:
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone='UTC'")
        orders = [s for s in log.valid("orders") if covered(s, as_of)]
        table = pa.table(
            {
                "event_id": [s.event["event_id"] for s in orders],
                "event_time": pa.array(
                    [s.event["event_time"] for s in orders], pa.timestamp("us", tz="UTC")
                ),
                "store_id": [s.event["store_id"] for s in orders],
                "sku": [s.event["sku"] for s in orders],
                "quantity": pa.array([s.event["quantity"] for s in orders], pa.int64()),
                "unit_price": pa.array([s.event["unit_price"] for s in orders], pa.float64()),
                "part": pa.array([s.partition for s in orders], pa.int32()),
                "off": pa.array([s.offset for s in orders], pa.int64()),
            }
        )
        self.con.register("raw_orders", table)
        # Deduplicated by event_id: the lowest offset wins.
        self.con.execute(
            "CREATE TABLE o AS SELECT * FROM raw_orders "
            "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY off, part) = 1"
        )
        # Reference data: each id's last covered message (by offset, then partition).
        for topic, key, attr in (("products", "sku", "category"), ("stores", "store_id", "region")):
            last: dict[str, Sent] = {}
            for m in sorted(
                (m for m in log.valid(topic) if covered(m, as_of)),
                key=lambda m: (m.offset, m.partition),
            ):
                last[m.event[key]] = m
            self.con.register(
                f"raw_{topic}",
                pa.table(
                    {
                        key: pa.array(list(last), pa.string()),
                        attr: pa.array([m.event[attr] for m in last.values()], pa.string()),
                    }
                ),
            )
            self.con.execute(f"CREATE TABLE {topic} AS SELECT * FROM raw_{topic}")
        reviews = [s for s in log.valid("reviews") if covered(s, as_of)]
        first: dict[str, Sent] = {}
        for s in sorted(reviews, key=lambda s: s.offset):
            first.setdefault(s.event["review_id"], s)
        self.reviews = list(first.values())

    def sales(self, q: dict[str, Any]) -> dict[str, tuple[int, float, int]]:
        gran, first, last = q["_expect"]
        period = (
            "CAST(event_time AS DATE)"
            if gran == "day"
            else "strftime(date_trunc('hour', event_time), '%Y-%m-%dT%H:00:00Z')"
        )
        where = ["period >= ?", "period <= ?"]
        params: list[Any] = [first, last]
        if "sku" in q:
            where.append("sku = ?")
            params.append(q["sku"])
        if "store_id" in q:
            where.append("store_id = ?")
            params.append(q["store_id"])
        sql = (
            f"SELECT CAST(period AS VARCHAR), SUM(quantity), SUM(quantity * unit_price), "
            f"COUNT(*) FROM (SELECT *, {period} AS period FROM o) "
            f"WHERE {' AND '.join(where)} GROUP BY period"
        )
        if gran == "day":
            params = [first.date(), last.date(), *params[2:]]
        else:
            params = [
                first.strftime("%Y-%m-%dT%H:00:00Z"),
                last.strftime("%Y-%m-%dT%H:00:00Z"),
                *params[2:],
            ]
        rows = self.con.execute(sql, params).fetchall()
        return {r[0]: (int(r[1]), float(r[2]), int(r[3])) for r in rows}

    def breakdown(self, q: dict[str, Any]) -> dict[tuple, tuple[int, float, int]]:
        """(period, *group fields) -> (units, revenue, order_lines) for a ``breakdown_query``."""
        gran, first, last = q["_expect"]
        period = {
            "day": "CAST(event_time AS DATE)",
            "week": "CAST(date_trunc('week', event_time) AS DATE)",
            "month": "CAST(date_trunc('month', event_time) AS DATE)",
        }[gran]
        group = [g for g in q.get("group_by", "").split(",") if g]
        where, params = ["period BETWEEN ? AND ?"], [first, last]
        filters = ("sku", "store_id", "category", "region")
        for name, ids in ((f, q.get(f)) for f in filters):
            if ids:
                where.append(f"list_contains(?, {name})")
                params.append(ids.split(","))
        cols = ", ".join(["CAST(period AS VARCHAR)", *group])
        # Type-1: a SKU's sales count under the category its last covered record names.
        sql = (
            f"SELECT {cols}, SUM(quantity), SUM(quantity * unit_price), COUNT(*) "
            f"FROM (SELECT o.*, p.category, s.region, {period} AS period FROM o "
            f"LEFT JOIN products p USING (sku) LEFT JOIN stores s USING (store_id)) "
            f"WHERE {' AND '.join(where)} GROUP BY ALL"
        )
        rows = self.con.execute(sql, params).fetchall()
        n = 1 + len(group)
        return {tuple(r[:n]): (int(r[n]), float(r[n + 1]), int(r[n + 2])) for r in rows}

    def sentiment(self, sku: str, scores: dict[str, tuple[float, str]]) -> dict[str, Any]:
        """reviews, rating_sum, sentiment_sum and label counts of ``sku``'s covered reviews."""
        mine = [s.event for s in self.reviews if s.event["sku"] == sku]
        labels = Counter(scores[e["review_id"]][1] for e in mine)
        return {
            "reviews": len(mine),
            "rating_sum": sum(e["rating"] for e in mine),
            "sentiment_sum": sum(scores[e["review_id"]][0] for e in mine),
            **{k: labels.get(k, 0) for k in ("positive", "neutral", "negative")},
        }

    def sentiment_weeks(
        self, sku: str, scores: dict[str, tuple[float, str]], first: date
    ) -> dict[str, tuple[int, int, int]]:
        """Per ISO week (its Monday, from ``first``): reviews, rating sum and positives of
        ``sku``'s covered reviews."""
        out: dict[str, list[int]] = {}
        for s in self.reviews:
            e = s.event
            if e["sku"] != sku:
                continue
            day = e["event_time"].astimezone(UTC)
            monday = day.date() - timedelta(days=day.weekday())
            if monday < first:
                continue
            acc = out.setdefault(monday.isoformat(), [0, 0, 0])
            acc[0] += 1
            acc[1] += e["rating"]
            acc[2] += scores[e["review_id"]][1] == "positive"
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}


# --- random queries --------------------------------------------------------------------------


def floor_hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def random_query(rng: random.Random, now: datetime) -> dict[str, Any]:
    """Query parameters plus ``_expect``: (granularity, first period, last period) in UTC."""
    q: dict[str, Any] = {}
    sku = rng.choice([*SKUS, None, None, "sku-unknown"])
    store = rng.choice([*STORES, None, None])
    if sku:
        q["sku"] = sku
    if store:
        q["store_id"] = store
    if rng.random() < 0.55:
        q["granularity"] = "day"
        a = now.date() - timedelta(days=rng.randint(0, 45))
        b = a + timedelta(days=rng.randint(0, 45))
        if rng.random() < 0.5:
            q["start"], q["end"] = a.isoformat(), b.isoformat()
        else:  # datetimes select their (UTC) dates
            q["start"] = f"{a.isoformat()}T{rng.randint(0, 23):02d}:15:00Z"
            q["end"] = f"{b.isoformat()}T{rng.randint(0, 23):02d}:45:00+00:00"
        q["_expect"] = (
            "day",
            datetime(a.year, a.month, a.day, tzinfo=UTC),
            datetime(b.year, b.month, b.day, tzinfo=UTC),
        )
    else:
        q["granularity"] = "hour"
        if rng.random() < 0.3:  # whole days by date
            a = now.date() - timedelta(days=rng.randint(0, 40))
            b = a + timedelta(days=rng.randint(0, 3))
            q["start"], q["end"] = a.isoformat(), b.isoformat()
            first = datetime(a.year, a.month, a.day, tzinfo=UTC)
            last = datetime(b.year, b.month, b.day, 23, tzinfo=UTC)
        else:  # times with offsets, floored to their UTC hour
            start = now - timedelta(minutes=rng.randint(0, 40 * 24 * 60))
            end = start + timedelta(minutes=rng.randint(0, 6 * 24 * 60))
            tz = timezone(timedelta(hours=rng.choice([0, 2, -5])))
            q["start"] = start.astimezone(tz).replace(microsecond=0).isoformat()
            q["end"] = end.astimezone(tz).replace(microsecond=0).isoformat()
            first = floor_hour(start)
            last = floor_hour(end)
        q["_expect"] = ("hour", first, last)
    return q


def breakdown_query(rng: random.Random, now: datetime) -> dict[str, Any]:
    """A ``/v1/sales`` breakdown: a grain of day, week or month, a random subset of group
    fields, id lists, a small page size (so it pages), plus ``_expect``."""
    q: dict[str, Any] = {"limit": rng.choice([3, 7, 50])}
    gran = rng.choice(["day", "week", "month"])
    q["granularity"] = gran
    group = [g for g in ("sku", "store_id", "category", "region") if rng.random() < 0.45]
    if group:
        q["group_by"] = ",".join(group)
    skus = rng.sample(SKUS, rng.randint(0, 2))
    if skus:
        q["sku"] = ",".join(skus)
    if rng.random() < 0.4:
        q["store_id"] = ",".join(rng.sample(STORES, 2))
    if rng.random() < 0.3:
        q["category"] = ",".join(rng.sample(CATEGORIES, rng.randint(1, 2)))
    if rng.random() < 0.2:
        q["region"] = rng.choice(REGIONS)
    a = now.date() - timedelta(days=rng.randint(0, 60))
    b = a + timedelta(days=rng.randint(0, 60))
    q["start"], q["end"] = a.isoformat(), b.isoformat()
    if gran == "week":
        a, b = a - timedelta(days=a.weekday()), b - timedelta(days=b.weekday())
    elif gran == "month":
        a, b = a.replace(day=1), b.replace(day=1)
    q["_expect"] = (gran, a, b)
    return q


def assert_points_equal(got: list[dict[str, Any]], want: dict, context: str) -> None:
    got_map = {p["period"]: (p["units"], p["revenue"], p["order_lines"]) for p in got}
    assert set(got_map) == set(want), (
        f"{context}: periods differ; only in API {sorted(set(got_map) - set(want))[:5]}, "
        f"only in recompute {sorted(set(want) - set(got_map))[:5]}"
    )
    for period, (units, revenue, lines) in want.items():
        g = got_map[period]
        assert (g[0], g[2]) == (units, lines), f"{context} {period}: API {g} != recompute"
        assert math.isclose(g[1], revenue, rel_tol=1e-6, abs_tol=1e-6), (
            f"{context} {period}: revenue {g[1]} != {revenue}"
        )


# --- processes -----------------------------------------------------------------------------


class SpeedWorker:
    """``lambdalake speed run --worker I/N`` as a subprocess (so it can be SIGKILLed)."""

    def __init__(self, settings: Settings, index: int, count: int, log_dir: Path) -> None:
        self.settings = settings
        self.index, self.count = index, count
        self.port = free_port()
        self.log_path = log_dir / f"speed-{index}-of-{count}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def partitions(self) -> list[int]:
        return [p for p in range(PARTITIONS) if p % self.count == self.index]

    @property
    def status_path(self) -> Path:
        return (
            self.settings.speed_state_dir / "status" / f"worker-{self.index}-of-{self.count}.json"
        )

    def start(self) -> None:
        progress(f"start speed worker {self.index}/{self.count}")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LAMBDALAKE_HOME": str(self.settings.home),
            "LAMBDALAKE_PARTITIONS": str(PARTITIONS),
            "LAMBDALAKE_LOG_LEVEL": "INFO",
        }
        cmd = [
            sys.executable,
            "-m",
            "lambdalake.cli",
            "speed",
            "run",
            "--worker",
            f"{self.index}/{self.count}",
            "--query-port",
            str(self.port),
            "--bootstrap",
            self.settings.bootstrap,
            "--lake",
            self.settings.lake_uri,
        ]
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.settings.home, env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def kill9(self) -> None:
        progress(f"SIGKILL speed worker {self.index}/{self.count}")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def offsets(self) -> Watermark:
        try:
            info = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return {
            t: {int(p): int(o) for p, o in ps.items()}
            for t, ps in (info.get("offsets") or {}).items()
        }

    def wait_caught_up(self, ends: Watermark, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """Until the worker's status file shows every owned partition consumed to ``ends``."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"speed worker {self.index}/{self.count} exited:\n{self.log_tail()}")
            got = self.offsets()
            if all(got.get(t, {}).get(p, 0) >= ends[t][p] for t in TOPICS for p in self.partitions):
                progress(f"speed worker {self.index}/{self.count} caught up")
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"speed worker {self.index}/{self.count} did not catch up to {ends} "
                    f"(at {got}):\n{self.log_tail()}"
                )
            time.sleep(0.2)


# --- the checks ----------------------------------------------------------------------------


class Checker:
    def __init__(
        self,
        clients: list[httpx.Client],
        log: EventLog,
        rng: random.Random,
        now: datetime,
        settings: Settings,
    ) -> None:
        self.clients = clients
        self.log = log
        self.rng = rng
        self.now = now
        self.settings = settings
        self.checked = 0
        self._scores: dict[str, tuple[float, str]] = {}
        self._model: tuple[str | None, Any] = ("", None)

    def scores(self) -> dict[str, tuple[float, str]]:
        """Every produced review scored with the served run's sentiment model."""
        from lambdalake.contract.lake import RUNS, Lake
        from lambdalake.contract.manifest import latest_published_run
        from lambdalake.sentiment import SentimentModel, lexicon_model

        lake = Lake(self.settings.lake_uri)
        run = latest_published_run(lake.table(RUNS))
        version = run.model_versions.get("sentiment") if run else None
        if version != self._model[0]:
            model = lexicon_model() if version is None else SentimentModel.load(lake, version)
            self._model, self._scores = (version, model), {}
        todo = [
            s.event for s in self.log.valid("reviews") if s.event["review_id"] not in self._scores
        ]
        if todo:
            values, labels = self._model[1].score(
                [e["text"] for e in todo], [e["title"] for e in todo]
            )
            for e, v, lab in zip(todo, values, labels, strict=True):
                self._scores[e["review_id"]] = (float(v), str(lab))
        return self._scores

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        clean = {k: v for k, v in (params or {}).items() if not k.startswith("_")}
        r = self.rng.choice(self.clients).get(path, params=clean)
        assert r.status_code == 200, f"{path} {clean}: {r.status_code} {r.text}"
        return r.json()

    def sales_matches(self, q: dict[str, Any], step: str) -> dict[str, Any]:
        body = self.get("/v1/sales", q)
        want = Recompute(self.log, body["as_of"]).sales(q)
        assert_points_equal(body["points"], want, f"[{step}] {q}")
        self.checked += 1
        return body

    def breakdown_matches(self, q: dict[str, Any], step: str) -> None:
        group = [g for g in q.get("group_by", "").split(",") if g]
        pages: list[dict[str, Any]] = []
        cursor = None
        while True:
            body = self.get("/v1/sales", {**q, **({"cursor": cursor} if cursor else {})})
            pages.append(body)
            cursor = body["next_cursor"]
            if cursor is None:
                break
        as_of = pages[0]["as_of"]
        assert all(p["as_of"] == as_of for p in pages), f"[{step}] pages with other as_of"
        points = [p for page in pages for p in page["points"]]
        got = {
            (p["period"], *(p[g] for g in group)): (p["units"], p["revenue"], p["order_lines"])
            for p in points
        }
        assert len(got) == len(points), f"[{step}] a row on two pages: {q}"
        want = Recompute(self.log, as_of).breakdown(q)
        assert set(got) == set(want), f"[{step}] {q}: keys {set(got) ^ set(want)}"
        for k, (units, revenue, lines) in want.items():
            assert got[k][0] == units and got[k][2] == lines, f"[{step}] {q} {k}"
            assert math.isclose(got[k][1], revenue, rel_tol=1e-6, abs_tol=1e-6), f"[{step}] {k}"
        self.checked += 1

    def sql_matches(self, q: dict[str, Any], step: str) -> None:
        """A breakdown asked as SQL (``POST /v1/sql``) over the merged tables, joined with
        products and stores, equals the recompute as of the answer's ``as_of``."""
        gran, first, last = q["_expect"]
        group = [g for g in q.get("group_by", "").split(",") if g]
        table = self.rng.choice(["sales_daily", "sales_hourly"])
        day = "period" if table == "sales_daily" else "CAST(period AS DATE)"
        period = day if gran == "day" else f"CAST(date_trunc('{gran}', {day}) AS DATE)"
        where = [f"{period} BETWEEN DATE '{first.isoformat()}' AND DATE '{last.isoformat()}'"]
        for name in ("sku", "store_id", "category", "region"):
            if q.get(name):
                values = ", ".join(f"'{v}'" for v in q[name].split(","))
                where.append(f"{name} IN ({values})")
        cols = ", ".join([f"CAST({period} AS VARCHAR) AS p", *group])
        statement = (
            f"SELECT {cols}, sum(units), sum(revenue), sum(order_lines) FROM {table} "
            "LEFT JOIN products USING (sku) LEFT JOIN stores USING (store_id) "
            f"WHERE {' AND '.join(where)} GROUP BY ALL"
        )
        r = self.rng.choice(self.clients).post("/v1/sql", json={"sql": statement})
        assert r.status_code == 200, f"[{step}] {statement}: {r.status_code} {r.text}"
        body = r.json()
        n = 1 + len(group)
        got = {tuple(row[:n]): tuple(row[n:]) for row in body["rows"]}
        want = Recompute(self.log, body["as_of"]).breakdown(q)
        assert set(got) == set(want), f"[{step}] {statement}: keys {set(got) ^ set(want)}"
        for k, (units, revenue, lines) in want.items():
            assert got[k][0] == units and got[k][2] == lines, f"[{step}] SQL {statement} {k}"
            assert math.isclose(got[k][1], revenue, rel_tol=1e-6, abs_tol=1e-6), f"[{step}] {k}"
        # The scored reviews too: one row per counted review, at the same as_of.
        r = self.rng.choice(self.clients).post(
            "/v1/sql",
            json={"sql": "SELECT sku, count(*), sum(rating) FROM review_scores GROUP BY sku"},
        )
        body = r.json()
        want_reviews = Counter()
        ratings = Counter()
        for s in Recompute(self.log, body["as_of"]).reviews:
            want_reviews[s.event["sku"]] += 1
            ratings[s.event["sku"]] += s.event["rating"]
        assert {row[0]: (row[1], row[2]) for row in body["rows"]} == {
            k: (v, ratings[k]) for k, v in want_reviews.items()
        }, f"[{step}] review_scores"
        self.checked += 1

    def check_step(
        self,
        step: str,
        *,
        run_id: str | None,
        degraded_partitions: dict[str, list[int]] | None = None,
        n: int = QUERIES_PER_CHECK,
    ) -> None:
        """Random queries equal the recompute over what each answer covers; coverage is right."""
        progress(f"check: {step}")
        # Snapshots fetched before the catch-up are past their last use (ttl + grace).
        time.sleep(SPEED_CACHE_TTL + SPEED_STALE_GRACE + 0.1)
        ends = self.log.ends()
        for _ in range(n):
            q = random_query(self.rng, self.now)
            body = self.sales_matches(q, step)
            self._check_coverage(body, "orders", ends, run_id, degraded_partitions, step)
        # Breakdowns at coarser grains, paged: the pages together equal the recompute as of
        # the first page's as_of, every row once.
        for _ in range(3):
            q = breakdown_query(self.rng, self.now)
            self.breakdown_matches(q, step)
        # The same questions as SQL over the merged tables.
        for _ in range(3):
            self.sql_matches(breakdown_query(self.rng, self.now), step)
        # The forecast's actuals are merged daily units too.
        for _ in range(3):
            sku, store = self.rng.choice(SKUS), self.rng.choice(STORES)
            body = self.get(f"/v1/forecast/{sku}", {"store_id": store, "horizon": 1})
            today = datetime.now(UTC).date()
            q = day_query(sku, store, today)
            q["_expect"] = ("day", q["_expect"][1] - timedelta(days=13), q["_expect"][2])
            want = Recompute(self.log, body["as_of"]).sales(q)
            assert {a["date"]: a["units"] for a in body["actuals"]} == {
                k: v[0] for k, v in want.items()
            }, f"[{step}] forecast actuals of {sku}/{store}"
        # Every SKU's sentiment, against the reviews scored with the run's model.
        scores = self.scores()
        for sku in [*SKUS, "sku-unknown"]:
            body = self.get(f"/v1/sentiment/{sku}")
            self._check_coverage(body, "reviews", ends, run_id, degraded_partitions, step)
            want = Recompute(self.log, body["as_of"]).sentiment(sku, scores)
            got = {k: body[k] for k in ("reviews", "positive", "neutral", "negative")}
            assert got == {k: want[k] for k in got}, f"[{step}] {sku}: {body} vs {want}"
            if want["reviews"]:
                n = want["reviews"]
                assert body["mean_rating"] == pytest.approx(want["rating_sum"] / n, rel=1e-9)
                assert math.isclose(
                    body["mean_sentiment"], want["sentiment_sum"] / n, rel_tol=1e-6, abs_tol=1e-9
                ), f"[{step}] {sku}: {body} vs {want}"
            else:
                assert body["mean_rating"] is None and body["mean_sentiment"] is None
        # Every SKU's weeks too (the sentiment view at its weekly grain), merged the same way.
        first = datetime.now(UTC).date() - timedelta(weeks=104)
        first -= timedelta(days=first.weekday())
        for sku in SKUS:
            body = self.get(f"/v1/sentiment-weeks/{sku}", {"start": first.isoformat()})
            self._check_coverage(body, "reviews", ends, run_id, degraded_partitions, step)
            want = Recompute(self.log, body["as_of"]).sentiment_weeks(sku, scores, first)
            got = {
                w["week"]: (w["reviews"], round(w["mean_rating"] * w["reviews"]), w["positive"])
                for w in body["weeks"]
            }
            assert got == want, f"[{step}] {sku} weeks: {got} vs {want}"

    def _check_coverage(
        self,
        body: dict[str, Any],
        topic: str,
        ends: Watermark,
        run_id: str | None,
        degraded_partitions: dict[str, list[int]] | None,
        step: str,
    ) -> None:
        as_of = body["as_of"]
        assert as_of["run_id"] == run_id, f"[{step}] served {as_of['run_id']}, want {run_id}"
        missing = (degraded_partitions or {}).get(topic, [])
        assert body["degraded"] is bool(missing), f"[{step}] {body['degraded']=} {missing=}"
        assert body["missing_partitions"].get(topic, []) == missing, f"[{step}] {body}"
        for p in range(PARTITIONS):
            speed = as_of["speed_offsets"].get(topic, {}).get(str(p))
            if p in missing:
                assert speed is None, f"[{step}] partition {p} is missing but has offsets"
            elif ends[topic][p]:
                # Every produced (hence consumed) offset is in the answer.
                assert speed == ends[topic][p], f"[{step}] {topic}/{p}: {speed} != {ends[topic][p]}"


def wait_not_degraded(clients: list[httpx.Client], timeout: float = 30.0) -> None:
    """Until answers are whole again (a failed worker is retried after a second)."""
    deadline = time.monotonic() + timeout
    for client in clients:
        while client.get("/v1/sales").json()["degraded"]:
            assert time.monotonic() < deadline, "the API still answers degraded after a restart"
            time.sleep(0.2)


def wait_for_run(clients: list[httpx.Client], run_id: str, timeout: float = 30.0) -> None:
    """Until every API serves ``run_id`` (they learn of it through StaleWatermark only)."""
    deadline = time.monotonic() + timeout
    for client in clients:
        while client.get("/v1/sales").json()["as_of"]["run_id"] != run_id:
            assert time.monotonic() < deadline, f"run {run_id} was not picked up by the API"
            time.sleep(0.2)


T0 = time.monotonic()


def progress(message: str) -> None:
    """A progress line (shown by pytest with -s, and with a failure's captured output)."""
    print(f"[invariant {time.monotonic() - T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def ingest_until_end(settings: Settings) -> dict[str, Any]:
    from batch.ingest import run_ingest

    progress("ingest --until-end")
    return run_ingest(settings, until_end=True, stop=threading.Event())


def day_query(sku: str, store: str, day: date) -> dict[str, Any]:
    ts = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return {
        "sku": sku,
        "store_id": store,
        "start": day.isoformat(),
        "end": day.isoformat(),
        "granularity": "day",
        "_expect": ("day", ts, ts),
    }


# --- the test --------------------------------------------------------------------------------


@pytest.mark.slow
def test_merged_answers_equal_a_full_recompute_through_runs_duplicates_and_crashes(
    fresh_broker: Any, settings_for: Any, spark: Any, tmp_path: Path
) -> None:
    from batch.forecast import ForecastConfig
    from batch.run import run_batch as batch_run

    def run_batch(settings: Settings, spark: Any) -> str:
        # Forecasts are not what this test checks: a short horizon keeps Spark runs quick.
        progress("batch run")
        fcfg = ForecastConfig(
            horizon=7,
            backtest_windows=1,
            backtest_horizon=7,
            smooth_models=("SeasonalNaive",),
            intermittent_models=("SeasonalNaive",),
        )
        run_id = batch_run(settings, spark=spark, forecast_config=fcfg)
        progress(f"batch run {run_id} published")
        return run_id

    settings = settings_for(fresh_broker)
    settings.home.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    now = datetime.now(UTC)
    log = EventLog(fresh_broker.bootstrap)
    gen = Generator(log, rng, now)
    workers = [SpeedWorker(settings, i, WORKERS, tmp_path) for i in range(WORKERS)]
    try:
        # 1. History (with its own duplicates and bad events), ingested, batch run 1. The
        #    catalog first: every SKU but the last, every store but the last (ids no record
        #    describes count under a null category / region).
        for sku in SKUS[:-1]:
            gen.product(sku)
        for store in STORES[:-1]:
            gen.store(store)
        gen.bad_reference()
        gen.mixed(
            orders=500, reviews=100, late=20, redeliveries=20, conflicts=8, bad=15, recent=(0, 35)
        )
        summary = ingest_until_end(settings)
        valid_counts = Counter(s.topic for s in log.sent if s.event is not None)
        bad_counts = Counter(s.topic for s in log.sent if s.event is None)
        for topic in TOPICS:
            assert summary[topic]["written"] == valid_counts[topic], summary
            assert summary[topic]["quarantined"] == bad_counts[topic], summary
        run1 = run_batch(settings, spark=spark)
        history = list(log.sent)

        # 2. Speed workers and the API; live events, including redeliveries of events the
        #    batch already counted and weeks-late events.
        for w in workers:
            w.start()
        # The APIs never poll the runs table here: they learn of runs 2 and 3 only when a speed
        # worker, already pruned to the new run, refuses a query (StaleWatermark) — so that
        # path, reload the latest run and ask again, is what every later answer goes through.
        # One API answers from its per-worker snapshot cache, the other asks the workers on
        # every request; queries go to either at random.
        cached = create_app(
            settings,
            poll_seconds=3600,
            speed_cache_ttl=SPEED_CACHE_TTL,
            speed_stale_grace=SPEED_STALE_GRACE,
        )
        direct = create_app(settings, poll_seconds=3600, speed_cache_ttl=0)
        with (
            running_server(cached) as url_cached,
            running_server(direct) as url_direct,
            httpx.Client(base_url=url_cached, timeout=30) as client,
            httpx.Client(base_url=url_direct, timeout=30) as client_direct,
        ):
            clients = [client, client_direct]
            check = Checker(clients, log, rng, now, settings)
            counted = rng.choice(
                [s for s in history if s.event is not None and s.topic == "orders"]
            )
            gen.redeliver(counted)
            gen.mixed(
                orders=200,
                reviews=40,
                late=10,
                redeliveries=25,
                conflicts=6,
                bad=10,
                old_pool=history,
            )
            gen.catalog_changes(8)  # re-categorised after run 1: the speed layer's to apply
            for w in workers:
                w.wait_caught_up(log.ends())
            check.check_step("live after run 1", run_id=run1)
            # A redelivery of an event the batch run already counted is counted once.
            e = counted.event
            check.sales_matches(
                day_query(e["sku"], e["store_id"], e["event_time"].date()), "redelivery"
            )

            # 3. A batch run at a random cut point: ingest part of the next events only.
            gen.mixed(
                orders=rng.randint(80, 160), reviews=20, late=5, redeliveries=10, conflicts=3, bad=5
            )
            gen.catalog_changes(4)
            ingest_until_end(settings)
            gen.mixed(
                orders=rng.randint(60, 120), reviews=15, late=5, redeliveries=10, conflicts=3, bad=5
            )
            gen.catalog_changes(4)
            run2 = run_batch(settings, spark=spark)
            assert run2 != run1
            # Right away: the API may still hold run 1 while workers prune to run 2; every
            # answer must still be exact for what it says it covers.
            for _ in range(10):
                q = random_query(rng, now)
                check.sales_matches(q, "just after run 2")
            for w in workers:
                w.wait_caught_up(log.ends())
            wait_for_run(clients, run2)
            check.check_step("after run 2", run_id=run2)

            # 4. A worker dies (SIGKILL). Events keep coming, among them an order weeks late
            #    for a day run 2 covered: a time-boundary merge would drop it.
            dead, alive = workers[1], workers[0]
            dead.kill9()
            late_day = (now - timedelta(days=21)).date()
            late_time = datetime(late_day.year, late_day.month, late_day.day, 13, 7, tzinfo=UTC)
            late_events = [
                gen.order(event_time=late_time, sku=SKUS[0], store_id=STORES[0], quantity=4),
                gen.order(event_time=late_time, sku=SKUS[1], store_id=STORES[0], quantity=6),
            ]
            gen.mixed(
                orders=100,
                reviews=20,
                late=8,
                redeliveries=10,
                conflicts=3,
                bad=5,
                old_pool=history,
            )
            alive.wait_caught_up(log.ends())
            missing = {t: dead.partitions for t in TOPICS}
            # Degraded answers: exact for the batch and the live worker, the rest listed.
            check.check_step("worker 1 down", run_id=run2, degraded_partitions=missing, n=20)

            dead.start()
            dead.wait_caught_up(log.ends())
            wait_not_degraded(clients)
            check.check_step("worker 1 restarted", run_id=run2)
            for s in late_events:
                e = s.event
                body = check.sales_matches(
                    day_query(e["sku"], e["store_id"], late_day), "weeks-late after batch"
                )
                assert covered(s, body["as_of"]) and s.offset >= int(
                    body["as_of"]["watermark"]["orders"][str(s.partition)]
                ), "the weeks-late event must come from the speed layer"

            # 5. Both workers killed mid-stream and restarted; then everything in a last run.
            gen.mixed(orders=60, reviews=10, redeliveries=5, bad=3)
            for w in workers:
                w.kill9()
            gen.mixed(orders=60, reviews=10, late=5, redeliveries=5, conflicts=2, bad=3)
            gen.catalog_changes(6)
            for w in workers:
                w.start()
            for w in workers:
                w.wait_caught_up(log.ends())
            wait_not_degraded(clients)
            check.check_step("both restarted", run_id=run2)

            ingest_until_end(settings)
            run3 = run_batch(settings, spark=spark)
            for w in workers:
                w.wait_caught_up(log.ends())
            wait_for_run(clients, run3)
            check.check_step("after run 3", run_id=run3)
            assert check.checked >= 5 * QUERIES_PER_CHECK

            status = client.get("/v1/status").json()
            bad_total = Counter(s.topic for s in log.sent if s.event is None)
            for topic in TOPICS:
                assert sum(status["quarantine"].get(topic, {}).values()) == bad_total[topic]
    finally:
        for w in workers:
            w.stop()
        log.close()
