"""Answers as tables: CSV, Parquet and Arrow IPC besides JSON, chosen by ``format=`` or the
``Accept`` header. A table answer carries what a JSON answer says besides its rows in
headers: ``X-As-Of`` (the ``as_of`` object as JSON), ``X-Degraded`` and, for paged answers,
``X-Next-Cursor``.

>>> negotiate(None, "text/csv;q=0.9, */*")
'csv'
>>> negotiate("json", "text/csv")
'json'
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa

from serving.params import InvalidParameter

FORMATS = ("json", "csv", "parquet", "arrow")
MEDIA_TYPES = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "arrow": "application/vnd.apache.arrow.stream",
}
# What an Accept header may name for each table format.
_ACCEPTED = {
    "csv": ("text/csv",),
    "parquet": ("application/vnd.apache.parquet", "application/x-parquet"),
    "arrow": ("application/vnd.apache.arrow.stream",),
}


def negotiate(format_: str | None, accept: str | None) -> str:
    """The answer's format: ``format=`` when given, else the first table type the ``Accept``
    header names, else JSON."""
    if format_ is not None:
        if format_ not in FORMATS:
            raise InvalidParameter("format", f"{format_!r}; send one of {', '.join(FORMATS)}")
        return format_
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        for name, types in _ACCEPTED.items():
            if media in types:
                return name
    return "json"


def table_body(table: pa.Table, format_: str) -> bytes:
    """``table`` written as CSV (a header row), Parquet or an Arrow IPC stream."""
    sink = io.BytesIO()
    if format_ == "csv":
        import pyarrow.csv as csv

        csv.write_csv(table, sink)
    elif format_ == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
    elif format_ == "arrow":
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        raise ValueError(f"not a table format: {format_!r}")
    return sink.getvalue()


def answer_headers(answer: Any, next_cursor: str | None = None) -> dict[str, str]:
    """The JSON answer's fields besides its rows, as headers of a table answer."""
    headers = {
        "X-As-Of": json.dumps(answer.as_of.model_dump(), separators=(",", ":")),
        "X-Degraded": "true" if answer.degraded else "false",
    }
    if answer.missing_partitions:
        headers["X-Missing-Partitions"] = json.dumps(answer.missing_partitions)
    if next_cursor:
        headers["X-Next-Cursor"] = next_cursor
    return headers
