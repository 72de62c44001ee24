"""Event contracts of the topics: ``orders`` and ``reviews`` (events, each counted once) and
``products`` and ``stores`` (reference data, the last message of an id wins): fields, keys,
and the rules that make a message valid or quarantine it with a reason.

Reasons are low-cardinality strings ``kind`` or ``kind:field`` (they are metric
labels and quarantine groupings):

==============  ==============================================================
kind            meaning
==============  ==============================================================
oversize        the message is larger than ``max_event_bytes`` (or ``oversize:text``
                for a review text over 20,000 characters)
bad_json        not UTF-8 JSON (a null value / tombstone included)
not_object      valid JSON, but not an object
missing_field   a required field is absent or JSON null
wrong_type      a field has the wrong JSON type (``5.0`` is not an integer; booleans
                are not numbers)
out_of_range    a value outside its domain (quantity 0, rating 6, negative price,
                empty id, lowercase currency, a time before 2000, from 2100 on, or
                more than ``max_future`` (default one day) ahead of the validator's clock)
bad_time        ``event_time`` is a string that is not RFC 3339 with an offset
==============  ==============================================================

Fields are checked in the order they are declared below; the first failure is
the reason. Unknown extra fields are ignored (producers may add fields).

In detail (where the architecture is silent, these are the decisions):

1. ``oversize``: more than ``max_event_bytes`` bytes (a None value has no size).
2. ``bad_json``: a None value; not UTF-8; not exactly one JSON text per RFC 8259.
   Strict: no BOM, comments, trailing commas, single quotes, ``NaN``/``Infinity``;
   escaped lone surrogates (``"\\ud800"``) are not text; nesting deeper than
   ``MAX_JSON_DEPTH`` (128) arrays/objects is refused. A number written as an integer
   keeps its exact value however long (``10**30`` in digits is an integer, so
   ``out_of_range`` for a quantity; ``1e30`` is a float, so ``wrong_type``); a float
   beyond the double range reads as infinite (``out_of_range`` for a price).
   Duplicate names: an object that names one of the topic's fields twice is
   ``bad_json`` (ambiguous: parsers disagree on which one wins); a repeated unknown
   name is ignored like any unknown field.
3. ``not_object``: valid JSON whose top level is not an object.
4. Each field in declared order. Absent or ``null``: ``missing_field:<f>`` if
   required, else its default. Wrong JSON type: ``wrong_type:<f>``. Bad value:
   ``out_of_range:<f>`` (``bad_time:event_time``, ``oversize:text``).

Field domains. Lengths count Unicode code points (as Python's ``len``):

- ids (``event_id``, ``review_id``, ``store_id``, ``sku``): string, 1..256 chars, not ``*``.
- ``event_time``: an RFC 3339 string with a mandatory offset,
  ``YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`` (separator ``T``, ``t`` or a space;
  ``z`` allowed; offsets up to 23:59), normalised to UTC, digits beyond microseconds
  truncated; a string of another shape, or an impossible date/time (Feb 30, hour 24,
  second 60, year 0000, offset minute 60) is ``bad_time``. Or a JSON integer: epoch
  milliseconds. Any other type is ``wrong_type``. The instant must lie in
  [2000-01-01T00:00:00Z, 2100-01-01T00:00:00Z) and be at most ``max_future`` ahead of
  ``now`` (the validator's clock when a batch is validated; the setting
  ``LAMBDALAKE_EVENT_TIME_MAX_SKEW``, default one day), else ``out_of_range``. Why: the
  batch layer pads every series to the latest date it sees, so one order dated 2099
  would pad every forecast with zeros to 2099. The skew bound depends on the clock, so
  two validations of one message agree only if the event is not within the skew of
  either clock: a message rejected as too far ahead is accepted once its time comes
  within the skew (a replay days later), never the other way round.
- ``quantity``: a JSON integer (not ``5.0``, not a boolean), non-zero, |q| <= 1,000,000.
- ``unit_price``: a JSON number (integer or float, not a boolean), finite, 0 <= p <= 1e9.
- ``currency``: optional, default ``"USD"``; a string matching ``^[A-Z]{3}$``, other
  strings ``out_of_range``, other types ``wrong_type``.
- ``rating``: a JSON integer 1..5.
- ``title``: optional string (null allowed), at most 1,000 chars (``out_of_range:title``).
- ``text``: required string, may be empty; over 20,000 chars is ``oversize:text``.
- ``customer_id``: optional string (null allowed).
- ``category`` (products), ``region`` (stores): a string of 1..256 chars.
- ``name``, ``brand`` (products), ``name``, ``city`` (stores): optional strings (null
  allowed), at most 1,000 chars (``out_of_range``).

Reference data (``products``, ``stores``) has no ``event_time``: a message is the id's
record as of its place in the log, and the last message of an id (by offset) wins, for
all history (a type-1 dimension; see :data:`REFERENCE_TOPICS`).

The validators that apply these rules, a plain reference and the vectorised one every
consumer runs, are in :mod:`lambdalake.contract.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pyarrow as pa

from lambdalake.contract.views import ALL

UTC_TS = pa.timestamp("us", tz="UTC")

# Limits that are part of the contract.
MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 256
# Forecast rows of an aggregate level carry it as the key they sum over (lambdalake.contract.views.ALL).
RESERVED_ID = ALL
MAX_TITLE_CHARS = 1_000
MAX_ABS_QUANTITY = 1_000_000
MAX_UNIT_PRICE = 1_000_000_000.0
MIN_EVENT_TIME_ISO = "2000-01-01T00:00:00Z"
MAX_EVENT_TIME_ISO = "2100-01-01T00:00:00Z"  # exclusive
DEFAULT_CURRENCY = "USD"
# How far ahead of the validator's clock an event may be (producers' clocks drift a
# little; an order dated next year is a bug). The setting event_time_max_skew.
DEFAULT_MAX_FUTURE = timedelta(days=1)

ORDER_FIELDS = [
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("event_time", UTC_TS, nullable=False),
    pa.field("store_id", pa.string(), nullable=False),
    pa.field("sku", pa.string(), nullable=False),
    pa.field("quantity", pa.int64(), nullable=False),
    pa.field("unit_price", pa.float64(), nullable=False),
    pa.field("currency", pa.string(), nullable=False),
]

REVIEW_FIELDS = [
    pa.field("review_id", pa.string(), nullable=False),
    pa.field("event_time", UTC_TS, nullable=False),
    pa.field("sku", pa.string(), nullable=False),
    pa.field("rating", pa.int32(), nullable=False),
    pa.field("title", pa.string(), nullable=True),
    pa.field("text", pa.string(), nullable=False),
    pa.field("customer_id", pa.string(), nullable=True),
]

PRODUCT_FIELDS = [
    pa.field("sku", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=True),
    pa.field("brand", pa.string(), nullable=True),
]

STORE_FIELDS = [
    pa.field("store_id", pa.string(), nullable=False),
    pa.field("region", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=True),
    pa.field("city", pa.string(), nullable=True),
]

FIELDS_BY_TOPIC = {
    "orders": ORDER_FIELDS,
    "reviews": REVIEW_FIELDS,
    "products": PRODUCT_FIELDS,
    "stores": STORE_FIELDS,
}

# Topics of events: each event counts once, the first of a key in the log wins (a
# redelivery is a duplicate). Topics of reference data: each message is an id's whole
# record, the last of an id in the log wins (a change applies to all history).
EVENT_TOPICS = ("orders", "reviews")
REFERENCE_TOPICS = ("products", "stores")
TOPICS = (*EVENT_TOPICS, *REFERENCE_TOPICS)

# The key of each topic: an event's idempotency key, a reference record's id.
KEY_BY_TOPIC = {
    "orders": "event_id",
    "reviews": "review_id",
    "products": "sku",
    "stores": "store_id",
}


# The field a producer keys each topic's messages by (so an id's messages share a partition):
# a SKU's orders and reviews, a record's id.
MESSAGE_KEY_BY_TOPIC = {"orders": "sku", "reviews": "sku", "products": "sku", "stores": "store_id"}


def timed(topic: str) -> bool:
    """The topic's messages carry ``event_time`` (and so ``event_date``)."""
    return any(f.name == "event_time" for f in FIELDS_BY_TOPIC[topic])


# --------------------------------------------------------------------------------------
# Validation: the result type and schemas
# --------------------------------------------------------------------------------------

# Nesting deeper than this is not accepted as an event (see the module docstring).
MAX_JSON_DEPTH = 128
MIN_EVENT_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in epoch microseconds
MAX_EVENT_US = 4_102_444_800_000_000  # 2100-01-01T00:00:00Z, exclusive
US_PER_DAY = 86_400_000_000

EVENT_DATE = pa.field("event_date", pa.date32(), nullable=False)

VALID_SCHEMA_BY_TOPIC: dict[str, pa.Schema] = {
    topic: pa.schema(
        [
            *fields,
            *([EVENT_DATE] if timed(topic) else []),
            pa.field("_partition", pa.int32(), nullable=False),
            pa.field("_offset", pa.int64(), nullable=False),
        ]
    )
    for topic, fields in FIELDS_BY_TOPIC.items()
}

REJECTED_SCHEMA = pa.schema(
    [
        pa.field("_partition", pa.int32(), nullable=False),
        pa.field("_offset", pa.int64(), nullable=False),
        pa.field("raw", pa.binary(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class Validated:
    """One validated micro-batch.

    ``valid``: the topic's fields (exact types), then ``event_date`` (UTC date of
    ``event_time``), ``_partition``, ``_offset``; rows in input order.
    ``rejected``: ``_partition``, ``_offset``, ``raw`` (the message value, None for a
    tombstone) and ``reason``; rows in input order.
    """

    valid: pa.Table
    rejected: pa.Table


# How each field is checked. One table per topic drives both implementations.
KIND_ID, KIND_TIME, KIND_QUANTITY, KIND_PRICE, KIND_CURRENCY = (
    "id",
    "time",
    "quantity",
    "price",
    "currency",
)
KIND_RATING, KIND_TITLE, KIND_TEXT, KIND_OPTIONAL_STRING = (
    "rating",
    "title",
    "text",
    "optional_string",
)
# A required label (``category``, ``region``): a string of 1..MAX_ID_CHARS chars.
KIND_LABEL = "label"

CHECKS_BY_TOPIC: dict[str, list[tuple[str, str]]] = {
    "orders": [
        ("event_id", KIND_ID),
        ("event_time", KIND_TIME),
        ("store_id", KIND_ID),
        ("sku", KIND_ID),
        ("quantity", KIND_QUANTITY),
        ("unit_price", KIND_PRICE),
        ("currency", KIND_CURRENCY),
    ],
    "reviews": [
        ("review_id", KIND_ID),
        ("event_time", KIND_TIME),
        ("sku", KIND_ID),
        ("rating", KIND_RATING),
        ("title", KIND_TITLE),
        ("text", KIND_TEXT),
        ("customer_id", KIND_OPTIONAL_STRING),
    ],
    # An optional name is checked as a title is (a string of at most MAX_TITLE_CHARS).
    "products": [
        ("sku", KIND_ID),
        ("category", KIND_LABEL),
        ("name", KIND_TITLE),
        ("brand", KIND_TITLE),
    ],
    "stores": [
        ("store_id", KIND_ID),
        ("region", KIND_LABEL),
        ("name", KIND_TITLE),
        ("city", KIND_TITLE),
    ],
}


def checks_of(topic: str) -> list[tuple[str, str]]:
    try:
        return CHECKS_BY_TOPIC[topic]
    except KeyError:
        raise ValueError(
            f"unknown topic {topic!r}; expected one of {sorted(CHECKS_BY_TOPIC)}"
        ) from None
