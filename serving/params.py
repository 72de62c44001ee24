"""Parsing and validation of query parameters: pure functions, one clear message per mistake.

Every function raises :class:`InvalidParameter` with a message that names the
parameter, what was wrong and what to send instead; the app turns it into a
400 answer. Times are UTC: a datetime without an offset is taken as UTC.

>>> parse_time_bound("2024-05-01", "start", end=False)
datetime.datetime(2024, 5, 1, 0, 0, tzinfo=datetime.timezone.utc)
>>> sales_range(None, "2024-05-03", "day", today=date(2024, 5, 3)).periods
30
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from lambdalake.contract.views import ALL, Granularity
from lambdalake.errors import InvalidInput

# Result-size caps: an answer never carries more points than these.
MAX_DAY_POINTS = 3_660  # ten years of days
MAX_HOUR_POINTS = 24 * 93  # about three months of hours
MAX_WEEK_POINTS = 530  # ten years of weeks
MAX_MONTH_POINTS = 1_200  # every month events may have (2000 to 2100)
MAX_POINTS = {
    "hour": MAX_HOUR_POINTS,
    "day": MAX_DAY_POINTS,
    "week": MAX_WEEK_POINTS,
    "month": MAX_MONTH_POINTS,
}
DEFAULT_MONTHS = 12
DEFAULT_DAYS = 30
DEFAULT_WEEKS = 26
DEFAULT_HOURS = 48
MAX_ID_CHARS = 256  # the event contract's limit for ids
MAX_HORIZON_DAYS = 366
MAX_RANKING_LIMIT = 1_000
DEFAULT_ACTUALS_DAYS = 14
# The instants a query bound may name. Events exist only in [2000, 2100) (the event
# contract); the margin keeps every default and window computed from a bound (30 days
# back, a year ahead) far inside what dates, DuckDB and the speed workers can represent.
SUPPORTED_FIRST = datetime(1900, 1, 1, tzinfo=UTC)
SUPPORTED_LAST = datetime(2999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


class InvalidParameter(InvalidInput):
    """A request parameter is invalid; ``str(exc)`` is the message for the caller."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"invalid parameter {name!r}: {message}")
        self.name = name


def parse_time_bound(text: str, name: str, *, end: bool) -> datetime:
    """An ISO date (``2024-05-01``) or datetime (``2024-05-01T10:00:00Z``) as an aware UTC time.

    A bare date means its first instant for a start, and its last hour for an
    end (bounds are inclusive, so ``end=2024-05-01`` includes the whole day).
    """
    text = text.strip()
    if not text:
        raise InvalidParameter(name, "empty; send an ISO date (2024-05-01) or datetime")
    if len(text) == 10:
        try:
            d = date.fromisoformat(text)
        except ValueError:
            raise InvalidParameter(
                name, f"{text!r} is not an ISO date; send YYYY-MM-DD, e.g. 2024-05-01"
            ) from None
        ts = datetime(d.year, d.month, d.day, tzinfo=UTC)
    else:
        try:
            ts = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
        except ValueError:
            raise InvalidParameter(
                name,
                f"{text!r} is not an ISO date or datetime; send e.g. 2024-05-01 or "
                "2024-05-01T10:00:00Z",
            ) from None
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        try:
            ts = ts.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+05:00 is before year 1 in UTC
            raise _outside_supported(name, text) from None
    if not SUPPORTED_FIRST <= ts <= SUPPORTED_LAST:
        raise _outside_supported(name, text)
    if len(text) == 10 and end:
        return ts + timedelta(hours=23)
    return ts


def _outside_supported(name: str, text: str) -> InvalidParameter:
    first, last = SUPPORTED_FIRST.date().isoformat(), SUPPORTED_LAST.date().isoformat()
    return InvalidParameter(name, f"{text!r} is outside the supported range {first} to {last}")


def floor_hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def first_of_month(d: date) -> date:
    return d.replace(day=1)


def months_between(a: date, b: date) -> int:
    """Whole months from ``a``'s month to ``b``'s (pure)."""
    return (b.year - a.year) * 12 + b.month - a.month


@dataclass(frozen=True)
class SalesRange:
    """An inclusive range of periods, each given by its start (UTC midnight of a day, a
    week's Monday, a month's first day; an hour's start)."""

    granularity: Granularity
    first: datetime  # first period's start, UTC
    last: datetime  # last period's start, inclusive

    @property
    def periods(self) -> int:
        if self.granularity == "month":
            return months_between(self.first.date(), self.last.date()) + 1
        step = {
            "hour": timedelta(hours=1),
            "day": timedelta(days=1),
            "week": timedelta(weeks=1),
        }[self.granularity]
        return int((self.last - self.first) / step) + 1

    @property
    def first_date(self) -> date:
        return self.first.date()

    @property
    def last_date(self) -> date:
        return self.last.date()


def sales_range(
    start: str | None,
    end: str | None,
    granularity: str,
    *,
    today: date,
    now: datetime | None = None,
) -> SalesRange:
    """Validate ``start``/``end``/``granularity`` of ``/v1/sales`` into a :class:`SalesRange`.

    Defaults: ``end`` = today (UTC), ``start`` = 30 days (day), 48 hours (hour), 26 weeks
    (week) or 12 months (month) before ``end``'s period. A time inside a period selects that
    period (hours are floored; a date selects its day, ISO week or month). Past the caps
    (``MAX_POINTS``: they scale with the grain) the answer is a 400 asking for a narrower
    range, never a truncated answer.
    """
    if granularity not in MAX_POINTS:
        raise InvalidParameter(
            "granularity", f"{granularity!r}; send one of {', '.join(MAX_POINTS)}"
        )
    now = now or datetime.now(UTC)
    end_ts = (
        parse_time_bound(end, "end", end=True)
        if end is not None
        else (datetime(today.year, today.month, today.day, 23, tzinfo=UTC))
    )
    if granularity == "day":
        last = datetime(end_ts.year, end_ts.month, end_ts.day, tzinfo=UTC)
        if start is None:
            first = last - timedelta(days=DEFAULT_DAYS - 1)
        else:
            s = parse_time_bound(start, "start", end=False)
            first = datetime(s.year, s.month, s.day, tzinfo=UTC)
        cap, unit = MAX_DAY_POINTS, "daily"
    elif granularity in ("week", "month"):
        floor = monday if granularity == "week" else first_of_month
        last_d = floor(end_ts.date())
        if start is None:
            first_d = (
                last_d - timedelta(weeks=DEFAULT_WEEKS - 1)
                if granularity == "week"
                else _months_back(last_d, DEFAULT_MONTHS - 1)
            )
        else:
            first_d = floor(parse_time_bound(start, "start", end=False).date())
        first = datetime(first_d.year, first_d.month, first_d.day, tzinfo=UTC)
        last = datetime(last_d.year, last_d.month, last_d.day, tzinfo=UTC)
        cap, unit = MAX_POINTS[granularity], f"{granularity}ly"
    else:
        last = floor_hour(end_ts) if end is not None else floor_hour(now)
        first = (
            floor_hour(parse_time_bound(start, "start", end=False))
            if start is not None
            else last - timedelta(hours=DEFAULT_HOURS - 1)
        )
        cap, unit = MAX_HOUR_POINTS, "hourly"
    if first > last:
        raise InvalidParameter(
            "start", f"start ({first.isoformat()}) is after end ({last.isoformat()})"
        )
    rng = SalesRange(granularity, first, last)  # type: ignore[arg-type]
    if rng.periods > cap:
        coarser = {"hourly": "day", "daily": "week", "weekly": "month"}.get(unit)
        hint = "; narrow start/end" + (f" or use granularity={coarser}" if coarser else "")
        raise InvalidParameter(
            "start", f"range too large: {rng.periods} {unit} points, at most {cap}{hint}"
        )
    return rng


def _months_back(d: date, n: int) -> date:
    """The first day of the month ``n`` months before ``d``'s (pure)."""
    total = d.year * 12 + d.month - 1 - n
    return date(total // 12, total % 12 + 1, 1)


def monday(d: date) -> date:
    """The Monday of ``d``'s ISO week."""
    return d - timedelta(days=d.weekday())


def week_range(start: str | None, end: str | None, *, today: date) -> tuple[date, date]:
    """Validate ``start``/``end`` of a weekly answer: the Mondays of the first and last ISO
    weeks, inclusive. A date inside a week selects that week. Defaults: the week of ``end``
    (today) and the ``DEFAULT_WEEKS - 1`` before it; at most ``MAX_WEEK_POINTS`` weeks."""
    last = monday(parse_time_bound(end, "end", end=True).date() if end is not None else today)
    first = (
        monday(parse_time_bound(start, "start", end=False).date())
        if start is not None
        else last - timedelta(weeks=DEFAULT_WEEKS - 1)
    )
    if first > last:
        raise InvalidParameter("start", f"start's week ({first}) is after end's week ({last})")
    weeks = (last - first).days // 7 + 1
    if weeks > MAX_WEEK_POINTS:
        raise InvalidParameter(
            "start",
            f"range too large: {weeks} weekly points, at most {MAX_WEEK_POINTS}; narrow start/end",
        )
    return first, last


def check_id(value: str | None, name: str) -> str | None:
    """An optional identifier (sku, store_id): non-empty, at most 256 characters."""
    if value is None:
        return None
    if not value.strip():
        raise InvalidParameter(name, "empty; omit it to mean all, or send an id")
    if len(value) > MAX_ID_CHARS:
        raise InvalidParameter(name, f"longer than {MAX_ID_CHARS} characters")
    if value == ALL:
        raise InvalidParameter(name, f"'{ALL}' is not an id; omit {name} to mean all")
    return value


def check_int(value: int | None, name: str, *, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if not low <= value <= high:
        raise InvalidParameter(name, f"{value} is out of range; send {low} to {high}")
    return value


def period_label(ts: datetime | date, granularity: Granularity) -> str:
    """The ``period`` string of a point: ``2024-05-01`` (a day, a week's Monday, a month's
    first day) or ``2024-05-01T10:00:00Z`` (an hour)."""
    if granularity != "hour":
        return (ts.date() if isinstance(ts, datetime) else ts).isoformat()
    assert isinstance(ts, datetime)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00Z")


# --- OpenAPI examples ---------------------------------------------------------------------------

# Values the documentation's examples ("Try it out") use: the demo's catalog (generator/) and the
# last four weeks as of the server's start, so every example answers rows on `make demo`.
EXAMPLE_SKU, EXAMPLE_STORE = "SKU-00001", "S001"
EXAMPLE_CATEGORY, EXAMPLE_REGION = "kitchen", "Europe"
EXAMPLE_END = datetime.now(UTC).date().isoformat()
EXAMPLE_START = (datetime.now(UTC).date() - timedelta(days=27)).isoformat()


# --- /v1/sales: breakdowns, order, paging ------------------------------------------------------

# What a sales answer can be broken down by (each point then carries these fields): its
# dimensions and the reference data's attributes of them (lambdalake.contract.views
# SALES_ATTRIBUTES).
GROUP_FIELDS = ("sku", "store_id", "category", "region")
SALES_ORDERS = ("period", "units_desc", "revenue_desc")
DEFAULT_LIMIT = 1_000
MAX_LIMIT = 10_000
MAX_FILTER_IDS = 1_000


def id_list(values: list[str] | None, name: str) -> tuple[str, ...] | None:
    """A filter's ids: the parameter repeated and/or comma-separated (``sku=A,B&sku=C``), each
    checked as an id; duplicates dropped, order kept. None when not given."""
    if not values:
        return None
    out: dict[str, None] = {}
    for value in values:
        for part in value.split(","):
            out[check_id(part, name) or part] = None
    if len(out) > MAX_FILTER_IDS:
        raise InvalidParameter(name, f"{len(out)} ids, at most {MAX_FILTER_IDS}")
    return tuple(out)


def label_list(values: list[str] | None, name: str) -> tuple[str, ...] | None:
    """A filter's labels (``category``, ``region``): repeated and/or comma-separated, each a
    string of 1..256 characters; duplicates dropped, order kept. None when not given."""
    if not values:
        return None
    out: dict[str, None] = {}
    for value in values:
        for part in value.split(","):
            if not 1 <= len(part) <= MAX_ID_CHARS:
                raise InvalidParameter(
                    name, f"{part[:40]!r}: a label has 1 to {MAX_ID_CHARS} characters"
                )
            out[part] = None
    if len(out) > MAX_FILTER_IDS:
        raise InvalidParameter(name, f"{len(out)} values, at most {MAX_FILTER_IDS}")
    return tuple(out)


def group_by_list(text: str | None) -> tuple[str, ...]:
    """``group_by``: a comma-separated subset of ``GROUP_FIELDS``, in the order given."""
    if not text:
        return ()
    fields: dict[str, None] = {}
    for part in text.split(","):
        part = part.strip()
        if part not in GROUP_FIELDS:
            raise InvalidParameter(
                "group_by",
                f"{part!r} is not a field; send a comma list of {', '.join(GROUP_FIELDS)}",
            )
        fields[part] = None
    return tuple(fields)


def sales_order(text: str) -> str:
    if text not in SALES_ORDERS:
        raise InvalidParameter("order", f"{text!r}; send one of {', '.join(SALES_ORDERS)}")
    return text


@dataclass(frozen=True)
class Cursor:
    """Where the next page of an answer starts, and what pins the answer: its batch run and
    speed offsets (every page is computed as of them), and a digest of the question."""

    digest: str
    run_id: str | None
    speed_offsets: dict[str, dict[int, int]]
    missing: dict[str, list[int]]
    position: int
    at_ms: int | None = None  # the first page's clock, for answers that depend on the time

    def encode(self) -> str:
        import base64
        import json

        body = {
            "q": self.digest,
            "r": self.run_id,
            "o": {t: {str(p): o for p, o in ps.items()} for t, ps in self.speed_offsets.items()},
            "m": self.missing,
            "p": self.position,
        }
        if self.at_ms is not None:
            body["t"] = self.at_ms
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, digest: str) -> Cursor:
        """The cursor in ``text``, which must belong to the question with ``digest``."""
        import base64
        import binascii
        import json

        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            body = json.loads(raw)
            cursor = cls(
                digest=str(body["q"]),
                run_id=body["r"],
                speed_offsets={
                    str(t): {int(p): int(o) for p, o in ps.items()} for t, ps in body["o"].items()
                },
                missing={str(t): [int(p) for p in ps] for t, ps in body["m"].items()},
                position=int(body["p"]),
                at_ms=None if body.get("t") is None else int(body["t"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise InvalidParameter(
                "cursor", "not a cursor; pass back an answer's next_cursor as it is"
            ) from None
        if cursor.digest != digest or cursor.position < 0:
            raise InvalidParameter(
                "cursor",
                "it belongs to another question; send the same parameters as the first page "
                "(explicit start and end keep them the same across days)",
            )
        return cursor


@dataclass(frozen=True)
class SalesQuery:
    """A validated ``/v1/sales`` question."""

    rng: SalesRange
    skus: tuple[str, ...] | None = None
    stores: tuple[str, ...] | None = None
    group_by: tuple[str, ...] = ()
    categories: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None
    order: str = "period"
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None  # as sent; :meth:`decoded_cursor` checks it

    @property
    def digest(self) -> str:
        """What identifies the question across its pages (everything but the cursor)."""
        import hashlib

        key = repr(
            (
                self.rng.granularity,
                self.rng.first.isoformat(),
                self.rng.last.isoformat(),
                self.skus,
                self.stores,
                self.group_by,
                self.categories,
                self.regions,
                self.order,
                self.limit,
            )
        )
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def decoded_cursor(self) -> Cursor | None:
        return None if self.cursor is None else Cursor.decode(self.cursor, self.digest)


# --- /v1/alerts/demand: ranked and paged ------------------------------------------------------

DEFAULT_ALERTS_LIMIT = 100
MAX_ALERTS_LIMIT = 1_000


@dataclass(frozen=True)
class AlertsQuery:
    """A validated ``/v1/alerts/demand`` question: a page of ``limit`` alerts from ``cursor``."""

    limit: int = DEFAULT_ALERTS_LIMIT
    cursor: str | None = None

    @property
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(repr(("alerts/demand", self.limit)).encode()).hexdigest()[:24]

    def decoded_cursor(self) -> Cursor | None:
        if self.cursor is None:
            return None
        cursor = Cursor.decode(self.cursor, self.digest)
        first, last = (int(t.timestamp() * 1000) for t in (SUPPORTED_FIRST, SUPPORTED_LAST))
        if cursor.at_ms is None or not first <= cursor.at_ms <= last:
            raise InvalidParameter("cursor", "not a cursor of /v1/alerts/demand")
        return cursor
