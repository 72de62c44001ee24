"""The answers: batch view (run R) merged with speed partials for offsets >= watermark(R).

Route functions call one method here each; this is where the merge lives. Every
measure is combined through the shared view definitions (``lambdalake.contract.views``):
batch rows with each ``Measure.merge_agg`` (see ``serving.served_run.merge_partials``),
speed partials with ``ViewDef.combine_rows``, means with ``Mean.compute`` after the
merge — never a measure defined twice.

If a speed worker reports that it has pruned past R's watermark (a newer run was
published meanwhile), the latest run is loaded and the query retried once.

The API's handlers are ``async`` and call :meth:`QueryService.answer`: a question is
first answered on the event loop from what is in memory (the run's views, the speed
snapshots); only when that would wait for I/O (a speed worker round trip, a run to
load) does :class:`~serving.speed_client.WouldBlock` send it to a worker thread instead. The
common case skips two thread hand-offs per request.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from lambdalake.contract.manifest import Watermark, watermark_to_dict
from lambdalake.contract.views import ALL, SALES, SENTIMENT, forecast_level
from lambdalake.errors import LambdalakeError
from lambdalake.settings import Settings
from serving.models import (
    ActualPoint,
    AlertsAnswer,
    AsOf,
    DemandAlert,
    ForecastAnswer,
    ForecastPoint,
    SalesAnswer,
    SalesPoint,
    SentimentAnswer,
    SentimentItem,
    SentimentRanking,
    SentimentWeek,
    SentimentWeeks,
    SeriesAccuracy,
)
from serving.params import (
    MAX_LIMIT,
    AlertsQuery,
    Cursor,
    Granularity,
    SalesQuery,
    period_label,
)
from serving.series import series_key
from serving.served_run import BatchCache, BatchSnapshot
from serving.speed_client import SpeedClient, SpeedFilter, SpeedResult, WouldBlock

T = TypeVar("T")

# False while a question is answered on the event loop: no I/O may wait there.
_MAY_BLOCK: contextvars.ContextVar[bool] = contextvars.ContextVar("may_block", default=True)

# Alerts: "far below the lower bound late in the day" means, after LATE_DAY_FRACTION
# of the UTC day, fewer units than LOW_FACTOR x the lower 95 % bound pro-rated to now.
LATE_DAY_FRACTION = 0.75
LOW_FACTOR = 0.5


def _zero(view: Any) -> dict[str, Any]:
    return {m.name: None for m in view.measures}


def merge_into(acc: dict[Any, dict[str, Any]], key: Any, row: dict[str, Any], view: Any) -> None:
    """Combine a partial ``row`` into ``acc[key]`` with the view's merge rules."""
    base = acc.get(key)
    acc[key] = view.combine_rows(base if base is not None else _zero(view), row)


@dataclass(frozen=True)
class Merged:
    """A merged answer's provenance."""

    as_of: AsOf
    degraded: bool
    missing: dict[str, list[int]]


class CursorExpired(LambdalakeError, LookupError):
    """A page was asked for an answer whose batch run is no longer served (or whose speed
    events were pruned since): it cannot be given as of the first page any more."""

    def __init__(self, run_id: str | None) -> None:
        super().__init__(
            f"the cursor's answer is as of batch run {run_id}, which is no longer served "
            "(a newer run was published); ask again without cursor"
        )


Row = tuple[tuple, dict[str, Any]]


def _pinned(cursor: Cursor, snap: BatchSnapshot) -> Watermark:
    """The speed offsets a page is computed as of: the first page's, and for partitions the
    first page lacked (a worker was down) the watermark itself, so that a worker back since
    adds nothing the first page did not have."""
    bounds = {t: dict(ps) for t, ps in cursor.speed_offsets.items()}
    for topic, parts in cursor.missing.items():
        for p in parts:
            bounds.setdefault(topic, {})[p] = snap.watermark.get(topic, {}).get(p, 0)
    return bounds


def _ordered(acc: dict[tuple, dict[str, Any]], q: SalesQuery) -> list[Row]:
    """``acc``'s rows in the answer's order; for a ranking, each period's top ``q.limit``."""
    if q.order == "period":
        return sorted(acc.items())
    measure = "units" if q.order == "units_desc" else "revenue"
    by_period: dict[str, list[Row]] = {}
    for key, row in acc.items():
        by_period.setdefault(key[0], []).append((key, row))
    out: list[Row] = []
    for period in sorted(by_period):
        ranked = sorted(by_period[period], key=lambda kr: (-(kr[1][measure] or 0), kr[0][1:]))
        out += ranked[: q.limit]
    return out


def _page(rows: list[Row], q: SalesQuery, start: int) -> tuple[list[Row], int, int]:
    """One page of ordered rows from ``start``, where the next begins and where they end: row
    indexes for ``order=period``, period indexes for a ranking (pages hold whole periods)."""
    if q.order == "period":
        end = min(len(rows), start + q.limit)
        return rows[start:end], end, len(rows)
    by_period: dict[str, list[Row]] = {}  # in the rows' (period) order
    for key, row in rows:
        by_period.setdefault(key[0], []).append((key, row))
    periods = list(by_period)
    taken: list[Row] = []
    end = start
    while end < len(periods):
        chunk = by_period[periods[end]]
        if taken and len(taken) + len(chunk) > MAX_LIMIT:
            break
        taken += chunk
        end += 1
    return taken, end, len(periods)


def provenance(snap: BatchSnapshot, speed: SpeedResult) -> Merged:
    wm = snap.watermark
    return Merged(
        as_of=AsOf(
            run_id=snap.run_id,
            watermark=watermark_to_dict(wm),
            speed_offsets=watermark_to_dict(speed.offsets),
        ),
        degraded=speed.degraded,
        missing={t: ps for t, ps in speed.missing.items() if ps},
    )


class QueryService:
    """Merged answers over a :class:`BatchCache` and a :class:`SpeedClient`."""

    def __init__(
        self,
        settings: Settings,
        batch: BatchCache,
        speed: SpeedClient,
        *,
        clock: Callable[[], datetime] | None = None,
        on_degraded: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.batch = batch
        self.speed = speed
        self.clock = clock or (lambda: datetime.now(UTC))
        self.on_degraded = on_degraded or (lambda kind: None)

    def _provenance(self, kind: str, snap: BatchSnapshot, speed: SpeedResult) -> Merged:
        merged = provenance(snap, speed)
        if merged.degraded:
            self.on_degraded(kind)
        return merged

    def today(self) -> date:
        return self.clock().astimezone(UTC).date()

    async def answer(self, question: Callable[[], T]) -> T:
        """``question()`` on the event loop if it needs no I/O, else on a worker thread."""
        from fastapi.concurrency import run_in_threadpool

        token = _MAY_BLOCK.set(False)
        try:
            return question()
        except WouldBlock:
            pass
        finally:
            _MAY_BLOCK.reset(token)
        return await run_in_threadpool(question)

    def _speed_query(
        self,
        view: Any,
        flt: SpeedFilter,
        snap: BatchSnapshot,
        *,
        max_offsets: Watermark | None = None,
    ) -> SpeedResult:
        return self.speed.query(
            view, flt, snap.watermark, block=_MAY_BLOCK.get(), max_offsets=max_offsets
        )

    def _current_run(self) -> BatchSnapshot:
        if not self.batch.loaded and not _MAY_BLOCK.get():
            raise WouldBlock("no batch run loaded yet")
        return self.batch.current()

    def _merged(
        self, compute: Callable[[BatchSnapshot], tuple[T, SpeedResult]]
    ) -> tuple[T, BatchSnapshot, SpeedResult]:
        """Run ``compute`` on the current run; once more on a newer run if speed is ahead."""
        snap = self._current_run()
        value, speed = compute(snap)
        if speed.stale:
            if not _MAY_BLOCK.get():
                raise WouldBlock("a newer run is published: load it first")
            self.batch.refresh(force=True)
            snap = self.batch.current()
            value, speed = compute(snap)
        return value, snap, speed

    def _paged(
        self,
        cursor: Cursor | None,
        compute: Callable[[BatchSnapshot], tuple[T, SpeedResult]],
        kind: str,
    ) -> tuple[T, BatchSnapshot, SpeedResult, Merged]:
        """``compute`` for a first page (as :meth:`_merged`), or for a later page as of its
        cursor's run and speed offsets (``compute`` must bound the speed layer with
        :func:`_pinned`): a cursor of a run no longer served raises :class:`CursorExpired`."""
        if cursor is None:
            value, snap, speed = self._merged(compute)
            return value, snap, speed, self._provenance(kind, snap, speed)
        if not _MAY_BLOCK.get():
            raise WouldBlock("a page as of earlier offsets asks the speed workers")
        snap = self._current_run()
        if snap.run_id != cursor.run_id:
            raise CursorExpired(cursor.run_id)
        value, speed = compute(snap)
        if speed.stale:
            raise CursorExpired(cursor.run_id)
        merged = Merged(
            as_of=AsOf(
                run_id=snap.run_id,
                watermark=watermark_to_dict(snap.watermark),
                speed_offsets=watermark_to_dict(cursor.speed_offsets),
            ),
            degraded=any(cursor.missing.values()),
            missing=cursor.missing,
        )
        return value, snap, speed, merged

    # --- sales --------------------------------------------------------------------------

    def _sales_rows(
        self,
        snap: BatchSnapshot,
        *,
        granularity: Granularity,
        dims: tuple[str, ...],
        sku: str | None,
        store_id: str | None,
        first: datetime,
        last: datetime,
        skus: tuple[str, ...] | None = None,
        stores: tuple[str, ...] | None = None,
        max_offsets: Watermark | None = None,
    ) -> tuple[dict[tuple, dict[str, Any]], SpeedResult]:
        """Merged sales partials keyed by (period label, *dims); ``skus``/``stores`` filter by
        several ids (instead of ``sku``/``store_id``); ``max_offsets`` bounds the speed
        layer's events from above (a page pinned to its answer's ``as_of``)."""
        snap.require(SALES, granularity, hint="ask for granularity=day, or ")
        lo: Any = first if granularity == "hour" else first.date()
        hi: Any = last if granularity == "hour" else last.date()
        acc: dict[tuple, dict[str, Any]] = {}
        if dims or skus is not None or stores is not None:
            rows = snap.aggregate(
                SALES,
                granularity,
                keys=["period", *dims],
                sku=sku,
                store_id=store_id,
                first=lo,
                last=hi,
                skus=skus,
                stores=stores,
            )
            for row in rows:
                key = (period_label(row["period"], granularity), *(row[d] for d in dims))
                merge_into(acc, key, row, SALES)
        else:  # one series (the point query): the run's per-key series, sliced
            names, series_key_ = series_key(sku, store_id)
            for label, values in snap.series.get(granularity, names).points(series_key_, lo, hi):
                acc[(label,)] = values
        flt = SpeedFilter(
            granularity=granularity,
            dimensions=dims,
            sku=sku,
            store_id=store_id,
            first=first,
            last=last,
            skus=skus,
            stores=stores,
        )
        speed = self._speed_query(SALES, flt, snap, max_offsets=max_offsets)
        for row in speed.rows:
            period = row["period"]  # a label already when it comes from a series index
            label = period if isinstance(period, str) else period_label(period, granularity)
            merge_into(acc, (label, *(row[d] for d in dims)), row, SALES)
        return acc, speed

    def sales(self, q: SalesQuery) -> SalesAnswer:
        """Sales per period, broken down by ``q.group_by``, filtered, ordered and paged.

        ``order=period``: rows by period then group fields, ``limit`` rows per page.
        ``units_desc``/``revenue_desc``: each period's rows ranked by the measure (ties by the
        group fields), the top ``limit`` of each period; a page holds whole periods, at most
        ``MAX_LIMIT`` rows. A page after the first is computed as of the first page's
        ``as_of`` (its run and speed offsets), so every row appears exactly once."""
        cursor = q.decoded_cursor()
        one = len(q.skus or ()) <= 1 and len(q.stores or ()) <= 1 and not q.group_by

        def compute(snap: BatchSnapshot) -> tuple[dict, SpeedResult]:
            return self._sales_rows(
                snap,
                granularity=q.rng.granularity,
                dims=q.group_by,
                # One series (or all): the per-key series index answers it.
                sku=q.skus[0] if one and q.skus else None,
                store_id=q.stores[0] if one and q.stores else None,
                first=q.rng.first,
                last=q.rng.last,
                skus=None if one else q.skus,
                stores=None if one else q.stores,
                max_offsets=_pinned(cursor, snap) if cursor is not None else None,
            )

        acc, snap, speed, merged = self._paged(cursor, compute, "sales")
        rows = _ordered(acc, q)
        start = cursor.position if cursor is not None else 0
        page, end, total = _page(rows, q, start)
        next_cursor = None
        if end < total:
            next_cursor = Cursor(
                digest=q.digest,
                run_id=snap.run_id,
                speed_offsets=cursor.speed_offsets if cursor is not None else speed.offsets,
                missing=merged.missing,
                position=end,
            ).encode()
        points = [
            SalesPoint(
                period=key[0],
                **dict(zip(q.group_by, key[1:], strict=True)),
                units=int(row["units"] or 0),
                revenue=float(row["revenue"] or 0.0),
                order_lines=int(row["order_lines"] or 0),
            )
            for key, row in page
        ]
        return SalesAnswer(
            points=points,
            next_cursor=next_cursor,
            as_of=merged.as_of,
            degraded=merged.degraded,
            missing_partitions=merged.missing,
        )

    # --- forecast -----------------------------------------------------------------------

    def forecast(
        self, *, sku: str | None, store_id: str | None, horizon: int, actuals_days: int
    ) -> ForecastAnswer:
        """The forecast of one node of the hierarchy: a SKU at a store, a SKU over all stores
        (``store_id`` None), a store over all SKUs (``sku`` None) or the total (both None)."""
        today = self.today()
        first = today - timedelta(days=actuals_days - 1)
        last = today + timedelta(days=horizon - 1)
        start_ts = datetime(first.year, first.month, first.day, tzinfo=UTC)
        today_ts = datetime(today.year, today.month, today.day, tzinfo=UTC)
        node = (sku or ALL, store_id or ALL)

        def compute(snap: BatchSnapshot) -> tuple[tuple, SpeedResult]:
            points, model, accuracy = self._forecast_points(snap, node, first, last)
            acc, speed = self._sales_rows(
                snap,
                granularity="day",
                dims=(),
                sku=sku,
                store_id=store_id,
                first=start_ts,
                last=today_ts,
            )
            return (points, model, accuracy, acc), speed

        (points, model, accuracy, acc), snap, speed = self._merged(compute)
        prov = self._provenance("forecast", snap, speed)
        return ForecastAnswer(
            sku=sku,
            store_id=store_id,
            level=forecast_level(*node),
            model=model,
            accuracy=[SeriesAccuracy(**row) for row in accuracy],
            points=points,
            actuals=[
                ActualPoint(date=key[0], units=int(row["units"] or 0))
                for key, row in sorted(acc.items())
            ],
            as_of=prov.as_of,
            degraded=prov.degraded,
            missing_partitions=prov.missing,
        )

    @staticmethod
    def _forecast_points(
        snap: BatchSnapshot, node: tuple[str, str], first: date, last: date
    ) -> tuple[list[ForecastPoint], str | None, list[dict[str, Any]]]:
        """Points, model and backtest of ``node``: the run's own forecast of it, with bounds.

        A run from before forecast levels has only (sku, store) series: an aggregate is then
        their sum, without bounds (quantiles of a sum are not sums of quantiles).
        """
        sku, store_id = node
        rows = snap.forecast_node(sku, store_id, first=first, last=last)
        if rows or forecast_level(sku, store_id) == "sku_store":
            points = [
                ForecastPoint(
                    date=r["date"].isoformat(),
                    forecast=r["forecast"],
                    lower_80=r["lower_80"],
                    upper_80=r["upper_80"],
                    lower_95=r["lower_95"],
                    upper_95=r["upper_95"],
                )
                for r in rows
            ]
            return points, (rows[0]["model"] if rows else None), snap.accuracy(sku, store_id)
        rows = snap.forecast(
            None if sku == ALL else sku,
            store_id=None if store_id == ALL else store_id,
            first=first,
            last=last,
        )
        by_date: dict[date, float] = {}
        for r in rows:
            by_date[r["date"]] = by_date.get(r["date"], 0.0) + r["forecast"]
        models = sorted({r["model"] for r in rows if r["model"]})
        points = [ForecastPoint(date=d.isoformat(), forecast=f) for d, f in sorted(by_date.items())]
        accuracy = snap.bottom_accuracy(sku) if store_id == ALL and sku != ALL else []
        return points, ("+".join(models) or None), accuracy

    # --- sentiment ----------------------------------------------------------------------

    def _sentiment_rows(
        self, snap: BatchSnapshot, sku: str | None
    ) -> tuple[dict[str, dict[str, Any]], SpeedResult]:
        acc: dict[str, dict[str, Any]] = {}
        for row in snap.aggregate(SENTIMENT, None, keys=["sku"], sku=sku):
            merge_into(acc, row["sku"], row, SENTIMENT)
        speed = self._speed_query(
            SENTIMENT, SpeedFilter(granularity=None, dimensions=("sku",), sku=sku), snap
        )
        for row in speed.rows:
            merge_into(acc, row["sku"], row, SENTIMENT)
        return acc, speed

    @staticmethod
    def _sentiment_item(sku: str, row: dict[str, Any] | None) -> SentimentItem:
        row = row or {}
        derived = {d.name: d.compute(row) for d in SENTIMENT.derived}
        return SentimentItem(
            sku=sku,
            reviews=int(row.get("reviews") or 0),
            mean_rating=derived["mean_rating"],
            mean_sentiment=derived["mean_sentiment"],
            positive=int(row.get("positive") or 0),
            neutral=int(row.get("neutral") or 0),
            negative=int(row.get("negative") or 0),
        )

    def sentiment(self, *, sku: str) -> SentimentAnswer:
        acc, snap, speed = self._merged(lambda s: self._sentiment_rows(s, sku))
        prov = self._provenance("sentiment", snap, speed)
        item = self._sentiment_item(sku, acc.get(sku))
        return SentimentAnswer(
            **item.model_dump(),
            as_of=prov.as_of,
            degraded=prov.degraded,
            missing_partitions=prov.missing,
        )

    def sentiment_ranking(self, *, order: str, limit: int, min_reviews: int) -> SentimentRanking:
        acc, snap, speed = self._merged(lambda s: self._sentiment_rows(s, None))
        items = [self._sentiment_item(sku, row) for sku, row in acc.items()]
        items = [i for i in items if i.reviews >= min_reviews and i.mean_sentiment is not None]
        sign = 1.0 if order == "worst" else -1.0
        items.sort(key=lambda i: (sign * (i.mean_sentiment or 0.0), i.sku))
        prov = self._provenance("sentiment_ranking", snap, speed)
        return SentimentRanking(
            items=items[:limit],
            as_of=prov.as_of,
            degraded=prov.degraded,
            missing_partitions=prov.missing,
        )

    def sentiment_weeks(self, *, sku: str, first: date, last: date) -> SentimentWeeks:
        """A SKU's sentiment per ISO week (``first``/``last``: Mondays, inclusive), merged."""
        snap_hint = "ask /v1/sentiment/{sku} for all time, or "

        def compute(snap: BatchSnapshot) -> tuple[dict, SpeedResult]:
            snap.require(SENTIMENT, "week", hint=snap_hint)
            acc: dict[str, dict[str, Any]] = {}
            for row in snap.aggregate(
                SENTIMENT, "week", keys=["period"], sku=sku, first=first, last=last
            ):
                merge_into(acc, period_label(row["period"], "week"), row, SENTIMENT)
            speed = self._speed_query(
                SENTIMENT,
                SpeedFilter(
                    granularity="week",
                    sku=sku,
                    first=datetime(first.year, first.month, first.day, tzinfo=UTC),
                    last=datetime(last.year, last.month, last.day, tzinfo=UTC),
                ),
                snap,
            )
            for row in speed.rows:
                merge_into(acc, period_label(row["period"], "week"), row, SENTIMENT)
            return acc, speed

        acc, snap, speed = self._merged(compute)
        prov = self._provenance("sentiment_weeks", snap, speed)
        return SentimentWeeks(
            sku=sku,
            weeks=[
                SentimentWeek(
                    week=week, **self._sentiment_item(sku, row).model_dump(exclude={"sku"})
                )
                for week, row in sorted(acc.items())
            ],
            as_of=prov.as_of,
            degraded=prov.degraded,
            missing_partitions=prov.missing,
        )

    # --- alerts -------------------------------------------------------------------------

    def demand_alerts(self, q: AlertsQuery | None = None) -> AlertsAnswer:
        """Today's (sku, store) series past their forecast's 95 % interval, ranked by
        :func:`alert_severity` (worst first; ties by units past the threshold, then ids) and
        paged: ``q.limit`` a page; a later page is computed as of the first page's run, speed
        offsets and time, so every alert appears once."""
        q = q or AlertsQuery()
        cursor = q.decoded_cursor()
        if cursor is not None and cursor.at_ms is not None:
            now = datetime.fromtimestamp(cursor.at_ms / 1000, UTC)
        else:
            now = self.clock().astimezone(UTC)
        today = now.date()
        midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
        fraction = (now - midnight).total_seconds() / 86_400

        def compute(snap: BatchSnapshot) -> tuple[tuple, SpeedResult]:
            acc, speed = self._sales_rows(
                snap,
                granularity="day",
                dims=("sku", "store_id"),
                sku=None,
                store_id=None,
                first=midnight,
                last=midnight,
                max_offsets=_pinned(cursor, snap) if cursor is not None else None,
            )
            forecasts = snap.forecast(None, store_id=None, first=today, last=today)
            return (acc, forecasts), speed

        (acc, forecasts), snap, speed, prov = self._paged(cursor, compute, "alerts")
        items: list[DemandAlert] = []
        for f in forecasts:
            row = acc.get((today.isoformat(), f["sku"], f["store_id"]))
            units = int(row["units"] or 0) if row else 0
            alert = demand_alert(f, units, fraction)
            if alert is not None:
                items.append(alert)
        items.sort(
            key=lambda a: (-a.severity, -abs(a.units - a.threshold), a.sku, a.store_id or "")
        )
        start = cursor.position if cursor is not None else 0
        end = min(len(items), start + q.limit)
        next_cursor = None
        if end < len(items):
            next_cursor = Cursor(
                digest=q.digest,
                run_id=snap.run_id,
                speed_offsets=cursor.speed_offsets if cursor is not None else speed.offsets,
                missing=prov.missing,
                position=end,
                at_ms=int(now.timestamp() * 1000),
            ).encode()
        return AlertsAnswer(
            date=today.isoformat(),
            day_fraction=round(fraction, 4),
            items=items[start:end],
            total=len(items),
            next_cursor=next_cursor,
            as_of=prov.as_of,
            degraded=prov.degraded,
            missing_partitions=prov.missing,
        )


def demand_alert(f: dict[str, Any], units: int, fraction: float) -> DemandAlert | None:
    """The alert of one series with forecast row ``f`` and ``units`` so far today, if any.

    ``above_upper_95``: units already above the day's upper 95 % bound. ``below_lower_95``:
    after ``LATE_DAY_FRACTION`` of the day, units below ``LOW_FACTOR`` x the lower bound
    pro-rated to the time of day. ``severity`` is the distance past the threshold in
    half-widths of the 95 % interval on that side (pro-rated below), each at least one unit,
    so that a series whose bounds collapsed cannot rank first on a unit or two.
    """
    forecast, lower, upper = f["forecast"], f["lower_95"], f["upper_95"]
    if upper is not None and units > upper:
        half = max(upper - forecast, 1.0)
        kind, threshold, severity = "above_upper_95", upper, (units - upper) / half
    elif (
        fraction >= LATE_DAY_FRACTION
        and lower is not None
        and units < LOW_FACTOR * lower * fraction
    ):
        threshold = LOW_FACTOR * lower * fraction
        half = max((forecast - lower) * fraction, 1.0)
        kind, severity = "below_lower_95", (threshold - units) / half
    else:
        return None
    return DemandAlert(
        sku=f["sku"],
        store_id=f["store_id"],
        kind=kind,
        units=units,
        forecast=forecast,
        lower_95=lower,
        upper_95=upper,
        threshold=round(threshold, 4),
        severity=round(severity, 4),
    )
