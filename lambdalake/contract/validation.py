"""The event validators: a micro-batch of raw Kafka message values in, the valid events as
one Arrow table and the rejected messages with their reasons out, by the rules of
:mod:`lambdalake.contract.events`. The validator sits in every consumer's hot path, so it
is vectorised.

>>> v = validate("orders", [b'{"event_id": "e1"}', None], partitions=[0, 0], offsets=[7, 8])
>>> v.rejected.column("reason").to_pylist()
['missing_field:event_time', 'bad_json']

``validate_one_reference`` is this contract written plainly in Python, one message at a
time; ``validate`` is the vectorised one, and the tests hold the two to agree on every
message. ``validate`` parses with DuckDB's JSON functions (yyjson, in-process C++) in one
prepared query per topic, on one core. DuckDB reads JSON more leniently than RFC 8259, so
a single regular-expression pass flags every message that *could* differ (a possible
trailing comma or NaN, nesting, a field name written twice or escaped); flagged rows get
exact checks in the query, and the few that still could differ (DuckDB-only syntax, deep
nesting) are decided by the reference. Ordinary producers never take that path.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.contract.events import (
    CHECKS_BY_TOPIC,
    DEFAULT_CURRENCY,
    DEFAULT_MAX_FUTURE,
    FIELDS_BY_TOPIC,
    KIND_CURRENCY,
    KIND_ID,
    KIND_LABEL,
    KIND_OPTIONAL_STRING,
    KIND_PRICE,
    KIND_QUANTITY,
    KIND_RATING,
    KIND_TEXT,
    KIND_TIME,
    KIND_TITLE,
    MAX_ABS_QUANTITY,
    MAX_EVENT_US,
    MAX_ID_CHARS,
    MAX_JSON_DEPTH,
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    MAX_UNIT_PRICE,
    MIN_EVENT_US,
    REJECTED_SCHEMA,
    RESERVED_ID,
    US_PER_DAY,
    UTC_TS,
    VALID_SCHEMA_BY_TOPIC,
    Validated,
    checks_of,
    timed,
)

# --------------------------------------------------------------------------------------
# The reference: one message at a time, plain Python. Slow and obviously correct; the
# property tests hold the vectorised validator to it.
# --------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_CURRENCY_CODE = re.compile(r"[A-Z]{3}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


class _Reject(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Object(dict[str, Any]):
    """A JSON object that remembers which names it saw more than once."""

    duplicates: frozenset[str] = frozenset()


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    seen_twice = set()
    for name, value in pairs:
        if name in obj:
            seen_twice.add(name)
        obj[name] = value
    if seen_twice:
        obj.duplicates = frozenset(seen_twice)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_int(literal: str) -> int:
    # Python refuses int() on more than 4300 digits. JSON forbids leading zeros, so a
    # literal this long is at least 10**63 in magnitude: far outside every range here.
    if len(literal) > 64:
        return -(10**100) if literal.startswith("-") else 10**100
    return int(literal)


_NOT_JSON = object()


def _strict_json(value: bytes) -> Any:
    """The parsed document, or ``_NOT_JSON`` (RFC 8259, UTF-8, the limits above)."""
    try:
        doc = json.loads(
            value.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            object_pairs_hook=_object_from_pairs,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOT_JSON
    # Python accepts escaped lone surrogates ("\ud800"); they are not Unicode text.
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return _NOT_JSON
        elif isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return _NOT_JSON
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((item, depth + 1) for item in items)
    return doc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _latest_event_us(now: datetime | None, max_future: timedelta) -> int:
    """The exclusive upper bound of event times in epoch microseconds: just after
    ``now + max_future``, and never beyond the contract's 2100-01-01."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be an aware datetime (UTC)")
    if max_future < timedelta(0):
        raise ValueError(f"max_future must not be negative, got {max_future}")
    try:
        latest = now + max_future
    except OverflowError:  # beyond year 9999: only the contract's bound applies
        return MAX_EVENT_US
    return min(MAX_EVENT_US, (latest - _EPOCH) // _ONE_US + 1)


def _check_time(v: Any, latest_us: int) -> datetime:
    if _is_int(v):
        try:
            t = _EPOCH + timedelta(milliseconds=v)
        except OverflowError:  # beyond what datetime holds: certainly out of range
            raise _Reject("out_of_range") from None
    elif isinstance(v, str):
        m = _RFC3339.fullmatch(v)
        if m is None:
            raise _Reject("bad_time")
        y, mo, d, h, mi, s = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
        micros = int((m.group(7) or "")[:6].ljust(6, "0"))  # truncate beyond microseconds
        zone = m.group(8)
        offset = timedelta(0)
        if zone not in ("Z", "z"):
            oh, om = int(zone[1:3]), int(zone[4:6])
            if oh > 23 or om > 59:
                raise _Reject("bad_time")
            offset = (1 if zone[0] == "+" else -1) * timedelta(hours=oh, minutes=om)
        try:
            local = datetime(y, mo, d, h, mi, s, micros)
        except ValueError:  # no such day or time (also year 0, second 60)
            raise _Reject("bad_time") from None
        try:
            t = (local - offset).replace(tzinfo=UTC)
        except OverflowError:  # a real instant, before year 1 or after 9999 in UTC
            raise _Reject("out_of_range") from None
    else:
        raise _Reject("wrong_type")
    if not MIN_EVENT_US <= (t - _EPOCH) // _ONE_US < latest_us:
        raise _Reject("out_of_range")
    return t


def _check_field(kind: str, v: Any, latest_us: int) -> Any:
    """The normalised value, or raises ``_Reject(kind)``; ``v`` is never None here.
    ``latest_us``: the exclusive upper bound of event times (epoch microseconds)."""
    if kind == KIND_ID:
        if not isinstance(v, str):
            raise _Reject("wrong_type")
        if not 1 <= len(v) <= MAX_ID_CHARS or v == RESERVED_ID:
            raise _Reject("out_of_range")
        return v
    if kind == KIND_TIME:
        return _check_time(v, latest_us)
    if kind == KIND_LABEL:
        if not isinstance(v, str):
            raise _Reject("wrong_type")
        if not 1 <= len(v) <= MAX_ID_CHARS:
            raise _Reject("out_of_range")
        return v
    if kind in (KIND_QUANTITY, KIND_RATING):
        if not _is_int(v):
            raise _Reject("wrong_type")
        ok = (v != 0 and abs(v) <= MAX_ABS_QUANTITY) if kind == KIND_QUANTITY else 1 <= v <= 5
        if not ok:
            raise _Reject("out_of_range")
        return v
    if kind == KIND_PRICE:
        if not (_is_int(v) or isinstance(v, float)):
            raise _Reject("wrong_type")
        # An int compares exactly at any size; a float may be inf or nan (from 1e999).
        if not (0 <= v <= MAX_UNIT_PRICE) or (isinstance(v, float) and not math.isfinite(v)):
            raise _Reject("out_of_range")
        return float(v)
    if kind == KIND_CURRENCY:
        if not isinstance(v, str):
            raise _Reject("wrong_type")
        if _CURRENCY_CODE.fullmatch(v) is None:
            raise _Reject("out_of_range")
        return v
    if kind in (KIND_TITLE, KIND_TEXT, KIND_OPTIONAL_STRING):
        if not isinstance(v, str):
            raise _Reject("wrong_type")
        if kind == KIND_TITLE and len(v) > MAX_TITLE_CHARS:
            raise _Reject("out_of_range")
        if kind == KIND_TEXT and len(v) > MAX_TEXT_CHARS:
            raise _Reject("oversize")
        return v
    raise AssertionError(kind)


# Fields that may be absent or null, and the value they then take.
_DEFAULT_FOR_MISSING: dict[str, Any] = {
    KIND_CURRENCY: DEFAULT_CURRENCY,
    KIND_TITLE: None,
    KIND_OPTIONAL_STRING: None,
}


def validate_one_reference(
    topic: str,
    value: bytes | None,
    *,
    max_event_bytes: int = 256 * 1024,
    max_future: timedelta = DEFAULT_MAX_FUTURE,
    now: datetime | None = None,
) -> dict[str, Any] | str:
    """Validate one message value the slow, obvious way (the specification of ``validate``).

    Returns the normalised event (the topic's fields, ``event_time`` an aware UTC
    ``datetime``, plus ``event_date``) or the reason string. ``now`` (default: the
    clock) and ``max_future`` bound how far ahead ``event_time`` may be.

    >>> validate_one_reference("orders", b'{"event_id": 1}')
    'wrong_type:event_id'
    """
    return _reference(topic, value, max_event_bytes, _latest_event_us(now, max_future))


def _reference(
    topic: str, value: bytes | None, max_event_bytes: int, latest_us: int
) -> dict[str, Any] | str:
    checks = checks_of(topic)
    if value is None:
        return "bad_json"
    if len(value) > max_event_bytes:
        return "oversize"
    doc = _strict_json(value)
    if doc is _NOT_JSON:
        return "bad_json"
    if not isinstance(doc, dict):
        return "not_object"
    if isinstance(doc, _Object) and doc.duplicates & {name for name, _ in checks}:
        return "bad_json"
    event: dict[str, Any] = {}
    for name, kind in checks:
        v = doc.get(name)
        if v is None:
            if kind not in _DEFAULT_FOR_MISSING:
                return f"missing_field:{name}"
            event[name] = _DEFAULT_FOR_MISSING[kind]
            continue
        try:
            event[name] = _check_field(kind, v, latest_us)
        except _Reject as r:
            return f"{r.reason}:{name}"
    if "event_time" in event:
        event["event_date"] = event["event_time"].date()
    return event


# --------------------------------------------------------------------------------------
# The vectorised validator. DuckDB's JSON functions (yyjson, C++) parse each message
# once into the topic's fields (as JSON texts); plain SQL expressions then compute every
# row's first failing reason and its typed values; pyarrow assembles the tables.
# --------------------------------------------------------------------------------------

# DuckDB reads JSON leniently: a trailing comma; NaN/Inf/Infinity in any case.
_LENIENT_JSON_PATTERN = r",[ \t\n\r]*[\]}]|(?:^|[:\[,])[ \t\n\r]*-?(?:[iIN]|n[^u])"


def _suspect_pattern(topic: str) -> str:
    """A regular expression that matches (at least) every message the plain fast path
    could get wrong: DuckDB's lenient syntax, nesting (for MAX_JSON_DEPTH), and a field
    named twice (a name written twice, or a name with a \\u escape). One pass over the
    bytes; ordinary events do not match, and a match only means "check exactly"."""
    nested = r"[:\[,][ \t\n\r]*[\[{]"
    twice = [f'"{name}"[\\s\\S]*"{name}"' for name, _ in checks_of(topic)]
    escaped_name = r'\\u[^"]*"[ \t\n\r]*:'
    return "|".join([_LENIENT_JSON_PATTERN, nested, *twice, escaped_name])


_SUSPECT_BY_TOPIC = {topic: _suspect_pattern(topic) for topic in CHECKS_BY_TOPIC}
_STRING_KINDS = {
    KIND_ID,
    KIND_LABEL,
    KIND_TIME,
    KIND_CURRENCY,
    KIND_TITLE,
    KIND_TEXT,
    KIND_OPTIONAL_STRING,
}
_INTEGER_KINDS = {KIND_TIME, KIND_QUANTITY, KIND_RATING}
_NUMBER_KINDS = {KIND_TIME, KIND_QUANTITY, KIND_RATING, KIND_PRICE}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _field_columns_sql(name: str, kind: str) -> list[str]:
    """Per-field columns from its JSON text ``e_<f>`` (NULL when absent): ``miss_<f>``
    (absent or null), ``v_<f>`` (the unescaped value when a string), ``num_<f>``,
    ``int_<f>`` (a JSON number; one written as an integer, of any size)."""
    e = f"e_{name}"
    cols = [f"({e} IS NULL OR {e} = 'null') AS miss_{name}"]
    if kind in _STRING_KINDS:
        cols.append(
            f"CASE WHEN prefix({e}, '\"') THEN json_extract_string({e}, '$') END AS v_{name}"
        )
    if kind in _NUMBER_KINDS:
        # from_json gives a number as yyjson writes it: an integer as its digits (any
        # size, verbatim), a float with '.' or 'e' (or as NaN/Infinity, which only
        # suspect rows hold). Every other JSON type starts with one of these.
        cols.append(
            f"NOT ({e} IS NULL OR prefix({e}, '\"') OR prefix({e}, 't') OR prefix({e}, 'f') "
            f"OR prefix({e}, 'n') OR prefix({e}, '[') OR prefix({e}, '{{')) AS num_{name}"
        )
    if kind in _INTEGER_KINDS:
        cols.append(
            f"coalesce(num_{name} AND NOT (contains({e}, '.') OR contains({e}, 'e') "
            f"OR contains({e}, 'E')), false) AS int_{name}"
        )
    return cols


def _time_steps_sql(name: str) -> list[list[str]]:
    """Projection steps that turn ``v_<f>``/``e_<f>`` into ``ts_ok`` (a real date and time
    of the right shape) and ``ts_us`` (the instant in epoch microseconds)."""
    v, e = f"v_{name}", f"e_{name}"
    lo, hi = MIN_EVENT_US // 1000, MAX_EVENT_US // 1000 - 1
    zulu = f"(suffix({v}, 'Z') OR suffix({v}, 'z'))"
    return [
        [f"coalesce(regexp_full_match({v}, {_sql_str(_RFC3339.pattern)}), false) AS ts_shape"],
        [
            # Positions are fixed by the shape; the offset is 'Z' or '+HH:MM'.
            f"CASE WHEN ts_shape AND NOT prefix({v}, '0000') "
            f"THEN TRY_CAST(substr({v}, 1, 10) AS DATE) END AS ts_date",
            f"CASE WHEN ts_shape THEN CAST(substr({v}, 12, 2) AS BIGINT) END AS ts_h",
            f"CASE WHEN ts_shape THEN CAST(substr({v}, 15, 2) AS BIGINT) END AS ts_mi",
            f"CASE WHEN ts_shape THEN CAST(substr({v}, 18, 2) AS BIGINT) END AS ts_s",
            f"CASE WHEN ts_shape AND NOT {zulu} THEN right({v}, 6) END AS ts_z",
            f"CASE WHEN ts_shape THEN length({v}) - (CASE WHEN {zulu} THEN 1 ELSE 6 END) - 20 END"
            " AS ts_frac_len",
        ],
        [
            "CASE WHEN ts_z IS NOT NULL THEN CAST(substr(ts_z, 2, 2) AS BIGINT) ELSE 0 END AS ts_oh",
            "CASE WHEN ts_z IS NOT NULL THEN CAST(substr(ts_z, 5, 2) AS BIGINT) ELSE 0 END AS ts_om",
            # Digits beyond microseconds are cut, not rounded.
            f"CASE WHEN ts_frac_len > 0 THEN CAST(rpad(substr({v}, 21, least(6, ts_frac_len)), 6,"
            " '0') AS BIGINT) ELSE 0 END AS ts_frac",
        ],
        [
            "coalesce(ts_date IS NOT NULL AND ts_h <= 23 AND ts_mi <= 59 AND ts_s <= 59 "
            "AND ts_oh <= 23 AND ts_om <= 59, false) AS ts_ok"
        ],
        [
            "CASE WHEN ts_ok THEN ((ts_date - DATE '1970-01-01') * 86400 + ts_h * 3600 "
            "+ ts_mi * 60 + ts_s - (CASE WHEN prefix(ts_z, '-') THEN -1 ELSE 1 END) "
            "* (ts_oh * 3600 + ts_om * 60)) * 1000000 + ts_frac "
            f"WHEN int_{name} AND TRY_CAST({e} AS BIGINT) BETWEEN {lo} AND {hi} "
            f"THEN TRY_CAST({e} AS BIGINT) * 1000 END AS ts_us",
        ],
    ]


def _field_reason_value_sql(name: str, kind: str) -> tuple[str, str]:
    """(reason expression, value expression) of one field over its per-field columns."""
    miss, e, v = f"miss_{name}", f"e_{name}", f"v_{name}"
    missing, wrong = f"'missing_field:{name}'", f"'wrong_type:{name}'"
    out_of_range = f"'out_of_range:{name}'"
    if kind == KIND_ID:
        reason = (
            f"CASE WHEN {miss} THEN {missing} WHEN {v} IS NULL THEN {wrong} "
            f"WHEN length({v}) NOT BETWEEN 1 AND {MAX_ID_CHARS} OR {v} = '{RESERVED_ID}' "
            f"THEN {out_of_range} END"
        )
        return reason, v
    if kind == KIND_LABEL:
        reason = (
            f"CASE WHEN {miss} THEN {missing} WHEN {v} IS NULL THEN {wrong} "
            f"WHEN length({v}) NOT BETWEEN 1 AND {MAX_ID_CHARS} THEN {out_of_range} END"
        )
        return reason, v
    if kind == KIND_TIME:
        # latest_us: the exclusive upper bound of this batch (the clock plus the skew).
        in_range = f"ts_us >= {MIN_EVENT_US} AND ts_us < latest_us"
        reason = (
            f"CASE WHEN {miss} THEN {missing} "
            f"WHEN {v} IS NOT NULL THEN CASE WHEN NOT ts_ok THEN 'bad_time:{name}' "
            f"WHEN NOT ({in_range}) THEN {out_of_range} END "
            f"WHEN int_{name} THEN CASE WHEN ts_us IS NULL OR ts_us >= latest_us "
            f"THEN {out_of_range} END "
            f"ELSE {wrong} END"
        )
        return reason, "ts_us"
    if kind in (KIND_QUANTITY, KIND_RATING):
        n = f"TRY_CAST({e} AS BIGINT)"  # exact: {e} is written as an integer here
        bad = (
            f"{n} IS NULL OR {n} = 0 OR {n} NOT BETWEEN -{MAX_ABS_QUANTITY} AND {MAX_ABS_QUANTITY}"
            if kind == KIND_QUANTITY
            else f"{n} IS NULL OR {n} NOT BETWEEN 1 AND 5"
        )
        reason = (
            f"CASE WHEN {miss} THEN {missing} WHEN NOT int_{name} THEN {wrong} "
            f"WHEN {bad} THEN {out_of_range} END"
        )
        cast = "BIGINT" if kind == KIND_QUANTITY else "INTEGER"
        return reason, f"CASE WHEN int_{name} THEN TRY_CAST({e} AS {cast}) END"
    if kind == KIND_PRICE:
        p = f"TRY_CAST({e} AS DOUBLE)"
        reason = (
            f"CASE WHEN {miss} THEN {missing} WHEN NOT num_{name} THEN {wrong} "
            f"WHEN {p} IS NULL OR NOT isfinite({p}) OR {p} < 0 OR {p} > {MAX_UNIT_PRICE!r} "
            f"THEN {out_of_range} END"
        )
        return reason, f"CASE WHEN num_{name} THEN {p} END"
    if kind == KIND_CURRENCY:
        reason = (
            f"CASE WHEN {miss} THEN NULL WHEN {v} IS NULL THEN {wrong} "
            f"WHEN NOT {v} GLOB '[A-Z][A-Z][A-Z]' THEN {out_of_range} END"
        )
        return reason, f"CASE WHEN {miss} THEN {_sql_str(DEFAULT_CURRENCY)} ELSE {v} END"
    if kind in (KIND_TITLE, KIND_TEXT, KIND_OPTIONAL_STRING):
        when_missing = f"'missing_field:{name}'" if kind == KIND_TEXT else "NULL"
        limit = ""
        if kind == KIND_TITLE:
            limit = f"WHEN length({v}) > {MAX_TITLE_CHARS} THEN {out_of_range} "
        if kind == KIND_TEXT:
            limit = f"WHEN length({v}) > {MAX_TEXT_CHARS} THEN 'oversize:{name}' "
        reason = f"CASE WHEN {miss} THEN {when_missing} WHEN {v} IS NULL THEN {wrong} {limit}END"
        return reason, v
    raise AssertionError(kind)


def _build_sql(topic: str) -> str:
    """The query over ``_batch(s VARCHAR, suspect BOOLEAN, latest_us BIGINT)``, where ``s``
    is JSON (as DuckDB reads it) or NULL (already rejected), ``suspect`` is
    ``_suspect_pattern``'s match and ``latest_us`` the exclusive upper bound of event times
    in epoch microseconds (the same in every row: a column, not a parameter, because DuckDB
    binds and plans a prepared statement with parameters again at every execution, ~20 ms
    for this one, whatever the batch's size).
    Per row: ``reason`` (NULL when valid or undecided), ``undecided`` (the reference
    decides) and the typed field values (``event_time`` in epoch microseconds)."""
    checks = checks_of(topic)
    names = [name for name, _ in checks]
    structure = _sql_str(json.dumps({name: "JSON" for name in names}))
    declared = ", ".join(_sql_str(n) for n in names)
    steps: list[list[str]] = [
        [
            "s",
            "latest_us",
            # One parse per message: each field's first occurrence, as JSON text.
            f"from_json(s, {structure}) AS j",
            # Exact checks, for the few rows the suspect pattern matched: DuckDB-only
            # syntax or deep nesting (the reference decides those rows) ...
            f"CASE WHEN suspect THEN regexp_matches(s, {_sql_str(_LENIENT_JSON_PATTERN)}) "
            f"OR (strlen(s) - strlen(replace(replace(s, '[', ''), '{{', '')) > {MAX_JSON_DEPTH})"
            " ELSE false END AS undecided",
            # ... and the top-level names that are the topic's fields, repeats included.
            f"CASE WHEN suspect THEN list_filter(json_keys(s), lambda k: k IN ({declared})) "
            "END AS declared_keys",
        ],
        ["*", *[f"j.{name} AS e_{name}" for name in names]],
        ["*", *[col for name, kind in checks for col in _field_columns_sql(name, kind)]],
    ]
    time_field = next((name for name, kind in checks if kind == KIND_TIME), None)
    if time_field is not None:
        steps += [["*", *cols] for cols in _time_steps_sql(time_field)]
    reasons, values = [], []
    for name, kind in checks:
        reason, value = _field_reason_value_sql(name, kind)
        reasons.append(reason)
        values.append(f"{value} AS {name}")
    all_absent = " AND ".join(f"e_{name} IS NULL" for name in names)
    steps.append(
        [
            f"""CASE WHEN s IS NULL OR undecided THEN NULL
              WHEN j IS NULL THEN 'not_object'
              WHEN CASE WHEN {all_absent} THEN json_type(s) <> 'OBJECT' ELSE false END
                THEN 'not_object'
              WHEN coalesce(len(declared_keys) > len(list_distinct(declared_keys)), false)
                THEN 'bad_json'
              ELSE coalesce({", ".join(reasons)}) END AS reason""",
            "coalesce(undecided, false) AS undecided",
            *values,
        ]
    )
    sql = "FROM _batch"
    for cols in steps:
        sql = f"SELECT {', '.join(cols)}\n" + (sql if sql == "FROM _batch" else f"FROM ({sql})")
    return sql


class _Source:
    """An Arrow stream that DuckDB reads afresh on every execution, so a statement can be
    prepared once (planning this query costs milliseconds) and fed a new batch each time."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.table = schema.empty_table()

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.table.__arrow_c_stream__(requested_schema)


class _Engine:
    """One thread's DuckDB connection (one thread: a consumer owns one core) with the
    validation statements prepared."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.con = duckdb.connect(config={"threads": 1})
        self.con.execute("SET TimeZone='UTC'")
        self.texts = _Source(pa.schema([("s", pa.string())]))
        self.batch = _Source(
            pa.schema([("s", pa.string()), ("suspect", pa.bool_()), ("latest_us", pa.int64())])
        )
        self.con.register("_texts", self.texts)
        self.con.register("_batch", self.batch)
        self.con.execute("PREPARE json_ok AS SELECT json_valid(s) AS ok FROM _texts")
        for topic in CHECKS_BY_TOPIC:
            self.con.execute(f"PREPARE validate_{topic} AS {_build_sql(topic)}")
        # Close with the engine (its thread ended) or at exit: a live connection that
        # holds Python objects at interpreter shutdown trips nanobind's leak check.
        self._close = weakref.finalize(self, self.con.close)

    def abandon(self) -> None:
        """Never touch this connection again (this process is a fork of its owner)."""
        self._close.detach()
        _ABANDONED.append(self)

    def _run(self, source: _Source, table: pa.Table, statement: str) -> pa.Table:
        source.table = table.cast(source.schema)
        try:
            out = self.con.sql(f"EXECUTE {statement}").to_arrow_table().combine_chunks()
        finally:
            source.table = source.schema.empty_table()  # do not hold on to the batch
        if out.num_rows != table.num_rows:  # a stale read would be a silent disaster
            raise RuntimeError(f"{statement}: {out.num_rows} rows out of {table.num_rows}")
        return out

    def json_ok(self, text: pa.Array) -> pa.Array:
        """Per row: is it JSON as DuckDB reads it (NULL for NULL)."""
        out = self._run(self.texts, pa.table({"s": text}), "json_ok")
        return out.column("ok").chunk(0) if out.num_rows else pa.array([], pa.bool_())

    def validate(self, topic: str, text: pa.Array, suspect: pa.Array, latest_us: int) -> pa.Table:
        latest = pa.repeat(pa.scalar(latest_us, pa.int64()), len(text))
        batch = pa.table({"s": text, "suspect": suspect, "latest_us": latest})
        return self._run(self.batch, batch, f"validate_{topic}")


# Batches of fewer messages are validated by the reference, message by message: below ~200
# it is the faster path, and it holds the GIL where DuckDB does not, hence a margin
# (bench/validator.py --batch N; BENCHMARKS.md, 2026-12-03).
REFERENCE_BELOW = 128

_local = threading.local()
_ABANDONED: list[_Engine] = []


def _engine() -> _Engine:
    """This thread's engine; a forked child makes its own (a connection must not cross a
    fork)."""
    engine: _Engine | None = getattr(_local, "engine", None)
    if engine is not None and engine.pid != os.getpid():
        engine.abandon()
        engine = None
    if engine is None:
        engine = _local.engine = _Engine()
    return engine


def _text_column(raw: pa.Array, skip: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """The values as UTF-8 text for parsing (null where ``skip``), and the mask of values
    that are not UTF-8 (None when all are)."""
    kept = pc.if_else(skip, pa.scalar(None, pa.binary()), raw)
    try:
        return kept.cast(pa.string()), None  # validates UTF-8 in one vectorised pass
    except pa.ArrowInvalid:
        pass

    # Rare: some value is not UTF-8. Find which, one by one.
    def not_utf8(b: bytes | None) -> bool:
        if b is None:
            return False
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    bad = pa.array([not_utf8(b) for b in kept.to_pylist()], type=pa.bool_())
    return pc.if_else(bad, pa.scalar(None, pa.binary()), kept).cast(pa.string()), bad


def validate(
    topic: str,
    values: Sequence[bytes | None],
    partitions: Sequence[int] | pa.Array,
    offsets: Sequence[int] | pa.Array,
    *,
    max_event_bytes: int = 256 * 1024,
    max_future: timedelta = DEFAULT_MAX_FUTURE,
    now: datetime | None = None,
) -> Validated:
    """Validate a micro-batch of raw message values of ``topic``.

    Every input row ends up in exactly one of ``valid`` and ``rejected`` (input order in
    both); a rejected row carries the reason of its first failing check. An
    ``event_time`` more than ``max_future`` ahead of ``now`` (default: the clock, read
    once per call) is ``out_of_range:event_time``. Never raises on bad message content;
    raises ``ValueError`` for an unknown topic or mismatched lengths.

    >>> v = validate("orders", [b"{}"], [0], [41])
    >>> v.rejected.column("reason").to_pylist()
    ['missing_field:event_id']
    """
    latest_us = _latest_event_us(now, max_future)
    return _validate(topic, values, partitions, offsets, max_event_bytes, latest_us)[0]


def _validate(
    topic: str,
    values: Sequence[bytes | None],
    partitions: Sequence[int] | pa.Array,
    offsets: Sequence[int] | pa.Array,
    max_event_bytes: int,
    latest_us: int = MAX_EVENT_US,
) -> tuple[Validated, int]:
    """``validate``, plus how many rows the reference decided (0 for ordinary input in a
    batch of ``REFERENCE_BELOW`` messages or more; all of them below).
    ``latest_us``: the exclusive upper bound of event times (epoch microseconds)."""
    checks = checks_of(topic)
    schema = VALID_SCHEMA_BY_TOPIC[topic]
    parts = _int_array(partitions, pa.int32(), "partitions")
    offs = _int_array(offsets, pa.int64(), "offsets")
    n = len(values)
    if not len(parts) == len(offs) == n:
        raise ValueError(
            f"values, partitions and offsets differ in length ({n}, {len(parts)}, {len(offs)})"
        )
    if n == 0:
        return Validated(schema.empty_table(), REJECTED_SCHEMA.empty_table()), 0

    raw = (
        values.cast(pa.binary()) if isinstance(values, pa.Array) else pa.array(values, pa.binary())
    )
    if n < REFERENCE_BELOW:
        # A small batch: the reference decides every row (the columnar path costs a few ms
        # a call whatever the batch's size, the reference ~20-40 µs a message).
        undecided = pa.repeat(pa.scalar(True), n)
        columns = {
            f.name: pa.nulls(n, pa.int64() if f.type == UTC_TS else f.type)
            for f in FIELDS_BY_TOPIC[topic]
        }
        reason = _decide_by_reference(
            topic, raw, undecided, pa.nulls(n, pa.string()), columns, max_event_bytes, latest_us
        )
        return _assemble(topic, raw, parts, offs, reason, columns), n

    none = raw.is_null()
    oversize = pc.fill_null(pc.greater(pc.binary_length(raw), max_event_bytes), False)
    text, not_utf8 = _text_column(raw, pc.or_(none, oversize))
    bad_json = none if not_utf8 is None else pc.or_(none, not_utf8)

    engine = _engine()
    is_json = pc.fill_null(engine.json_ok(text), True)
    bad_json = pc.or_(bad_json, pc.invert(is_json))
    # From here on every value is JSON as DuckDB reads it, or NULL.
    text = pc.if_else(is_json, text, pa.scalar(None, pa.string()))
    suspect = pc.fill_null(pc.match_substring_regex(text, _SUSPECT_BY_TOPIC[topic]), False)
    out = engine.validate(topic, text, suspect, latest_us)

    early = pc.if_else(
        oversize,
        pa.scalar("oversize"),
        pc.if_else(bad_json, pa.scalar("bad_json"), pa.scalar(None, pa.string())),
    )
    reason = pc.coalesce(early, out.column("reason").chunk(0))
    columns = {name: out.column(name).chunk(0) for name, _ in checks}
    undecided = out.column("undecided").chunk(0)
    by_reference = pc.sum(undecided).as_py() or 0
    if by_reference:
        reason = _decide_by_reference(
            topic, raw, undecided, reason, columns, max_event_bytes, latest_us
        )

    return _assemble(topic, raw, parts, offs, reason, columns), by_reference


def _assemble(
    topic: str,
    raw: pa.Array,
    parts: pa.Array,
    offs: pa.Array,
    reason: pa.Array,
    columns: dict[str, pa.Array],
) -> Validated:
    """The valid rows (``reason`` null) as the topic's typed table, the rest as rejected."""
    schema = VALID_SCHEMA_BY_TOPIC[topic]
    ok = pc.is_null(reason)
    valid_cols = []
    for field in FIELDS_BY_TOPIC[topic]:
        if field.type == UTC_TS:
            valid_cols.append(pc.filter(columns[field.name], ok).view(UTC_TS))
        else:
            valid_cols.append(pc.filter(columns[field.name], ok).cast(field.type))
    if timed(topic):
        ts_us = pc.filter(columns["event_time"], ok)
        valid_cols.append(pc.divide(ts_us, US_PER_DAY).cast(pa.int32()).view(pa.date32()))
    valid_cols += [pc.filter(parts, ok), pc.filter(offs, ok)]
    bad = pc.invert(ok)
    rejected = pa.Table.from_arrays(
        [pc.filter(parts, bad), pc.filter(offs, bad), pc.filter(raw, bad), pc.filter(reason, bad)],
        schema=REJECTED_SCHEMA,
    )
    return Validated(pa.Table.from_arrays(valid_cols, schema=schema), rejected)


def _int_array(values: Sequence[int] | pa.Array, typ: pa.DataType, what: str) -> pa.Array:
    arr = values if isinstance(values, pa.Array) else pa.array(values, type=typ)
    if arr.null_count:
        raise ValueError(f"{what} must not contain nulls")
    return arr.cast(typ)


def _decide_by_reference(
    topic: str,
    raw: pa.Array,
    undecided: pa.Array,
    reason: pa.Array,
    columns: dict[str, pa.Array],
    max_event_bytes: int,
    latest_us: int,
) -> pa.Array:
    """Let the reference decide the ``undecided`` rows: patch ``columns`` in place and
    return the patched reasons."""
    rows = pc.indices_nonzero(undecided).to_pylist()
    results = [_reference(topic, raw[i].as_py(), max_event_bytes, latest_us) for i in rows]
    events = [r if isinstance(r, dict) else None for r in results]
    for name, col in columns.items():
        if name == "event_time":  # the query's column holds epoch microseconds
            vals = [None if e is None else (e[name] - _EPOCH) // _ONE_US for e in events]
        else:
            vals = [None if e is None else e[name] for e in events]
        columns[name] = pc.replace_with_mask(col, undecided, pa.array(vals, col.type))
    reasons = pa.array([r if isinstance(r, str) else None for r in results], pa.string())
    return pc.replace_with_mask(reason, undecided, reasons)
