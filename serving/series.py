"""Per-key time series of a view's partials, summed and sorted once, sliced per request.

The hot query of the API is "one SKU (or one SKU at one store, or everything),
one range of days or hours". A :class:`SeriesIndex` answers it without any
filter or group-by at request time: built once per batch run (and once per
speed snapshot), it holds the view's partials merged to one row per
``(*keys, period)`` with the view's own merge rules (``Measure.merge_agg``),
sorted by keys then period, plus each key's row span and the periods as
integers. A query is a dictionary lookup, two binary searches and one
zero-copy slice.

>>> import pyarrow as pa
>>> from datetime import date
>>> from lambdalake.contract.views import SALES
>>> t = pa.table({
...     "period": pa.array([date(2024, 5, 1), date(2024, 5, 1), date(2024, 5, 2)]),
...     "store_id": ["S1", "S2", "S1"], "sku": ["A", "A", "A"],
...     "units": [1, 2, 4], "revenue": [1.0, 2.0, 4.0], "order_lines": [1, 1, 1]})
>>> idx = SeriesIndex.build(t, ("sku",), SALES, "day")
>>> idx.points(("A",), date(2024, 5, 1), date(2024, 5, 2))
[('2024-05-01', {'units': 3, 'revenue': 3.0, 'order_lines': 2}), \
('2024-05-02', {'units': 4, 'revenue': 4.0, 'order_lines': 1})]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from lambdalake.contract.views import ViewDef
from serving.params import period_label
from serving.tables import key_runs, merge_table, rollup

# Every key combination a sales question can pin: nothing, the SKU, the store, both.
KEY_SETS: tuple[tuple[str, ...], ...] = ((), ("sku",), ("store_id",), ("sku", "store_id"))

_EPOCH_DAY = date(1970, 1, 1)


def _period_number(value: date | datetime, granularity: str) -> int:
    """A period bound as the integer the index sorts on (days, or microseconds, since 1970)."""
    if granularity != "hour":
        day = value.date() if isinstance(value, datetime) else value
        return (day - _EPOCH_DAY).days
    assert isinstance(value, datetime)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1_000_000)


def _period_numbers(column: pa.ChunkedArray, granularity: str) -> np.ndarray:
    if granularity != "hour":
        return column.cast(pa.int32()).to_numpy().astype(np.int64)
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


@dataclass(frozen=True)
class SeriesIndex:
    """One row per ``(*keys, period)``, sorted; see the module docstring."""

    granularity: str
    measures: tuple[str, ...]
    table: pa.Table  # period, *measures (the key columns are only in ``spans``)
    periods: np.ndarray  # int64, in ``table`` order
    spans: dict[tuple, tuple[int, int]]

    @classmethod
    def build(
        cls, partials: pa.Table, keys: tuple[str, ...], view: ViewDef, granularity: str
    ) -> SeriesIndex:
        """Merge ``partials`` (``period``, the view's dimensions and measures; periods of
        ``granularity``, or of a finer grain they roll up from) by ``keys`` and period.

        Partials already one row per ``(*keys, period)`` in that order (a batch view
        indexed by all its dimensions) are used as they are: no group-by, no sort, no copy."""
        measures = tuple(m.name for m in view.measures)
        period = rollup(partials.column("period"), granularity)
        table = pa.table(
            {"period": period, **{k: partials.column(k) for k in keys}}
            | {m: partials.column(m) for m in measures}
        )
        periods = _period_numbers(table.column("period"), granularity)
        runs = key_runs(table, keys) if set(keys) == set(view.dimensions) else None
        if runs is None or not _one_row_per_period(runs, periods):
            table = merge_table(table, [*keys, "period"], view)
            table = table.sort_by([(k, "ascending") for k in (*keys, "period")])
            periods = _period_numbers(table.column("period"), granularity)
            runs = key_runs(table, keys)
        return cls(
            granularity=granularity,
            measures=measures,
            table=table.select(["period", *measures]),
            periods=periods,
            spans={key: (a, b) for key, a, b in runs},
        )

    def _rows(self, key: tuple, first: Any, last: Any) -> tuple[int, int]:
        """Row positions ``[a, b)`` of ``key`` with ``first <= period <= last``."""
        a, b = self.spans.get(key, (0, 0))
        if a == b:
            return 0, 0
        periods = self.periods[a:b]
        lo = 0
        if first is not None:
            lo = int(np.searchsorted(periods, _period_number(first, self.granularity), "left"))
        hi = b - a
        if last is not None:
            hi = int(np.searchsorted(periods, _period_number(last, self.granularity), "right"))
        return a + lo, a + max(lo, hi)

    def points(
        self, key: tuple, first: date | datetime | None, last: date | datetime | None
    ) -> list[tuple[str, dict[str, Any]]]:
        """``(period label, {measure: value})`` for ``key`` in the range, in period order;
        labels as the API prints periods (``serving.params.period_label``)."""
        a, b = self._rows(key, first, last)
        if a == b:
            return []
        rows = self.table.slice(a, b - a)
        labels = period_labels(self.periods[a:b].tolist(), self.granularity)
        values = [rows.column(m).to_pylist() for m in self.measures]
        return [
            (label, dict(zip(self.measures, row, strict=True)))
            for label, row in zip(labels, zip(*values, strict=True), strict=True)
        ]


def _one_row_per_period(runs: list[tuple[tuple, int, int]], periods: np.ndarray) -> bool:
    """Each key in one run, and periods strictly increasing inside every run (pure)."""
    if len({key for key, _, _ in runs}) != len(runs):
        return False
    increasing = np.diff(periods) > 0
    across = np.array([a - 1 for _, a, _ in runs[1:]], dtype=np.int64)  # run boundaries
    increasing[across] = True
    return bool(increasing.all())


_LABELS: dict[tuple[str, int], str] = {}


def period_labels(numbers: list[int], granularity: str) -> list[str]:
    """Labels of period numbers (days or microseconds since 1970), memoised: the same
    few thousand days and hours are printed over and over."""
    out = []
    for n in numbers:
        label = _LABELS.get((granularity, n))
        if label is None:
            when: date | datetime = (
                date.fromordinal(_EPOCH_DAY.toordinal() + n)
                if granularity != "hour"
                else datetime.fromtimestamp(n / 1_000_000, tz=UTC)
            )
            label = period_label(when, granularity)  # type: ignore[arg-type]
            if len(_LABELS) < 1_000_000:  # bounded: about 100 years of hours
                _LABELS[(granularity, n)] = label
        out.append(label)
    return out


class SeriesCache:
    """The :class:`SeriesIndex` of each (granularity, keys) over one set of partials,
    built on first use (thread-safe: concurrent first users build it once)."""

    def __init__(self, view: ViewDef, sources: dict[str, pa.Table]) -> None:
        self.view = view
        self.sources = sources  # granularity -> partials to index
        self._built: dict[tuple[str, tuple[str, ...]], SeriesIndex] = {}
        self._lock = threading.Lock()

    def get(self, granularity: str, keys: tuple[str, ...]) -> SeriesIndex:
        found = self._built.get((granularity, keys))
        if found is not None:
            return found
        with self._lock:
            found = self._built.get((granularity, keys))
            if found is None:
                found = SeriesIndex.build(self.sources[granularity], keys, self.view, granularity)
                self._built[(granularity, keys)] = found
            return found

    def warm(self) -> None:
        """Build every key set of every grain now (e.g. before a new batch run is swapped in)."""
        for granularity in self.sources:
            for keys in KEY_SETS:
                self.get(granularity, keys)


def series_key(sku: str | None, store_id: str | None) -> tuple[tuple[str, ...], tuple]:
    """The key set and key of a question pinning ``sku`` and/or ``store_id`` (pure)."""
    names = tuple(n for n, v in (("sku", sku), ("store_id", store_id)) if v is not None)
    return names, tuple(v for v in (sku, store_id) if v is not None)
