"""Speed-layer benchmark: this worker vs a naive per-message consumer vs Quix Streams.

One run, one broker, one pre-filled ``orders`` topic, the same aggregation
(units, revenue and order lines per SKU, store and UTC hour of the event time):

1. **this worker** (``lambdalake speed run`` as a subprocess) drains the topic:
   sustained events/s, peak RSS; its answer (through the Flight endpoint) is
   checked against an independent DuckDB recompute of what was produced.
2. **naive baseline**: kafka-python, one DuckDB transaction per message (dedup
   insert + aggregate upsert + position), bounded to ``--naive-seconds`` and
   extrapolated; its partial result is checked against the recompute of the
   prefix it consumed.
3. **Quix Streams** (if installed; ``pip install quixstreams``, not a project
   dependency) in a subprocess: tumbling 1 h event-time windows with
   ``Sum``/``Count`` per message key (``store|sku``), at-least-once, no
   changelog topics; its consumer-group join is timed and reported apart; its
   final window values are checked against the recompute.
4. **freshness** (last: it adds events to the topic): the worker again (it
   resumes at the end) while a producer sends a steady ``--rate`` events/s;
   probe events are timed from ``send`` to "covered by an answer of the query
   endpoint" (the answer's offsets pass the probe's offset): p50 / p99.

The events are all valid and unique, keyed ``store|sku``, with event times
spread over ``--days`` days in random order (so windows see out-of-order data).

    .venv/bin/python bench/speed.py --events 200000 --out bench-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import pyarrow as pa  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from lambdalake.contract.speed_protocol import (  # noqa: E402
    SpeedQuery,
    connect,
    query_speed,
    speed_status,
)
from lambdalake.ops.broker import EmbeddedBroker, free_port  # noqa: E402

Key = tuple[str, str, str]  # (hour ISO, store, sku)
Sums = dict[Key, tuple[int, float, int]]


def say(stage: str, **facts: Any) -> None:
    detail = " ".join(f"{k}={v}" for k, v in facts.items())
    print(f"[bench] {stage} {detail}", file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------------


def make_events(
    n: int, *, skus: int, stores: int, days: int, seed: int, end: datetime | None = None
) -> list[dict]:
    rng = random.Random(seed)
    end = end or datetime.now(UTC).replace(microsecond=0)
    span = days * 86_400
    return [
        {
            "event_id": f"b-{seed}-{i}",
            "event_time": (end - timedelta(seconds=rng.randrange(span))).isoformat(),
            "store_id": f"store-{rng.randrange(stores)}",
            "sku": f"sku-{rng.randrange(skus)}",
            "quantity": rng.choice((1, 1, 1, 2, 3, -1)),
            "unit_price": round(rng.uniform(0.5, 200.0), 2),
        }
        for i in range(n)
    ]


class Producer:
    """kafka-python producer with explicit partitions (by key) and delivery records."""

    def __init__(self, bootstrap: str, partitions: int, linger_ms: int = 20) -> None:
        self.partitions = partitions
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=linger_ms, batch_size=1 << 20, acks=1
        )

    def send(self, event: dict, on_delivery: Any = None) -> None:
        key = f"{event['store_id']}|{event['sku']}".encode()
        fut = self.producer.send(
            "orders",
            key=key,
            value=json.dumps(event).encode(),
            partition=zlib.crc32(key) % self.partitions,
        )
        if on_delivery is not None:
            fut.add_callback(on_delivery)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def prefill(bootstrap: str, partitions: int, events: list[dict]) -> list[tuple[int, int]]:
    """Produce ``events``; return each one's (partition, offset)."""
    where: list[tuple[int, int] | None] = [None] * len(events)
    producer = Producer(bootstrap, partitions)
    t0 = time.monotonic()
    for i, event in enumerate(events):

        def done(md: Any, i: int = i) -> None:
            where[i] = (md.partition, md.offset)

        producer.send(event, done)
        if i and i % 100_000 == 0:
            say("prefill", sent=i, per_s=round(i / (time.monotonic() - t0)))
    producer.close()
    assert all(w is not None for w in where), "some events were not acknowledged"
    return [w for w in where if w is not None]


def recompute(
    events: list[dict], where: list[tuple[int, int]], upto: dict[int, int] | None
) -> Sums:
    """The reference answer: DuckDB over the produced events (below ``upto`` if given)."""
    keep = [i for i, (p, o) in enumerate(where) if upto is None or o < upto.get(p, 0)]
    produced = pa.table(  # noqa: F841 - scanned by name below
        {
            "ts": [events[i]["event_time"] for i in keep],
            "store": [events[i]["store_id"] for i in keep],
            "sku": [events[i]["sku"] for i in keep],
            "qty": pa.array([events[i]["quantity"] for i in keep], pa.int64()),
            "price": pa.array([events[i]["unit_price"] for i in keep], pa.float64()),
        }
    )
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    rows = con.execute(
        """SELECT date_trunc('hour', CAST(ts AS TIMESTAMPTZ)), store, sku,
                  sum(qty), sum(qty * price), count(*) FROM produced GROUP BY ALL"""
    ).fetchall()
    return {(_iso(h), st, sk): (int(u), float(r), int(n)) for h, st, sk, u, r, n in rows}


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00Z")


def same(a: Sums, b: Sums) -> bool:
    if set(a) != set(b):
        return False
    return all(
        a[k][0] == b[k][0]
        and a[k][2] == b[k][2]
        and abs(a[k][1] - b[k][1]) < 1e-6 * max(1, abs(b[k][1]))
        for k in b
    )


def differences(got: Sums, want: Sums, limit: int = 5) -> dict[str, Any]:
    """A short account of how two results differ (for the report when they do)."""
    keys = sorted(set(got) | set(want))
    diff = [k for k in keys if got.get(k) != want.get(k)]
    return {
        "groups": [len(got), len(want)],
        "order_lines": [sum(v[2] for v in got.values()), sum(v[2] for v in want.values())],
        "differing_groups": len(diff),
        "examples": [[list(k), got.get(k), want.get(k)] for k in diff[:limit]],
    }


def true_ends(bootstrap: str, partitions: int) -> dict[int, int]:
    from lambdalake.kafka.clients import end_offsets

    ends = end_offsets(bootstrap, [TopicPartition("orders", p) for p in range(partitions)])
    return {tp.partition: o for tp, o in ends.items()}


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --- 1 + 2: this worker and freshness ---------------------------------------------------------------


# The worker with another Kafka client: ``run_worker`` itself (the CLI has no flag for it).
WORKER_WITH_CLIENT = """
import sys
from lambdalake.cli import stop_event_on_signals
from lambdalake.settings import Settings
from speed.worker import run_worker
settings = Settings().with_overrides(bootstrap=sys.argv[1], lake=sys.argv[2])
run_worker(settings, worker=(0, 1), query_port=int(sys.argv[3]), stop=stop_event_on_signals(),
           kafka_client=sys.argv[4])
"""


@contextmanager
def our_worker(
    bootstrap: str, workdir: Path, client: str = "kafka-python"
) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """``lambdalake speed run`` as a subprocess (state in ``workdir``); yields its
    endpoint, the process and the seconds it took to connect; SIGTERM after."""
    port = free_port()
    endpoint = f"grpc://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LAMBDALAKE_HOME": str(workdir / "home"),
        "LAMBDALAKE_SPEED_DIR": str(workdir / "speed"),
        "LAMBDALAKE_LOG_LEVEL": "WARNING",
    }
    cmd = [
        sys.executable, "-m", "lambdalake.cli", "speed", "run", "--bootstrap", bootstrap,
        "--lake", str(workdir / "lake"), "--query-port", str(port),
    ]  # fmt: skip
    if client != "kafka-python":
        lake = str(workdir / "lake")
        cmd = [sys.executable, "-c", WORKER_WITH_CLIENT, bootstrap, lake, str(port), client]
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        status: dict[str, Any] = {}
        while not status.get("connected"):
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}")
            try:
                status = speed_status(endpoint, timeout=2)
            except Exception:  # not listening yet
                time.sleep(0.05)
        yield endpoint, proc, time.monotonic() - t_start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_ours(
    bootstrap: str,
    ends: dict[int, int],
    workdir: Path,
    events: list[dict],
    where: list[tuple[int, int]],
    client: str = "kafka-python",
) -> dict[str, Any]:
    """Drain the pre-filled topic with this worker; verify its answer."""
    total = sum(ends.values())
    with our_worker(bootstrap, workdir, client) as (endpoint, proc, startup):
        t0 = time.monotonic()
        say("ours.started", client=client, startup_s=round(startup, 2))
        while True:
            status = speed_status(endpoint, timeout=5)
            done = sum(int(o) for o in status["offsets"].get("orders", {}).values())
            if done >= total:
                break
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        rate = total / seconds
        say("ours.drained", events=total, seconds=round(seconds, 2), per_s=round(rate))
        answer = query_speed(endpoint, SpeedQuery(view="sales", granularity="hour"), timeout=30)
        rss = peak_rss_mb(proc.pid)
    got = {
        (_iso(r["period"]), r["store_id"], r["sku"]): (r["units"], r["revenue"], r["order_lines"])
        for r in answer.table.to_pylist()
    }
    want = recompute(events, where, None)
    ok = same(got, want)
    say("ours.verified", equal=ok, groups=len(want))
    since = status.get("since_start", {})
    result = {
        "kafka_client": client,
        "events": total,
        "seconds": round(seconds, 3),
        "events_per_s": round(rate),
        "startup_seconds": round(startup, 2),
        "peak_rss_mb": rss,
        "equal_to_recompute": ok,
        "batches": since.get("batches"),
        "stage_seconds": {k: since.get(f"{k}_seconds") for k in ("poll", "validate", "commit")},
    }
    if not ok:
        result["differences"] = differences(got, want)
    return result


def run_freshness(
    bootstrap: str, partitions: int, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The worker again (it resumes at the end), under a steady stream."""
    with our_worker(bootstrap, workdir) as (endpoint, proc, _):
        cpu0, status0, t0 = cpu_seconds(proc.pid), speed_status(endpoint), time.monotonic()
        result = freshness(bootstrap, partitions, endpoint, args)
        status, wall = speed_status(endpoint), time.monotonic() - t0
        # The worker's own share: first message polled -> micro-batch committed.
        result["worker_poll_to_commit_ms"] = status["poll_to_commit_ms"]
        # What the steady stream cost it: cores busy and micro-batches committed per second.
        result["worker_cpu_cores"] = round((cpu_seconds(proc.pid) - cpu0) / wall, 3)
        batches = status["since_start"]["batches"] - status0["since_start"]["batches"]
        result["batches_per_s"] = round(batches / wall, 1)
        # Where the main thread's time went, per micro-batch (the rest of the CPU: the
        # poller's fetching and the query endpoint answering the probes above).
        for stage in ("validate", "commit"):
            spent = (
                status["since_start"][f"{stage}_seconds"]
                - status0["since_start"][f"{stage}_seconds"]
            )
            result[f"{stage}_ms_per_batch"] = round(1000 * spent / max(batches, 1), 1)
        say(
            "freshness cost",
            cores=result["worker_cpu_cores"],
            batches_per_s=result["batches_per_s"],
        )
        return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def freshness(bootstrap: str, partitions: int, endpoint: str, args: argparse.Namespace) -> dict:
    """Steady ``args.rate`` events/s; probes timed from send to covered by an answer."""
    rng_events = make_events(
        int(args.rate * args.freshness_seconds) + 10, skus=args.skus, stores=args.stores,
        days=1, seed=99,
    )  # fmt: skip
    producer = Producer(bootstrap, partitions, linger_ms=5)
    probes: dict[int, tuple[float, int | None, int | None]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    latencies: list[float] = []

    def on_probe(i: int) -> Any:
        def done(md: Any) -> None:
            with lock:
                sent, _, _ = probes[i]
                probes[i] = (sent, md.partition, md.offset)

        return done

    def watch() -> None:
        q = SpeedQuery(view="sales", granularity="hour", skus=("no-such-sku",))
        client = connect(endpoint)
        while True:
            try:
                answer = query_speed(endpoint, q, timeout=5, client=client)
            except Exception:  # keep probing
                time.sleep(0.01)
                continue
            now = time.monotonic()
            covered = answer.offsets.get("orders", {})
            with lock:
                for i, (sent, p, o) in list(probes.items()):
                    if p is not None and o is not None and covered.get(p, 0) > o:
                        latencies.append(now - sent)
                        del probes[i]
            if stop.is_set() and (not probes or time.monotonic() > deadline_after_stop[0]):
                break
            time.sleep(0.01)
        client.close()

    deadline_after_stop = [float("inf")]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    probe_every = max(1, int(args.rate / 20))  # ~20 probes per second
    for i, event in enumerate(rng_events):
        due = t0 + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if i % probe_every == 0:
            with lock:
                probes[i] = (time.monotonic(), None, None)
            producer.send(event, on_probe(i))
        else:
            producer.send(event)
    achieved = len(rng_events) / (time.monotonic() - t0)
    producer.close()
    stop.set()
    deadline_after_stop[0] = time.monotonic() + 10
    watcher.join(timeout=15)
    latencies.sort()
    if not latencies:
        return {"probes": 0}
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    result = {
        "rate_target": args.rate,
        "rate_achieved": round(achieved),
        "probes": len(latencies),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
    }
    say("freshness", **result)
    return result


# --- 3: the naive per-message baseline ----------------------------------------------------------


def run_naive(
    bootstrap: str,
    partitions: int,
    seconds: float,
    total: int,
    workdir: Path,
    events: list[dict],
    where: list[tuple[int, int]],
) -> dict[str, Any]:
    """One DuckDB transaction per message: dedup insert, aggregate upsert, position."""
    con = duckdb.connect(str(workdir / "naive.duckdb"))
    con.execute("SET TimeZone='UTC'")
    con.execute("CREATE TABLE seen (event_id VARCHAR PRIMARY KEY)")
    con.execute(
        "CREATE TABLE agg (hour TIMESTAMPTZ, store_id VARCHAR, sku VARCHAR, units BIGINT, "
        "revenue DOUBLE, order_lines BIGINT, PRIMARY KEY (hour, store_id, sku))"
    )
    con.execute("CREATE TABLE positions (p INTEGER PRIMARY KEY, next_offset BIGINT)")
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", max_poll_records=500,
    )  # fmt: skip
    tps = [TopicPartition("orders", p) for p in range(partitions)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    n = 0
    upto: dict[int, int] = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and n < total:
        for tp, records in consumer.poll(timeout_ms=100).items():
            for r in records:
                e = json.loads(r.value)
                con.execute("BEGIN")
                new = con.execute(
                    "INSERT INTO seen VALUES (?) ON CONFLICT DO NOTHING RETURNING event_id",
                    [e["event_id"]],
                ).fetchall()
                if new:
                    con.execute(
                        """INSERT INTO agg VALUES (date_trunc('hour', CAST(? AS TIMESTAMPTZ)),
                        ?, ?, ?, ?, 1) ON CONFLICT (hour, store_id, sku) DO UPDATE SET
                        units = units + excluded.units, revenue = revenue + excluded.revenue,
                        order_lines = order_lines + 1""",
                        [e["event_time"], e["store_id"], e["sku"], e["quantity"],
                         e["quantity"] * e["unit_price"]],
                    )  # fmt: skip
                con.execute(
                    "INSERT INTO positions VALUES (?, ?) ON CONFLICT (p) DO UPDATE SET "
                    "next_offset = excluded.next_offset",
                    [tp.partition, r.offset + 1],
                )
                con.execute("COMMIT")
                upto[tp.partition] = r.offset + 1
                n += 1
                if time.monotonic() - t0 >= seconds:
                    break
            if time.monotonic() - t0 >= seconds:
                break
    elapsed = time.monotonic() - t0
    consumer.close()
    rows = con.execute(
        "SELECT hour, store_id, sku, units, revenue, order_lines FROM agg"
    ).fetchall()
    got = {(_iso(h), st, sk): (int(u), float(rv), int(c)) for h, st, sk, u, rv, c in rows}
    ok = same(got, recompute(events, where, upto))
    rate = n / elapsed
    result = {
        "events": n,
        "seconds": round(elapsed, 2),
        "events_per_s": round(rate),
        "extrapolated_seconds_for_all": round(total / rate, 1),
        "equal_to_recompute_of_prefix": ok,
    }
    say("naive", **result)
    return result


# --- 4: Quix Streams ------------------------------------------------------------------------------


def quix_child(args: argparse.Namespace) -> None:
    """Runs in a subprocess: Quix Streams tumbling windows; writes results as JSON."""
    import logging

    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Sum

    logging.getLogger("quixstreams").setLevel(logging.WARNING)
    results: dict[str, list] = {}
    marks: dict[str, float] = {}
    seen = [0]
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"bench-{os.getpid()}-{time.time_ns()}",
        auto_offset_reset="earliest",
        state_dir=args.quix_state,
        use_changelog_topics=False,
        loglevel="WARNING",
    )

    def event_ms(value: Any, headers: Any, timestamp: float, timestamp_type: Any) -> int:
        return int(datetime.fromisoformat(value["event_time"]).timestamp() * 1000)

    topic = app.topic("orders", value_deserializer="json", timestamp_extractor=event_ms)
    # Tansu's DescribeConfigs has no retention.ms, which Quix's window state requires.
    config = topic.broker_config
    config.extra_config.setdefault("retention.ms", "-1")
    topic.broker_config = config
    sdf = app.dataframe(topic)
    sdf["revenue"] = sdf.apply(lambda v: v["quantity"] * v["unit_price"])
    sdf = (
        sdf.tumbling_window(duration_ms=3_600_000, grace_ms=365 * 86_400_000)
        .agg(units=Sum("quantity"), revenue=Sum("revenue"), order_lines=Count())
        .current()
    )

    def record(value: Any, key: Any, timestamp: int, headers: Any) -> None:
        if not seen[0]:
            marks["first"] = time.monotonic()
        seen[0] += 1
        results[f"{key.decode() if isinstance(key, bytes) else key}#{value['start']}"] = [
            value["units"],
            value["revenue"],
            value["order_lines"],
        ]
        marks["last"] = time.monotonic()

    sdf = sdf.update(record, metadata=True)
    marks["start"] = time.monotonic()
    app.run(sdf, count=args.events, timeout=args.quix_timeout, collect=False)
    out = {"marks": marks, "processed": seen[0], "results": results}
    Path(args.quix_out).write_text(json.dumps(out))


def run_quix(
    bootstrap: str,
    total: int,
    workdir: Path,
    args: argparse.Namespace,
    events: list[dict],
    where: list[tuple[int, int]],
) -> dict[str, Any]:
    try:
        import quixstreams
    except ImportError:
        return {"skipped": "quixstreams is not installed (pip install quixstreams)"}
    out = workdir / "quix.json"
    cmd = [
        sys.executable, __file__, "--quix-child", "--bootstrap", bootstrap,
        "--events", str(total), "--quix-out", str(out), "--quix-state", str(workdir / "quix"),
        "--quix-timeout", str(args.quix_timeout),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT)
    rss = None
    while proc.poll() is None:
        rss = peak_rss_mb(proc.pid) or rss
        time.sleep(0.5)
    if proc.returncode != 0 or not out.exists():
        return {"failed": f"exit code {proc.returncode}"}
    data = json.loads(out.read_text())
    marks = data["marks"]
    seconds = marks["last"] - marks["first"]
    got: Sums = {}
    for k, (u, rv, c) in data["results"].items():
        key, start = k.rsplit("#", 1)
        store, sku = key.split("|")
        hour = datetime.fromtimestamp(int(start) / 1000, UTC)
        got[(_iso(hour), store, sku)] = (int(u), float(rv), int(c))
    want = recompute(events, where, None)
    ok = same(got, want)
    result = {
        "version": quixstreams.__version__,
        "events": data["processed"],
        "seconds": round(seconds, 2),
        "events_per_s": round(data["processed"] / seconds) if seconds > 0 else None,
        "consumer_group_join_seconds": round(marks["first"] - marks["start"], 1),
        "peak_rss_mb": rss,
        "equal_to_recompute": ok,
    }
    if not ok:
        result["differences"] = differences(got, want)
    say("quix", **result)
    return result


# --- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--skus", type=int, default=100)
    parser.add_argument("--stores", type=int, default=5)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--rate", type=float, default=5000.0, help="freshness: events/s")
    parser.add_argument("--freshness-seconds", type=float, default=20.0)
    parser.add_argument("--naive-seconds", type=float, default=5.0)
    parser.add_argument("--skip-quix", action="store_true")
    parser.add_argument(
        "--also-confluent",
        action="store_true",
        help="also run this worker with the optional confluent-kafka client",
    )
    parser.add_argument("--quix-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quix-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quix-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quix-state", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quix_child:
        quix_child(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="lambdalake-bench-speed-"))
    say("start", events=args.events, partitions=args.partitions, workdir=workdir)
    broker = EmbeddedBroker.start(port=0, partitions=args.partitions, log_dir=workdir / "broker")
    try:
        events = make_events(
            args.events, skus=args.skus, stores=args.stores, days=args.days, seed=1
        )
        t0 = time.monotonic()
        where = prefill(broker.bootstrap, args.partitions, events)
        say("prefill.done", events=len(events), seconds=round(time.monotonic() - t0, 1))
        ends = true_ends(broker.bootstrap, args.partitions)
        assert sum(ends.values()) == len(events), ends
        results: dict[str, Any] = {
            "events": len(events),
            "partitions": args.partitions,
            "machine": {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)},
        }
        results["ours"] = run_ours(broker.bootstrap, ends, workdir / "ours", events, where)
        if args.also_confluent:
            results["ours_confluent_kafka"] = run_ours(
                broker.bootstrap, ends, workdir / "ours-ck", events, where, "confluent-kafka"
            )
        results["naive"] = run_naive(
            broker.bootstrap,
            args.partitions,
            args.naive_seconds,
            len(events),
            workdir,
            events,
            where,
        )
        if args.skip_quix:
            results["quix"] = {"skipped": "--skip-quix"}
        else:
            results["quix"] = run_quix(broker.bootstrap, len(events), workdir, args, events, where)
        # Last: the steady stream adds events to the topic the others read.
        results["freshness"] = run_freshness(
            broker.bootstrap, args.partitions, workdir / "ours", args
        )
        ours, naive, quix = results["ours"], results["naive"], results["quix"]
        results["speedup"] = {
            "vs_naive": round(ours["events_per_s"] / naive["events_per_s"], 1),
            "vs_quix": (
                round(ours["events_per_s"] / quix["events_per_s"], 1)
                if quix.get("events_per_s")
                else None
            ),
        }
        results["machine"]["load_1m_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(results, indent=2))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
