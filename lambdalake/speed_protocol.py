"""The contract between a speed worker's query endpoint and the serving layer.

A speed worker answers Arrow Flight requests on its ``--query-port``:

``do_get(Ticket(SpeedQuery.to_json()))``
    Partial aggregates of one view over the events the worker holds, as an Arrow
    stream. The answer's schema metadata (key ``lambdalake``) carries what it
    covers: :class:`SpeedAnswer` decodes it.
``do_action("status")``
    The worker's status object (the same JSON it writes to its status file).

Exactness: an answer covers exactly the events the worker holds with
``min_offsets[topic][p] <= offset < answer.offsets[topic][p]`` for every
partition ``p`` it owns (deduplicated by the view's key). ``min_offsets`` is the
watermark of the batch run the caller merges with. A worker that has already
pruned beyond ``min_offsets`` (it saw a newer run than the caller) cannot answer
exactly and refuses with :class:`StaleWatermark`: reload the latest run and ask
again. A worker behind the caller (older run) filters its held events by offset,
so its answer is still exact.

>>> q = SpeedQuery(view="sales", granularity="day", skus=("sku-1",), start="2026-11-01")
>>> SpeedQuery.from_json(q.to_json()) == q
True
>>> answer = query_speed("grpc://127.0.0.1:8815", q, timeout=2.0)  # doctest: +SKIP
>>> answer.table.column_names  # doctest: +SKIP
['period', 'store_id', 'sku', 'units', 'revenue', 'order_lines']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from lambdalake.manifest import Watermark
from lambdalake.views import SALES, SENTIMENT, VIEWS

ViewName = Literal["sales", "sentiment"]
Granularity = Literal["day", "hour"]

UTC_TS = pa.timestamp("us", tz="UTC")
META_KEY = b"lambdalake"
STALE_WATERMARK = "stale watermark"

# Arrow types of each view's measures in an answer (the measures themselves are
# defined once, in lambdalake.views; this only fixes their wire types).
MEASURE_TYPES: dict[str, pa.DataType] = {
    "units": pa.int64(),
    "revenue": pa.float64(),
    "order_lines": pa.int64(),
    "reviews": pa.int64(),
    "rating_sum": pa.int64(),
    "sentiment_sum": pa.float64(),
    "positive": pa.int64(),
    "neutral": pa.int64(),
    "negative": pa.int64(),
}


def answer_schema(view: ViewName, granularity: Granularity = "day") -> pa.Schema:
    """The Arrow schema of an answer: ``period`` (sales only), dimensions, measures."""
    vd = VIEWS[view]
    fields: list[pa.Field] = []
    if vd.has_period:
        fields.append(pa.field("period", pa.date32() if granularity == "day" else UTC_TS))
    fields += [pa.field(d, pa.string()) for d in vd.dimensions]
    fields += [pa.field(m, MEASURE_TYPES[m]) for m in vd.measure_names]
    return pa.schema(fields)


assert set(SALES.measure_names) | set(SENTIMENT.measure_names) <= set(MEASURE_TYPES)


def _offsets_to_json(offsets: Watermark) -> dict[str, dict[str, int]]:
    return {t: {str(p): int(o) for p, o in sorted(ps.items())} for t, ps in sorted(offsets.items())}


def _offsets_from_json(raw: dict[str, Any] | None) -> Watermark:
    return {t: {int(p): int(o) for p, o in ps.items()} for t, ps in (raw or {}).items()}


@dataclass(frozen=True)
class SpeedQuery:
    """One request for partial aggregates.

    ``start``/``end`` are inclusive period bounds as ISO dates or date-times
    (UTC when no offset is given); for ``granularity="hour"`` a bare date as
    ``end`` includes that whole day. The sentiment view has no period: the
    bounds and ``stores`` are ignored for it. ``skus``/``stores`` ``None`` = all.
    """

    view: ViewName
    granularity: Granularity = "day"
    skus: tuple[str, ...] | None = None
    stores: tuple[str, ...] | None = None
    start: str | None = None
    end: str | None = None
    min_offsets: Watermark = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"unknown view {self.view!r}; expected one of {sorted(VIEWS)}")
        if self.granularity not in ("day", "hour"):
            raise ValueError(f"granularity must be 'day' or 'hour', not {self.granularity!r}")
        # Accept lists from callers, keep the object hashable-by-value.
        for name in ("skus", "stores"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "view": self.view,
                "granularity": self.granularity,
                "skus": list(self.skus) if self.skus is not None else None,
                "stores": list(self.stores) if self.stores is not None else None,
                "start": self.start,
                "end": self.end,
                "min_offsets": _offsets_to_json(self.min_offsets),
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> SpeedQuery:
        try:
            raw = json.loads(data)
            return cls(
                view=raw["view"],
                granularity=raw.get("granularity") or "day",
                skus=tuple(raw["skus"]) if raw.get("skus") is not None else None,
                stores=tuple(raw["stores"]) if raw.get("stores") is not None else None,
                start=raw.get("start"),
                end=raw.get("end"),
                min_offsets=_offsets_from_json(raw.get("min_offsets")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"bad speed query: {exc}") from exc


@dataclass(frozen=True)
class AnswerMeta:
    """What an answer covers (travels as the answer schema's metadata)."""

    worker: str
    run_id: str | None
    watermark: Watermark  # what the worker has pruned to (its run's watermark)
    min_offsets: Watermark  # the lower bounds actually applied, per owned partition
    offsets: Watermark  # next offset per owned partition: the exclusive upper bounds
    partitions: dict[str, list[int]]
    model_version: str | None = None
    exact_filter: bool = False  # True when held events were filtered by offset

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "worker": self.worker,
                "run_id": self.run_id,
                "watermark": _offsets_to_json(self.watermark),
                "min_offsets": _offsets_to_json(self.min_offsets),
                "offsets": _offsets_to_json(self.offsets),
                "partitions": {t: sorted(ps) for t, ps in self.partitions.items()},
                "model_version": self.model_version,
                "exact_filter": self.exact_filter,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AnswerMeta:
        raw = json.loads(data)
        return cls(
            worker=raw["worker"],
            run_id=raw.get("run_id"),
            watermark=_offsets_from_json(raw.get("watermark")),
            min_offsets=_offsets_from_json(raw.get("min_offsets")),
            offsets=_offsets_from_json(raw.get("offsets")),
            partitions={t: [int(p) for p in ps] for t, ps in raw.get("partitions", {}).items()},
            model_version=raw.get("model_version"),
            exact_filter=bool(raw.get("exact_filter")),
        )


@dataclass(frozen=True)
class SpeedAnswer:
    """Partial aggregates from one worker and exactly what they cover."""

    table: pa.Table
    meta: AnswerMeta

    @property
    def offsets(self) -> Watermark:
        return self.meta.offsets

    @property
    def partitions(self) -> dict[str, list[int]]:
        return self.meta.partitions

    @property
    def run_id(self) -> str | None:
        return self.meta.run_id

    @property
    def model_version(self) -> str | None:
        return self.meta.model_version


class SpeedError(RuntimeError):
    """A speed worker could not answer (unreachable, timed out, bad request)."""


class StaleWatermark(SpeedError):
    """The worker pruned beyond the caller's ``min_offsets``: reload the latest run.

    ``run_id`` and ``watermark`` say what the worker is pruned at."""

    def __init__(self, message: str, run_id: str | None, watermark: Watermark) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.watermark = watermark


def stale_watermark_error(run_id: str | None, watermark: Watermark, detail: str) -> Exception:
    """The Flight error a worker raises for a stale ``min_offsets`` (server side)."""
    import pyarrow.flight as flight

    info = json.dumps({"run_id": run_id, "watermark": _offsets_to_json(watermark)}).encode()
    return flight.FlightServerError(f"{STALE_WATERMARK}: {detail}", extra_info=info)


def connect(endpoint: str, timeout: float = 5.0) -> Any:
    """A Flight client for ``endpoint`` to reuse across calls (``client=``); thread-safe.

    Connecting is lazy: an unreachable worker fails on the first call, not here."""
    import pyarrow.flight as flight

    return flight.FlightClient(endpoint, generic_options=[("grpc.enable_retries", 0)])


def query_speed(
    endpoint: str, q: SpeedQuery, timeout: float = 5.0, client: Any = None
) -> SpeedAnswer:
    """Ask one worker (``grpc://HOST:PORT``) for partial aggregates.

    ``client``: one from :func:`connect` to reuse (left open); by default a
    client is opened and closed for this call. Raises :class:`StaleWatermark`
    when the worker pruned beyond ``q.min_offsets``, :class:`SpeedError` when it
    cannot answer."""
    import pyarrow.flight as flight

    own = client is None
    if own:
        client = connect(endpoint, timeout)
    try:
        options = flight.FlightCallOptions(timeout=timeout)
        reader = client.do_get(flight.Ticket(q.to_json()), options)
        table = reader.read_all()
    except flight.FlightServerError as exc:
        message = str(exc)
        if STALE_WATERMARK in message:
            info = json.loads(exc.extra_info or b"{}")
            raise StaleWatermark(
                message.splitlines()[0],
                info.get("run_id"),
                _offsets_from_json(info.get("watermark")),
            ) from None
        raise SpeedError(f"speed worker {endpoint} failed: {message}") from exc
    except flight.FlightError as exc:
        raise SpeedError(f"speed worker {endpoint} did not answer: {exc}") from exc
    except OSError as exc:
        raise SpeedError(f"speed worker {endpoint} unreachable: {exc}") from exc
    finally:
        if own:
            client.close()
    meta = table.schema.metadata or {}
    if META_KEY not in meta:
        raise SpeedError(f"speed worker {endpoint} sent an answer without its coverage")
    return SpeedAnswer(
        table=table.replace_schema_metadata(None), meta=AnswerMeta.from_json(meta[META_KEY])
    )


def speed_status(endpoint: str, timeout: float = 5.0, client: Any = None) -> dict[str, Any]:
    """The worker's status object, through its endpoint's ``status`` action."""
    import pyarrow.flight as flight

    own = client is None
    if own:
        client = connect(endpoint, timeout)
    try:
        results = list(
            client.do_action(
                flight.Action("status", b""), flight.FlightCallOptions(timeout=timeout)
            )
        )
    except (flight.FlightError, OSError) as exc:
        raise SpeedError(f"speed worker {endpoint} did not answer: {exc}") from exc
    finally:
        if own:
            client.close()
    if not results:
        raise SpeedError(f"speed worker {endpoint} sent an empty status")
    return json.loads(results[0].body.to_pybytes())
