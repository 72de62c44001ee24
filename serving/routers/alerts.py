"""``GET /v1/alerts/demand``: today's demand outside the forecast's 95 % interval."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from serving.deps import get_service
from serving.models import AlertsAnswer
from serving.service import LATE_DAY_FRACTION, LOW_FACTOR, QueryService

router = APIRouter(prefix="/v1", tags=["alerts"])

DESCRIPTION = (
    "Series (sku, store) whose merged units today already exceed the forecast's upper 95 % "
    f"bound (`above_upper_95`), or, after {int(LATE_DAY_FRACTION * 24)}:00 UTC, are below "
    f"{LOW_FACTOR} x the lower 95 % bound pro-rated to the time of day (`below_lower_95`)."
)


@router.get(
    "/alerts/demand",
    response_model=AlertsAnswer,
    summary="Demand alerts for today",
    description=DESCRIPTION,
)
async def get_demand_alerts(service: Annotated[QueryService, Depends(get_service)]) -> AlertsAnswer:
    return await service.answer(service.demand_alerts)
