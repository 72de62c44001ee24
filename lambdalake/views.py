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
from typing import Any, Literal

Agg = Literal["sum", "count", "min", "max"]
Granularity = Literal["day", "hour"]
MeasureType = Literal["int64", "float64"]

# Each measure type's name per engine (Arrow/Parquet/Delta use the Arrow type).
DUCKDB_TYPES: dict[str, str] = {"int64": "BIGINT", "float64": "DOUBLE"}
PERIOD_DUCKDB_TYPES: dict[str, str] = {"day": "DATE", "hour": "TIMESTAMPTZ"}

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
    type: MeasureType = "int64"  # the partial's type, everywhere (Arrow, Delta, DuckDB, Spark)

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

    def partial_columns(self, granularity: Granularity | None = "day") -> list[tuple[str, str]]:
        """``(column, type)`` of a partial row: ``period`` (a view with periods, given a
        granularity: ``date`` or ``timestamp`` UTC), the dimensions (``string``) and the
        measures (``int64``/``float64``). The one source of every engine's schema.

        >>> SENTIMENT.partial_columns()[:3]
        [('sku', 'string'), ('reviews', 'int64'), ('rating_sum', 'int64')]
        """
        cols: list[tuple[str, str]] = []
        if self.has_period and granularity is not None:
            cols.append(("period", "date" if granularity == "day" else "timestamp"))
        cols += [(d, "string") for d in self.dimensions]
        cols += [(m.name, m.type) for m in self.measures]
        return cols

    def arrow_schema(
        self,
        granularity: Granularity | None = "day",
        *,
        period_name: str = "period",
        derived: bool = False,
        extra: Sequence[tuple[str, str]] = (),
    ) -> Any:
        """The partials' Arrow schema (``pyarrow.Schema``): see :meth:`partial_columns`;
        ``derived`` adds the derived measures (``float64``), ``extra`` more columns."""
        import pyarrow as pa

        types = {
            "string": pa.string(),
            "int64": pa.int64(),
            "float64": pa.float64(),
            "date": pa.date32(),
            "timestamp": pa.timestamp("us", tz="UTC"),
        }
        cols = self.partial_columns(granularity)
        if derived:
            cols += [(d.name, "float64") for d in self.derived]
        cols += list(extra)
        return pa.schema([pa.field(period_name if n == "period" else n, types[t]) for n, t in cols])

    def duckdb_ddl(self, table: str, granularity: Granularity | None = "day") -> str:
        """``CREATE TABLE`` of an empty table of partials in DuckDB."""
        names = {"string": "VARCHAR", "date": "DATE", "timestamp": "TIMESTAMPTZ", **DUCKDB_TYPES}
        cols = ", ".join(f"{n} {names[t]}" for n, t in self.partial_columns(granularity))
        return f"CREATE TABLE {table} ({cols})"

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
        Measure("revenue", "quantity * unit_price", "sum", "float64"),
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
        Measure("sentiment_sum", "sentiment", "sum", "float64"),
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
