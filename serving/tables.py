"""Arrow helpers shared by the batch and speed sides: a SKU index, filters, view merges.

>>> import pyarrow as pa
>>> t = IndexedTable.build(pa.table({"sku": ["a", "a", "b"], "units": [1, 2, 3]}))
>>> t.rows("a").num_rows, t.rows("zzz").num_rows
(2, 0)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.contract.views import VERSION, ViewDef

# Tables received over Arrow Flight may hold buffers that are not 64-byte aligned; Acero
# (``group_by``) then writes a warning to stderr on every call. Let it copy them aligned
# instead (read when the first plan runs; an operator's own setting wins).
os.environ.setdefault("ACERO_ALIGNMENT_HANDLING", "reallocate")

# Arrow's name for each merge aggregate of lambdalake.contract.views.Measure.merge_agg
# ("last" over rows sorted by the view's version: the latest record's value).
ARROW_AGG = {"SUM": "sum", "MIN": "min", "MAX": "max", "LAST": "last"}


def index_key(view: ViewDef) -> str:
    """The column a view's tables are indexed by: ``sku`` when it has one (the API's usual
    filter), else its first dimension (``store_id`` of the stores view)."""
    return "sku" if "sku" in view.dimensions else view.dimensions[0]


@dataclass(frozen=True)
class IndexedTable:
    """An Arrow table sorted by ``key`` (``sku`` unless told), with the row span of every
    key value."""

    table: pa.Table
    spans: dict[str, tuple[int, int]]

    @classmethod
    def build(cls, table: pa.Table, *, sort: bool = False, key: str = "sku") -> IndexedTable:
        """Index ``table`` (already sorted by ``key``, or ``sort=True`` to sort it here)."""
        if sort and table.num_rows:
            table = table.sort_by(key)
        spans = {k[0]: (a, b) for k, a, b in key_runs(table, (key,))}
        return cls(table=table, spans=spans)

    def rows(self, sku: str | None) -> pa.Table:
        """All rows, or one key's (zero-copy); an unknown key gives an empty table."""
        if sku is None:
            return self.table
        a, b = self.spans.get(sku, (0, 0))
        return self.table.slice(a, b - a)

    def rows_of(self, keys: Sequence[str] | None) -> pa.Table:
        """The rows of any of ``keys`` (``None``: all), in key order of the list."""
        if keys is None or len(keys) == 1:
            return self.rows(keys[0] if keys else None)
        return pa.concat_tables([self.table.slice(0, 0), *(self.rows(k) for k in keys)])


def as_days(period: pa.ChunkedArray) -> pa.ChunkedArray:
    """Periods as UTC dates: hour starts cast to their day (a UTC hour lies in one UTC
    day); dates stay as they are."""
    return period if pa.types.is_date32(period.type) else pc.cast(period, pa.date32())


def rollup(period: pa.ChunkedArray, granularity: str) -> pa.ChunkedArray:
    """Periods (hour starts, dates, Mondays or months' first days) as periods of
    ``granularity``: hours stay, a day is its date, a week its ISO Monday, a month its first
    day (``lambdalake.contract.views.ROLLUP_EXPR`` in Arrow).

    >>> from datetime import date
    >>> rollup(pa.chunked_array([[date(2024, 5, 1), date(2024, 5, 5)]]), "week").to_pylist()
    [datetime.date(2024, 4, 29), datetime.date(2024, 4, 29)]
    """
    if granularity == "hour":
        return period
    days = as_days(period)
    if granularity == "day":
        return days
    if granularity == "week":
        return pc.floor_temporal(days, unit="week", week_starts_monday=True)
    if granularity == "month":
        return pc.floor_temporal(days, unit="month")
    raise ValueError(f"no grain {granularity!r}")


def select(table: pa.Table, *conditions: tuple[str, str, Any]) -> pa.Table:
    """Rows where every ``(column, op, value)`` holds (``op`` a pyarrow.compute
    comparison); a ``None`` value means no condition."""
    mask = None
    for column, op, value in conditions:
        if value is None:
            continue
        cond = getattr(pc, op)(table.column(column), value)
        mask = cond if mask is None else pc.and_(mask, cond)
    return table if mask is None else table.filter(mask)


def key_runs(table: pa.Table, keys: tuple[str, ...]) -> list[tuple[tuple[str, ...], int, int]]:
    """``(key values, start, end)`` of each run of consecutive rows with equal ``keys``,
    in table order (pure). Without keys the whole table is one run."""
    n = table.num_rows
    if n == 0:
        return []
    if not keys:
        return [((), 0, n)]
    columns = [table.column(k).to_numpy(zero_copy_only=False) for k in keys]
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for col in columns:
        change[1:] |= col[1:] != col[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)
    return [
        (tuple(str(col[a]) for col in columns), a, b)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def merge_table(table: pa.Table, keys: list[str], view: ViewDef) -> pa.Table:
    """Partial rows merged by ``keys`` with the view's own merge rules (``Measure.merge_agg``)."""
    aggs = [(m.name, ARROW_AGG[m.merge_agg]) for m in view.measures]
    if any(m.merge_agg == "LAST" for m in view.measures):
        table = table.sort_by(VERSION)  # "last" in each group is then the latest record's
    out = table.group_by(keys, use_threads=False).aggregate(aggs)
    return out.rename_columns(
        [c.rsplit("_", 1)[0] if c not in keys else c for c in out.column_names]
    )


def merge_partials(table: pa.Table, keys: list[str], view: ViewDef) -> list[dict[str, Any]]:
    """:func:`merge_table` as Python rows."""
    if table.num_rows == 0:
        return []
    return merge_table(table, keys, view).to_pylist()
