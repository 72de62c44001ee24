"""Event contracts for the ``orders`` and ``reviews`` topics, and the validator.

The validator takes a micro-batch of raw Kafka message values and returns the
valid events as one Arrow table plus the rejected messages, each with a precise
reason. It sits in every consumer's hot path, so it is vectorised.

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
                empty id, lowercase currency, a time before 2000 or after 2100)
bad_time        ``event_time`` is a string that is not RFC 3339 with an offset
==============  ==============================================================

Fields are checked in the order they are declared below; the first failure is
the reason. Unknown extra fields are ignored (producers may add fields).
"""

from __future__ import annotations

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")

# Limits that are part of the contract.
MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 1_000
MAX_ABS_QUANTITY = 1_000_000
MAX_UNIT_PRICE = 1_000_000_000.0
MIN_EVENT_TIME_ISO = "2000-01-01T00:00:00Z"
MAX_EVENT_TIME_ISO = "2100-01-01T00:00:00Z"  # exclusive
DEFAULT_CURRENCY = "USD"

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

FIELDS_BY_TOPIC = {"orders": ORDER_FIELDS, "reviews": REVIEW_FIELDS}

# The idempotency key of each topic's events.
KEY_BY_TOPIC = {"orders": "event_id", "reviews": "review_id"}
