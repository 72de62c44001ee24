"""Benchmark of the event validator: ``validate()`` events/s against the per-message reference.

Generates N valid ``orders`` and ``reviews`` messages (orjson, as the generator writes
them) and the same with ~2 % invalid ones (every reason kind, tombstones and non-UTF-8
bytes included), times ``validate()`` over micro-batches of ``--batch`` messages (one core:
the validator's DuckDB connection is single-threaded), then times
``validate_one_reference()`` message by message over the same messages and prints the
ratio. Wall-clock and process CPU time are both shown: on a shared machine the CPU figure
is the steadier one.

    .venv/bin/python bench/validator.py --events 200000
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lambdalake.contract import events as contracts
from lambdalake.contract import validation

WORDS = [
    "great",
    "product",
    "works",
    "fine",
    "arrived",
    "late",
    "broke",
    "after",
    "a",
    "week",
    "love",
    "it",
    "would",
    "buy",
    "again",
    "terrible",
    "quality",
    "the",
    "size",
    "is",
    "perfect",
    "colour",
    "faded",
    "quickly",
    "excellent",
    "value",
    "for",
    "money",
    "customer",
    "service",
    "was",
    "helpful",
    "not",
    "as",
    "described",
    "battery",
    "lasts",
    "long",
    "instructions",
    "unclear",
]
OFFSETS = ["Z", "+00:00", "+01:00", "+02:00", "+05:30", "-05:00", "-08:00"]


def iso_time(rnd: random.Random, ms: int) -> str | int:
    """An RFC 3339 time in a random offset (1 in 5: epoch milliseconds)."""
    if rnd.random() < 0.2:
        return ms
    offset = rnd.choice(OFFSETS)
    minutes = 0 if offset in ("Z", "+00:00") else int(offset[1:3]) * 60 + int(offset[4:6])
    minutes = -minutes if offset.startswith("-") else minutes
    secs, millis = divmod(ms, 1000)
    local = time.gmtime(secs + minutes * 60)
    return time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{millis:03d}{offset}"


def orders(n: int, rnd: random.Random) -> list[dict[str, object]]:
    start = 1_735_689_600_000  # 2025-01-01
    out: list[dict[str, object]] = []
    for _ in range(n):
        d: dict[str, object] = {
            "event_id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
            "event_time": iso_time(rnd, start + rnd.randrange(365 * 86_400_000)),
            "store_id": f"store-{rnd.randrange(200):04d}",
            "sku": f"SKU-{rnd.randrange(20_000):06d}",
            "quantity": rnd.choice([1, 1, 1, 2, 2, 3, 4, 6, -1]),
            "unit_price": round(rnd.uniform(0.5, 400.0), 2),
        }
        if rnd.random() < 0.7:
            d["currency"] = rnd.choice(["USD", "EUR", "GBP"])
        out.append(d)
    return out


def reviews(n: int, rnd: random.Random) -> list[dict[str, object]]:
    start = 1_735_689_600_000
    out: list[dict[str, object]] = []
    for _ in range(n):
        text = " ".join(rnd.choices(WORDS, k=rnd.randint(5, 120)))
        d: dict[str, object] = {
            "review_id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
            "event_time": iso_time(rnd, start + rnd.randrange(365 * 86_400_000)),
            "sku": f"SKU-{rnd.randrange(20_000):06d}",
            "rating": rnd.randint(1, 5),
        }
        if rnd.random() < 0.6:
            d["title"] = " ".join(rnd.choices(WORDS, k=rnd.randint(1, 6))).capitalize()
        d["text"] = text.capitalize() + rnd.choice([".", "!", '. "Really".', ".\nThanks"])
        if rnd.random() < 0.8:
            d["customer_id"] = f"cust-{rnd.randrange(1_000_000)}"
        out.append(d)
    return out


def invalid(topic: str, event: dict[str, object], rnd: random.Random) -> bytes | None:
    """One invalid message derived from ``event``: each reason kind in turn."""
    e = dict(event)
    raw = orjson.dumps(e)
    id_field = contracts.KEY_BY_TOPIC[topic]
    number = "quantity" if topic == "orders" else "rating"
    choice = rnd.randrange(10)
    if choice == 0:
        return raw[: len(raw) // 2]  # truncated JSON
    if choice == 1:
        return b"\xff\xfe" + raw[2:]  # not UTF-8
    if choice == 2:
        return None  # tombstone
    if choice == 3:
        return orjson.dumps([e])  # not an object
    if choice == 4:
        del e[id_field]
    elif choice == 5:
        e[number] = str(e[number])
    elif choice == 6:
        e[number] = 0
    elif choice == 7:
        e["event_time"] = "2025-13-45T10:00:00Z"
    elif choice == 8:
        e["event_time"] = "1999-12-31T23:59:59Z"
    else:
        e[number] = 2.5
    return orjson.dumps(e)


def with_invalid(
    topic: str, events: list[dict[str, object]], rnd: random.Random, share: float
) -> list[bytes | None]:
    return [invalid(topic, e, rnd) if rnd.random() < share else orjson.dumps(e) for e in events]


@dataclass
class Timing:
    wall: float
    cpu: float


def timed(fn: Callable[[], object]) -> Timing:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - w, time.process_time() - c)


def run_validate(
    topic: str, values: list[bytes | None], batch: int
) -> tuple[Timing, int, int, int]:
    counts = [0, 0, 0]

    def go() -> None:
        for start in range(0, len(values), batch):
            chunk = values[start : start + batch]
            v, by_reference = validation._validate(
                topic, chunk, [0] * len(chunk), range(start, start + len(chunk)), 256 * 1024
            )
            counts[0] += v.valid.num_rows
            counts[1] += v.rejected.num_rows
            counts[2] += by_reference

    t = timed(go)
    return t, counts[0], counts[1], counts[2]


def run_reference(topic: str, values: list[bytes | None]) -> Timing:
    return timed(lambda: [validation.validate_one_reference(topic, v) for v in values])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000, help="messages per data set")
    ap.add_argument("--batch", type=int, default=50_000, help="messages per validate() call")
    ap.add_argument("--invalid-share", type=float, default=0.02)
    ap.add_argument(
        "--reference-events",
        type=int,
        default=None,
        help="time the reference on the first K messages of each set (default: all)",
    )
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"python {platform.python_version()}, duckdb {duckdb.__version__}, pyarrow "
        f"{pa.__version__}, {os.cpu_count()} CPUs, {platform.machine()}; "
        f"validate() single-threaded, batches of {args.batch}"
    )
    rnd = random.Random(args.seed)
    print(f"generating {args.events} orders and {args.events} reviews ...", flush=True)
    order_events, review_events = orders(args.events, rnd), reviews(args.events, rnd)
    sets = [
        ("orders", "valid", [orjson.dumps(e) for e in order_events]),
        (
            "orders",
            f"{args.invalid_share:.0%} invalid",
            with_invalid("orders", order_events, rnd, args.invalid_share),
        ),
        ("reviews", "valid", [orjson.dumps(e) for e in review_events]),
        (
            "reviews",
            f"{args.invalid_share:.0%} invalid",
            with_invalid("reviews", review_events, rnd, args.invalid_share),
        ),
    ]
    validation.validate("orders", [b"{}"], [0], [0])  # warm up: connection and prepared plans

    header = (
        f"{'data set':<22}{'messages':>9}{'avg B':>7}  {'validate ev/s wall':>19}{'cpu':>10}"
        f"  {'reference ev/s wall':>20}{'cpu':>9}  {'speed-up (cpu)':>15}  {'valid':>7}"
        f"{'rejected':>9}{'by ref':>7}"
    )
    rows = []
    for topic, label, values in sets:
        name = f"{topic} ({label})"
        print(f"timing {name} ...", flush=True)
        t, n_valid, n_rejected, by_ref = run_validate(topic, values, args.batch)
        sample = values if args.reference_events is None else values[: args.reference_events]
        r = run_reference(topic, sample)
        n, k = len(values), len(sample)
        avg = sum(len(v) for v in values if v is not None) / n
        rows.append(
            f"{name:<22}{n:>9}{avg:>7.0f}  {n / t.wall:>19,.0f}{n / t.cpu:>10,.0f}"
            f"  {k / r.wall:>20,.0f}{k / r.cpu:>9,.0f}  {(n / t.cpu) / (k / r.cpu):>14.1f}x"
            f"  {n_valid:>7}{n_rejected:>9}{by_ref:>7}"
        )
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
