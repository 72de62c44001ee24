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

Errors have a kind (:attr:`SpeedError.kind`), so a caller can tell its own
mistakes from a worker's: ``unavailable`` (transport: unreachable, timed out —
the only kind after which to treat the worker as down), ``bad_request`` (the
query is invalid; asking again will not help, the worker is fine),
``stale_watermark`` (reload the latest run), ``worker_failed`` (the worker is up
but could not answer this query; its log has the details under the error id the
message gives — a worker never sends its exception text) and
``unauthenticated`` (a missing or wrong shared secret).

Auth: a worker started with a shared secret (``LAMBDALAKE_SPEED_TOKEN``) refuses
every call without ``authorization: Bearer <secret>``; :func:`connect` sends it
when given ``token=``.

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
from datetime import UTC, date, datetime
from typing import Any, ClassVar, Literal

import pyarrow as pa

from lambdalake.contract.manifest import Watermark, watermark_from_dict, watermark_to_dict
from lambdalake.contract.views import VIEWS, Granularity
from lambdalake.errors import OperationFailed

# A view's name in a query: one of lambdalake.contract.views.VIEWS (checked by SpeedQuery).
ViewName = str

UTC_TS = pa.timestamp("us", tz="UTC")
META_KEY = b"lambdalake"
STALE_WATERMARK = "stale watermark"
# A query's granularity when it names none: the view's default grain (sales by day,
# sentiment over all time).
DEFAULT: Literal["default"] = "default"


@dataclass(frozen=True)
class EventView:
    """Held events answered one row each (not aggregated): a topic's events at or above the
    watermark, deduplicated as the worker holds them, with ``columns`` of ``schema``."""

    name: str
    topic: str
    schema: pa.Schema


# Every scored review a worker holds (the SQL table ``review_scores``'s speed side).
REVIEW_SCORES = EventView(
    "review_scores",
    "reviews",
    pa.schema(
        [
            ("review_id", pa.string()),
            ("sku", pa.string()),
            ("event_time", pa.timestamp("us", tz="UTC")),
            ("rating", pa.int32()),
            ("sentiment", pa.float64()),
            ("label", pa.string()),
        ]
    ),
)
EVENT_VIEWS = {REVIEW_SCORES.name: REVIEW_SCORES}


def topic_of(view: ViewName) -> str:
    """The topic a view (aggregate or events) is built from."""
    return EVENT_VIEWS[view].topic if view in EVENT_VIEWS else VIEWS[view].topic


def answer_schema(view: ViewName, granularity: Granularity | None) -> pa.Schema:
    """The Arrow schema of an answer: ``period`` (at a grain; none for all time), dimensions,
    measures, as the view defines them (``ViewDef.arrow_schema``); an event view's columns."""
    if view in EVENT_VIEWS:
        return EVENT_VIEWS[view].schema
    return VIEWS[view].arrow_schema(granularity)


def parse_bound(text: str) -> date | datetime:
    """A period bound: an ISO date, or an ISO date-time (UTC when no offset is given)."""
    try:
        if len(text) <= 10:
            return date.fromisoformat(text)
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not an ISO date or date-time") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


_offsets_to_json = watermark_to_dict
_offsets_from_json = watermark_from_dict


@dataclass(frozen=True)
class SpeedQuery:
    """One request for partial aggregates.

    ``granularity`` is the view's stored grain or any coarser one
    (``ViewDef.check_grain``); ``None`` is all time (no period column: the bounds are
    ignored); left out, the view's default grain (``ViewDef.default_grain``). ``start``/``end`` are inclusive
    period bounds as ISO dates or date-times (UTC when no offset is given); for
    ``granularity="hour"`` a bare date as ``end`` includes that whole day, for
    ``"week"`` a date selects its ISO week. ``stores`` applies to views with a
    ``store_id`` dimension. ``skus``/``stores`` ``None`` = all. ``max_offsets``
    (optional) bounds the events from above, per partition (exclusive): an answer as of
    earlier offsets than the worker holds, exactly (a page of an answer pinned to its
    ``as_of``); a worker that does not hold events up to them refuses with
    :class:`StaleWatermark`.
    """

    view: ViewName
    granularity: Granularity | Literal["default"] | None = DEFAULT
    skus: tuple[str, ...] | None = None
    stores: tuple[str, ...] | None = None
    start: str | None = None
    end: str | None = None
    min_offsets: Watermark = field(default_factory=dict)
    max_offsets: Watermark = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.view in EVENT_VIEWS:  # rows, not aggregates: no grain
            if self.granularity not in (DEFAULT, None):
                raise ValueError(f"view {self.view} has no grain; it answers held events")
            object.__setattr__(self, "granularity", None)
        elif self.view not in VIEWS:
            names = sorted([*VIEWS, *EVENT_VIEWS])
            raise ValueError(f"unknown view {self.view!r}; expected one of {names}")
        else:
            view = VIEWS[self.view]
            if self.granularity == DEFAULT:
                object.__setattr__(self, "granularity", view.default_grain)
            view.check_grain(self.granularity)  # type: ignore[arg-type]
        # Accept lists from callers, keep the object hashable-by-value.
        for name in ("skus", "stores"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def grain(self) -> Granularity | None:
        """The grain asked, ``"default"`` resolved by the constructor (``None``: all time,
        or an event view)."""
        grain = self.granularity
        assert grain != DEFAULT
        return grain

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
                "max_offsets": _offsets_to_json(self.max_offsets),
            }
        ).encode()

    def check(self) -> SpeedQuery:
        """Raise ``ValueError`` for a bound that is not an ISO date or date-time."""
        for bound in (self.start, self.end):
            if bound is not None:
                if not isinstance(bound, str):
                    raise ValueError(f"{bound!r} is not an ISO date or date-time")
                parse_bound(bound)
        return self

    @classmethod
    def from_json(cls, data: bytes | str) -> SpeedQuery:
        """Decode and :meth:`check` a request (``ValueError`` when it is not one)."""
        try:
            raw = json.loads(data)
            return cls(
                view=raw["view"],
                granularity=raw.get("granularity", DEFAULT),
                skus=tuple(raw["skus"]) if raw.get("skus") is not None else None,
                stores=tuple(raw["stores"]) if raw.get("stores") is not None else None,
                start=raw.get("start"),
                end=raw.get("end"),
                min_offsets=_offsets_from_json(raw.get("min_offsets")),
                max_offsets=_offsets_from_json(raw.get("max_offsets")),
            ).check()
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
    # Partitions being re-read after the watermark went back (a run demoted or
    # withdrawn), with the offset the worker had reached before: they are left out of
    # ``partitions``, ``offsets`` and the rows until re-read, so callers list them missing.
    rereading: Watermark = field(default_factory=dict)

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
                "rereading": _offsets_to_json(self.rereading),
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
            rereading=_offsets_from_json(raw.get("rereading")),
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


ErrorKind = Literal[
    "unavailable", "bad_request", "stale_watermark", "worker_failed", "unauthenticated"
]


class SpeedError(OperationFailed):
    """A speed worker could not answer; :attr:`kind` says why (see the module doc).

    Only ``kind == "unavailable"`` (:attr:`worker_down`) means the worker itself
    is unreachable; the other kinds concern one request."""

    kind: ClassVar[ErrorKind] = "unavailable"

    @property
    def worker_down(self) -> bool:
        """True for transport failures: the worker is not answering anyone."""
        return self.kind == "unavailable"


class SpeedUnavailable(SpeedError):
    """The worker did not answer: unreachable, refused the connection, timed out."""

    kind: ClassVar[ErrorKind] = "unavailable"


class SpeedBadRequest(SpeedError):
    """The query is invalid (a bound that is not a date, an unknown view ...)."""

    kind: ClassVar[ErrorKind] = "bad_request"


class SpeedWorkerFailed(SpeedError):
    """The worker is up but failed to answer this query (details in its log)."""

    kind: ClassVar[ErrorKind] = "worker_failed"


class SpeedUnauthenticated(SpeedError):
    """The worker wants a shared secret and the caller sent none or another one."""

    kind: ClassVar[ErrorKind] = "unauthenticated"


class StaleWatermark(SpeedError):
    """The worker pruned beyond the caller's ``min_offsets``: reload the latest run.

    ``run_id`` and ``watermark`` say what the worker is pruned at."""

    kind: ClassVar[ErrorKind] = "stale_watermark"

    def __init__(self, message: str, run_id: str | None, watermark: Watermark) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.watermark = watermark


ERRORS_BY_KIND: dict[str, type[SpeedError]] = {
    cls.kind: cls
    for cls in (
        SpeedUnavailable,
        SpeedBadRequest,
        SpeedWorkerFailed,
        SpeedUnauthenticated,
        StaleWatermark,
    )
}


def flight_error(kind: ErrorKind, message: str, **info: Any) -> Exception:
    """The Flight error a worker raises for ``kind`` (server side): one line, the kind
    and ``info`` in ``extra_info`` so the client rebuilds the right :class:`SpeedError`."""
    import pyarrow.flight as flight

    extra = json.dumps({"kind": kind, **info}).encode()
    line = message.splitlines()[0] if message else kind
    if kind == "unauthenticated":
        return flight.FlightUnauthenticatedError(line, extra_info=extra)
    return flight.FlightServerError(line, extra_info=extra)


def stale_watermark_error(run_id: str | None, watermark: Watermark, detail: str) -> Exception:
    """The Flight error a worker raises for a stale ``min_offsets`` (server side)."""
    return flight_error(
        "stale_watermark",
        f"{STALE_WATERMARK}: {detail}",
        run_id=run_id,
        watermark=_offsets_to_json(watermark),
    )


def _speed_error(endpoint: str, exc: Exception) -> SpeedError:
    """The :class:`SpeedError` for a failed call (client side)."""
    import pyarrow.flight as flight

    info: dict[str, Any] = {}
    raw = getattr(exc, "extra_info", None)
    if raw:
        try:
            info = json.loads(raw)
        except ValueError:
            info = {}
    kind = info.get("kind") if isinstance(info, dict) else None
    message = (str(exc).splitlines() or [""])[0]
    # gRPC appends its own detail to the worker's message; keep the worker's sentence.
    message = message.split(". Detail:")[0]
    if kind == "stale_watermark":
        return StaleWatermark(
            message, info.get("run_id"), _offsets_from_json(info.get("watermark"))
        )
    if kind in ERRORS_BY_KIND:
        return ERRORS_BY_KIND[kind](f"speed worker {endpoint}: {message}")
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return SpeedUnauthenticated(f"speed worker {endpoint} refused the call: {message}")
    # Anything the worker did not classify itself is the transport's failure.
    return SpeedUnavailable(f"speed worker {endpoint} did not answer: {message}")


class _BearerToken:
    """Client middleware: ``authorization: Bearer <token>`` on every call."""

    def __init__(self, token: str) -> None:
        self.headers = {"authorization": [f"Bearer {token}"]}

    def sending_headers(self) -> dict[str, list[str]]:
        return self.headers

    def received_headers(self, headers: Any) -> None:
        pass

    def call_completed(self, exception: Any) -> None:
        pass


def _token_middleware(token: str) -> Any:
    import pyarrow.flight as flight

    class Middleware(_BearerToken, flight.ClientMiddleware):
        pass

    class Factory(flight.ClientMiddlewareFactory):
        def start_call(self, info: Any) -> Any:
            return Middleware(token)

    return Factory()


def connect(endpoint: str, timeout: float = 5.0, token: str | None = None) -> Any:
    """A Flight client for ``endpoint`` to reuse across calls (``client=``); thread-safe.

    ``token``: the worker's shared secret (``LAMBDALAKE_SPEED_TOKEN``), sent on
    every call. Connecting is lazy: an unreachable worker fails on the first
    call, not here."""
    import pyarrow.flight as flight

    middleware = [_token_middleware(token)] if token else []
    return flight.FlightClient(
        endpoint, generic_options=[("grpc.enable_retries", 0)], middleware=middleware
    )


def query_speed(
    endpoint: str,
    q: SpeedQuery,
    timeout: float = 5.0,
    client: Any = None,
    token: str | None = None,
) -> SpeedAnswer:
    """Ask one worker (``grpc://HOST:PORT``) for partial aggregates.

    ``client``: one from :func:`connect` to reuse (left open); by default a
    client is opened (with ``token``) and closed for this call. Raises a
    :class:`SpeedError` of the kind that says why it could not answer
    (:class:`StaleWatermark` when the worker pruned beyond ``q.min_offsets``)."""
    import pyarrow.flight as flight

    own = client is None
    if own:
        client = connect(endpoint, timeout, token=token)
    try:
        options = flight.FlightCallOptions(timeout=timeout)
        reader = client.do_get(flight.Ticket(q.to_json()), options)
        table = reader.read_all()
    except (flight.FlightError, OSError) as exc:
        raise _speed_error(endpoint, exc) from exc
    finally:
        if own:
            client.close()
    meta = table.schema.metadata or {}
    if META_KEY not in meta:
        raise SpeedWorkerFailed(f"speed worker {endpoint} sent an answer without its coverage")
    return SpeedAnswer(
        table=table.replace_schema_metadata(None), meta=AnswerMeta.from_json(meta[META_KEY])
    )


def speed_status(
    endpoint: str, timeout: float = 5.0, client: Any = None, token: str | None = None
) -> dict[str, Any]:
    """The worker's status object, through its endpoint's ``status`` action."""
    import pyarrow.flight as flight

    own = client is None
    if own:
        client = connect(endpoint, timeout, token=token)
    try:
        results = list(
            client.do_action(
                flight.Action("status", b""), flight.FlightCallOptions(timeout=timeout)
            )
        )
    except (flight.FlightError, OSError) as exc:
        raise _speed_error(endpoint, exc) from exc
    finally:
        if own:
            client.close()
    if not results:
        raise SpeedWorkerFailed(f"speed worker {endpoint} sent an empty status")
    return json.loads(results[0].body.to_pybytes())
