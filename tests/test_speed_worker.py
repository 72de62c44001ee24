"""The speed worker against a real broker: exactly once, pruning, scaling, queries.

Events are crafted here (late ones weeks back, duplicate deliveries of the same
bytes, invalid messages) and produced with kafka-python; batch runs are written
here as ``runs`` rows plus master tables with delta-rs. The expected answers are
recomputed independently in DuckDB from what the test produced.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from kafka import KafkaProducer

from lambdalake.contract.lake import MASTER_SCHEMA_BY_TOPIC, MASTER_TABLE_BY_TOPIC, RUNS, Lake
from lambdalake.contract.manifest import RUNS_SCHEMA, RunRecord, Watermark
from lambdalake.contract.speed_protocol import SpeedAnswer, SpeedQuery, query_speed, speed_status
from lambdalake.ops.broker import EmbeddedBroker, free_port
from lambdalake.sentiment import lexicon_model
from lambdalake.settings import TOPICS, Settings
from speed.consumer import Assigned, Polled, Poller
from speed.state import SpeedState
from speed.worker import SpeedWorker, run_worker

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
NOW = datetime.now(UTC).replace(microsecond=0)

# --- events and the log of what was produced ------------------------------------------------


@dataclass
class Sent:
    topic: str
    partition: int
    offset: int
    value: bytes
    event: dict | None  # None = crafted invalid


@dataclass
class Stream:
    """Crafts events, produces them, and remembers every (partition, offset) sent."""

    bootstrap: str
    seed: int = 7
    log: list[Sent] = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.producer = KafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=20, batch_size=1 << 20
        )
        self.lock = threading.Lock()

    def close(self) -> None:
        self.producer.close()

    def order(self) -> dict:
        self._n += 1
        late = self.rng.random() < 0.1
        when = NOW - timedelta(days=self.rng.randint(14, 40) if late else 0, minutes=self._n % 600)
        return {
            "event_id": f"o-{self.seed}-{self._n}",
            "event_time": when.isoformat().replace("+00:00", "Z"),
            "store_id": f"s{self.rng.randint(1, 3)}",
            "sku": f"sku-{self.rng.randint(1, 12)}",
            "quantity": self.rng.choice([1, 1, 2, 3, -1]),
            "unit_price": round(self.rng.uniform(1, 50), 2),
        }

    def review(self) -> dict:
        self._n += 1
        return {
            "review_id": f"r-{self.seed}-{self._n}",
            "event_time": (NOW - timedelta(minutes=self._n % 300)).isoformat(),
            "sku": f"sku-{self.rng.randint(1, 12)}",
            "rating": self.rng.randint(1, 5),
            "title": self.rng.choice([None, "Great", "Meh"]),
            "text": self.rng.choice(["love it, works great", "broken and awful", "it is a box"]),
        }

    def send(self, topic: str, event: dict | None, raw: bytes | None = None) -> None:
        value = raw if raw is not None else json.dumps(event).encode()
        key = (event or {}).get("sku", "bad")
        # Explicit partitions (by SKU, like the key) keep producing fast; a duplicate
        # delivery of the same bytes lands in the same partition, as with a keyed producer.
        partition = zlib.crc32(key.encode()) % PARTITIONS
        fut = self.producer.send(topic, value=value, partition=partition)
        fut.add_callback(
            lambda md: self._record(Sent(topic, md.partition, md.offset, value, event))
        )

    def _record(self, sent: Sent) -> None:
        with self.lock:
            self.log.append(sent)

    def burst(self, orders: int, reviews: int = 0, dup: float = 0.05, bad: float = 0.02) -> None:
        """Produce new orders and reviews, re-deliveries of earlier ones, invalid messages."""
        for _ in range(orders):
            self.send("orders", self.order())
        for _ in range(reviews):
            self.send("reviews", self.review())
        self.flush()
        earlier = [s for s in self.log if s.event is not None]
        for s in self.rng.sample(earlier, int(len(earlier) * dup) if earlier else 0)[:200]:
            self.send(s.topic, s.event, raw=s.value)  # the same bytes again
        for i in range(int((orders + reviews) * bad)):
            raw = [b"{not json", b'{"event_id": "x"}', b"[1, 2]"][i % 3]
            self.send(self.rng.choice(["orders", "reviews"]), None, raw=raw)
        self.flush()

    def flush(self) -> None:
        self.producer.flush()

    def ends(self) -> Watermark:
        with self.lock:
            out: Watermark = {t: dict.fromkeys(range(PARTITIONS), 0) for t in ("orders", "reviews")}
            for s in self.log:
                out[s.topic][s.partition] = max(out[s.topic][s.partition], s.offset + 1)
        return out


# --- the independent recompute -----------------------------------------------------------------


def expected(
    log: list[Sent], watermark: Watermark, upto: Watermark | None = None
) -> tuple[dict, dict]:
    """(sales by (hour, store, sku), sentiment by sku) over valid events at or above
    ``watermark`` (and below ``upto``), deduplicated by id, the lowest offset winning."""
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")

    def rows(topic: str) -> list[Sent]:
        return [s for s in log if s.topic == topic and s.event is not None]

    orders = rows("orders")
    o = pa.table(  # noqa: F841 - scanned by name below
        {
            "id": [s.event["event_id"] for s in orders],
            "ts": [s.event["event_time"] for s in orders],
            "store": [s.event["store_id"] for s in orders],
            "sku": [s.event["sku"] for s in orders],
            "qty": pa.array([s.event["quantity"] for s in orders], pa.int64()),
            "price": pa.array([s.event["unit_price"] for s in orders], pa.float64()),
            "p": pa.array([s.partition for s in orders], pa.int32()),
            "off": pa.array([s.offset for s in orders], pa.int64()),
        }
    )
    con.execute("CREATE TABLE o AS SELECT * REPLACE (CAST(ts AS TIMESTAMPTZ) AS ts) FROM o")
    reviews = rows("reviews")
    scores, labels = lexicon_model().score(
        [s.event["text"] for s in reviews], [s.event.get("title") for s in reviews]
    )
    r = pa.table(  # noqa: F841 - scanned by name below
        {
            "id": [s.event["review_id"] for s in reviews],
            "sku": [s.event["sku"] for s in reviews],
            "rating": pa.array([s.event["rating"] for s in reviews], pa.int64()),
            "sentiment": pa.array(scores, pa.float64()),
            "label": [str(x) for x in labels],
            "p": pa.array([s.partition for s in reviews], pa.int32()),
            "off": pa.array([s.offset for s in reviews], pa.int64()),
        }
    )
    con.execute("CREATE TABLE r AS SELECT * FROM r")

    def consumed(topic: str) -> str:
        ends = (upto or {}).get(topic, {})
        return " AND ".join(f"NOT (p = {p} AND off >= {o})" for p, o in ends.items()) or "true"

    def above(topic: str) -> str:
        wm = watermark.get(topic, {})
        return " AND ".join(f"NOT (p = {p} AND off < {o})" for p, o in wm.items()) or "true"

    # The first delivery of each id in everything consumed wins; it is the speed
    # layer's to count when it is at or above the watermark (the batch counted the rest).
    first = "QUALIFY row_number() OVER (PARTITION BY id ORDER BY off, p) = 1"
    sales = {
        (str(h), store, sku): (int(u), round(float(rev), 6), int(n))
        for h, store, sku, u, rev, n in con.execute(
            f"""SELECT date_trunc('hour', ts), store, sku, sum(qty), sum(qty * price), count(*)
            FROM (SELECT * FROM o WHERE {consumed("orders")} {first})
            WHERE {above("orders")} GROUP BY ALL"""
        ).fetchall()
    }
    sentiment = {
        sku: (int(n), int(rs), round(float(ss), 6), int(pos), int(neu), int(neg))
        for sku, n, rs, ss, pos, neu, neg in con.execute(
            f"""SELECT sku, count(*), sum(rating), sum(sentiment),
                count(*) FILTER (WHERE label = 'positive'), count(*) FILTER (WHERE label = 'neutral'),
                count(*) FILTER (WHERE label = 'negative')
            FROM (SELECT * FROM r WHERE {consumed("reviews")} {first})
            WHERE {above("reviews")} GROUP BY ALL"""
        ).fetchall()
    }
    return sales, sentiment


def answer_sales(answer: SpeedAnswer) -> dict:
    return {
        (str(r["period"]), r["store_id"], r["sku"]): (r["units"], r["revenue"], r["order_lines"])
        for r in answer.table.to_pylist()
    }


def answer_sentiment(answer: SpeedAnswer) -> dict:
    return {
        r["sku"]: (
            r["reviews"],
            r["rating_sum"],
            r["sentiment_sum"],
            r["positive"],
            r["neutral"],
            r["negative"],
        )
        for r in answer.table.to_pylist()
    }


def merged(*parts: dict) -> dict:
    """Partials over disjoint events added up (the views' merge rule for sums/counts)."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out[k] = tuple(a + b for a, b in zip(out[k], v, strict=True)) if k in out else v
    return out


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (
        f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    )
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-6), k


# --- batch runs, written the way the batch layer publishes them ----------------------------------


@dataclass
class Publisher:
    """Appends master rows below each new watermark and commits a published runs row."""

    settings: Settings
    published: Watermark = field(default_factory=dict)

    def publish(self, run_id: str, watermark: Watermark, log: list[Sent]) -> RunRecord:
        lake = Lake(self.settings.lake_uri)
        versions: dict[str, int] = {}
        now = datetime.now(UTC)
        for topic in ("orders", "reviews"):
            old = self.published.get(topic, {})
            new = watermark.get(topic, {})
            rows = [
                s
                for s in log
                if s.topic == topic
                and s.event is not None
                and old.get(s.partition, 0) <= s.offset < new.get(s.partition, 0)
            ]
            uri = lake.table(MASTER_TABLE_BY_TOPIC[topic])
            schema = MASTER_SCHEMA_BY_TOPIC[topic]
            table = pa.Table.from_pylist([master_row(topic, s, now) for s in rows], schema=schema)
            write_deltalake(uri, table, mode="append", partition_by=["event_date"])
            versions[MASTER_TABLE_BY_TOPIC[topic]] = DeltaTable(uri).version()
        run = RunRecord(
            run_id=run_id,
            status="published",
            started_at=now,
            published_at=now,
            master_versions=versions,
            watermark=watermark,
        )
        write_deltalake(
            lake.table(RUNS),
            pa.Table.from_pylist([run.to_row()], schema=RUNS_SCHEMA),
            mode="append",
        )
        self.published = {t: dict(ps) for t, ps in watermark.items()}
        return run


def master_row(topic: str, s: Sent, ingested_at: datetime) -> dict:
    e = dict(s.event or {})
    ts = datetime.fromisoformat(e["event_time"].replace("Z", "+00:00")).astimezone(UTC)
    e["event_time"] = ts
    e["event_date"] = ts.date()
    e.setdefault("currency", "USD")
    for optional in ("title", "customer_id"):
        if topic == "reviews":
            e.setdefault(optional, None)
    return {
        **e,
        "_topic": topic,
        "_partition": s.partition,
        "_offset": s.offset,
        "_ingested_at": ingested_at,
    }


# --- running workers ------------------------------------------------------------------------------


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # not ready yet
            last_exc = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_exc})")


def status_file(settings: Settings, worker: tuple[int, int]) -> dict:
    path = settings.speed_state_dir / "status" / f"worker-{worker[0]}-of-{worker[1]}.json"
    return json.loads(path.read_text())


def offsets_of(status: dict) -> Watermark:
    return {t: {int(p): int(o) for p, o in ps.items()} for t, ps in status["offsets"].items()}


def covers(status: dict, ends: Watermark, worker: tuple[int, int] = (0, 1)) -> bool:
    """The worker's positions reached ``ends`` on every partition it owns."""
    got = offsets_of(status)
    return all(
        got.get(t, {}).get(p) == o
        for t, ps in ends.items()
        for p, o in ps.items()
        if p % worker[1] == worker[0]
    )


@contextmanager
def worker_thread(
    settings: Settings,
    worker: tuple[int, int] = (0, 1),
    max_records: int | None = None,
    kafka_client: str = "kafka-python",
    serving_only: bool = False,
) -> Iterator[str]:
    """Run a worker in a thread; yield its query endpoint; stop it cleanly after.

    Yields once the worker's status says it is connected to the broker, or with
    ``serving_only`` as soon as it serves queries (it may not have polled yet)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if max_records is None:
                run_worker(
                    settings, worker=worker, query_port=0, stop=stop, kafka_client=kafka_client
                )
                return
            state = SpeedState(settings.speed_state_dir / "w.duckdb", worker)
            try:
                SpeedWorker(
                    settings, state, worker, max_records=max_records, kafka_client=kafka_client
                ).run(stop, 0)
            finally:
                state.close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        status = wait_until(
            lambda: (
                not errors
                and (serving_only or status_file(settings, worker).get("connected"))
                and status_file(settings, worker).get("query_endpoint")
                and status_file(settings, worker)
            ),
            60,
            f"worker {worker} to start",
        )
        yield status["query_endpoint"]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the worker did not stop"
    assert not errors, errors


def query(endpoint: str, view: str, min_offsets: Watermark, **kw) -> SpeedAnswer:
    return query_speed(endpoint, SpeedQuery(view=view, min_offsets=min_offsets, **kw), timeout=10)  # type: ignore[arg-type]


# --- the tests ------------------------------------------------------------------------------------


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    settings = settings_for(fresh_broker, speed_dir=tmp_path / "speed")
    stream = Stream(fresh_broker.bootstrap, seed=11)
    publisher = Publisher(settings)
    port = free_port()
    env = {
        **os.environ,
        "LAMBDALAKE_HOME": str(tmp_path / "home"),
        "LAMBDALAKE_SPEED_DIR": str(settings.speed_state_dir),
        "LAMBDALAKE_LOG_LEVEL": "WARNING",
    }
    cmd = [
        sys.executable, "-m", "lambdalake.cli", "speed", "run",
        "--bootstrap", fresh_broker.bootstrap, "--lake", settings.lake_uri,
        "--query-port", str(port),
    ]  # fmt: skip
    producing = threading.Event()
    producing.set()
    run: list[RunRecord] = []

    def produce() -> None:
        for i in range(40):
            stream.burst(orders=400, reviews=25, dup=0.01, bad=0.02)
            if i == 15:  # a batch run publishes in the middle of the stream
                run.append(publisher.publish("run-1", stream.ends(), list(stream.log)))
            time.sleep(0.25)
        producing.clear()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    rng = random.Random(3)
    kills = kills_while_running = 0
    try:
        while kills < 12 or producing.is_set():
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.2, 3.0))  # now and then, while it starts
            else:
                # Otherwise at a random moment after it started consuming.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not _running(settings, proc.pid):
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.5))
            running = _running(settings, proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            kills_while_running += running
        producer.join()
        stream.flush()
        ends = stream.ends()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            endpoint = f"grpc://127.0.0.1:{port}"
            wait_until(lambda: covers(speed_status(endpoint), ends), 90, "the worker to catch up")
            wm = run[0].watermark
            sales = query(endpoint, "sales", wm, granularity="hour")
            sentiment = query(endpoint, "sentiment", wm)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        producing.clear()
        stream.close()
    assert kills >= 12 and kills_while_running >= 8, (kills, kills_while_running)
    assert sales.run_id == "run-1" and sales.offsets["orders"] == ends["orders"]
    want_sales, want_sentiment = expected(stream.log, run[0].watermark)
    assert want_sales and want_sentiment
    assert_same(answer_sales(sales), want_sales)
    assert_same(answer_sentiment(sentiment), want_sentiment)


def _running(settings: Settings, pid: int) -> bool:
    """The worker process ``pid`` has started and published its status."""
    try:
        return status_file(settings, (0, 1)).get("pid") == pid
    except (OSError, ValueError):
        return False


def test_a_published_run_prunes_exactly_at_its_watermark_even_mid_batch(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=23)
    publisher = Publisher(settings)
    state = SpeedState(tmp_path / "w.duckdb", (0, 1))
    worker = SpeedWorker(settings, state, (0, 1), max_records=700)
    try:
        worker.start(0)
        endpoint = worker.server.endpoint

        def drain(ends: Watermark) -> None:
            deadline = time.monotonic() + 60
            while not all(
                state.positions.get((t, p), 0) >= o for t, ps in ends.items() for p, o in ps.items()
            ):
                assert time.monotonic() < deadline, "the worker did not catch up"
                worker.step()

        stream.burst(orders=1500, reviews=60, dup=0.0)
        stream.burst(orders=500, reviews=20, dup=0.1)  # duplicates within the held events
        first_ends = stream.ends()
        drain(first_ends)
        assert_same(
            answer_sales(query(endpoint, "sales", {}, granularity="hour")),
            expected(stream.log, {})[0],
        )

        # Run 1 covers everything consumed so far: the worker then holds nothing.
        run1 = publisher.publish("run-1", first_ends, list(stream.log))
        wait_until(lambda: worker.watcher.prepared_run_id == "run-1", 30, "run-1 prepared")
        worker.step()
        assert state.applied.run_id == "run-1"
        assert state.counts()["events"] == dict.fromkeys(TOPICS, 0)
        answer = query(endpoint, "sales", run1.watermark)
        assert answer.table.num_rows == 0 and answer.offsets["orders"] == first_ends["orders"]

        # New events, and re-deliveries of events the run counted (they straddle the watermark).
        stream.burst(orders=2000, reviews=40, dup=0.0)
        counted = [
            s
            for s in stream.log
            if s.event is not None and s.offset < first_ends[s.topic][s.partition]
        ]
        for s in random.Random(1).sample(counted, 150):
            stream.send(s.topic, s.event, raw=s.value)
        stream.flush()
        all_ends = stream.ends()

        # Take a micro-batch in flight, then publish run 2 with a watermark inside it.
        item = wait_until(lambda: _next_batch(worker), 30, "a micro-batch in flight")
        raw = item.raw["orders"]
        wm2 = {t: dict(first_ends[t]) for t in first_ends}
        for p in set(raw.partitions):
            offs = [o for o, pp in zip(raw.offsets, raw.partitions, strict=True) if pp == p]
            wm2["orders"][p] = (min(offs) + max(offs) + 1) // 2
        run2 = publisher.publish("run-2", wm2, list(stream.log))
        wait_until(lambda: worker.watcher.prepared_run_id == "run-2", 30, "run-2 prepared")
        worker.handle(item)  # the run is applied first; the batch is cut at its watermark
        assert state.applied.run_id == "run-2"
        consumed = {t: {p: state.positions[(t, p)] for p in range(PARTITIONS)} for t in all_ends}
        want_now = expected(stream.log, run2.watermark, upto=consumed)[0]
        assert_same(
            answer_sales(query(endpoint, "sales", run2.watermark, granularity="hour")), want_now
        )

        drain(all_ends)
        want_sales, want_sentiment = expected(stream.log, run2.watermark)
        assert_same(
            answer_sales(query(endpoint, "sales", run2.watermark, granularity="hour")), want_sales
        )
        assert_same(answer_sentiment(query(endpoint, "sentiment", run2.watermark)), want_sentiment)
        # Not one re-delivered event the batch counted is held again.
        held_ids = {r[0] for r in state.con.execute("SELECT event_id FROM held_orders").fetchall()}
        counted_ids = {s.event["event_id"] for s in counted if s.topic == "orders"}
        assert not held_ids & counted_ids
    finally:
        worker.close()
        state.close()
        stream.close()


def _next_batch(worker: SpeedWorker) -> Polled | None:
    """The next micro-batch with orders from the poller (partition assignments handled)."""
    item = worker.queue.get(timeout=1)
    if not isinstance(item, Polled):
        worker.handle(item)
        return None
    if "orders" not in item.raw or len(item.raw["orders"].offsets) < 10:
        worker.handle(item)
        return None
    return item


def test_a_trickle_is_handed_over_in_micro_batches_at_least_the_interval_apart(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    """At a low rate every poll would be a micro-batch of a few events, each costing a whole
    commit: the poller hands micro-batches over LAMBDALAKE_SPEED_BATCH_INTERVAL_MS apart even
    to a main thread that is free at once (docs/speed.md), and every event still comes."""
    settings = settings_for(fresh_broker)
    interval = settings.speed_batch_interval_ms / 1000
    assert interval > 0.1
    out: queue.Queue[Polled | Assigned] = queue.Queue(maxsize=1)
    stop = threading.Event()
    poller = Poller(settings, (0, 1), out, stop, min_interval=interval)
    poller.start()
    stream = Stream(fresh_broker.bootstrap, seed=43)
    handed: list[tuple[float, int]] = []

    def trickle() -> None:  # 40 orders over ~2 s
        for _ in range(40):
            stream.send("orders", stream.order())
            stream.flush()
            time.sleep(0.05)

    try:
        assigned = out.get(timeout=60)
        assert isinstance(assigned, Assigned)
        poller.seek({tp: 0 for tp in assigned.partitions})
        producer = threading.Thread(target=trickle)
        producer.start()
        deadline = time.monotonic() + 60
        while sum(n for _, n in handed) < 40:
            assert time.monotonic() < deadline, f"only {handed} handed over"
            try:
                item = out.get(timeout=0.5)  # the main thread, free again at once
            except queue.Empty:
                continue
            if isinstance(item, Polled) and item.messages:
                handed.append((time.monotonic(), item.messages))
        producer.join()
    finally:
        stop.set()
        poller.join(timeout=10)
        stream.close()
    assert sum(n for _, n in handed) == 40
    assert len(handed) >= 3, handed  # a trickle: several micro-batches, not one at the end
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(handed)]
    assert min(gaps) >= interval - 0.02, gaps


def test_two_workers_together_hold_what_one_holds(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=31)
    try:
        stream.burst(orders=1500, reviews=80, dup=0.05)
        # A run before the workers start: they begin at its watermark.
        run = Publisher(settings).publish("run-1", stream.ends(), list(stream.log))
        stream.burst(orders=2500, reviews=80, dup=0.05)
    finally:
        stream.close()
    ends = stream.ends()
    answers = {}
    with (
        worker_thread(settings, (0, 1)) as one,
        worker_thread(settings, (0, 2)) as first,
        worker_thread(settings, (1, 2)) as second,
    ):
        for w, ep in (((0, 1), one), ((0, 2), first), ((1, 2), second)):
            wait_until(lambda w=w, ep=ep: covers(speed_status(ep), ends, w), 60, f"worker {w}")
            answers[w] = (
                query(ep, "sales", run.watermark, granularity="hour"),
                query(ep, "sentiment", run.watermark),
            )
        messages = speed_status(one)["since_start"]["messages"]
    # The single worker started at the watermark and read every message once.
    assert messages == sum(o - run.watermark[t][p] for t, ps in ends.items() for p, o in ps.items())
    halves = [answers[(0, 2)], answers[(1, 2)]]
    assert set(halves[0][0].partitions["orders"]) == {0, 2}
    assert set(halves[1][0].partitions["orders"]) == {1, 3}
    want_sales, want_sentiment = expected(stream.log, run.watermark)
    assert_same(answer_sales(answers[(0, 1)][0]), want_sales)
    assert_same(merged(*(answer_sales(a[0]) for a in halves)), want_sales)
    assert_same(answer_sentiment(answers[(0, 1)][1]), want_sentiment)
    assert_same(merged(*(answer_sentiment(a[1]) for a in halves)), want_sentiment)


def test_the_endpoint_answers_exactly_while_the_worker_consumes_at_full_speed(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=41)
    try:
        for _ in range(5):
            stream.burst(orders=6000, dup=0.002, bad=0.001)
    finally:
        stream.close()
    ends = stream.ends()
    total = sum(ends["orders"].values())
    answers: list[tuple[float, SpeedAnswer]] = []
    # Micro-batches of 5,000 messages: the backlog takes several commits to drain. Queries
    # start as soon as the endpoint serves: a worker that waited to report itself connected
    # (a status write) could have drained the whole backlog by then.
    with worker_thread(settings, max_records=5000, serving_only=True) as endpoint:
        while True:
            t0 = time.monotonic()
            answer = query(endpoint, "sales", {}, granularity="hour")
            answers.append((time.monotonic() - t0, answer))
            if answer.offsets["orders"] == ends["orders"]:
                break
            assert len(answers) < 2000, "the worker did not catch up"
    mid = [a for _, a in answers if 0 < sum(a.offsets["orders"].values()) < total]
    assert len(mid) >= 3, f"only {len(mid)} answers while consuming"
    assert max(s for s, _ in answers) < 2.0
    # Every answer is exactly the events below the offsets it reports (a consistent snapshot).
    for answer in [*mid[:: max(1, len(mid) // 4)], answers[-1][1]]:
        want = expected(stream.log, {}, upto={"orders": answer.offsets["orders"]})[0]
        assert_same(answer_sales(answer), want)


def test_broker_down_keeps_serving_and_reports_it(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=53)
    try:
        stream.burst(orders=800, reviews=20)
    finally:
        stream.close()
    ends = stream.ends()
    with worker_thread(settings) as endpoint:
        wait_until(lambda: covers(speed_status(endpoint), ends), 60, "the worker to catch up")
        before = answer_sales(query(endpoint, "sales", {}, granularity="hour"))
        fresh_broker.stop()
        status = wait_until(
            lambda: (s := speed_status(endpoint))["broker_unreachable"] and s, 40, "unreachable"
        )
        assert status["lag"]["orders"] == {str(p): 0 for p in range(PARTITIONS)}
        assert status["memory"]["duckdb"] > 0  # where the worker's memory is (bench/soak.py)
        assert answer_sales(query(endpoint, "sales", {}, granularity="hour")) == before
        assert status_file(settings, (0, 1))["broker_unreachable"] is True
    assert_same(before, expected(stream.log, {})[0])


def test_the_confluent_kafka_client_holds_exactly_the_same(
    fresh_broker: EmbeddedBroker, settings_for
) -> None:
    pytest.importorskip("confluent_kafka", reason="confluent-kafka is optional")
    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=61)
    try:
        stream.burst(orders=1200, reviews=40, dup=0.05)
        run = Publisher(settings).publish("run-1", stream.ends(), list(stream.log))
        stream.burst(orders=1200, reviews=40, dup=0.05)
    finally:
        stream.close()
    ends = stream.ends()
    with worker_thread(settings, kafka_client="confluent-kafka") as endpoint:
        status = wait_until(
            lambda: (s := speed_status(endpoint)) and covers(s, ends) and s, 60, "catch up"
        )
        sales = query(endpoint, "sales", run.watermark, granularity="hour")
        sentiment = query(endpoint, "sentiment", run.watermark)
    assert status["kafka_client"] == "confluent-kafka"
    # Nothing was delivered twice to the state: every message consumed once, from the watermark.
    consumed = sum(o - run.watermark[t][p] for t, ps in ends.items() for p, o in ps.items())
    assert status["since_start"]["messages"] == consumed
    want_sales, want_sentiment = expected(stream.log, run.watermark)
    assert_same(answer_sales(sales), want_sales)
    assert_same(answer_sentiment(sentiment), want_sentiment)


def test_a_run_demoted_mid_batch_re_reads_from_the_older_watermark_and_loses_nothing(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """The watermark goes back (the newest run demoted) while a micro-batch polled above
    the worker's positions is in flight: that batch must not be committed after the
    re-seek, or positions jump past every event between the older watermark and it."""
    from batch.quality import demote_run

    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=71)
    publisher = Publisher(settings)
    state = SpeedState(tmp_path / "w.duckdb", (0, 1))
    worker = SpeedWorker(settings, state, (0, 1), max_records=700)

    def drain(ends: Watermark) -> None:
        deadline = time.monotonic() + 60
        while not all(
            state.positions.get((t, p), 0) >= o for t, ps in ends.items() for p, o in ps.items()
        ):
            assert time.monotonic() < deadline, "the worker did not catch up"
            worker.step()

    try:
        worker.start(0)
        endpoint = worker.server.endpoint
        stream.burst(orders=1200, reviews=40, dup=0.05)
        ends_a = stream.ends()
        wm1 = {t: {p: o // 2 for p, o in ps.items()} for t, ps in ends_a.items()}
        run1 = publisher.publish("run-1", wm1, list(stream.log))
        stream.burst(orders=1200, reviews=40, dup=0.05)
        ends_b = stream.ends()
        drain(ends_b)
        publisher.publish("run-2", ends_b, list(stream.log))
        wait_until(lambda: worker.watcher.prepared_run_id == "run-2", 30, "run-2 prepared")
        worker.step()
        assert state.applied.run_id == "run-2"
        assert state.counts()["events"] == dict.fromkeys(TOPICS, 0)

        stream.burst(orders=3000, reviews=20, dup=0.0, bad=0.0)
        item = wait_until(lambda: _next_batch(worker), 30, "a micro-batch in flight")
        assert min(item.raw["orders"].offsets) >= min(ends_b["orders"].values())
        assert demote_run(settings, "run-2", ["a failed check"])
        wait_until(lambda: worker.watcher.prepared_run_id == "run-1", 30, "run-1 prepared")
        worker.handle(item)  # run-1 applied first (a reset); the in-flight batch discarded
        assert state.applied.run_id == "run-1"
        assert worker.counters.discarded == 1
        # The ids run-1 counted were streamed through a file, gone once applied.
        assert not list((settings.speed_state_dir / "prepared").rglob("*.parquet"))
        assert state.positions[("orders", 0)] == wm1["orders"][0]

        # While re-reading, answers leave the partitions out (callers report them missing).
        answer = query(endpoint, "sales", run1.watermark, granularity="hour")
        assert answer.partitions["orders"] == [] and answer.table.num_rows == 0
        rereading = answer.meta.rereading["orders"]
        assert set(rereading) == set(range(PARTITIONS))
        assert all(rereading[p] >= ends_b["orders"][p] > wm1["orders"][p] for p in rereading)

        all_ends = stream.ends()
        drain(all_ends)
        sales = query(endpoint, "sales", run1.watermark, granularity="hour")
        sentiment = query(endpoint, "sentiment", run1.watermark)
        assert sales.meta.rereading == {} and sales.partitions["orders"] == list(range(PARTITIONS))
        assert sales.offsets["orders"] == all_ends["orders"]
        want_sales, want_sentiment = expected(stream.log, run1.watermark)
        assert_same(answer_sales(sales), want_sales)
        assert_same(answer_sentiment(sentiment), want_sentiment)
    finally:
        worker.close()
        state.close()
        stream.close()


def test_status_measures_lag_against_the_ends_now_and_says_how_old_it_is(
    fresh_broker: EmbeddedBroker, settings_for, tmp_path: Path
) -> None:
    """Messages wait while the worker does not commit: `lambdalake status` must show
    them at once (not a 0 from ends read seconds ago), with the measurement's age."""
    from lambdalake.ops.status import collect_status

    settings = settings_for(fresh_broker)
    stream = Stream(fresh_broker.bootstrap, seed=83)
    state = SpeedState(tmp_path / "w.duckdb", (0, 1))
    worker = SpeedWorker(settings, state, (0, 1))
    try:
        stream.burst(orders=300, dup=0.0, bad=0.0)
        worker.start(0)
        first = stream.ends()
        deadline = time.monotonic() + 60
        while not all(
            state.positions.get(("orders", p), 0) >= o for p, o in first["orders"].items()
        ):
            assert time.monotonic() < deadline, "the worker did not catch up"
            worker.step()
        worker.reporter.write()
        # From now on the main thread commits nothing: everything produced waits.
        stream.burst(orders=2000, dup=0.0, bad=0.0)
        ends = stream.ends()
        waiting = sum(ends["orders"][p] - first["orders"][p] for p in range(PARTITIONS))
        report = collect_status(settings)
        (w,) = report["speed"]["workers"]
        assert w["lag_source"] == "broker" and w["lag_age_s"] < 5
        assert sum(int(n) for n in w["lag"]["orders"].values()) == waiting
        assert report["speed"]["total_lag"] == waiting
        # The worker's own file catches up with the ends within about a second or two, and
        # says when its ends were read (the fetch high-water marks can raise the lag before the
        # first ListOffsets read lands, so wait for that read too).
        own = wait_until(
            lambda: (
                (s := status_file(settings, (0, 1)))
                and sum(int(n) for n in s["lag"]["orders"].values()) == waiting
                and s["lag_age_s"] is not None
                and s
            ),
            10,
            "the worker's own lag and its age",
        )
        assert own["lag_age_s"] < 5
        assert own["lag_measured_at"].endswith("Z")
        # The next read, a second later, goes through the same kept client and sees the
        # messages produced since (ListOffsets asked again, not remembered).
        from lambdalake.ops import status as status_module

        readers = {r for r, _ in status_module._ENDS._readers.values()}
        made = sum(r.clients_made for r in readers)
        stream.burst(orders=500, dup=0.0, bad=0.0)
        more = sum(stream.ends()["orders"][p] - ends["orders"][p] for p in range(PARTITIONS))
        time.sleep(status_module.ENDS_TTL_SECONDS + 0.1)
        report = collect_status(settings)
        assert report["speed"]["total_lag"] == waiting + more
        assert {r for r, _ in status_module._ENDS._readers.values()} == readers
        assert sum(r.clients_made for r in readers) == made  # no new client
    finally:
        worker.close()
        state.close()
        stream.close()


def test_status_without_a_broker_keeps_the_workers_lag_and_answers_quickly(tmp_path: Path) -> None:
    from lambdalake.ops.status import speed_status as system_speed_status

    status_dir = tmp_path / "status"
    status_dir.mkdir()
    measured = (NOW - timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    (status_dir / "worker-0-of-1.json").write_text(
        json.dumps(
            {
                "worker": "0/1",
                "offsets": {"orders": {"0": 5}},
                "lag": {"orders": {"0": 7}},
                "updated_at": NOW.isoformat(),
                "lag_measured_at": measured,
            }
        )
    )
    t0 = time.monotonic()
    report = system_speed_status(status_dir, NOW, f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 5
    (w,) = report["workers"]
    assert w["lag_source"] == "worker" and w["lag"] == {"orders": {"0": 7}}
    assert w["lag_age_s"] == 30.0 and report["total_lag"] == 7
