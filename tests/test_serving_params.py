"""Parameter rules of the serving API (pure functions): ranges, defaults, caps, labels."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from lambdalake.contract.views import SALES, SENTIMENT
from lambdalake.settings import Settings
from serving.params import (
    MAX_DAY_POINTS,
    MAX_HOUR_POINTS,
    InvalidParameter,
    parse_time_bound,
    period_label,
    sales_range,
)
from serving.speed_client import SpeedFilter, all_partitions, parse_endpoints, to_speed_query

TODAY = date(2024, 5, 10)
NOW = datetime(2024, 5, 10, 15, 42, tzinfo=UTC)


def test_a_date_as_end_includes_the_whole_day_and_offsets_become_utc() -> None:
    assert parse_time_bound("2024-05-01", "end", end=True) == datetime(2024, 5, 1, 23, tzinfo=UTC)
    assert parse_time_bound("2024-05-01T01:30:00+02:00", "start", end=False) == datetime(
        2024, 4, 30, 23, 30, tzinfo=UTC
    )
    assert parse_time_bound("2024-05-01T01:30:00", "start", end=False).tzinfo == UTC


def test_hour_ranges_floor_times_to_their_utc_hour() -> None:
    rng = sales_range("2024-05-01T10:59:59Z", "2024-05-01T13:00:00+01:00", "hour", today=TODAY)
    assert (rng.first, rng.last) == (
        datetime(2024, 5, 1, 10, tzinfo=UTC),
        datetime(2024, 5, 1, 12, tzinfo=UTC),
    )
    assert rng.periods == 3


def test_day_ranges_take_the_utc_date_of_datetimes() -> None:
    rng = sales_range("2024-05-01T23:30:00-02:00", "2024-05-03", "day", today=TODAY)
    assert rng.first_date == date(2024, 5, 2)  # 01:30 UTC on the 2nd
    assert rng.last_date == date(2024, 5, 3)


def test_defaults_are_30_days_or_48_hours_up_to_now() -> None:
    day = sales_range(None, None, "day", today=TODAY, now=NOW)
    assert (day.first_date, day.last_date, day.periods) == (date(2024, 4, 11), TODAY, 30)
    hour = sales_range(None, None, "hour", today=TODAY, now=NOW)
    assert hour.last == datetime(2024, 5, 10, 15, tzinfo=UTC)
    assert hour.periods == 48


def test_ranges_past_the_caps_are_refused_not_truncated() -> None:
    first = date(2010, 1, 1)
    ok = sales_range(
        str(first), str(first + timedelta(days=MAX_DAY_POINTS - 1)), "day", today=TODAY
    )
    assert ok.periods == MAX_DAY_POINTS
    with pytest.raises(InvalidParameter, match="range too large"):
        sales_range(str(first), str(first + timedelta(days=MAX_DAY_POINTS)), "day", today=TODAY)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    ok = sales_range(
        start.isoformat(),
        (start + timedelta(hours=MAX_HOUR_POINTS - 1)).isoformat(),
        "hour",
        today=TODAY,
    )
    assert ok.periods == MAX_HOUR_POINTS
    with pytest.raises(InvalidParameter, match="granularity=day"):
        sales_range(
            start.isoformat(),
            (start + timedelta(hours=MAX_HOUR_POINTS)).isoformat(),
            "hour",
            today=TODAY,
        )


@pytest.mark.parametrize(
    ("start", "end", "granularity", "name"),
    [
        ("2024-02-30", None, "day", "start"),
        (None, "soon", "day", "end"),
        ("2024-05-02", "2024-05-01", "day", "start"),
        (None, None, "year", "granularity"),
        ("", None, "day", "start"),
    ],
)
def test_invalid_ranges_name_the_parameter(
    start: str | None, end: str | None, granularity: str, name: str
) -> None:
    with pytest.raises(InvalidParameter) as err:
        sales_range(start, end, granularity, today=TODAY)
    assert err.value.name == name
    assert str(err.value).startswith(f"invalid parameter {name!r}")


def test_period_labels() -> None:
    assert period_label(date(2024, 5, 1), "day") == "2024-05-01"
    assert period_label(datetime(2024, 5, 1, 7, tzinfo=UTC), "hour") == "2024-05-01T07:00:00Z"
    assert period_label(datetime(2024, 5, 1, 7), "hour") == "2024-05-01T07:00:00Z"


def test_speed_queries_carry_filters_bounds_and_the_watermark() -> None:
    wm = {"orders": {0: 10, 1: 12}}
    flt = SpeedFilter(
        granularity="hour",
        sku="A",
        first=datetime(2024, 5, 1, 10, tzinfo=UTC),
        last=datetime(2024, 5, 1, 12, tzinfo=UTC),
    )
    q = to_speed_query(SALES, flt, wm)
    assert (q.view, q.granularity, q.skus, q.stores) == ("sales", "hour", ("A",), None)
    assert q.start == "2024-05-01T10:00:00+00:00" and q.end == "2024-05-01T12:00:00+00:00"
    assert q.min_offsets == wm
    day = to_speed_query(SALES, SpeedFilter(granularity="day", first=flt.first, last=flt.last), wm)
    assert (day.start, day.end) == ("2024-05-01", "2024-05-01")
    sent = to_speed_query(SENTIMENT, SpeedFilter(granularity=None, sku="A"), {})
    assert (sent.view, sent.skus, sent.start) == ("sentiment", ("A",), None)


def test_partitions_to_cover_come_from_the_watermark_and_status_files() -> None:
    settings = Settings(_env_file=None, partitions=4)  # type: ignore[call-arg]
    statuses = [{"offsets": {"orders": {"5": 3}}}]
    assert all_partitions("orders", settings, {"orders": {0: 1, 1: 2}}, statuses) == [0, 1, 5]
    # Nothing known yet (no run, no worker): the configured partition count.
    assert all_partitions("reviews", settings, {}, []) == [0, 1, 2, 3]
    assert parse_endpoints(" grpc://a:1, ,grpc://b:2 ") == ["grpc://a:1", "grpc://b:2"]
