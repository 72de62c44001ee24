"""Invalid messages of every kind the event contract rejects.

``bad_message(i, topic, event, rnd, max_event_bytes)`` turns a valid event into
the ``i``-th bad message of a run. The kinds follow the reasons of
:mod:`lambdalake.contract.events` and are cycled so that any run with at least
``len(KINDS)`` bad messages contains every kind; within a kind the variants are
cycled too. Oversize messages (> ``max_event_bytes``) are big, so after the first
cycle they take one slot in four of their turn (the others become truncated
JSON) to keep a large run's volume sensible.
"""

from __future__ import annotations

import random

import orjson

KINDS = (
    "bad_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "bad_time",
    "oversize",
)
REQUIRED = {
    "orders": ("event_id", "event_time", "store_id", "sku", "quantity", "unit_price"),
    "reviews": ("review_id", "event_time", "sku", "rating", "text"),
}
BAD_TIMES = (
    "yesterday",
    "2025-13-45T10:00:00Z",
    "2025-06-01 10:00:00",  # no offset
    "01/06/2025 10:00",
    "",
)


def kind_of(i: int) -> str:
    """The kind of the ``i``-th (0-based) bad message of a run."""
    kind = KINDS[i % len(KINDS)]
    if kind == "oversize" and i >= len(KINDS) and (i // len(KINDS)) % 4 != 0:
        return "bad_json"
    return kind


def _variant(i: int, n: int) -> int:
    return (i // len(KINDS)) % n


def bad_message(
    i: int, topic: str, event: dict[str, object], rnd: random.Random, max_event_bytes: int
) -> bytes | None:
    """The ``i``-th bad message, derived from a valid ``event`` of ``topic``.

    Returns the raw value to send (``None`` is a tombstone: a null value).
    """
    kind = kind_of(i)
    e = dict(event)
    if kind == "bad_json":
        v = _variant(i, 4)
        raw = orjson.dumps(e)
        if v == 0:
            return raw[: max(1, int(len(raw) * rnd.uniform(0.2, 0.9)))]  # truncated
        if v == 1:
            return b"\xff\xfe" + raw[2:]  # not UTF-8
        if v == 2:
            return None  # tombstone
        return raw.replace(b'":', b"\":'", 1)  # a stray quote
    if kind == "not_object":
        v = _variant(i, 3)
        return orjson.dumps([e] if v == 0 else (str(e.get("sku")) if v == 1 else 42))
    if kind == "missing_field":
        fields = REQUIRED[topic]
        del e[fields[_variant(i, len(fields))]]
    elif kind == "wrong_type":
        if topic == "orders":
            v = _variant(i, 3)
            if v == 0:
                e["quantity"] = str(e["quantity"])  # "3"
            elif v == 1:
                e["unit_price"] = str(e["unit_price"])
            else:
                e["quantity"] = float(e["quantity"]) + 0.5  # type: ignore[arg-type]
        else:
            v = _variant(i, 2)
            e["rating" if v == 0 else "text"] = str(e["rating"]) if v == 0 else 12345
    elif kind == "out_of_range":
        if topic == "orders":
            v = _variant(i, 3)
            if v == 0:
                e["quantity"] = 0
            elif v == 1:
                e["unit_price"] = -abs(float(e["unit_price"])) - 0.01  # type: ignore[arg-type]
            else:
                e["currency"] = "usd"
        else:
            e["rating"] = (7, 0)[_variant(i, 2)]
    elif kind == "bad_time":
        e["event_time"] = BAD_TIMES[_variant(i, len(BAD_TIMES))]
    elif kind == "oversize":
        # A few KiB past the limit; an unknown field carries the bulk for orders.
        pad = "x" * (max_event_bytes + 4096)
        if topic == "reviews":
            e["text"] = pad
        else:
            e["note"] = pad
    return orjson.dumps(e)
