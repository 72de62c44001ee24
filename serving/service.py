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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.contract.manifest import Watermark, watermark_to_dict
from lambdalake.contract.speed_protocol import answer_schema
from lambdalake.contract.views import (
    ALL,
    PRODUCTS,
    SALES,
    SALES_ATTRIBUTES,
    SENTIMENT,
    STORES,
    ViewDef,
    forecast_level,
)
from lambdalake.errors import LambdalakeError
from lambdalake.settings import Settings
from serving.models import (
    ActualPoint,
    AlertsAnswer,
    AsOf,
    DemandAlert,
    ForecastAnswer,
    ForecastPoint,
    ProductsAnswer,
    SalesAnswer,
    SalesPoint,
    SentimentAnswer,
    SentimentItem,
    SentimentRanking,
    SentimentWeek,
    SentimentWeeks,
    SeriesAccuracy,
    StoresAnswer,
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
from serving.served_run import BatchCache, BatchSnapshot, snapshot_table
from serving.speed_client import SpeedClient, SpeedFilter, SpeedResult, WouldBlock
from serving.sql import Sandbox, SqlLimits, SqlResult, Statement
from serving.tables import merge_table

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


def _next_page(
    digest: str,
    cursor: Cursor | None,
    snap: BatchSnapshot,
    speed: SpeedResult,
    missing: dict[str, list[int]],
    end: int,
    total: int,
    *,
    now: datetime | None = None,
) -> str | None:
    """The cursor of the page after one that ends at ``end`` of ``total`` (None after the
    last): pinned to the first page's run and speed offsets (and its clock, ``now``, for
    answers that depend on the time)."""
    if end >= total:
        return None
    return Cursor(
        digest=digest,
        run_id=snap.run_id,
        speed_offsets=cursor.speed_offsets if cursor is not None else speed.offsets,
        missing=missing,
        position=end,
        at_ms=None if now is None else int(now.timestamp() * 1000),
    ).encode()


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


def _sortable(key: tuple) -> tuple:
    """A row key that sorts with nulls (an id the reference data has no record of) last."""
    return tuple((v is None, v or "") for v in key)


def _ordered(acc: dict[tuple, dict[str, Any]], q: SalesQuery) -> list[Row]:
    """``acc``'s rows in the answer's order; for a ranking, each period's top ``q.limit``."""
    if q.order == "period":
        return sorted(acc.items(), key=lambda kv: _sortable(kv[0]))
    measure = RANKED_BY[q.order]
    by_period: dict[str, list[Row]] = {}
    for key, row in acc.items():
        by_period.setdefault(key[0], []).append((key, row))
    out: list[Row] = []
    for period in sorted(by_period):
        ranked = sorted(
            by_period[period], key=lambda kr: (-(kr[1][measure] or 0), _sortable(kr[0][1:]))
        )
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


def combined(*results: SpeedResult) -> SpeedResult:
    """Several speed answers (of different topics) as one: offsets and missing partitions of
    each topic, stale if any is."""
    out = SpeedResult()
    for r in results:
        out.rows.extend(r.rows)
        for topic, parts in r.offsets.items():
            out.offsets.setdefault(topic, {}).update(parts)
        for topic, missing in r.missing.items():
            out.missing[topic] = sorted({*out.missing.get(topic, []), *missing})
        out.stale = out.stale or r.stale
    return out


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


RANKED_BY = {"units_desc": "units", "revenue_desc": "revenue"}


def top_per_period(table: pa.Table, keys: tuple[str, ...], measure: str, n: int) -> pa.Table:
    """Each period's ``n`` rows with the highest ``measure`` (ties by ``keys`` ascending, nulls
    last): what :func:`_ordered` keeps of a ranking, chosen before rows become Python."""
    order = [("period", "ascending"), (measure, "descending"), *((k, "ascending") for k in keys)]
    table = table.sort_by(order)
    periods = table["period"].to_numpy()
    index = np.arange(len(periods))
    first = np.r_[True, periods[1:] != periods[:-1]]
    run_start = np.maximum.accumulate(np.where(first, index, 0))
    return table.filter(pa.array(index - run_start < n))


def with_attributes(
    table: pa.Table, keys: tuple[str, ...], refs: dict[str, dict[str, dict[str, Any]]]
) -> pa.Table:
    """``table`` with a column for each attribute among ``keys`` (``category`` of its ``sku``,
    ``region`` of its ``store_id``) from the current records ``refs``; null for an id no
    record names."""
    for key in keys:
        if key not in SALES_ATTRIBUTES or key in table.column_names:
            continue
        _, dim = SALES_ATTRIBUTES[key]
        records = refs.get(key, {})
        ids = pa.array(list(records), pa.string())
        values = pa.array([r[key] for r in records.values()], pa.string())
        positions = pc.index_in(table[dim], value_set=ids)
        table = table.append_column(key, pc.take(values, positions))
    return table


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
        self._sandbox: Sandbox | None = None  # SQL's connections (serving.sql), made on first use

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
            self.batch.refresh()
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
        group_by: tuple[str, ...] | None = None,
        refs: dict[str, dict[str, dict[str, Any]]] | None = None,
        top: tuple[str, int] | None = None,
    ) -> tuple[dict[tuple, dict[str, Any]], SpeedResult]:
        """Merged sales partials keyed by (period label, *dims); ``skus``/``stores`` filter by
        several ids (instead of ``sku``/``store_id``); ``max_offsets`` bounds the speed
        layer's events from above (a page pinned to its answer's ``as_of``). With
        ``group_by`` (fields or attributes of ``dims``, looked up in ``refs``), keyed by
        (period label, *group_by) instead. ``top=(measure, n)``: only each period's ``n``
        rows ranked highest by ``measure`` (ties by the keys), chosen in Arrow."""
        snap.require(SALES, granularity, hint="ask for granularity=day, or ")
        lo: Any = first if granularity == "hour" else first.date()
        hi: Any = last if granularity == "hour" else last.date()
        acc: dict[tuple, dict[str, Any]] = {}
        breakdown = bool(dims or skus is not None or stores is not None)
        batch: pa.Table | None = None
        if breakdown:
            batch = snap.partials(
                SALES,
                granularity,
                sku=sku,
                store_id=store_id,
                first=lo,
                last=hi,
                skus=skus,
                stores=stores,
            ).select(["period", *dims, *SALES.measure_names])
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
        if batch is not None:
            # Batch and speed partials merged in Arrow by the answer's keys (the rows are the
            # question's periods x ids; only the merged groups become Python rows).
            if speed.rows:
                recent = pa.Table.from_pylist(speed.rows).select(batch.column_names)
                batch = pa.concat_tables([batch, recent.cast(batch.schema)])
            keys = group_by if group_by is not None else dims
            batch = with_attributes(batch, keys, refs or {})
            if batch.num_rows:
                merged = merge_table(batch, ["period", *keys], SALES)
                if top is not None:
                    merged = top_per_period(merged, keys, *top)
                for row in merged.to_pylist():
                    acc[(period_label(row["period"], granularity), *(row[k] for k in keys))] = row
            return acc, speed
        for row in speed.rows:
            period = row["period"]  # a label already when it comes from a series index
            label = period if isinstance(period, str) else period_label(period, granularity)
            merge_into(acc, (label, *(row[d] for d in dims)), row, SALES)
        return acc, speed

    # --- reference data -----------------------------------------------------------------

    def reference(
        self, snap: BatchSnapshot, view: ViewDef, *, max_offsets: Watermark | None = None
    ) -> tuple[dict[str, dict[str, Any]], SpeedResult]:
        """Each id's record of a reference view (``products``, ``stores``): the run's table
        merged with the speed layer's messages at or above its watermark, the last message
        of an id winning (``version``). Optional fields a message left out are ``None``."""
        flt = SpeedFilter(granularity=None, dimensions=view.dimensions)
        speed = self._speed_query(view, flt, snap, max_offsets=max_offsets)
        batch = snap.tables[snapshot_table(view, None)].table
        table = batch
        if speed.rows:
            table = pa.concat_tables([batch, pa.Table.from_pylist(speed.rows, schema=batch.schema)])
        key = view.dimensions[0]
        strings = [m.name for m in view.measures if m.agg == "last"]
        records = {}
        for row in merge_table(table, [key], view).to_pylist() if table.num_rows else []:
            records[row[key]] = {**row, **{f: row[f] or None for f in strings}}
        return records, speed

    def _records(
        self, view: ViewDef, attr: str, wanted: tuple[str, ...] | None, answer: Any
    ) -> Any:
        """``answer`` (a model with ``items``) of a reference view's current records, those
        whose ``attr`` is one of ``wanted`` (``None``: all), sorted by id."""

        def compute(snap: BatchSnapshot) -> tuple[dict, SpeedResult]:
            return self.reference(snap, view)

        records, snap, speed = self._merged(compute)
        keep = None if wanted is None else set(wanted)
        merged = self._provenance(view.name, snap, speed)
        return answer(
            items=[r for _, r in sorted(records.items()) if keep is None or r[attr] in keep],
            as_of=merged.as_of,
            degraded=merged.degraded,
            missing_partitions=merged.missing,
        )

    def products(self, categories: tuple[str, ...] | None) -> ProductsAnswer:
        return self._records(PRODUCTS, "category", categories, ProductsAnswer)

    def stores(self, regions: tuple[str, ...] | None) -> StoresAnswer:
        return self._records(STORES, "region", regions, StoresAnswer)

    def _sales_scope(
        self, snap: BatchSnapshot, q: SalesQuery, max_offsets: Watermark | None
    ) -> tuple[dict[str, dict[str, dict[str, Any]]], list[SpeedResult], tuple | None, tuple | None]:
        """The reference records a sales question needs (by attribute), their speed answers,
        and its SKU and store filters with the category and region filters applied."""
        wanted = {
            attr: (q.categories if attr == "category" else q.regions) for attr in SALES_ATTRIBUTES
        }
        refs: dict[str, dict[str, dict[str, Any]]] = {}
        speeds: list[SpeedResult] = []
        filters: dict[str, tuple[str, ...] | None] = {"sku": q.skus, "store_id": q.stores}
        for attr, (view, dim) in SALES_ATTRIBUTES.items():
            if attr not in q.group_by and wanted[attr] is None:
                continue
            records, speed = self.reference(snap, view, max_offsets=max_offsets)
            refs[attr] = records
            speeds.append(speed)
            if wanted[attr] is not None:
                allowed = set(wanted[attr] or ())
                ids = [i for i, r in sorted(records.items()) if r[attr] in allowed]
                given = filters[dim]
                filters[dim] = tuple(ids if given is None else (i for i in given if i in set(ids)))
        return refs, speeds, filters["sku"], filters["store_id"]

    def sales(self, q: SalesQuery) -> SalesAnswer:
        """Sales per period, broken down by ``q.group_by``, filtered, ordered and paged.

        ``order=period``: rows by period then group fields, ``limit`` rows per page.
        ``units_desc``/``revenue_desc``: each period's rows ranked by the measure (ties by the
        group fields), the top ``limit`` of each period; a page holds whole periods, at most
        ``MAX_LIMIT`` rows. A page after the first is computed as of the first page's
        ``as_of`` (its run and speed offsets), so every row appears exactly once."""
        cursor = q.decoded_cursor()
        # Category and region are attributes of the SKU and the store (type-1: as the
        # reference data says now): sales are merged by SKU / store, then regrouped.
        dims = tuple(
            dict.fromkeys(
                SALES_ATTRIBUTES[g][1] if g in SALES_ATTRIBUTES else g for g in q.group_by
            )
        )

        def compute(snap: BatchSnapshot) -> tuple[dict, SpeedResult]:
            pins = _pinned(cursor, snap) if cursor is not None else None
            refs, ref_speeds, skus, stores = self._sales_scope(snap, q, pins)
            one = (
                len(skus or ()) <= 1
                and len(stores or ()) <= 1
                and not q.group_by
                and not (skus == () or stores == ())
            )
            acc, speed = self._sales_rows(
                snap,
                granularity=q.rng.granularity,
                dims=dims,
                # One series (or all): the per-key series index answers it.
                sku=skus[0] if one and skus else None,
                store_id=stores[0] if one and stores else None,
                first=q.rng.first,
                last=q.rng.last,
                skus=None if one else skus,
                stores=None if one else stores,
                max_offsets=pins,
                group_by=q.group_by,
                refs=refs,
                top=None if q.order == "period" else (RANKED_BY[q.order], q.limit),
            )
            return acc, combined(speed, *ref_speeds)

        acc, snap, speed, merged = self._paged(cursor, compute, "sales")
        rows = _ordered(acc, q)
        start = cursor.position if cursor is not None else 0
        page, end, total = _page(rows, q, start)
        next_cursor = _next_page(q.digest, cursor, snap, speed, merged.missing, end, total)
        points = []
        for key, row in page:
            point = SalesPoint(
                period=key[0],
                **dict(zip(q.group_by, key[1:], strict=True)),
                units=int(row["units"] or 0),
                revenue=float(row["revenue"] or 0.0),
                order_lines=int(row["order_lines"] or 0),
            )
            point._groups = q.group_by
            points.append(point)
        return SalesAnswer(
            points=points,
            next_cursor=next_cursor,
            as_of=merged.as_of,
            degraded=merged.degraded,
            missing_partitions=merged.missing,
        )

    # --- SQL ------------------------------------------------------------------------------

    def sql(self, stmt: Statement, limits: SqlLimits) -> tuple[SqlResult, Merged]:
        """Run a checked statement over the merged tables it names, all as of one run and
        one set of speed offsets (see :mod:`serving.sql`). Blocks: call it on a thread."""
        from serving.sql import SPEED_SOURCE, TABLES, Sandbox, build_inputs

        needed = {SPEED_SOURCE[t].name: SPEED_SOURCE[t] for t in stmt.tables if t in SPEED_SOURCE}

        def compute(snap: BatchSnapshot) -> tuple[Any, SpeedResult]:
            if "sales_hourly" in stmt.tables:
                snap.require(SALES, "hour", hint="use sales_daily, or ")
            results, speed_tables = [], {}
            for view in {v.name: v for v in SPEED_SOURCE.values()}.values():
                schema = answer_schema(view.name, getattr(view, "stored_grain", None))
                if view.name not in needed:
                    speed_tables[view.name] = schema.empty_table()
                    continue
                r = self.speed.query(view, SpeedFilter(), snap.watermark, whole=True)
                results.append(r)
                speed_tables[view.name] = (
                    pa.concat_tables([t.cast(schema) for t in r.tables])
                    if r.tables
                    else schema.empty_table()
                )
            batch = {name: t.table for name, t in snap.tables.items()}
            return (batch, speed_tables), combined(*results)

        (batch, speed_tables), snap, speed = self._merged(compute)
        merged = self._provenance("sql", snap, speed)
        if self._sandbox is None or self._sandbox.limits != limits:
            old, self._sandbox = self._sandbox, Sandbox(limits)
            if old is not None:
                old.close()
        inputs = build_inputs(stmt.tables, batch, speed_tables)

        def template() -> Any:  # every table's inputs, for a connection opened now
            return build_inputs(frozenset(TABLES), batch, speed_tables)

        return self._sandbox.execute(stmt, inputs, template), merged

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
        next_cursor = _next_page(
            q.digest, cursor, snap, speed, prov.missing, end, len(items), now=now
        )
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
