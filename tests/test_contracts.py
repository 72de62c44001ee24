"""The event validator: every reason, UTC normalisation, exact schemas, and the property
that the vectorised ``validate`` agrees with ``validate_one_reference`` on any input."""

from __future__ import annotations

import doctest
import json
import math
import multiprocessing
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdalake.contract import events as contracts
from lambdalake.contract import validation
from lambdalake.contract.events import (
    DEFAULT_MAX_FUTURE,
    FIELDS_BY_TOPIC,
    REJECTED_SCHEMA,
    VALID_SCHEMA_BY_TOPIC,
    Validated,
)
from lambdalake.contract.validation import validate, validate_one_reference

DROP = object()  # marks a field to leave out of a message

# The validator's clock in most tests: late enough that the contract's own range
# [2000, 2100) decides, not the skew bound (tested on its own below).
CLOCK = datetime(2099, 12, 31, tzinfo=UTC)

ORDER = {
    "event_id": "ord-1",
    "event_time": "2024-05-01T12:34:56.789+02:00",
    "store_id": "store-7",
    "sku": "SKU-42",
    "quantity": 3,
    "unit_price": 19.99,
    "currency": "EUR",
}
REVIEW = {
    "review_id": "rev-1",
    "event_time": "2024-05-01T12:34:56Z",
    "sku": "SKU-42",
    "rating": 4,
    "title": "Solid",
    "text": 'Works as "advertised".\nWould buy again.',
    "customer_id": "cust-9",
}
PRODUCT = {"sku": "SKU-42", "category": "Kitchen", "name": "Pan 24 cm", "brand": "Acme"}
STORE = {"store_id": "store-7", "region": "West", "name": "Downtown", "city": "Lyon"}
BASE = {"orders": ORDER, "reviews": REVIEW, "products": PRODUCT, "stores": STORE}


@pytest.fixture(autouse=True, scope="module")
def _columnar_path_for_every_batch() -> Any:
    """These tests hold the columnar path to the reference, on batches of every size: keep
    small batches on it (``validate`` sends batches under ``REFERENCE_BELOW`` messages to the
    reference itself; tested on its own below)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "REFERENCE_BELOW", 0)
        yield


def message(topic: str, **changes: Any) -> bytes:
    event = {**BASE[topic], **changes}
    kept = {k: v for k, v in event.items() if v is not DROP}
    return json.dumps(kept, separators=(",", ":"), ensure_ascii=False).encode()


def validate_all(topic: str, values: list[bytes | None], **kw: Any) -> Validated:
    kw.setdefault("now", CLOCK)
    return validate(topic, values, [0] * len(values), list(range(len(values))), **kw)


def reference(topic: str, value: bytes | None, **kw: Any) -> dict[str, Any] | str:
    kw.setdefault("now", CLOCK)
    return validate_one_reference(topic, value, **kw)


def outcomes(topic: str, values: list[bytes | None], **kw: Any) -> list[dict[str, Any] | str]:
    """Per input row: the valid event (without lineage columns) or the reason."""
    v = validate_all(topic, values, **kw)
    by_offset: dict[int, dict[str, Any] | str] = {}
    for row in v.valid.to_pylist():
        offset = row.pop("_offset")
        row.pop("_partition")
        by_offset[offset] = row
    for row in v.rejected.to_pylist():
        assert row["raw"] == values[row["_offset"]], "a rejected row keeps its raw bytes"
        by_offset[row["_offset"]] = row["reason"]
    assert sorted(by_offset) == list(range(len(values))), "every row lands exactly once"
    return [by_offset[i] for i in range(len(values))]


def one(topic: str, value: bytes | None, **kw: Any) -> dict[str, Any] | str:
    return outcomes(topic, [value], **kw)[0]


# --------------------------------------------------------------------------------------
# Every reason, table-driven. Each case is checked against both implementations.
# --------------------------------------------------------------------------------------

LONG = "x" * 257
INVALID_ORDERS = [
    ("not UTF-8", b'{"event_id": "\xff"}', "bad_json"),
    ("tombstone (None)", None, "bad_json"),
    ("empty value", b"", "bad_json"),
    ("truncated JSON", b'{"event_id": "a",', "bad_json"),
    ("trailing comma", message("orders")[:-1] + b",}", "bad_json"),
    ("NaN is not JSON", message("orders")[:-1] + b',"x":NaN}', "bad_json"),
    (
        "Infinity is not JSON",
        message("orders", unit_price=DROP)[:-1] + b',"unit_price":-inf}',
        "bad_json",
    ),
    ("byte order mark", b"\xef\xbb\xbf" + message("orders"), "bad_json"),
    (
        "lone surrogate escape",
        message("orders", event_id=DROP)[:-1] + b',"event_id":"\\ud800"}',
        "bad_json",
    ),
    ("comment", b"/* hi */" + message("orders"), "bad_json"),
    ("two documents", message("orders") + message("orders"), "bad_json"),
    ("declared field twice", b'{"sku":"a",' + message("orders")[1:], "bad_json"),
    (
        "declared field twice, once escaped",
        b'{"s\\u006bu":"a",' + message("orders")[1:],
        "bad_json",
    ),
    (
        "nested 129 deep",
        message("orders")[:-1] + b',"x":' + b"[" * 128 + b"]" * 128 + b"}",
        "bad_json",
    ),
    ("array", b"[1, 2]", "not_object"),
    ("string", b'"order"', "not_object"),
    ("null", b"null", "not_object"),
    ("number", b"5", "not_object"),
    ("event_id absent", message("orders", event_id=DROP), "missing_field:event_id"),
    ("event_id null", message("orders", event_id=None), "missing_field:event_id"),
    ("event_id a number", message("orders", event_id=7), "wrong_type:event_id"),
    ("event_id empty", message("orders", event_id=""), "out_of_range:event_id"),
    ("event_id 257 chars", message("orders", event_id=LONG), "out_of_range:event_id"),
    ("event_time absent", message("orders", event_time=DROP), "missing_field:event_time"),
    ("event_time a bool", message("orders", event_time=True), "wrong_type:event_time"),
    ("event_time a float", message("orders", event_time=1714567890123.0), "wrong_type:event_time"),
    ("event_time an object", message("orders", event_time={"ms": 1}), "wrong_type:event_time"),
    ("event_time date only", message("orders", event_time="2024-05-01"), "bad_time:event_time"),
    (
        "event_time no offset",
        message("orders", event_time="2024-05-01T12:00:00"),
        "bad_time:event_time",
    ),
    (
        "event_time Feb 30",
        message("orders", event_time="2024-02-30T00:00:00Z"),
        "bad_time:event_time",
    ),
    (
        "event_time hour 24",
        message("orders", event_time="2024-05-01T24:00:00Z"),
        "bad_time:event_time",
    ),
    (
        "event_time leap second",
        message("orders", event_time="2024-06-30T23:59:60Z"),
        "bad_time:event_time",
    ),
    (
        "event_time offset +24:00",
        message("orders", event_time="2024-05-01T12:00:00+24:00"),
        "bad_time:event_time",
    ),
    (
        "event_time year 0",
        message("orders", event_time="0000-01-01T00:00:00Z"),
        "bad_time:event_time",
    ),
    (
        "event_time 1999",
        message("orders", event_time="1999-12-31T23:59:59.999999Z"),
        "out_of_range:event_time",
    ),
    (
        "event_time 2100",
        message("orders", event_time="2100-01-01T00:00:00Z"),
        "out_of_range:event_time",
    ),
    (
        "event_time 2100 via offset",
        message("orders", event_time="2099-12-31T23:30:00-01:00"),
        "out_of_range:event_time",
    ),
    (
        "event_time epoch ms 1999",
        message("orders", event_time=946684799999),
        "out_of_range:event_time",
    ),
    ("event_time epoch ms > int64", message("orders", event_time=2**70), "out_of_range:event_time"),
    ("store_id absent", message("orders", store_id=DROP), "missing_field:store_id"),
    ("store_id a list", message("orders", store_id=["s"]), "wrong_type:store_id"),
    ("sku null", message("orders", sku=None), "missing_field:sku"),
    ("sku a bool", message("orders", sku=False), "wrong_type:sku"),
    ("sku empty", message("orders", sku=""), "out_of_range:sku"),
    # '*' names "all" in forecast levels' rows, so it is no id.
    ("sku '*'", message("orders", sku="*"), "out_of_range:sku"),
    ("store_id '*'", message("orders", store_id="*"), "out_of_range:store_id"),
    ("quantity absent", message("orders", quantity=DROP), "missing_field:quantity"),
    ("quantity 5.0", message("orders", quantity=5.0), "wrong_type:quantity"),
    ("quantity a bool", message("orders", quantity=True), "wrong_type:quantity"),
    ("quantity a string", message("orders", quantity="3"), "wrong_type:quantity"),
    ("quantity 0", message("orders", quantity=0), "out_of_range:quantity"),
    ("quantity 1,000,001", message("orders", quantity=1_000_001), "out_of_range:quantity"),
    ("quantity -1,000,001", message("orders", quantity=-1_000_001), "out_of_range:quantity"),
    ("quantity 2**63", message("orders", quantity=2**63), "out_of_range:quantity"),
    ("quantity 10**30", message("orders", quantity=10**30), "out_of_range:quantity"),
    ("unit_price absent", message("orders", unit_price=DROP), "missing_field:unit_price"),
    ("unit_price a string", message("orders", unit_price="9.99"), "wrong_type:unit_price"),
    ("unit_price a bool", message("orders", unit_price=False), "wrong_type:unit_price"),
    ("unit_price negative", message("orders", unit_price=-0.01), "out_of_range:unit_price"),
    ("unit_price over 1e9", message("orders", unit_price=1_000_000_001), "out_of_range:unit_price"),
    (
        "unit_price 1e999",
        message("orders", unit_price=DROP)[:-1] + b',"unit_price":1e999}',
        "out_of_range:unit_price",
    ),
    ("currency a number", message("orders", currency=978), "wrong_type:currency"),
    ("currency lowercase", message("orders", currency="usd"), "out_of_range:currency"),
    ("currency 4 letters", message("orders", currency="EURO"), "out_of_range:currency"),
    ("currency accented", message("orders", currency="ÉUR"), "out_of_range:currency"),
    ("first failure wins", message("orders", event_id=DROP, quantity=0), "missing_field:event_id"),
    ("field order decides", message("orders", sku=1, quantity=0, currency=1), "wrong_type:sku"),
]

INVALID_REVIEWS = [
    ("review_id absent", message("reviews", review_id=DROP), "missing_field:review_id"),
    ("review_id a number", message("reviews", review_id=1), "wrong_type:review_id"),
    (
        "event_time epoch ms 2100",
        message("reviews", event_time=4102444800000),
        "out_of_range:event_time",
    ),
    ("event_time gibberish", message("reviews", event_time="yesterday"), "bad_time:event_time"),
    ("sku absent", message("reviews", sku=DROP), "missing_field:sku"),
    ("rating absent", message("reviews", rating=DROP), "missing_field:rating"),
    ("rating 4.0", message("reviews", rating=4.0), "wrong_type:rating"),
    ("rating a bool", message("reviews", rating=True), "wrong_type:rating"),
    ("rating 0", message("reviews", rating=0), "out_of_range:rating"),
    ("rating 6", message("reviews", rating=6), "out_of_range:rating"),
    ("rating 2**64", message("reviews", rating=2**64), "out_of_range:rating"),
    ("title a number", message("reviews", title=5), "wrong_type:title"),
    ("title 1001 chars", message("reviews", title="t" * 1001), "out_of_range:title"),
    ("text absent", message("reviews", text=DROP), "missing_field:text"),
    ("text null", message("reviews", text=None), "missing_field:text"),
    ("text a list", message("reviews", text=["a"]), "wrong_type:text"),
    ("text 20,001 chars", message("reviews", text="é" * 20_001), "oversize:text"),
    ("customer_id a number", message("reviews", customer_id=12), "wrong_type:customer_id"),
    ("declared field twice", b'{"rating":5,' + message("reviews")[1:], "bad_json"),
]


@pytest.mark.parametrize(
    ("topic", "value", "reason"),
    [pytest.param("orders", v, r, id=f"orders: {d}") for d, v, r in INVALID_ORDERS]
    + [pytest.param("reviews", v, r, id=f"reviews: {d}") for d, v, r in INVALID_REVIEWS],
)
def test_invalid_message_is_rejected_with_its_reason(topic: str, value: bytes, reason: str) -> None:
    assert reference(topic, value) == reason
    assert one(topic, value) == reason


def test_all_invalid_cases_in_one_batch_keep_their_reasons_and_order() -> None:
    for topic, cases in (("orders", INVALID_ORDERS), ("reviews", INVALID_REVIEWS)):
        values = [v for _, v, _ in cases]
        assert outcomes(topic, values) == [r for _, _, r in cases]


def test_a_small_batch_goes_to_the_reference_and_gets_the_columnar_paths_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under REFERENCE_BELOW messages the reference decides every row (the faster path for a
    few messages); valid rows, every reason, lineage and order are the columnar path's."""
    far = (CLOCK + timedelta(days=3)).isoformat()
    for topic, cases in (("orders", INVALID_ORDERS), ("reviews", INVALID_REVIEWS)):
        values = [message(topic), *[v for _, v, _ in cases], None, b"\xff\xfe", b"[]"]
        values += [message(topic, event_time=far), message(topic, event_time=1_700_000_000_000)]
        columnar = validate_all(topic, values)
        monkeypatch.setattr(validation, "REFERENCE_BELOW", len(values) + 1)
        small = validate_all(topic, values)
        _, by_reference = validation._validate(
            topic, values, [0] * len(values), range(len(values)), 256 * 1024
        )
        monkeypatch.setattr(validation, "REFERENCE_BELOW", 0)
        assert by_reference == len(values)
        assert small.valid.schema == columnar.valid.schema
        assert small.valid.equals(columnar.valid), (small.valid, columnar.valid)
        assert small.rejected.equals(columnar.rejected), (small.rejected, columnar.rejected)
        assert 2 <= small.valid.num_rows < len(values)


def test_oversize_is_checked_first_against_max_event_bytes() -> None:
    big = message("orders", event_id="e" * 200)
    assert one("orders", big, max_event_bytes=len(big) - 1) == "oversize"
    assert isinstance(one("orders", big, max_event_bytes=len(big)), dict)
    assert one("orders", b"\xff" * 50, max_event_bytes=10) == "oversize"
    assert reference("orders", big, max_event_bytes=len(big) - 1) == "oversize"


def test_the_default_size_limit_is_256_kib() -> None:
    padding = "p" * (256 * 1024)
    assert one("orders", message("orders", note=padding)) == "oversize"


# --------------------------------------------------------------------------------------
# Valid events: normalisation to UTC, defaults, exact values.
# --------------------------------------------------------------------------------------

TIMES = [
    ("+05:30", "2024-03-01T01:00:00+05:30", datetime(2024, 2, 29, 19, 30, tzinfo=UTC)),
    ("-08:00", "2024-12-31T20:00:00.5-08:00", datetime(2025, 1, 1, 4, 0, 0, 500000, tzinfo=UTC)),
    ("Z", "2024-05-01T12:34:56Z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
    ("lowercase t and z", "2024-05-01t12:34:56z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
    ("space separator", "2024-05-01 12:34:56+00:00", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
    ("-00:00", "2024-05-01T12:34:56-00:00", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
    (
        "nanoseconds truncated",
        "2024-05-01T12:34:56.123456999Z",
        datetime(2024, 5, 1, 12, 34, 56, 123456, tzinfo=UTC),
    ),
    (
        "one fraction digit",
        "2024-05-01T12:34:56.1+01:00",
        datetime(2024, 5, 1, 11, 34, 56, 100000, tzinfo=UTC),
    ),
    ("first instant", "2000-01-01T00:00:00Z", datetime(2000, 1, 1, tzinfo=UTC)),
    ("from 1999 by offset", "1999-12-31T23:00:00-01:00", datetime(2000, 1, 1, tzinfo=UTC)),
    (
        "last instant",
        "2099-12-31T23:59:59.999999Z",
        datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ),
    ("epoch ms", 1714567890123, datetime(2024, 5, 1, 12, 51, 30, 123000, tzinfo=UTC)),
    ("epoch ms, first", 946684800000, datetime(2000, 1, 1, tzinfo=UTC)),
]


@pytest.mark.parametrize(("when", "expected"), [pytest.param(w, e, id=d) for d, w, e in TIMES])
def test_event_time_is_normalised_to_utc_with_its_utc_date(
    when: str | int, expected: datetime
) -> None:
    value = message("orders", event_time=when)
    for got in (one("orders", value), reference("orders", value)):
        assert isinstance(got, dict)
        assert got["event_time"] == expected
        assert got["event_time"].utcoffset().total_seconds() == 0
        assert got["event_date"] == expected.date()


# --------------------------------------------------------------------------------------
# Far-future events: at most max_future (default one day) ahead of the validator's clock.
# --------------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SKEW_CASES = [
    ("exactly one day ahead", "2024-05-02T12:00:00Z", True),
    ("one microsecond beyond", "2024-05-02T12:00:00.000001Z", False),
    ("at the bound, by its offset", "2024-05-02T12:30:00+00:30", True),
    ("beyond, by its offset", "2024-05-02T11:30:00-00:31", False),
    ("far future", "2099-12-31T23:59:59Z", False),
    ("the past", "2001-01-01T00:00:00Z", True),
    ("epoch ms, at the bound", 1714651200000, True),
    ("epoch ms, beyond", 1714651200001, False),
]


@pytest.mark.parametrize(("when", "ok"), [pytest.param(w, ok, id=d) for d, w, ok in SKEW_CASES])
def test_an_event_time_beyond_the_skew_is_out_of_range(when: str | int, ok: bool) -> None:
    for topic in ("orders", "reviews"):
        value = message(topic, event_time=when)
        expected: Any = dict if ok else "out_of_range:event_time"
        for got in (one(topic, value, now=NOW), reference(topic, value, now=NOW)):
            assert (type(got) if ok else got) == expected


def test_the_skew_is_configurable_and_the_first_failing_field_still_wins() -> None:
    in_an_hour = message("orders", event_time="2024-05-01T13:00:00Z")
    later = message("orders", event_time="2024-05-01T13:00:01Z", quantity=0)
    hour = timedelta(hours=1)
    assert outcomes("orders", [in_an_hour, later], now=NOW, max_future=hour)[1] == (
        "out_of_range:event_time"
    )
    assert isinstance(one("orders", in_an_hour, now=NOW, max_future=hour), dict)
    assert one("orders", later, now=NOW, max_future=2 * hour) == "out_of_range:quantity"
    assert reference("orders", later, now=NOW, max_future=hour) == "out_of_range:event_time"
    assert one("orders", in_an_hour, now=NOW, max_future=timedelta(0)) == (
        "out_of_range:event_time"
    )
    with pytest.raises(ValueError, match="must not be negative"):
        validate("orders", [in_an_hour], [0], [0], max_future=-hour)
    with pytest.raises(ValueError, match="aware"):
        validate("orders", [in_an_hour], [0], [0], now=datetime(2024, 5, 1))


def test_by_default_the_clock_is_now_and_the_skew_one_day() -> None:
    assert timedelta(days=1) == DEFAULT_MAX_FUTURE
    now = datetime.now(UTC)
    soon = message("orders", event_time=(now + timedelta(hours=20)).isoformat())
    too_far = message("orders", event_time=(now + timedelta(hours=28)).isoformat())
    v = validate("orders", [soon, too_far], [0, 0], [0, 1])
    assert v.valid.column("_offset").to_pylist() == [0]
    assert v.rejected.column("reason").to_pylist() == ["out_of_range:event_time"]
    assert isinstance(validate_one_reference("orders", soon), dict)
    assert validate_one_reference("orders", too_far) == "out_of_range:event_time"


def test_the_skew_setting_is_seconds_and_defaults_to_one_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lambdalake.settings import Settings

    assert Settings().event_time_max_skew == DEFAULT_MAX_FUTURE
    monkeypatch.setenv("LAMBDALAKE_EVENT_TIME_MAX_SKEW_SECONDS", "7200")
    assert Settings().event_time_max_skew == timedelta(hours=2)
    with pytest.raises(ValueError, match="event_time_max_skew_seconds"):
        Settings(event_time_max_skew_seconds=-1)


def test_a_valid_order_keeps_exact_values_and_defaults_currency_to_usd() -> None:
    got = outcomes(
        "orders",
        [
            message("orders"),
            message("orders", currency=DROP),
            message("orders", currency=None),
            message("orders", quantity=-2, unit_price=0, extra={"ignored": [1, 2]}),
            message("orders", event_id="😀" * 256, unit_price=1_000_000_000, quantity=-1_000_000),
        ],
    )
    assert got[0] == {
        "event_id": "ord-1",
        "event_time": datetime(2024, 5, 1, 10, 34, 56, 789000, tzinfo=UTC),
        "store_id": "store-7",
        "sku": "SKU-42",
        "quantity": 3,
        "unit_price": 19.99,
        "currency": "EUR",
        "event_date": date(2024, 5, 1),
    }
    assert got[1]["currency"] == got[2]["currency"] == "USD"
    assert (got[3]["quantity"], got[3]["unit_price"]) == (-2, 0.0)
    assert (got[4]["event_id"], got[4]["unit_price"]) == ("😀" * 256, 1e9)


def test_a_valid_review_keeps_optional_fields_null_and_text_verbatim() -> None:
    got = outcomes(
        "reviews",
        [
            message("reviews"),
            message("reviews", title=None, customer_id=DROP, text=""),
            message("reviews", title="t" * 1000, text="y" * 20_000, rating=1),
        ],
    )
    assert got[0]["text"] == 'Works as "advertised".\nWould buy again.'
    assert (got[0]["rating"], got[0]["title"], got[0]["customer_id"]) == (4, "Solid", "cust-9")
    assert (got[1]["title"], got[1]["customer_id"], got[1]["text"]) == (None, None, "")
    assert (len(got[2]["title"]), len(got[2]["text"])) == (1000, 20_000)


def test_escaped_and_unusual_json_spellings_read_the_same() -> None:
    pretty = json.dumps(ORDER, indent=2).encode()  # whitespace, ', ' and ': '
    ascii_escaped = json.dumps({**ORDER, "sku": "Größe ☃"}).encode()  # \\u escapes
    escaped_name = b'{"event\\u005fid":"ord-1",' + message("orders", event_id=DROP)[1:]
    got = outcomes("orders", [pretty, ascii_escaped, escaped_name])
    assert got[0] == got[2] == one("orders", message("orders"))
    assert got[1]["sku"] == "Größe ☃"


# --------------------------------------------------------------------------------------
# Tables: exact schemas, order, lineage, inputs.
# --------------------------------------------------------------------------------------


def test_schemas_are_the_topic_fields_then_date_and_lineage() -> None:
    for topic, fields in FIELDS_BY_TOPIC.items():
        schema = VALID_SCHEMA_BY_TOPIC[topic]
        assert list(schema)[: len(fields)] == fields
        date = ["event_date"] if contracts.timed(topic) else []  # reference data has no time
        assert schema.names[len(fields) :] == [*date, "_partition", "_offset"]
        assert [f.name for f in fields] == [n for n, _ in contracts.CHECKS_BY_TOPIC[topic]]
    assert REJECTED_SCHEMA.names == ["_partition", "_offset", "raw", "reason"]
    assert REJECTED_SCHEMA.field("raw").nullable and not REJECTED_SCHEMA.field("reason").nullable


def test_tables_have_exact_schemas_and_keep_input_order_and_lineage() -> None:
    for topic in ("orders", "reviews"):
        values = [message(topic), b"nope", None, message(topic, event_time=946684800000), b"[]"]
        v = validate(topic, values, partitions=[3, 3, 1, 2, 0], offsets=[10, 11, 7, 99, 5])
        assert v.valid.schema.equals(VALID_SCHEMA_BY_TOPIC[topic])
        assert v.rejected.schema.equals(REJECTED_SCHEMA)
        assert v.valid.column("_partition").to_pylist() == [3, 2]
        assert v.valid.column("_offset").to_pylist() == [10, 99]
        assert v.rejected.to_pylist() == [
            {"_partition": 3, "_offset": 11, "raw": b"nope", "reason": "bad_json"},
            {"_partition": 1, "_offset": 7, "raw": None, "reason": "bad_json"},
            {"_partition": 0, "_offset": 5, "raw": b"[]", "reason": "not_object"},
        ]


def test_event_time_column_is_utc_microseconds_and_event_date_is_date32() -> None:
    v = validate_all("orders", [message("orders", event_time="2024-05-01T23:30:00-02:00")])
    assert v.valid.schema.field("event_time").type == pa.timestamp("us", tz="UTC")
    assert v.valid.schema.field("event_date").type == pa.date32()
    assert v.valid.column("event_date").to_pylist() == [date(2024, 5, 2)]


def test_arrow_arrays_are_accepted_as_inputs() -> None:
    values = pa.array([message("orders"), None], pa.large_binary())
    v = validate("orders", values, pa.array([1, 2], pa.int64()), pa.array([5, 6], pa.int32()))
    assert v.valid.column("_offset").to_pylist() == [5]
    assert v.rejected.column("_partition").to_pylist() == [2]


def test_an_empty_batch_gives_two_empty_tables_with_the_schemas() -> None:
    for topic in ("orders", "reviews"):
        v = validate(topic, [], [], [])
        assert v.valid.num_rows == v.rejected.num_rows == 0
        assert v.valid.schema.equals(VALID_SCHEMA_BY_TOPIC[topic])
        assert v.rejected.schema.equals(REJECTED_SCHEMA)


def test_unknown_topic_and_mismatched_lengths_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="unknown topic 'payments'"):
        validate("payments", [b"{}"], [0], [0])
    with pytest.raises(ValueError, match="unknown topic"):
        validate_one_reference("payments", b"{}")
    with pytest.raises(ValueError, match="differ in length"):
        validate("orders", [b"{}", b"{}"], [0], [0, 1])


def test_ordinary_messages_never_need_the_reference() -> None:
    values = [message("orders", event_id=f"e{i}", quantity=i % 7 + 1) for i in range(300)]
    values += [json.dumps(ORDER, indent=1).encode(), b"garbage", message("orders", quantity=0)]
    validated, by_reference = validation._validate("orders", values, [0] * 303, range(303), 10**6)
    assert by_reference == 0
    assert validated.valid.num_rows == 301


def test_nesting_repeated_names_and_escapes_are_checked_exactly_on_the_fast_path() -> None:
    values = [
        message("orders", meta={"source": {"app": "pos", "tags": [[1], [2]]}}),  # nested
        message("orders", note='the "sku" and "sku" again'),  # a name twice, in a value
        b'{"event\\u005fid":"e1",' + message("orders", event_id=DROP)[1:],  # escaped name
        b'{"sku":"a",' + message("orders")[1:],  # a field named twice
        b'{"sku":"a","sku":null,' + message("orders", sku=DROP)[1:],  # ... once null
    ]
    validated, by_reference = validation._validate("orders", values, [0] * 5, range(5), 10**6)
    assert by_reference == 0
    assert validated.valid.column("_offset").to_pylist() == [0, 1, 2]
    assert validated.rejected.column("reason").to_pylist() == ["bad_json", "bad_json"]


def test_rows_the_fast_path_cannot_decide_go_to_the_reference() -> None:
    values = [
        message("orders"),
        message("orders")[:-1] + b",}",
        message("orders")[:-1] + b',"x":nan}',
    ]
    validated, by_reference = validation._validate("orders", values, [0] * 3, range(3), 10**6)
    assert by_reference == 2
    assert validated.rejected.column("reason").to_pylist() == ["bad_json", "bad_json"]


def _reasons_in_child(queue: Any) -> None:
    queue.put(validate_all("orders", [b"[]", message("orders")]).rejected["reason"].to_pylist())


def test_validate_works_in_threads_and_forked_children() -> None:
    validate_all("orders", [b"{}"])  # this thread's engine exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_reasons_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == ["not_object"]
    child.join(timeout=60)
    assert child.exitcode == 0
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: one("reviews", message("reviews", rating=i)), range(8)))
    assert [r if isinstance(r, str) else r["rating"] for r in results] == [
        "out_of_range:rating",
        1,
        2,
        3,
        4,
        5,
        "out_of_range:rating",
        "out_of_range:rating",
    ]


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(contracts).failed == 0


# --------------------------------------------------------------------------------------
# Property: validate() never raises and agrees with the reference on every message.
# --------------------------------------------------------------------------------------


def assert_agrees(
    topic: str,
    values: list[bytes | None],
    clock: tuple[datetime, timedelta] = (CLOCK, DEFAULT_MAX_FUTURE),
) -> None:
    now, max_future = clock
    fast = outcomes(topic, values, now=now, max_future=max_future)
    for value, got in zip(values, fast, strict=True):
        expected = validate_one_reference(topic, value, now=now, max_future=max_future)
        assert got == expected, f"{value!r}: fast {got!r} != reference {expected!r}"
        if isinstance(got, dict) and topic == "orders":  # 0.0 == -0.0: compare the sign too
            assert math.copysign(1, got["unit_price"]) == math.copysign(1, expected["unit_price"])


def property_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


topics = st.sampled_from(["orders", "reviews", "products", "stores"])
# Validator clocks and skews: the contract's range alone, and bounds that fall exactly on
# times the generated messages use (2024-05-01T12:34:56Z, epoch ms 1714567890123).
clocks = st.sampled_from(
    [
        (CLOCK, DEFAULT_MAX_FUTURE),
        (datetime(2024, 4, 30, 12, 34, 56, tzinfo=UTC), DEFAULT_MAX_FUTURE),
        (datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC), timedelta(0)),
        (datetime(2024, 5, 1, 12, 34, 55, 999999, tzinfo=UTC), timedelta(0)),
        (datetime(2024, 5, 1, 11, 51, 30, 123000, tzinfo=UTC), timedelta(hours=1)),
        (datetime(2024, 5, 1, 20, 34, 56, 123456, tzinfo=UTC), timedelta(0)),
        (datetime(2099, 12, 31, 0, 0, 0, 1, tzinfo=UTC), DEFAULT_MAX_FUTURE),
    ]
)


@property_settings(30)
@given(topics, st.lists(st.one_of(st.none(), st.binary(max_size=64)), min_size=1, max_size=200))
def test_random_bytes_agree_with_the_reference(topic: str, values: list[bytes | None]) -> None:
    assert_agrees(topic, values)


@property_settings(30)
@given(topics, st.lists(st.text(alphabet='{}[],:"\\ 0123456789.-eEtrufalsnNI', max_size=40)))
def test_random_json_like_text_agrees_with_the_reference(topic: str, texts: list[str]) -> None:
    assert_agrees(topic, [t.encode() for t in texts])


# Near-valid messages: a valid event with fields dropped, nulled or replaced by values of
# every JSON type (boundary numbers, odd strings and times, nesting), written by one of
# several serialisers, sometimes with bytes spliced in. Each example is a batch of 200
# from a seeded Random (Hypothesis picks the seed, so a failure replays).
BOUNDARY_NUMBERS = [
    0,
    -0.0,
    1,
    -1,
    5,
    6,
    1_000_000,
    1_000_001,
    -1_000_000,
    -1_000_001,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**30,
    -(10**30),
    10**400,
    946684800000,
    946684799999,
    4102444799999,
    4102444800000,
    1714567890123,
    0.0,
    5.0,
    1.5,
    1e9,
    1e9 + 0.5,
    1e-320,
    1e308,
    -1e-5,
    19.99,
    0.1,
    2.5e-308,
    1e22,
    -1e-7,
    5e-324,
    1e16,  # yyjson writes some of these back without a '.'
]
WEIRD_STRINGS = [
    "",
    "a",
    "USD",
    "usd",
    "US",
    "USDX",
    "ÉUR",
    "U\u0000D",
    "x" * 256,
    "x" * 257,
    "é" * 256,
    "😀" * 257,
    "e\u0301",
    "\u2028",
    "\x7f",
    "null",
    "5",
    "t" * 1000,
    "t" * 1001,
    "y" * 20_000,
    "y" * 20_001,
    '"',
    "\\",
    "２０２４",
]
TIMES_TO_TRY = [
    "2024-05-01T12:34:56Z",
    "2024-05-01t12:34:56z",
    "2024-05-01 12:34:56+00:00",
    "2024-05-01T12:34:56.1234567890-08:00",
    "2024-02-29T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-04-31T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T23:60:00Z",
    "2024-01-01T23:59:60Z",
    "2024-01-01T00:00:00+24:00",
    "2024-01-01T00:00:00+23:59",
    "2024-01-01T00:00:00-23:59",
    "2024-01-01T00:00:00+05:60",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "1999-12-31T23:59:59.999999Z",
    "2000-01-01T00:00:00Z",
    "1999-12-31T23:00:00-01:00",
    "2099-12-31T23:59:59.9999999Z",
    "2100-01-01T00:00:00Z",
    "2100-01-01T00:30:00+01:00",
    "2024-05-01T12:34:56",
    "2024-05-01T12:34:56.Z",
    "2024-05-01T12:34Z",
    "2024-5-01T12:34:56Z",
    "２０２４-05-01T12:34:56Z",
    "2024-05-01T12:34:56+0530",
    "2024-05-01T12:34:56 Z",
    "2024-05-01T12:34:56Z\n",
    " 2024-05-01T12:34:56Z",
    "2024-13-01T00:00:00Z",
    "2024-01-00T00:00:00Z",
    "",
]
SPLICES = [
    b",",
    b",]",
    b",}",
    b"NaN",
    b"-Infinity",
    b"inf",
    b"nan",
    b"\\u0000",
    b"\\ud800",
    b"\\ud83d\\ude00",
    b'"',
    b"\\",
    b"1e999",
    b"-0",
    b"00",
    b'"sku":"dup",',
    b"\xef\xbb\xbf",
    b" ",
    b"[" * 130,
    b"null",
    b"true",
    b"\xff",
    b"\x00",
    b"\xc3\xa9",
]


def random_json(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.choice([True, False])
    if kind == 2:
        return rnd.choice(BOUNDARY_NUMBERS)
    if kind == 3:
        return rnd.choice(WEIRD_STRINGS)
    if kind == 4:
        return rnd.choice(TIMES_TO_TRY)
    if kind == 5:
        return rnd.choice([rnd.uniform(-1e12, 1e12), rnd.randint(-(10**20), 10**20)])
    if kind == 6:
        return [random_json(rnd, depth + 1) for _ in range(rnd.randrange(3))]
    return {rnd.choice(["a", "sku", "x"]): random_json(rnd, depth + 1) for _ in range(3)}


def serialise(rnd: random.Random, event: dict[str, Any]) -> bytes:
    style = rnd.randrange(4)
    if style == 0:
        try:
            return orjson.dumps(event)
        except TypeError:  # an integer beyond 64 bits
            pass
    if style == 1:
        return json.dumps(event, ensure_ascii=False, indent=rnd.choice([None, 1, "\t"])).encode()
    if style == 2:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(event).encode()  # ASCII with \\u escapes, ", " and ": "


def near_valid_message(rnd: random.Random, topic: str) -> bytes:
    event: dict[str, Any] = dict(BASE[topic])
    for _ in range(rnd.randrange(1, 4)):
        name = rnd.choice([*event, "extra"])
        r = rnd.random()
        if r < 0.15:
            event.pop(name, None)
        elif r < 0.25:
            event[name] = None
        else:
            event[name] = random_json(rnd)
    data = serialise(rnd, event)
    if rnd.random() < 0.25:  # exercise the edges of the JSON reader
        data = bytearray(data)
        for _ in range(rnd.randrange(1, 3)):
            at = rnd.randrange(len(data) + 1)
            if rnd.random() < 0.3 and data:
                del data[min(at, len(data) - 1)]
            else:
                data[at:at] = rnd.choice(SPLICES)
        data = bytes(data)
    return data


@property_settings(100)
@given(topics, st.integers(0, 2**64), clocks)
def test_near_valid_json_agrees_with_the_reference(
    topic: str, seed: int, clock: tuple[datetime, timedelta]
) -> None:
    rnd = random.Random(seed)
    assert_agrees(topic, [near_valid_message(rnd, topic) for _ in range(200)], clock)


# --------------------------------------------------------------------------------------
# Reference data (products, stores): no time, a required label, optional names.
# --------------------------------------------------------------------------------------

INVALID_REFERENCE = [
    ("products", message("products", category=DROP), "missing_field:category"),
    ("products", message("products", category=""), "out_of_range:category"),
    ("products", message("products", category="c" * 257), "out_of_range:category"),
    ("products", message("products", category=7), "wrong_type:category"),
    ("products", message("products", sku="*"), "out_of_range:sku"),
    ("products", message("products", name=["x"]), "wrong_type:name"),
    ("products", message("products", brand="b" * 1001), "out_of_range:brand"),
    ("stores", message("stores", region=None), "missing_field:region"),
    ("stores", message("stores", store_id=""), "out_of_range:store_id"),
    ("stores", message("stores", city=1.5), "wrong_type:city"),
    ("stores", b"[]", "not_object"),
]


@pytest.mark.parametrize(("topic", "value", "reason"), INVALID_REFERENCE)
def test_invalid_reference_data_is_rejected_with_its_reason(topic, value, reason) -> None:
    assert one(topic, value) == reason == reference(topic, value)


def test_reference_data_has_no_time_and_keeps_optional_fields_null() -> None:
    got = one("products", message("products", name=None, brand=DROP, event_time="not a time"))
    assert got == {"sku": "SKU-42", "category": "Kitchen", "name": None, "brand": None}
    assert one("stores", message("stores")) == STORE == reference("stores", message("stores"))
