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


@dataclass(frozen=True)
class SalesRange:
    """An inclusive range of periods: dates for ``day``, hour starts (UTC) for ``hour``."""

    granularity: Granularity
    first: datetime  # first period (a day's midnight, or an hour's start), UTC
    last: datetime  # last period, inclusive

    @property
    def periods(self) -> int:
        step = timedelta(days=1) if self.granularity == "day" else timedelta(hours=1)
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

    Defaults: ``end`` = today (UTC), ``start`` = 30 days (day) or 48 hours (hour)
    before ``end``. A time inside a period selects that period (hours are
    floored, datetimes select their date for ``day``). Past the caps the answer
    is a 400 asking for a narrower range, never a truncated answer.
    """
    if granularity not in ("day", "hour"):
        raise InvalidParameter("granularity", f"{granularity!r}; send 'day' or 'hour'")
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
        hint = "; narrow start/end" + (" or use granularity=day" if unit == "hourly" else "")
        raise InvalidParameter(
            "start", f"range too large: {rng.periods} {unit} points, at most {cap}{hint}"
        )
    return rng


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
    """The ``period`` string of a point: ``2024-05-01`` (a day, or a week's Monday) or
    ``2024-05-01T10:00:00Z`` (an hour)."""
    if granularity in ("day", "week"):
        return (ts.date() if isinstance(ts, datetime) else ts).isoformat()
    assert isinstance(ts, datetime)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00Z")
