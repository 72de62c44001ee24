"""SQL over the merged views: one read-only DuckDB statement, sandboxed (``POST /v1/sql``).

Every table a statement may read is the exact merge the endpoints answer from: the latest
published run's view plus the speed layer's partials (or events) at or above its watermark,
all read for one statement at one ``as_of`` (the run, and per topic partition the speed
offsets). The tables are built per statement, and only those it names:

``sales_hourly``, ``sales_daily``
    ``period`` (hour start, UTC / date), ``store_id``, ``sku``, ``units``, ``revenue``,
    ``order_lines``: the ``SALES`` view at its hour and day grains (``views/hourly_sales`` /
    ``daily_sales`` merged with the speed partials, rolled up).
``products``, ``stores``
    each id's current record (``sku``, ``category``, ``name``, ``brand`` /
    ``store_id``, ``region``, ``name``, ``city``; a field left out is NULL).
``review_scores``
    ``review_id``, ``sku``, ``event_time``, ``rating``, ``sentiment``, ``label``: the run's
    scored reviews and the speed layer's (scored with the same model).
``forecast``, ``forecast_accuracy``
    the run's published forecasts and backtests, every level (``level``; ``*`` for the key
    an aggregate sums over).

The sandbox, in layers:

1. **The statement is parsed** (DuckDB's own parser, ``json_serialize_sql``) before anything
   runs: one ``SELECT``/``WITH`` statement only (DDL, DML, ``COPY``, ``ATTACH``,
   ``INSTALL``/``LOAD``, ``SET``/``PRAGMA``, ``CALL``, ``EXPLAIN`` and several statements do
   not serialise and are refused); every table it reads must be one of :data:`TABLES` (or a
   ``WITH`` name of its own, which may not shadow a catalog name); no schema or catalog
   qualifier; table functions other than :data:`ALLOWED_TABLE_FUNCTIONS` and the functions
   in :data:`DENIED_FUNCTIONS` are refused. Names compare case-insensitively, as DuckDB
   resolves them, whether quoted or not, so a look-alike (``ѕales_daily`` with a Cyrillic
   ``ѕ``) is simply an unknown table.
2. **The connection runs with** ``enable_external_access = false`` (no file, network or
   extension access even if a check above were wrong), no extension autoloading, its own
   ``memory_limit`` and one thread, and ``lock_configuration`` so the statement cannot
   change any of it.
3. **Connections are reused** (:class:`Sandbox`: opening one costs more than most
   statements): the views are created once; a statement only registers its inputs.
4. **Limits**: the statement is interrupted past ``LAMBDALAKE_SQL_TIMEOUT_S``; at most
   ``LAMBDALAKE_SQL_MAX_ROWS`` rows are returned (``truncated``); at most
   ``sql_concurrency`` statements run at once per API process (more: 429 with
   ``Retry-After``), each on a worker thread, so the API keeps answering meanwhile.
"""

from __future__ import annotations

import atexit
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from lambdalake.contract.speed_protocol import REVIEW_SCORES
from lambdalake.contract.views import PRODUCTS, SALES, STORES, ViewDef
from lambdalake.errors import InvalidInput, LambdalakeError

# The tables a statement may read, and what each is (the docs and the error messages say so).
TABLES: dict[str, str] = {
    "sales_hourly": "period (UTC hour start), store_id, sku, units, revenue, order_lines",
    "sales_daily": "period (UTC date), store_id, sku, units, revenue, order_lines",
    "products": "sku, category, name, brand (current records)",
    "stores": "store_id, region, name, city (current records)",
    "review_scores": "review_id, sku, event_time, rating, sentiment, label",
    "forecast": "sku, store_id, date, forecast, lower_80, upper_80, lower_95, upper_95, "
    "model, level",
    "forecast_accuracy": "sku, store_id, model, mase, coverage_80, coverage_95, "
    "n_train_days, level",
}
# Table functions that only compute (no file, network or process access).
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
# Scalar functions refused by name (the process's environment and settings); prefixes of
# families of functions that read files or the catalog.
DENIED_FUNCTIONS = frozenset(
    {"getenv", "current_setting", "query", "query_table", "sql_auto_complete", "glob"}
)
DENIED_PREFIXES = ("read_", "parquet_", "duckdb_", "pragma_", "delta_", "iceberg_", "icu_")
MAX_STATEMENT_CHARS = 100_000
# The kinds of FROM items a statement may have (DESCRIBE / SUMMARIZE / SHOW are SHOW_REF).
TABLE_REFS = frozenset(
    {"BASE_TABLE", "TABLE_FUNCTION", "SUBQUERY", "JOIN", "EXPRESSION_LIST", "EMPTY", "PIVOT"}
)
# Names of the sandbox's own tables (the inputs the views merge): never the user's.
INTERNAL_PREFIX = "_ll_"


class SqlRefused(InvalidInput):
    """The statement is not one the sandbox runs (a 400); nothing was executed."""


class SqlFailed(LambdalakeError):
    """The statement ran and failed: DuckDB's binder or runtime error (a 400)."""


class SqlLimit(LambdalakeError):
    """The statement hit the time or memory limit (a 422: a smaller question may pass)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SqlBusy(LambdalakeError):
    """As many statements as allowed are running in this process (a 429)."""


@dataclass(frozen=True)
class SqlLimits:
    timeout_s: float = 10.0
    max_rows: int = 100_000
    memory_limit: str = "1GB"


@dataclass(frozen=True)
class Statement:
    """A checked statement and the tables it reads."""

    sql: str
    tables: frozenset[str]


def _catalog_names() -> frozenset[str]:
    """Every name an unqualified table reference could resolve to in a fresh connection
    (DuckDB's own views such as ``pg_tables``, ``duckdb_settings``): a ``WITH`` name may not
    be one, so a reference outside its scope cannot reach the catalog."""
    con = duckdb.connect(config={"enable_external_access": False})
    try:
        rows = con.execute(
            "SELECT view_name FROM duckdb_views() UNION SELECT table_name FROM duckdb_tables() "
            "UNION SELECT function_name FROM duckdb_functions() WHERE function_type = 'table'"
        ).fetchall()
    finally:
        con.close()
    return frozenset(str(r[0]).lower() for r in rows)


_CATALOG: frozenset[str] | None = None
_PARSER = threading.local()


def _ast(sql: str) -> dict[str, Any]:
    con = getattr(_PARSER, "con", None)
    if con is None:
        con = _PARSER.con = duckdb.connect(config={"enable_external_access": False})
    [(tree,)] = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    return json.loads(tree)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def check_statement(sql: str) -> Statement:
    """The statement if the sandbox runs it; :class:`SqlRefused` with the reason otherwise.

    >>> sorted(check_statement("SELECT sku, sum(units) FROM sales_daily GROUP BY sku").tables)
    ['sales_daily']
    >>> check_statement("DROP TABLE products")
    Traceback (most recent call last):
    ...
    serving.sql.SqlRefused: only one read-only statement (SELECT or WITH ... SELECT) is run
    """
    global _CATALOG
    if not isinstance(sql, str) or not sql.strip():
        raise SqlRefused('send a statement: {"sql": "SELECT ..."}')
    if len(sql) > MAX_STATEMENT_CHARS:
        raise SqlRefused(
            f"the statement is {len(sql):,} characters; at most {MAX_STATEMENT_CHARS:,}"
        )
    try:
        ast = _ast(sql)
    except duckdb.Error as exc:
        raise SqlRefused(f"the statement does not parse: {_first_line(exc)}") from None
    if ast.get("error"):
        message = str(ast.get("error_message") or "")
        if "Only SELECT" in message:
            raise SqlRefused("only one read-only statement (SELECT or WITH ... SELECT) is run")
        raise SqlRefused(f"the statement does not parse: {_first_line(message)}")
    statements = ast.get("statements") or []
    if len(statements) != 1:
        raise SqlRefused(f"one statement per request, not {len(statements)}")
    if _CATALOG is None:
        _CATALOG = _catalog_names()
    nodes = list(_walk(statements[0]))
    ctes = {
        str(entry["key"]).lower()
        for n in nodes
        if isinstance(n.get("cte_map"), dict)
        for entry in n["cte_map"].get("map") or []
    }
    for name in ctes:
        if name in TABLES or name in _CATALOG or name.startswith(INTERNAL_PREFIX):
            raise SqlRefused(f"a WITH name may not be {name!r} (a table of its own)")
    tables: set[str] = set()
    for n in nodes:
        kind = n.get("type")
        if "sample" in n and "alias" in n and kind not in TABLE_REFS:  # a FROM item
            raise SqlRefused(
                "only SELECT over the tables is run (not DESCRIBE, SUMMARIZE or SHOW); the "
                "tables are " + ", ".join(TABLES)
            )
        if kind == "BASE_TABLE":
            name = str(n.get("table_name", "")).lower()
            if n.get("schema_name") or n.get("catalog_name"):
                qualified = ".".join(
                    str(p) for p in (n.get("catalog_name"), n.get("schema_name"), name) if p
                )
                raise SqlRefused(
                    f"{qualified!r}: tables are named without a schema; the tables are "
                    + ", ".join(TABLES)
                )
            if name in TABLES:
                tables.add(name)
            elif name not in ctes:
                raise SqlRefused(f"no table {name!r}; the tables are {', '.join(TABLES)}")
        elif kind == "TABLE_FUNCTION":
            fn = str((n.get("function") or {}).get("function_name", "")).lower()
            if fn not in ALLOWED_TABLE_FUNCTIONS:
                raise SqlRefused(
                    f"table function {fn or '?'}() is not allowed; only "
                    f"{', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))}, and the tables "
                    + ", ".join(TABLES)
                )
        elif n.get("class") == "FUNCTION":
            fn = str(n.get("function_name", "")).lower()
            if fn in DENIED_FUNCTIONS or fn.startswith(DENIED_PREFIXES):
                raise SqlRefused(f"function {fn}() is not allowed here")
    return Statement(sql, frozenset(tables))


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


@dataclass
class Inputs:
    """What a statement's tables are built from: Arrow tables registered under internal names
    and the SQL of each user-visible view over them."""

    arrow: dict[str, pa.Table] = field(default_factory=dict)
    views: dict[str, str] = field(default_factory=dict)


def merged_view_sql(view: ViewDef, batch: str, speed: str | None, select: str) -> str:
    """A view's batch rows and speed partials merged by its own rules (``merge_sql``);
    ``select`` projects the speed partials onto the batch table's shape (a grain's roll-up)."""
    keys = ["period", *view.dimensions] if select else list(view.dimensions)
    union = f"SELECT * FROM {batch}"
    if speed is not None:
        union += f" UNION ALL BY NAME SELECT {select or '*'} FROM {speed}"
    return view.merge_sql(f"({union})", keys=keys, derive=False)


@dataclass
class SqlResult:
    table: pa.Table
    types: list[str]
    truncated: bool


class Sandbox:
    """Sandboxed DuckDB connections, kept and reused (opening one costs ~25 ms, more than a
    typical statement): each is its own in-memory database with external access off, no
    extension autoloading, one thread, its own ``memory_limit`` and ``lock_configuration``,
    and the views of every table created once over internal names. A statement registers
    the Arrow inputs of the tables it reads under those names, runs, and unregisters them;
    a connection whose statement was interrupted or ran out of memory is closed, not kept."""

    def __init__(self, limits: SqlLimits) -> None:
        self.limits = limits
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        atexit.register(self.close)  # no live connection at interpreter shutdown

    def _open(self, template: Inputs) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(
            ":memory:",
            config={
                "enable_external_access": False,
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "threads": 1,
                "memory_limit": self.limits.memory_limit,
            },
        )
        con.execute("SET TimeZone = 'UTC'")
        for name, table in template.arrow.items():  # the views bind to these schemas
            con.register(name, table.slice(0, 0))
        for name, sql in template.views.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        for name in template.arrow:
            con.unregister(name)
        con.execute("SET lock_configuration = true")
        return con

    def execute(self, stmt: Statement, inputs: Inputs, template: Callable[[], Inputs]) -> SqlResult:
        """Run ``stmt`` over ``inputs`` (the Arrow tables of the tables it reads);
        ``template()`` (every table's inputs, any rows) makes a new connection's views; it is
        called only when no idle connection is left."""
        limits = self.limits
        with self._lock:
            con = self._idle.pop() if self._idle else None
        if con is None:
            con = self._open(template())
        keep = False
        try:
            for name, table in inputs.arrow.items():
                con.register(name, table)
            done = threading.Event()

            def interrupt() -> None:
                if not done.is_set():
                    con.interrupt()

            timer = threading.Timer(limits.timeout_s, interrupt)
            timer.daemon = True
            timer.start()
            try:
                rel = con.sql(stmt.sql)
                types = [str(t) for t in rel.types]
                reader = rel.fetch_arrow_reader(min(limits.max_rows + 1, 10_000))
                batches: list[pa.RecordBatch] = []
                rows = 0
                for batch in reader:
                    batches.append(batch)
                    rows += batch.num_rows
                    if rows > limits.max_rows:
                        break
                schema = reader.schema
                del rel, reader
            finally:
                done.set()
                timer.cancel()
            table = pa.Table.from_batches(batches, schema=schema)
            truncated = table.num_rows > limits.max_rows
            keep = True
            return SqlResult(table.slice(0, limits.max_rows), types, truncated)
        except duckdb.InterruptException:
            raise SqlLimit(
                "timeout",
                f"the statement ran past the {limits.timeout_s:g} s limit "
                "(LAMBDALAKE_SQL_TIMEOUT_S); ask a smaller question (fewer rows, a filter, no "
                "cross join)",
            ) from None
        except duckdb.OutOfMemoryException as exc:
            raise SqlLimit(
                "memory",
                f"the statement needs more than the {limits.memory_limit} memory limit: "
                f"{_first_line(exc)}",
            ) from None
        except duckdb.Error as exc:
            keep = True  # the statement's own error: the connection is as it was
            raise SqlFailed(_first_line(exc)) from None
        finally:
            if keep:
                try:
                    for name in inputs.arrow:
                        con.unregister(name)
                except duckdb.Error:
                    keep = False
            if keep:
                with self._lock:
                    self._idle.append(con)
            else:
                con.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()


def internal(name: str) -> str:
    return f"{INTERNAL_PREFIX}{name}"


# How each user-visible table is made from the served run's snapshot tables (``b``) and the
# speed layer's answers (``s``): the view, and the speed query that feeds it.
SPEED_SOURCE: dict[str, ViewDef | Any] = {
    "sales_hourly": SALES,
    "sales_daily": SALES,
    "products": PRODUCTS,
    "stores": STORES,
    "review_scores": REVIEW_SCORES,
}


LEVEL_SQL = (
    "CASE WHEN sku = '*' THEN (CASE WHEN store_id = '*' THEN 'total' ELSE 'store' END) "
    "WHEN store_id = '*' THEN 'sku' ELSE 'sku_store' END AS level"
)


def build_inputs(
    tables: frozenset[str], batch: dict[str, pa.Table], speed: dict[str, pa.Table]
) -> Inputs:
    """The registered inputs and view SQL of ``tables``, from the served run's snapshot
    tables (``batch``: ``sales_day``, ``sales_hour``, ``products``, ``stores``,
    ``review_scores``, ``forecast``, ``accuracy``) and the speed layer's whole answers
    (``speed``: by view name, at the view's stored grain)."""
    inputs = Inputs()

    def arrow(name: str, table: pa.Table) -> str:
        inputs.arrow[internal(name)] = table
        return internal(name)

    measures = ", ".join(SALES.measure_names)
    if "sales_hourly" in tables:
        b = arrow("b_sales_hour", batch["sales_hour"])
        s = arrow("s_sales", speed["sales"])
        inputs.views["sales_hourly"] = merged_view_sql(
            SALES, b, s, f"period, store_id, sku, {measures}"
        )
    if "sales_daily" in tables:
        b = arrow("b_sales_day", batch["sales_day"])
        s = arrow("s_sales", speed["sales"])
        inputs.views["sales_daily"] = merged_view_sql(
            SALES, b, s, f"CAST(period AS DATE) AS period, store_id, sku, {measures}"
        )
    for view in (PRODUCTS, STORES):
        if view.name in tables:
            b = arrow(f"b_{view.name}", batch[view.name])
            s = arrow(f"s_{view.name}", speed[view.name])
            fields = [m.name for m in view.measures if m.agg == "last"]
            cols = ", ".join([view.dimensions[0], *(f"nullif({f}, '') AS {f}" for f in fields)])
            inputs.views[view.name] = f"SELECT {cols} FROM ({merged_view_sql(view, b, s, '')})"
    if "review_scores" in tables:
        b = arrow("b_review_scores", batch["review_scores"])
        s = arrow("s_review_scores", speed[REVIEW_SCORES.name])
        inputs.views["review_scores"] = f"SELECT * FROM {b} UNION ALL BY NAME SELECT * FROM {s}"
    if "forecast" in tables:
        b = arrow("b_forecast", batch["forecast"])
        inputs.views["forecast"] = f"SELECT *, {LEVEL_SQL} FROM {b}"
    if "forecast_accuracy" in tables:
        b = arrow("b_accuracy", batch["accuracy"])
        inputs.views["forecast_accuracy"] = f"SELECT *, {LEVEL_SQL} FROM {b}"
    return inputs


def json_value(v: Any) -> Any:
    """A value of a result row as JSON can hold it: dates and times in ISO 8601, decimals
    as numbers (integers when their scale is 0: a HUGEINT sum), NaN and infinities as null,
    bytes as hex.

    >>> import decimal
    >>> json_value(decimal.Decimal("524")), json_value(decimal.Decimal("5.25"))
    (524, 5.25)
    """
    import datetime as dt
    import decimal
    import math

    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):  # HUGEINT (an integer sum) arrives as a scale-0 decimal
        exponent = v.as_tuple().exponent
        return int(v) if isinstance(exponent, int) and exponent >= 0 else float(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    return str(v)
