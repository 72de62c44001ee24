"""The per-key series index answers exactly what the generic filter + merge path answers."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest

from lambdalake.contract.views import SALES
from serving.params import period_label
from serving.series import KEY_SETS, SeriesCache, SeriesIndex, series_key
from serving.tables import merge_partials, merge_table, select

START = datetime(2026, 10, 1, tzinfo=UTC)
SKUS = ["SKU-1", "SKU-2", "SKU-3", "SKU-x"]
STORES = ["S01", "S02", "S03"]


def hourly_partials(seed: int, rows: int = 600) -> pa.Table:
    """Random hourly sales partials, several rows per (hour, store, sku) at times."""
    rng = random.Random(seed)
    hours = [START + timedelta(hours=rng.randrange(24 * 20)) for _ in range(rows)]
    return pa.table(
        {
            "period": pa.array(hours, pa.timestamp("us", tz="UTC")),
            "store_id": [rng.choice(STORES) for _ in range(rows)],
            "sku": [rng.choice(SKUS) for _ in range(rows)],
            "units": [rng.randint(-2, 9) for _ in range(rows)],
            "revenue": [round(rng.uniform(-20, 90), 2) for _ in range(rows)],
            "order_lines": [rng.randint(1, 3) for _ in range(rows)],
        }
    )


def generic(
    table: pa.Table, granularity: str, sku: str | None, store: str | None, lo, hi
) -> list[tuple[str, dict]]:
    """The reference: filter, cast hours to days, merge by period (serving.tables)."""
    if granularity == "day":
        table = table.set_column(0, "period", table["period"].cast(pa.date32()))
    table = select(
        table,
        ("sku", "equal", sku),
        ("store_id", "equal", store),
        ("period", "greater_equal", lo),
        ("period", "less_equal", hi),
    )
    rows = merge_partials(table, ["period"], SALES)
    return sorted(
        (period_label(r.pop("period"), granularity), r)
        for r in rows  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("granularity", ["day", "hour"])
def test_series_points_equal_the_generic_merge(seed: int, granularity: str) -> None:
    table = hourly_partials(seed)
    cache = SeriesCache(SALES, {"day": table, "hour": table})
    rng = random.Random(seed * 10)
    for _ in range(60):
        sku = rng.choice([None, *SKUS, "SKU-unknown"])
        store = rng.choice([None, *STORES])
        a = START + timedelta(hours=rng.randrange(-48, 24 * 21))
        b = a + timedelta(hours=rng.randrange(0, 24 * 10))
        lo: date | datetime = a.date() if granularity == "day" else a
        hi: date | datetime = b.date() if granularity == "day" else b
        names, key = series_key(sku, store)
        got = cache.get(granularity, names).points(key, lo, hi)
        assert got == generic(table, granularity, sku, store, lo, hi), (sku, store, lo, hi)


def test_series_slices_are_inclusive_and_open_ended() -> None:
    table = hourly_partials(5)
    idx = SeriesIndex.build(table, (), SALES, "hour")
    everything = idx.points((), None, None)
    assert [p for p, _ in everything] == sorted({p for p, _ in everything})
    first, last = everything[0][0], everything[-1][0]
    as_dt = datetime.fromisoformat
    assert idx.points((), as_dt(first), as_dt(first))[0][0] == first
    assert idx.points((), as_dt(last), None)[-1][0] == last
    assert idx.points((), None, as_dt(first) - timedelta(hours=1)) == []
    assert idx.points(("nope",), None, None) == []


def test_every_key_set_covers_the_same_totals() -> None:
    table = hourly_partials(9)
    cache = SeriesCache(SALES, {"day": table, "hour": table})
    cache.warm()
    total = sum(table["units"].to_pylist())
    for granularity in ("day", "hour"):
        for names in KEY_SETS:
            idx = cache.get(granularity, names)
            units = sum(v["units"] for k in idx.spans for _, v in idx.points(k, None, None))
            assert units == total, (granularity, names)


def test_an_empty_view_has_no_series() -> None:
    empty = hourly_partials(1).slice(0, 0)
    idx = SeriesIndex.build(empty, ("sku",), SALES, "day")
    assert idx.spans == {} and idx.points(("SKU-1",), None, None) == []


def test_partials_already_one_row_per_key_and_period_are_indexed_as_they_are() -> None:
    """A batch view is one row per (sku, store, period), sorted: indexed without a merge,
    with the same answers; a repeated row in such a table is still merged, not dropped."""
    table = hourly_partials(4)
    keys = ["sku", "store_id", "period"]
    merged = merge_table(table, keys, SALES).sort_by([(k, "ascending") for k in keys])
    merged = merged.select(["period", "store_id", "sku", "units", "revenue", "order_lines"])
    again = pa.concat_tables([merged.slice(0, 1), merged])  # the first row twice
    for source in (merged, again):
        idx = SeriesIndex.build(source, ("sku", "store_id"), SALES, "hour")
        for sku in SKUS:
            for store in STORES:
                got = idx.points((sku, store), None, None)
                assert got == generic(source, "hour", sku, store, None, None), (sku, store)
    fast = SeriesIndex.build(merged, ("sku", "store_id"), SALES, "hour")
    # Used as it is: the index holds the source's own buffers (no group-by, sort or copy).
    assert [c.buffers()[1].address for c in fast.table.column("units").chunks] == [
        c.buffers()[1].address for c in merged.column("units").chunks
    ]
