"""``GET /v1/forecast/{sku}`` and ``GET /v1/forecast``: the batch forecast of one node of the
hierarchy (a SKU at a store, a SKU, a store, the total) with its bounds, and merged recent
actuals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from serving.deps import get_service
from serving.models import ForecastAnswer
from serving.params import (
    DEFAULT_ACTUALS_DAYS,
    EXAMPLE_SKU,
    EXAMPLE_STORE,
    MAX_HORIZON_DAYS,
    check_id,
    check_int,
)
from serving.service import QueryService

router = APIRouter(prefix="/v1", tags=["forecast"])


HorizonQ = Annotated[
    int | None,
    Query(description=f"Days ahead from today, 1 to {MAX_HORIZON_DAYS} (default 28)."),
]
ActualsDaysQ = Annotated[
    int | None,
    Query(description=f"Recent days of actuals, today included (default {DEFAULT_ACTUALS_DAYS})."),
]


async def _answer(
    service: QueryService,
    sku: str | None,
    store_id: str | None,
    horizon: int | None,
    actuals_days: int | None,
) -> ForecastAnswer:
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


@router.get(
    "/forecast/{sku:path}", response_model=ForecastAnswer, summary="Demand forecast vs. actuals"
)
async def get_forecast(
    service: Annotated[QueryService, Depends(get_service)],
    sku: Annotated[str, Path(description="The SKU (it may contain `/`).", examples=[EXAMPLE_SKU])],
    store_id: Annotated[
        str | None,
        Query(description="One store; omit for the SKU over all stores.", examples=[EXAMPLE_STORE]),
    ] = None,
    horizon: HorizonQ = None,
    actuals_days: ActualsDaysQ = None,
) -> ForecastAnswer:
    """Forecast points of a SKU at one store, or over all stores, from the latest run for the
    actuals window and ``horizon`` days ahead, with the merged (batch + speed) daily units of
    recent days, today included."""
    return await _answer(service, check_id(sku, "sku") or sku, store_id, horizon, actuals_days)


@router.get("/forecast", response_model=ForecastAnswer, summary="Store or total demand forecast")
async def get_total_forecast(
    service: Annotated[QueryService, Depends(get_service)],
    store_id: Annotated[
        str | None,
        Query(description="One store's total over all SKUs; omit for the grand total."),
    ] = None,
    horizon: HorizonQ = None,
    actuals_days: ActualsDaysQ = None,
) -> ForecastAnswer:
    """The forecast of one store over all SKUs, or of everything, with the merged actuals of
    recent days (the same shape as a SKU's forecast)."""
    return await _answer(service, None, store_id, horizon, actuals_days)
