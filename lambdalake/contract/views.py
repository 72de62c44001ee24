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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Agg = Literal["sum", "count", "min", "max", "last"]
Granularity = Literal["hour", "day", "week", "month"]
MeasureType = Literal["int64", "float64", "string"]

# Grains, finest first; ``None`` is "all time" (no period column).
GRAINS: tuple[Granularity | None, ...] = ("hour", "day", "week", "month", None)
# The grains each grain rolls up into exactly: a period lies in one period of each (a UTC hour
# in one UTC day, a day in one ISO week and one month). A week does not lie in one month.
ROLLS_UP_TO: dict[Granularity | None, frozenset[Granularity | None]] = {
    "hour": frozenset({"day", "week", "month", None}),
    "day": frozenset({"week", "month", None}),
    "week": frozenset({None}),
    "month": frozenset({None}),
    None: frozenset(),
}

# Each measure type's name per engine (Arrow/Parquet/Delta use the Arrow type).
DUCKDB_TYPES: dict[str, str] = {"int64": "BIGINT", "float64": "DOUBLE", "string": "VARCHAR"}
# A period's type per grain: an hour is its UTC start, a day its date, a week its Monday.
PERIOD_TYPES: dict[str, str] = {
    "hour": "timestamp",
    "day": "date",
    "week": "date",
    "month": "date",
}

# The expression that buckets an event's time, per granularity (UTC; ISO weeks start Monday
# in both engines).
PERIOD_EXPR: dict[str, str] = {
    "hour": "date_trunc('hour', event_time)",
    "day": "event_date",
    "week": "CAST(date_trunc('week', event_time) AS DATE)",
    "month": "CAST(date_trunc('month', event_time) AS DATE)",
}

# The expression that rolls a finer period column ``{c}`` up to a grain.
ROLLUP_EXPR: dict[str, str] = {
    "hour": "{c}",
    "day": "CAST({c} AS DATE)",
    "week": "CAST(date_trunc('week', CAST({c} AS DATE)) AS DATE)",
    "month": "CAST(date_trunc('month', CAST({c} AS DATE)) AS DATE)",
}

# The column that holds the period in the batch layer's aggregate views, per grain:
# ``views/daily_sales.date`` (DATE), ``views/hourly_sales.hour`` (UTC TIMESTAMP, the hour's
# start), ``views/sentiment_weekly.week`` (DATE, the ISO week's Monday). The speed layer and
# serving call it ``period``.
PERIOD_COLUMN: dict[str, str] = {"hour": "hour", "day": "date", "week": "week", "month": "month"}

# Events are deduplicated by their topic's key (``lambdalake.contract.events.KEY_BY_TOPIC``); of
# several events with one key the first in the log wins: the lowest offset, then the lowest
# partition. Every layer dedups with this window (Spark SQL and DuckDB).
FIRST_WINS = ("_offset", "_partition")


def dedup_rank_sql(key: str) -> str:
    """The rank of an event among those sharing its ``key`` (1 = the one that counts).

    >>> dedup_rank_sql("event_id")
    'row_number() OVER (PARTITION BY event_id ORDER BY _offset, _partition)'
    """
    return f"row_number() OVER (PARTITION BY {key} ORDER BY {', '.join(FIRST_WINS)})"


def rolls_up(a: Granularity | None, b: Granularity | None) -> bool:
    """Partials at grain ``a`` answer at grain ``b`` exactly (the same grain, or one every
    period of ``a`` lies in)."""
    return a == b or b in ROLLS_UP_TO[a]


# The place of a message in the log as one number, for "the last message wins": its offset,
# then its partition (an id a keyed producer sends lives in one partition, where the offset
# alone orders it; an id seen in several partitions is decided by the higher offset). Exact
# for offsets below 2**51 and fewer than 4,096 partitions.
LOG_POSITION = "(_offset * 4096 + _partition)"
# A reference view's measure holding its record's LOG_POSITION (``last`` measures follow it).
VERSION = "version"


@dataclass(frozen=True)
class Measure:
    """A mergeable measure: ``agg(expr)`` over events, merged with ``merge_agg``.

    ``last``: the value of the message latest in the log, by the view's ``version`` measure
    (``max(LOG_POSITION)``); merged by taking the row with the highest version. A missing
    value is kept as ``''`` (both engines' ``max_by`` would skip a NULL otherwise)."""

    name: str
    expr: str
    agg: Agg
    type: MeasureType = "int64"  # the partial's type, everywhere (Arrow, Delta, DuckDB, Spark)

    @property
    def merge_agg(self) -> str:
        return {"sum": "SUM", "count": "SUM", "min": "MIN", "max": "MAX", "last": "LAST"}[self.agg]

    def aggregate_sql(self) -> str:
        if self.agg == "count":
            return f"COUNT({self.expr}) AS {self.name}"
        if self.agg == "last":
            return f"max_by(coalesce({self.expr}, ''), {LOG_POSITION}) AS {self.name}"
        return f"{self.agg.upper()}({self.expr}) AS {self.name}"

    def merge_sql(self, column: str | None = None) -> str:
        if self.agg == "last":
            return f"max_by({column or self.name}, {VERSION}) AS {self.name}"
        return f"{self.merge_agg}({column or self.name}) AS {self.name}"

    def combine(self, a: float | int | None, b: float | int | None) -> float | int | None:
        """Merge two partial values in Python (``None`` = no events); a ``last`` measure is
        merged by :meth:`ViewDef.combine_rows`, which knows the rows' versions."""
        if a is None:
            return b
        if b is None:
            return a
        if self.merge_agg == "SUM":
            return a + b
        if self.merge_agg == "LAST":
            raise ValueError(f"{self.name}: a last value is merged by row (combine_rows)")
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
    """An aggregate view over one topic's deduplicated events: everything it is.

    ``tables`` maps each grain the batch layer publishes (``None``: all time) to its Delta
    table; the table's key is the period column (``PERIOD_COLUMN``) and the dimensions, and
    its columns are :meth:`arrow_schema` with the derived measures and ``run_id``. The speed
    layer keeps partials at the finest grain (:attr:`stored_grain`) and rolls them up to any
    grain asked (:attr:`grains`). Events are deduplicated by ``key`` with
    :func:`dedup_rank_sql`. Adding a grain or a view here adds its batch table, its speed
    partials, its place in the protocol and in the serving snapshot; only the API's route
    that answers it is written by hand.
    """

    name: str
    topic: str
    key: str
    dimensions: tuple[str, ...]
    measures: tuple[Measure, ...]
    tables: Mapping[Granularity | None, str]
    default_grain: Granularity | None  # the grain of a question that names none
    derived: tuple[Mean, ...] = field(default_factory=tuple)
    # Events (``first``): the first of a key in the log counts, later ones are duplicates
    # (dedup_rank_sql). Reference data (``last``): every message counts, and the view keeps
    # each id's last record (``last`` measures); nothing is deduplicated.
    wins: Literal["first", "last"] = "first"

    @property
    def grains(self) -> tuple[Granularity | None, ...]:
        """The grains the view answers at, finest first."""
        return tuple(g for g in GRAINS if g in self.tables)

    @property
    def stored_grain(self) -> Granularity | None:
        """The finest grain: what the speed layer keeps, and rolls up from."""
        return self.grains[0]

    @property
    def has_period(self) -> bool:
        """Partials carry a period (the view has a grain finer than all time)."""
        return self.stored_grain is not None

    @property
    def event_count(self) -> str:
        """The measure that counts the view's events (``COUNT(*)``): summed over any of its
        tables, it is the number of deduplicated events the table was built from."""
        return next(m.name for m in self.measures if m.agg == "count" and m.expr == "*")

    def table_key(self, granularity: Granularity | None) -> tuple[str, ...]:
        """The columns that identify a row of the view's table at ``granularity``."""
        period = (PERIOD_COLUMN[granularity],) if granularity is not None else ()
        return (*period, *self.dimensions)

    def check_grain(self, granularity: Granularity | None) -> None:
        """``ValueError`` unless partials can answer at ``granularity``: the stored grain
        or any coarser one (they roll up exactly), published as a table or not."""
        if granularity not in GRAINS or not rolls_up(self.stored_grain, granularity):
            coarser = [g or "all time" for g in GRAINS if rolls_up(self.stored_grain, g)]
            raise ValueError(
                f"view {self.name} has no grain {granularity!r}; it answers at {', '.join(coarser)}"
            )

    @property
    def measure_names(self) -> list[str]:
        return [m.name for m in self.measures]

    def measure(self, name: str) -> Measure:
        return next(m for m in self.measures if m.name == name)

    def partial_columns(self, granularity: Granularity | None) -> list[tuple[str, str]]:
        """``(column, type)`` of a partial row: ``period`` (given a granularity:
        ``PERIOD_TYPES``), the dimensions (``string``) and the measures
        (``int64``/``float64``). The one source of every engine's schema.

        >>> SENTIMENT.partial_columns(None)[:3]
        [('sku', 'string'), ('reviews', 'int64'), ('rating_sum', 'int64')]
        """
        cols: list[tuple[str, str]] = []
        if granularity is not None:
            cols.append(("period", PERIOD_TYPES[granularity]))
        cols += [(d, "string") for d in self.dimensions]
        cols += [(m.name, m.type) for m in self.measures]
        return cols

    def arrow_schema(
        self,
        granularity: Granularity | None,
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

    def duckdb_ddl(self, table: str, granularity: Granularity | None) -> str:
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
        ``period`` leads when ``granularity`` is given.
        """
        dims = list(self.dimensions if dimensions is None else dimensions)
        select: list[str] = []
        group: list[str] = []
        if granularity is not None:
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
        later = b if (b.get(VERSION) or -1) > (a.get(VERSION) or -1) else a
        for m in self.measures:
            if m.agg == "last":
                out[m.name] = later.get(m.name)
            else:
                out[m.name] = m.combine(a.get(m.name), b.get(m.name))
        return out


# Sales per period (day or hour), store and SKU. Returns count with negative quantity.
SALES = ViewDef(
    name="sales",
    topic="orders",
    key="event_id",
    dimensions=("store_id", "sku"),
    tables={
        "hour": "views/hourly_sales",
        "day": "views/daily_sales",
        "week": "views/weekly_sales",
        "month": "views/monthly_sales",
    },
    default_grain="day",
    measures=(
        Measure("units", "quantity", "sum"),
        Measure("revenue", "quantity * unit_price", "sum", "float64"),
        Measure("order_lines", "*", "count"),
    ),
)

# Sentiment per SKU over scored reviews (columns ``rating``, ``sentiment``, ``label``), per
# ISO week and over all time.
SENTIMENT = ViewDef(
    name="sentiment",
    topic="reviews",
    key="review_id",
    dimensions=("sku",),
    tables={"week": "views/sentiment_weekly", None: "views/sentiment_by_sku"},
    default_grain=None,
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
)

# Reference data: each id's record, the last message of the id in the log winning (type-1:
# a change applies to all history). ``messages`` counts every message of the id, ``version``
# is the latest one's place in the log (LOG_POSITION), the other measures its fields. Sales
# are broken down by ``category`` and ``region`` by joining these at question time.


def _reference_view(name: str, key: str, fields: tuple[str, ...]) -> ViewDef:
    return ViewDef(
        name=name,
        topic=name,
        key=key,
        dimensions=(key,),
        tables={None: f"dims/{name}"},
        default_grain=None,
        measures=(
            Measure("messages", "*", "count"),
            Measure(VERSION, LOG_POSITION, "max"),
            *(Measure(f, f, "last", "string") for f in fields),
        ),
        wins="last",
    )


PRODUCTS = _reference_view("products", "sku", ("category", "name", "brand"))
STORES = _reference_view("stores", "store_id", ("region", "name", "city"))
# The attribute of each reference view that sales can be broken down by (and filtered on).
SALES_ATTRIBUTES: dict[str, tuple[ViewDef, str]] = {
    "category": (PRODUCTS, "sku"),
    "region": (STORES, "store_id"),
}

VIEWS = {v.name: v for v in (SALES, SENTIMENT, PRODUCTS, STORES)}
VIEWS_BY_TOPIC: dict[str, tuple[ViewDef, ...]] = {
    t: tuple(v for v in VIEWS.values() if v.topic == t)
    for t in ("orders", "reviews", "products", "stores")
}


def aggregate_tables() -> list[tuple[ViewDef, Granularity | None, str]]:
    """``(view, grain, table)`` of every aggregate table the batch layer publishes."""
    return [(v, g, v.tables[g]) for v in VIEWS.values() for g in v.grains]


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
