"""``GET /v1/forecast/{sku}``: the batch forecast with its bounds, and merged recent actuals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from serving.deps import get_service
from serving.models import ForecastAnswer
from serving.params import (
    DEFAULT_ACTUALS_DAYS,
    MAX_HORIZON_DAYS,
    check_id,
    check_int,
)
from serving.service import QueryService

router = APIRouter(prefix="/v1", tags=["forecast"])


@router.get(
    "/forecast/{sku:path}", response_model=ForecastAnswer, summary="Demand forecast vs. actuals"
)
async def get_forecast(
    service: Annotated[QueryService, Depends(get_service)],
    sku: Annotated[str, Path(description="The SKU (it may contain `/`).", examples=["SKU-00001"])],
    store_id: Annotated[
        str | None,
        Query(
            description="One store; omit for the sum over stores (no bounds).", examples=["S001"]
        ),
    ] = None,
    horizon: Annotated[
        int | None,
        Query(description=f"Days ahead from today, 1 to {MAX_HORIZON_DAYS} (default 28)."),
    ] = None,
    actuals_days: Annotated[
        int | None,
        Query(
            description=f"Recent days of actuals, today included (default {DEFAULT_ACTUALS_DAYS})."
        ),
    ] = None,
) -> ForecastAnswer:
    """Forecast points from the latest run for the actuals window and ``horizon`` days ahead,
    with the merged (batch + speed) daily units of recent days, today included."""
    sku = check_id(sku, "sku") or sku
    store_id = check_id(store_id, "store_id")
    days_ahead = check_int(horizon, "horizon", low=1, high=MAX_HORIZON_DAYS, default=28)
    days_back = check_int(
        actuals_days, "actuals_days", low=1, high=MAX_HORIZON_DAYS, default=DEFAULT_ACTUALS_DAYS
    )
    return await service.answer(
        lambda: service.forecast(
            sku=sku, store_id=store_id, horizon=days_ahead, actuals_days=days_back
        )
    )
