"""``GET /v1/sales``: merged sales per day or hour."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from serving.deps import get_service
from serving.models import SalesAnswer
from serving.params import check_id, sales_range
from serving.service import QueryService

router = APIRouter(prefix="/v1", tags=["sales"])

# In the schema: an ISO date or date-time (clients and fuzzers generate both forms).
DATE_OR_TIME = {
    "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]
}


@router.get("/sales", response_model=SalesAnswer, summary="Sales per day or hour, batch + speed")
async def get_sales(
    service: Annotated[QueryService, Depends(get_service)],
    sku: Annotated[
        str | None, Query(description="One SKU; omit for all.", examples=["SKU-00001"])
    ] = None,
    store_id: Annotated[
        str | None, Query(description="One store; omit for all.", examples=["S001"])
    ] = None,
    start: Annotated[
        str | None,
        Query(
            description="First period, inclusive: ISO date or datetime (UTC if no offset). "
            "Default: 30 days (day) or 48 hours (hour) before end. Years 1900 to 2999.",
            examples=["2024-05-01"],
            json_schema_extra=DATE_OR_TIME,
        ),
    ] = None,
    end: Annotated[
        str | None,
        Query(
            description="Last period, inclusive (a date includes its whole day). Default: now. "
            "Years 1900 to 2999.",
            examples=["2024-05-31"],
            json_schema_extra=DATE_OR_TIME,
        ),
    ] = None,
    granularity: Annotated[
        str,
        Query(
            description="`day` or `hour` (UTC).",
            examples=["day"],
            json_schema_extra={"enum": ["day", "hour"]},
        ),
    ] = "day",
) -> SalesAnswer:
    """Units, revenue and order lines per period, summed over the dimensions not filtered.

    Exact merge: the batch views of the latest published run plus the speed
    layer's partials for every event at or above that run's offset watermark.
    """
    rng = sales_range(start, end, granularity, today=service.today(), now=service.clock())
    sku, store_id = check_id(sku, "sku"), check_id(store_id, "store_id")
    return await service.answer(lambda: service.sales(sku=sku, store_id=store_id, rng=rng))
