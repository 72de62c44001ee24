"""The reference data as it is now: ``GET /v1/products`` and ``GET /v1/stores``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from serving.deps import get_service
from serving.models import ProductsAnswer, StoresAnswer
from serving.params import EXAMPLE_CATEGORY, EXAMPLE_REGION, label_list
from serving.service import QueryService

router = APIRouter(prefix="/v1", tags=["reference data"])


@router.get("/products", response_model=ProductsAnswer, summary="The product catalog, current")
async def get_products(
    service: Annotated[QueryService, Depends(get_service)],
    category: Annotated[
        list[str] | None,
        Query(
            description="Only these categories (repeat or comma list).", examples=[EXAMPLE_CATEGORY]
        ),
    ] = None,
) -> ProductsAnswer:
    """Each SKU's current record: the last `products` message of the SKU (by offset), the
    batch run's `dims/products` merged with the speed layer's messages since its watermark.
    Sorted by SKU."""
    categories = label_list(category, "category")
    return await service.answer(lambda: service.products(categories))


@router.get("/stores", response_model=StoresAnswer, summary="The stores, current")
async def get_stores(
    service: Annotated[QueryService, Depends(get_service)],
    region: Annotated[
        list[str] | None,
        Query(description="Only these regions (repeat or comma list).", examples=[EXAMPLE_REGION]),
    ] = None,
) -> StoresAnswer:
    """Each store's current record (the last `stores` message of the store), sorted by id."""
    regions = label_list(region, "region")
    return await service.answer(lambda: service.stores(regions))
