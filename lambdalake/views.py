"""One definition per aggregate view: dimensions, measures, and how partials merge.

The batch job (Spark SQL), the speed layer (DuckDB) and the serving merge all
build their SQL from these objects, so the three cannot disagree. Every measure
is *mergeable*: partial results over disjoint sets of events combine with
``merge`` (sums and counts add, mins take the min, maxes the max); means are
derived as sum / count after the merge, never averaged.

The generated SQL is the common subset of Spark SQL and DuckDB. Both engines
must run with the session time zone set to UTC (``spark.sql.session.timeZone``,
DuckDB ``SET TimeZone='UTC'``): days and hours are UTC.

>>> SALES.aggregate_sql("orders", granularity="day")  # doctest: +NORMALIZE_WHITESPACE
'SELECT event_date AS period, store_id, sku, SUM(quantity) AS units,
 SUM(quantity * unit_price) AS revenue, COUNT(*) AS order_lines FROM orders
 GROUP BY event_date, store_id, sku'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Agg = Literal["sum", "count", "min", "max"]
Granularity = Literal["day", "hour"]

# The expression that buckets an event's time, per granularity (UTC).
PERIOD_EXPR: dict[str, str] = {
    "day": "event_date",
    "hour": "date_trunc('hour', event_time)",
}

# The column that holds the period in the batch layer's sales views, per granularity:
# ``views/daily_sales.date`` (DATE) and ``views/hourly_sales.hour`` (UTC TIMESTAMP, the hour's
# start). The speed layer and serving call it ``period``.
PERIOD_COLUMN: dict[str, str] = {"day": "date", "hour": "hour"}


@dataclass(frozen=True)
class Measure:
    """A mergeable measure: ``agg(expr)`` over events, merged with ``merge_agg``."""

    name: str
    expr: str
    agg: Agg

    @property
    def merge_agg(self) -> str:
        return {"sum": "SUM", "count": "SUM", "min": "MIN", "max": "MAX"}[self.agg]

    def aggregate_sql(self) -> str:
        if self.agg == "count":
            return f"COUNT({self.expr}) AS {self.name}"
        return f"{self.agg.upper()}({self.expr}) AS {self.name}"

    def merge_sql(self, column: str | None = None) -> str:
        return f"{self.merge_agg}({column or self.name}) AS {self.name}"

    def combine(self, a: float | int | None, b: float | int | None) -> float | int | None:
        """Merge two partial values in Python (``None`` = no events)."""
        if a is None:
            return b
        if b is None:
            return a
        if self.merge_agg == "SUM":
            return a + b
        return min(a, b) if self.merge_agg == "MIN" else max(a, b)


@dataclass(frozen=True)
class Mean:
    """A derived measure: ``numerator / denominator`` computed after merging."""

    name: str
    numerator: str
    denominator: str

    def sql(self) -> str:
        return (
            f"CASE WHEN {self.denominator} = 0 THEN NULL "
            f"ELSE CAST({self.numerator} AS DOUBLE) / {self.denominator} END AS {self.name}"
        )

    def compute(self, row: dict[str, float | int | None]) -> float | None:
        den = row.get(self.denominator)
        num = row.get(self.numerator)
        if not den or num is None:
            return None
        return float(num) / float(den)


@dataclass(frozen=True)
class ViewDef:
    """An aggregate view over one topic's deduplicated events."""

    name: str
    topic: str
    key: str
    dimensions: tuple[str, ...]
    measures: tuple[Measure, ...]
    derived: tuple[Mean, ...] = field(default_factory=tuple)
    has_period: bool = True

    @property
    def measure_names(self) -> list[str]:
        return [m.name for m in self.measures]

    def measure(self, name: str) -> Measure:
        return next(m for m in self.measures if m.name == name)

    def aggregate_sql(
        self,
        source: str,
        *,
        granularity: Granularity | None = "day",
        dimensions: Sequence[str] | None = None,
        where: str | None = None,
    ) -> str:
        """SQL that aggregates deduplicated events in ``source`` into partials.

        ``dimensions`` defaults to all of the view's; a period column named
        ``period`` leads when the view has one and ``granularity`` is given.
        """
        dims = list(self.dimensions if dimensions is None else dimensions)
        select: list[str] = []
        group: list[str] = []
        if self.has_period and granularity is not None:
            select.append(f"{PERIOD_EXPR[granularity]} AS period")
            group.append(PERIOD_EXPR[granularity])
        select += dims
        group += dims
        select += [m.aggregate_sql() for m in self.measures]
        sql = f"SELECT {', '.join(select)} FROM {source}"
        if where:
            sql += f" WHERE {where}"
        if group:
            sql += f" GROUP BY {', '.join(group)}"
        return sql

    def merge_sql(
        self, source: str, *, keys: Sequence[str], where: str | None = None, derive: bool = True
    ) -> str:
        """SQL that merges partial rows in ``source`` (any union of partials) by ``keys``."""
        select = [*keys, *(m.merge_sql() for m in self.measures)]
        sql = f"SELECT {', '.join(select)} FROM {source}"
        if where:
            sql += f" WHERE {where}"
        if keys:
            sql += f" GROUP BY {', '.join(keys)}"
        if derive and self.derived:
            sql = f"SELECT *, {', '.join(d.sql() for d in self.derived)} FROM ({sql})"
        return sql

    def combine_rows(self, a: dict, b: dict) -> dict:
        """Merge two partial rows (same keys) in Python."""
        out = dict(a)
        for m in self.measures:
            out[m.name] = m.combine(a.get(m.name), b.get(m.name))
        return out


# Sales per period (day or hour), store and SKU. Returns count with negative quantity.
SALES = ViewDef(
    name="sales",
    topic="orders",
    key="event_id",
    dimensions=("store_id", "sku"),
    measures=(
        Measure("units", "quantity", "sum"),
        Measure("revenue", "quantity * unit_price", "sum"),
        Measure("order_lines", "*", "count"),
    ),
)

# Sentiment per SKU over scored reviews (columns ``rating``, ``sentiment``, ``label``).
SENTIMENT = ViewDef(
    name="sentiment",
    topic="reviews",
    key="review_id",
    dimensions=("sku",),
    measures=(
        Measure("reviews", "*", "count"),
        Measure("rating_sum", "rating", "sum"),
        Measure("sentiment_sum", "sentiment", "sum"),
        Measure("positive", "CASE WHEN label = 'positive' THEN 1 ELSE 0 END", "sum"),
        Measure("neutral", "CASE WHEN label = 'neutral' THEN 1 ELSE 0 END", "sum"),
        Measure("negative", "CASE WHEN label = 'negative' THEN 1 ELSE 0 END", "sum"),
    ),
    derived=(
        Mean("mean_rating", "rating_sum", "reviews"),
        Mean("mean_sentiment", "sentiment_sum", "reviews"),
    ),
    has_period=False,
)

VIEWS = {v.name: v for v in (SALES, SENTIMENT)}

# --- forecast levels --------------------------------------------------------------------------

# The batch layer forecasts every level analysts plan at, reconciled so that they add up:
# each (sku, store), each SKU over all stores, each store over all SKUs, and the total. A row
# of an aggregate level carries ``ALL`` as the key it sums over; ``ALL`` is therefore not a
# valid id in events (the validator rejects it as ``out_of_range``).
ALL = "*"
FORECAST_LEVELS = ("sku_store", "sku", "store", "total")


def forecast_level(sku: str, store_id: str) -> str:
    """The level of a forecast row, from its keys.

    >>> forecast_level("SKU-1", "S001"), forecast_level("SKU-1", ALL), forecast_level(ALL, ALL)
    ('sku_store', 'sku', 'total')
    """
    if sku == ALL:
        return "total" if store_id == ALL else "store"
    return "sku" if store_id == ALL else "sku_store"
