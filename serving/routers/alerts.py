"""``GET /v1/alerts/demand``: today's demand outside the forecast's 95 % interval, ranked, paged."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from serving.deps import get_service
from serving.models import AlertsAnswer
from serving.params import DEFAULT_ALERTS_LIMIT, MAX_ALERTS_LIMIT, AlertsQuery, check_int
from serving.service import LATE_DAY_FRACTION, LOW_FACTOR, QueryService

router = APIRouter(prefix="/v1", tags=["alerts"])

DESCRIPTION = (
    "Series (sku, store) whose merged units today already exceed the forecast's upper 95 % "
    f"bound (`above_upper_95`), or, after {int(LATE_DAY_FRACTION * 24)}:00 UTC, are below "
    f"{LOW_FACTOR} x the lower 95 % bound pro-rated to the time of day (`below_lower_95`). "
    "Ranked by `severity` (how far past the bound, in half-widths of the 95 % interval), "
    "worst first; `total` counts them all, `next_cursor` pages on."
)


@router.get(
    "/alerts/demand",
    response_model=AlertsAnswer,
    summary="Demand alerts for today, worst first",
    description=DESCRIPTION,
)
async def get_demand_alerts(
    service: Annotated[QueryService, Depends(get_service)],
    limit: Annotated[
        int | None,
        Query(
            description=f"Alerts per page; default {DEFAULT_ALERTS_LIMIT}, at most "
            f"{MAX_ALERTS_LIMIT:,}."
        ),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="An answer's `next_cursor`, with the same `limit`: the next page, as "
            "of the first page's `as_of` and time."
        ),
    ] = None,
) -> AlertsAnswer:
    q = AlertsQuery(
        limit=check_int(limit, "limit", low=1, high=MAX_ALERTS_LIMIT, default=DEFAULT_ALERTS_LIMIT),
        cursor=cursor,
    )
    q.decoded_cursor()  # a bad cursor is a 400 before any work
    return await service.answer(lambda: service.demand_alerts(q))
