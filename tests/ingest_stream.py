"""A test stream for ingest: valid, invalid and redelivered events, and checks on the lake.

Shared by the ingest and maintenance tests. Each produced message is recorded
by its (topic, partition, offset), so a test can say exactly which rows the
lake must hold.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deltalake import DeltaTable
from kafka import KafkaProducer, TopicPartition

from lambdalake.contract.events import KEY_BY_TOPIC
from lambdalake.contract.lake import QUARANTINE, Lake
from lambdalake.kafka.clients import end_offsets
from lambdalake.settings import TOPICS

ROOT = Path(__file__).resolve().parents[1]
MAX_EVENT_BYTES = 2048  # small, so oversize messages are cheap to produce

Key = tuple[str, int, int]  # topic, partition, offset


# --- the stream ---------------------------------------------------------------------------


def order_event(i: int) -> dict[str, object]:
    return {
        "event_id": f"o-{i}",
        "event_time": f"2025-01-{1 + i // 1000:02d}T{i % 24:02d}:{i % 60:02d}:00+00:00",
        "store_id": f"store-{i % 3}",
        "sku": f"sku-{i % 17}",
        "quantity": (i % 5) - 2 or 1,
        "unit_price": round(1 + (i % 100) / 7, 2),
        "currency": "USD",
    }


def review_event(i: int) -> dict[str, object]:
    event: dict[str, object] = {
        "review_id": f"r-{i}",
        "event_time": 1_735_689_600_000 + i * 61_000,  # epoch milliseconds
        "sku": f"sku-{i % 17}",
        "rating": 1 + i % 5,
        "text": f"review text number {i}",
    }
    # The optional fields, sometimes absent.
    if i % 3 == 0:
        event["title"] = f"title {i}"
    if i % 2:
        event["customer_id"] = f"c-{i % 11}"
    return event


def product_event(i: int) -> dict[str, object]:
    event: dict[str, object] = {"sku": f"sku-{i % 17}", "category": f"cat-{i % 4}"}
    if i % 2:
        event["name"] = f"product {i}"
    return event


def store_event(i: int) -> dict[str, object]:
    return {"store_id": f"store-{i % 3}", "region": f"region-{i % 2}", "city": f"city {i}"}


EVENTS = {
    "orders": order_event,
    "reviews": review_event,
    "products": product_event,
    "stores": store_event,
}
# The key of each topic's messages (reference data is keyed by its id).
ID_FIELD = KEY_BY_TOPIC  # each topic's id field (a reference record's id is its key)

INVALID_ORDERS: list[bytes | None] = [
    b"{not json",
    json.dumps({**order_event(0), "quantity": 0}).encode(),  # out of range
    json.dumps({k: v for k, v in order_event(0).items() if k != "sku"}).encode(),  # missing
    json.dumps({**order_event(0), "quantity": "three"}).encode(),  # wrong type
    b"[1, 2, 3]",  # not an object
    None,  # tombstone
    json.dumps({**order_event(0), "store_id": "x" * 3000}).encode(),  # oversize
]
INVALID_REVIEWS: list[bytes | None] = [
    b"\xff\xfe not utf-8",
    json.dumps({**review_event(0), "rating": 6}).encode(),
    json.dumps({k: v for k, v in review_event(0).items() if k != "text"}).encode(),
]
INVALID = {
    "orders": INVALID_ORDERS,
    "reviews": INVALID_REVIEWS,
    "products": [json.dumps({"sku": "sku-1"}).encode(), b"{", None],
    "stores": [json.dumps({"store_id": "store-1", "region": ""}).encode(), b"[]"],
}


@dataclass
class Stream:
    """What was produced: every message's value by (topic, partition, offset)."""

    valid: dict[Key, bytes] = field(default_factory=dict)
    invalid: dict[Key, bytes | None] = field(default_factory=dict)
    redeliveries: int = 0


def produce_stream(
    bootstrap: str,
    n: int,
    *,
    seed: int,
    rate: float | None = None,
    stream: Stream | None = None,
    security: dict[str, object] | None = None,
) -> Stream:
    """Produce ``n`` messages (about 85 % orders, 11 % reviews, 2 % each of products and
    stores), 4 % invalid and 3 % redeliveries."""
    rng = random.Random(seed)
    stream = stream or Stream()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1, **(security or {}))
    pending = []
    sent_valid: list[tuple[str, bytes]] = []
    started = time.monotonic()
    for i in range(n):
        pick = rng.random()
        topic = (
            "orders"
            if pick < 0.85
            else "reviews"
            if pick < 0.96
            else "products"
            if pick < 0.98
            else "stores"
        )
        roll = rng.random()
        if roll < 0.04:
            value = rng.choice(INVALID[topic])
            valid = False
        elif roll < 0.07 and sent_valid:
            topic, value = rng.choice(sent_valid)  # a redelivery: same bytes, same id
            valid = True
            stream.redeliveries += 1
        else:
            event = EVENTS[topic](i)
            value = json.dumps(event).encode()
            valid = True
            sent_valid.append((topic, value))
        key = f"k-{rng.randrange(64)}".encode()
        pending.append((topic, value, valid, producer.send(topic, key=key, value=value)))
        if rate and i % 200 == 199:
            producer.flush()
            ahead = (i + 1) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush()
    producer.close()
    for topic, value, valid, future in pending:
        meta = future.get(timeout=30)
        target = stream.valid if valid else stream.invalid
        target[(topic, meta.partition, meta.offset)] = value
    return stream


# --- running ingest -----------------------------------------------------------------------


def ingest_cmd(bootstrap: str, lake: str, *extra: str) -> list[str]:
    cli = [sys.executable, "-m", "lambdalake.cli", "ingest"]
    return [*cli, "--bootstrap", bootstrap, "--lake", lake, *extra]


def ingest_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "LAMBDALAKE_LOG_LEVEL": "INFO",
        "LAMBDALAKE_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.update(extra)
    return env


def run_until_end(bootstrap: str, lake: str, log: Path) -> dict[str, dict[str, int]]:
    with open(log, "ab") as err:
        done = subprocess.run(
            [*ingest_cmd(bootstrap, lake), "--until-end"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=ingest_env(),
            timeout=180,
            check=False,
        )
    assert done.returncode == 0, log.read_text()[-3000:]
    last = done.stdout.decode().strip().splitlines()[-1]
    return json.loads(last)


def true_ends(bootstrap: str) -> dict[str, dict[int, int]]:
    tps = [TopicPartition(t, p) for t in TOPICS for p in range(4)]
    ends = end_offsets(bootstrap, tps)
    return {t: {p: ends[TopicPartition(t, p)] for p in range(4)} for t in TOPICS}


def master_keys(lake: Lake, topic: str) -> list[tuple[Key, str]]:
    rows = DeltaTable(lake.master(topic)).to_pyarrow_table().to_pylist()
    return [((r["_topic"], r["_partition"], r["_offset"]), r[ID_FIELD[topic]]) for r in rows]


def quarantine_rows(lake: Lake) -> list[dict[str, object]]:
    return DeltaTable(lake.table(QUARANTINE)).to_pyarrow_table().to_pylist()


def table_versions(lake: Lake) -> dict[str, int]:
    uris = [lake.master(t) for t in TOPICS] + [lake.table(QUARANTINE)]
    return {u: DeltaTable(u).version() for u in uris}


def assert_exactly_once(lake: Lake, stream: Stream) -> None:
    """Master holds each valid message once, quarantine each invalid one once."""
    for topic in TOPICS:
        rows = master_keys(lake, topic)
        keys = [k for k, _ in rows]
        duplicated = [k for k, n in Counter(keys).items() if n > 1]
        assert not duplicated, f"{topic}: rows written twice: {duplicated[:5]}"
        expected = {k for k in stream.valid if k[0] == topic}
        assert set(keys) == expected, (
            f"{topic}: missing {sorted(expected - set(keys))[:5]}, "
            f"unexpected {sorted(set(keys) - expected)[:5]}"
        )
        id_field = ID_FIELD[topic]
        for key, event_id in rows:
            assert json.loads(stream.valid[key])[id_field] == event_id
    q = quarantine_rows(lake)
    q_keys = [(r["_topic"], r["_partition"], r["_offset"]) for r in q]
    assert len(q_keys) == len(set(q_keys)), "quarantine rows written twice"
    assert set(q_keys) == set(stream.invalid)
    for r in q:
        key = (r["_topic"], r["_partition"], r["_offset"])
        assert r["raw"] == stream.invalid[key]
        assert r["reason"]


def wait_for_line(path: Path, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False
