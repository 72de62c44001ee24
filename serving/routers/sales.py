"""``GET /v1/sales``: merged sales per hour, day, week or month, broken down, ordered, paged."""

from __future__ import annotations

from typing import Annotated, Any

import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request, Response

from serving.deps import get_service
from serving.formats import FORMATS, MEDIA_TYPES, answer_headers, negotiate, table_body
from serving.models import SalesAnswer
from serving.params import (
    DEFAULT_LIMIT,
    EXAMPLE_CATEGORY,
    EXAMPLE_END,
    EXAMPLE_REGION,
    EXAMPLE_SKU,
    EXAMPLE_START,
    EXAMPLE_STORE,
    GROUP_FIELDS,
    MAX_LIMIT,
    MAX_POINTS,
    SALES_ORDERS,
    SalesQuery,
    check_int,
    group_by_list,
    id_list,
    label_list,
    sales_order,
    sales_range,
)
from serving.service import QueryService

router = APIRouter(prefix="/v1", tags=["sales"])

# In the schema: an ISO date or date-time (clients and fuzzers generate both forms).
DATE_OR_TIME = {
    "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]
}


SALES_COLUMNS = {"units": pa.int64(), "revenue": pa.float64(), "order_lines": pa.int64()}


@router.get(
    "/sales",
    response_model=SalesAnswer,
    summary="Sales per hour, day, week or month, broken down and paged, batch + speed",
    responses={
        200: {
            "content": {media: {} for name, media in MEDIA_TYPES.items() if name != "json"},
            "description": "JSON by default; CSV, Parquet or an Arrow IPC stream with "
            "`format=` or the `Accept` header (then `as_of` is in the `X-As-Of` header).",
        }
    },
)
async def get_sales(
    request: Request,
    service: Annotated[QueryService, Depends(get_service)],
    sku: Annotated[
        list[str] | None,
        Query(
            description="Only these SKUs: repeat the parameter or send a comma list "
            "(an id containing a comma cannot be listed). Omit for all.",
            examples=[EXAMPLE_SKU],
        ),
    ] = None,
    store_id: Annotated[
        list[str] | None,
        Query(
            description="Only these stores (repeat or comma list). Omit for all.",
            examples=[EXAMPLE_STORE],
        ),
    ] = None,
    category: Annotated[
        list[str] | None,
        Query(
            description="Only SKUs of these categories, as the `products` topic says now "
            "(repeat or comma list). Omit for all.",
            examples=[EXAMPLE_CATEGORY],
        ),
    ] = None,
    region: Annotated[
        list[str] | None,
        Query(
            description="Only stores of these regions, as the `stores` topic says now (repeat "
            "or comma list). Omit for all.",
            examples=[EXAMPLE_REGION],
        ),
    ] = None,
    start: Annotated[
        str | None,
        Query(
            description="First period, inclusive: ISO date or datetime (UTC if no offset); a "
            "date selects its day, week or month. Default: 30 days, 48 hours, 26 weeks or 12 "
            "months before end. Years 1900 to 2999.",
            examples=[EXAMPLE_START],
            json_schema_extra=DATE_OR_TIME,
        ),
    ] = None,
    end: Annotated[
        str | None,
        Query(
            description="Last period, inclusive (a date includes its whole day). Default: now. "
            "Years 1900 to 2999.",
            examples=[EXAMPLE_END],
            json_schema_extra=DATE_OR_TIME,
        ),
    ] = None,
    granularity: Annotated[
        str,
        Query(
            description="`hour`, `day`, `week` (ISO; `period` = its Monday) or `month` "
            "(`period` = its first day); UTC. Range caps: "
            + ", ".join(f"{n:,} {g}s" for g, n in MAX_POINTS.items())
            + ".",
            examples=["day"],
            json_schema_extra={"enum": list(MAX_POINTS)},
        ),
    ] = "day",
    group_by: Annotated[
        str | None,
        Query(
            description="Break down by a comma list of "
            + ", ".join(f"`{f}`" for f in GROUP_FIELDS)
            + ": each point carries those fields. Omit to sum over them.",
            examples=["sku"],
        ),
    ] = None,
    order: Annotated[
        str,
        Query(
            description="`period` (then the group fields), or `units_desc` / `revenue_desc`: "
            "each period's rows ranked by the measure, the top `limit` of each period.",
            json_schema_extra={"enum": list(SALES_ORDERS)},
        ),
    ] = "period",
    limit: Annotated[
        int | None,
        Query(
            description=f"Rows per page (`order=period`) or per period (a ranking); default "
            f"{DEFAULT_LIMIT:,}, at most {MAX_LIMIT:,}."
        ),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="An answer's `next_cursor`, with the same other parameters: the "
            "next page, as of the first page's `as_of`."
        ),
    ] = None,
    format: Annotated[
        str | None,
        Query(
            description="`json` (default), `csv`, `parquet` or `arrow` (Arrow IPC stream); or "
            "send an `Accept` header.",
            json_schema_extra={"enum": list(FORMATS)},
        ),
    ] = None,
) -> Any:
    """Units, revenue and order lines per period, summed over the dimensions not grouped by.

    Exact merge: the batch views of the latest published run plus the speed layer's
    partials for every event at or above that run's offset watermark. Examples:
    `granularity=week&group_by=store_id` (units per store per week),
    `granularity=month&group_by=sku&order=revenue_desc&limit=20` (the 20 best-selling
    SKUs of each month), `granularity=week&group_by=category` (units per category per
    week), `granularity=month&group_by=region&region=West` (one region by month).
    Categories and regions are type-1: a SKU re-categorised counts under its new category
    for all of its history, within seconds of the `products` message.
    """
    form = negotiate(format, request.headers.get("accept"))
    rng = sales_range(start, end, granularity, today=service.today(), now=service.clock())
    q = SalesQuery(
        rng=rng,
        skus=id_list(sku, "sku"),
        stores=id_list(store_id, "store_id"),
        group_by=group_by_list(group_by),
        categories=label_list(category, "category"),
        regions=label_list(region, "region"),
        order=sales_order(order),
        limit=check_int(limit, "limit", low=1, high=MAX_LIMIT, default=DEFAULT_LIMIT),
        cursor=cursor,
    )
    q.decoded_cursor()  # a bad cursor is a 400 before any work
    answer = await service.answer(lambda: service.sales(q))
    if form == "json":
        return answer
    columns: dict[str, pa.Array] = {
        "period": pa.array([p.period for p in answer.points], pa.string())
    }
    for field in q.group_by:
        columns[field] = pa.array([getattr(p, field) for p in answer.points], pa.string())
    for name, typ in SALES_COLUMNS.items():
        columns[name] = pa.array([getattr(p, name) for p in answer.points], typ)
    return Response(
        content=table_body(pa.table(columns), form),
        media_type=MEDIA_TYPES[form],
        headers=answer_headers(answer, answer.next_cursor),
    )
