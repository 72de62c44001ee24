"""Synthetic master tables, written straight to the lake (no Kafka), for tests and benchmarks.

The tables have exactly the shape ingest writes (``lambdalake.contract.lake`` schemas,
partitioned by ``event_date``, one Delta app transaction per topic partition
holding the ingest position), so the batch layer cannot tell them from real
ones. Generation is vectorised: two years x 2,000 series take seconds.

Sales per (sku, store) follow a level x weekly pattern x slow trend, with a
share of low-volume (intermittent) series; some order lines are returns and a
configurable share is delivered twice (same ``event_id``, a later offset).
Reviews carry star ratings and texts written from varied phrasings, including
negations ("not good", "no complaints") that a lexicon alone misreads.

>>> import pyarrow as pa
>>> t = synthetic_orders(SalesSpec(days=3, skus=2, stores=1, seed=1))
>>> t.schema.names[:3], t.num_rows > 0
(['event_id', 'event_time', 'store_id'], True)
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa

from lambdalake.contract.lake import MASTER_PARTITION_BY, MASTER_SCHEMA_BY_TOPIC, Lake
from lambdalake.contract.manifest import ingest_app_id


@dataclass(frozen=True)
class SalesSpec:
    days: int = 90
    skus: int = 20
    stores: int = 3
    end_date: date = date(2026, 10, 31)
    seed: int = 42
    intermittent_share: float = 0.25  # share of series with a low daily rate
    duplicate_fraction: float = 0.01
    return_fraction: float = 0.02
    review_rate: float = 0.03  # reviews per order line
    partitions: int = 4


def sku_name(i: int) -> str:
    return f"SKU-{i:05d}"


def store_name(i: int) -> str:
    return f"S{i:03d}"


def partition_of(sku: str, partitions: int) -> int:
    """Which topic partition a key lands on (any stable hash: events are keyed by sku)."""
    return zlib.crc32(sku.encode()) % partitions


def _assign_offsets(part: np.ndarray, order_key: np.ndarray, partitions: int) -> np.ndarray:
    """Offsets 0.. within each partition, in ``order_key`` order."""
    offsets = np.empty(len(part), dtype=np.int64)
    for p in range(partitions):
        idx = np.flatnonzero(part == p)
        idx = idx[np.argsort(order_key[idx], kind="stable")]
        offsets[idx] = np.arange(len(idx), dtype=np.int64)
    return offsets


def _times(day_index: np.ndarray, spec: SalesSpec, rng: np.random.Generator) -> np.ndarray:
    start = datetime.combine(
        spec.end_date - timedelta(days=spec.days - 1), datetime.min.time(), tzinfo=UTC
    )
    start_us = int(start.timestamp() * 1_000_000)
    seconds = rng.integers(0, 86_400, size=len(day_index))
    return start_us + (day_index.astype(np.int64) * 86_400 + seconds) * 1_000_000


def synthetic_orders(spec: SalesSpec) -> pa.Table:
    """Order lines (duplicates included) as a ``master/orders`` Arrow table."""
    rng = np.random.default_rng(spec.seed)
    n_series = spec.skus * spec.stores
    sku_idx = np.repeat(np.arange(spec.skus), spec.stores)
    store_idx = np.tile(np.arange(spec.stores), spec.skus)
    level = rng.lognormal(mean=0.8, sigma=0.6, size=n_series)
    sparse = rng.random(n_series) < spec.intermittent_share
    level[sparse] = rng.uniform(0.05, 0.35, size=int(sparse.sum()))
    weekly = 1.0 + rng.uniform(0.1, 0.5, size=(n_series, 1)) * np.sin(
        2 * np.pi * (np.arange(spec.days)[None, :] + rng.integers(0, 7, size=(n_series, 1))) / 7
    )
    trend = 1.0 + rng.uniform(-0.3, 0.6, size=(n_series, 1)) * np.arange(spec.days)[None, :] / max(
        spec.days, 1
    )
    lam = np.clip(level[:, None] * weekly * trend, 0.0, None)
    lines = rng.poisson(lam)  # (series, day) order lines
    series_of_line = np.repeat(np.arange(n_series), lines.sum(axis=1))
    day_of_line = np.concatenate([np.repeat(np.arange(spec.days), row) for row in lines])
    n = len(series_of_line)

    quantity = 1 + rng.poisson(0.6, size=n)
    quantity[rng.random(n) < spec.return_fraction] *= -1
    price_of_sku = np.round(rng.uniform(2.0, 200.0, size=spec.skus), 2)
    unit_price = price_of_sku[sku_idx[series_of_line]]
    event_time = _times(day_of_line, spec, rng)
    sku = np.array([sku_name(i) for i in range(spec.skus)], dtype=object)[sku_idx[series_of_line]]
    store = np.array([store_name(i) for i in range(spec.stores)], dtype=object)[
        store_idx[series_of_line]
    ]
    event_id = np.array([f"o-{spec.seed}-{i}" for i in range(n)], dtype=object)

    # Duplicate deliveries: the same event again, later in the log.
    dup = np.flatnonzero(rng.random(n) < spec.duplicate_fraction)
    take = np.concatenate([np.arange(n), dup])
    arrival = np.concatenate([event_time, event_time[dup] + 3_600_000_000])
    return _master_table(
        "orders",
        {
            "event_id": event_id[take],
            "event_time": event_time[take],
            "store_id": store[take],
            "sku": sku[take],
            "quantity": quantity[take].astype(np.int64),
            "unit_price": unit_price[take].astype(np.float64),
            "currency": np.full(len(take), "USD", dtype=object),
        },
        arrival,
        spec.partitions,
    )


# --- reviews -----------------------------------------------------------------------------

_POSITIVE = [
    "works great",
    "exactly what I needed",
    "really happy with it",
    "no complaints at all",
    "can't fault it",
    "not bad at all, actually very solid",
    "exceeded my expectations",
    "would buy again",
    "my kids love it",
    "does not disappoint",
    "sturdy and well made",
    "never had a single problem with it",
    "five stars from me",
    "arrived early and works perfectly",
]
_NEUTRAL = [
    "it's okay",
    "does the job, nothing special",
    "average quality for the price",
    "fine but not great",
    "not sure yet, time will tell",
    "as described",
    "some good points, some bad",
    "mixed feelings about it",
    "decent but the instructions could be clearer",
    "it works, I guess",
]
_NEGATIVE = [
    "not good",
    "not worth the money",
    "stopped working after a week",
    "does not work as advertised",
    "returned it",
    "would not buy again",
    "cheap plastic, broke on day two",
    "not what I expected",
    "never again",
    "arrived damaged and support never answered",
    "fell apart quickly",
    "doesn't fit, waste of money",
    "worked fine for a day then died",
    "no better than the knockoffs",
]
_OBJECTS = ["this blender", "the charger", "these headphones", "the jacket", "this lamp", "it"]
_FILLER = [
    "I bought it last month.",
    "Used it every day since.",
    "Got it as a gift.",
    "Ordered two of them.",
    "",
]
_TITLES = {
    "positive": ["Great", "Love it", "Recommended", "Solid buy", None],
    "neutral": ["OK", "Meh", "Average", None],
    "negative": ["Disappointed", "Avoid", "Not good", "Broken", None],
}


def review_text(
    rng: np.random.Generator, rating: int, noise: float = 0.1
) -> tuple[str | None, str]:
    """A (title, text) written for a star rating; ``noise`` = chance the text disagrees."""
    label = "positive" if rating >= 4 else "negative" if rating <= 2 else "neutral"
    if rng.random() < noise:
        label = str(rng.choice(["positive", "neutral", "negative"]))
    pool = {"positive": _POSITIVE, "neutral": _NEUTRAL, "negative": _NEGATIVE}[label]
    k = int(rng.integers(1, 3))
    phrases = [str(p) for p in rng.choice(pool, size=k, replace=False)]
    obj = str(rng.choice(_OBJECTS))
    filler = str(rng.choice(_FILLER))
    text = f"{filler} {obj.capitalize()}: {phrases[0]}." + (
        f" Also {phrases[1]}." if len(phrases) > 1 else ""
    )
    titles = _TITLES[label]
    title = titles[int(rng.integers(0, len(titles)))]
    return title, text.strip()


def synthetic_reviews(spec: SalesSpec, orders: pa.Table | None = None) -> pa.Table:
    """Reviews as a ``master/reviews`` Arrow table (about ``review_rate`` per order line)."""
    rng = np.random.default_rng(spec.seed + 1)
    n_orders = orders.num_rows if orders is not None else spec.days * spec.skus * spec.stores
    n = max(int(n_orders * spec.review_rate), 0)
    sku_quality = rng.uniform(2.0, 4.8, size=spec.skus)
    sku_idx = rng.integers(0, spec.skus, size=n)
    rating = np.clip(np.rint(rng.normal(sku_quality[sku_idx], 1.0)), 1, 5).astype(np.int32)
    day = rng.integers(0, spec.days, size=n)
    event_time = _times(day, spec, rng)
    titles: list[str | None] = []
    texts: list[str] = []
    for r in rating:
        title, text = review_text(rng, int(r))
        titles.append(title)
        texts.append(text)
    sku = np.array([sku_name(i) for i in range(spec.skus)], dtype=object)[sku_idx]
    review_id = np.array([f"r-{spec.seed}-{i}" for i in range(n)], dtype=object)
    dup = np.flatnonzero(rng.random(n) < spec.duplicate_fraction)
    take = np.concatenate([np.arange(n), dup])
    arrival = np.concatenate([event_time, event_time[dup] + 3_600_000_000])
    customer = np.array([f"c-{i % 997}" for i in range(n)], dtype=object)
    return _master_table(
        "reviews",
        {
            "review_id": review_id[take],
            "event_time": event_time[take],
            "sku": sku[take],
            "rating": rating[take],
            "title": np.array(titles, dtype=object)[take],
            "text": np.array(texts, dtype=object)[take],
            "customer_id": customer[take],
        },
        arrival,
        spec.partitions,
    )


def _master_table(
    topic: str, cols: dict[str, np.ndarray], arrival: np.ndarray, partitions: int
) -> pa.Table:
    schema = MASTER_SCHEMA_BY_TOPIC[topic]
    sku_part = {s: partition_of(s, partitions) for s in set(cols["sku"].tolist())}
    part = np.array([sku_part[s] for s in cols["sku"]], dtype=np.int32)
    offsets = _assign_offsets(part, arrival, partitions)
    n = len(part)
    ts_type = schema.field("event_time").type
    event_time = pa.array(cols["event_time"], type=pa.int64()).cast(ts_type)
    arrays: dict[str, pa.Array] = {}
    for f in schema:
        if f.name == "event_time":
            arrays[f.name] = event_time
        elif f.name == "event_date":
            arrays[f.name] = event_time.cast(pa.date32())
        elif f.name == "_topic":
            arrays[f.name] = pa.array([topic] * n, pa.string())
        elif f.name == "_partition":
            arrays[f.name] = pa.array(part, pa.int32())
        elif f.name == "_offset":
            arrays[f.name] = pa.array(offsets, pa.int64())
        elif f.name == "_ingested_at":
            arrays[f.name] = pa.array(arrival, type=pa.int64()).cast(ts_type)
        else:
            arrays[f.name] = pa.array(cols[f.name], type=f.type)
    return pa.Table.from_pydict(arrays, schema=schema)


def write_master(
    lake: Lake,
    topic: str,
    table: pa.Table,
    *,
    partitions: int,
    commits: int = 1,
) -> int:
    """Append ``table`` to ``master/<topic>`` like ingest does; returns the new table version.

    Offsets in ``table`` count from 0 per partition; they are shifted past the
    table's current ingest positions, so appending a second generated table
    continues the log. Rows go in ``commits`` commits, in offset order; each
    commit carries the ingest position (one past the highest offset written)
    of every partition.
    """
    from deltalake import DeltaTable, write_deltalake
    from deltalake.transaction import CommitProperties, Transaction

    uri = lake.master(topic)
    positions = {p: 0 for p in range(partitions)}
    if DeltaTable.is_deltatable(uri, storage_options=lake.storage_options):
        dt = DeltaTable(uri, storage_options=lake.storage_options)
        for p in range(partitions):
            positions[p] = dt.transaction_version(ingest_app_id(topic, p)) or 0
    base = np.array([positions[p] for p in range(partitions)], dtype=np.int64)
    shifted = table.column("_offset").to_numpy() + base[table.column("_partition").to_numpy()]
    table = table.set_column(
        table.schema.get_field_index("_offset"),
        table.schema.field("_offset"),
        pa.array(shifted, pa.int64()),
    )
    table = table.sort_by([("_offset", "ascending"), ("_partition", "ascending")])
    for chunk in _chunks(table, commits):
        parts = chunk.column("_partition").to_numpy()
        offs = chunk.column("_offset").to_numpy()
        for p in range(partitions):
            sel = offs[parts == p]
            if len(sel):
                positions[p] = max(positions[p], int(sel.max()) + 1)
        write_deltalake(
            uri,
            chunk,
            mode="append",
            partition_by=MASTER_PARTITION_BY[topic],
            storage_options=lake.storage_options,
            commit_properties=CommitProperties(
                app_transactions=[
                    Transaction(ingest_app_id(topic, p), v) for p, v in positions.items()
                ]
            ),
        )
    return DeltaTable(uri, storage_options=lake.storage_options).version()


def _chunks(table: pa.Table, n: int) -> Iterable[pa.Table]:
    n = max(1, n)
    size = max(1, -(-table.num_rows // n))
    for start in range(0, max(table.num_rows, 1), size):
        yield table.slice(start, size)


CATEGORIES = ("Kitchen", "Garden", "Toys", "Books", "Sports")
REGIONS = ("North", "South", "East", "West")


def synthetic_catalog(spec: SalesSpec) -> dict[str, pa.Table]:
    """Master rows of the ``products`` and ``stores`` topics for ``spec``'s ids: a record per
    SKU and store, then (deterministically) a second one for every third SKU, re-categorised,
    and every second store, moved: the last one of each id is the record that holds."""
    rng = np.random.default_rng(spec.seed + 7)
    out = {}
    for topic, ids, attr, values in (
        ("products", [sku_name(i) for i in range(spec.skus)], "category", CATEGORIES),
        ("stores", [store_name(i) for i in range(spec.stores)], "region", REGIONS),
    ):
        rows = [(i, str(values[int(rng.integers(len(values)))])) for i in ids]
        every = 3 if topic == "products" else 2
        rows += [(i, str(values[int(rng.integers(len(values)))])) for i in ids[::every]]
        schema = MASTER_SCHEMA_BY_TOPIC[topic]
        key = schema.names[0]
        part = np.array([partition_of(i, spec.partitions) for i, _ in rows], dtype=np.int32)
        offsets = _assign_offsets(part, np.arange(len(rows)), spec.partitions)
        cols: dict[str, list | np.ndarray] = {
            key: [i for i, _ in rows],
            attr: [v for _, v in rows],
            "name": [f"{i} name" for i, _ in rows],
            "_topic": [topic] * len(rows),
            "_partition": part,
            "_offset": offsets,
            "_ingested_at": [datetime.now(UTC)] * len(rows),
        }
        for f in schema:
            cols.setdefault(f.name, [None] * len(rows))
        out[topic] = pa.table(
            {f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema
        )
    return out


def build_master(lake: Lake, spec: SalesSpec, *, commits: int = 1) -> dict[str, pa.Table]:
    """Generate orders, reviews and the catalog (products, stores) for ``spec`` and append
    them to the lake's master tables."""
    orders = synthetic_orders(spec)
    reviews = synthetic_reviews(spec, orders)
    written = {"orders": orders, "reviews": reviews, **synthetic_catalog(spec)}
    for topic, table in written.items():
        write_master(lake, topic, table, partitions=spec.partitions, commits=commits)
    return written
