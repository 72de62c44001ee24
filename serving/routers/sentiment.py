"""``GET /v1/sentiment/{sku}``, the ranking ``GET /v1/sentiment?order=worst|best`` and a
SKU's weeks, ``GET /v1/sentiment-weeks/{sku}``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query

from serving.deps import get_service
from serving.models import SentimentAnswer, SentimentRanking, SentimentWeeks
from serving.params import EXAMPLE_SKU, MAX_RANKING_LIMIT, check_id, check_int, week_range
from serving.service import QueryService

router = APIRouter(prefix="/v1", tags=["sentiment"])


@router.get("/sentiment", response_model=SentimentRanking, summary="SKUs ranked by sentiment")
async def get_sentiment_ranking(
    service: Annotated[QueryService, Depends(get_service)],
    order: Annotated[
        Literal["worst", "best"],
        Query(description="`worst` (lowest mean sentiment first) or `best`."),
    ] = "worst",
    limit: Annotated[
        int | None, Query(description=f"Items to return, 1 to {MAX_RANKING_LIMIT} (default 10).")
    ] = None,
    min_reviews: Annotated[
        int | None, Query(description="Only SKUs with at least this many reviews (default 1).")
    ] = None,
) -> SentimentRanking:
    """SKUs ordered by merged mean sentiment (ties by sku)."""
    top = check_int(limit, "limit", low=1, high=MAX_RANKING_LIMIT, default=10)
    least = check_int(min_reviews, "min_reviews", low=1, high=10**9, default=1)
    return await service.answer(
        lambda: service.sentiment_ranking(order=order, limit=top, min_reviews=least)
    )


@router.get(
    "/sentiment/{sku:path}", response_model=SentimentAnswer, summary="Review sentiment of a SKU"
)
async def get_sentiment(
    service: Annotated[QueryService, Depends(get_service)],
    sku: Annotated[str, Path(description="The SKU (it may contain `/`).", examples=[EXAMPLE_SKU])],
) -> SentimentAnswer:
    """Review count, mean rating, mean sentiment and label counts (batch + speed merged).
    An unknown SKU answers zero reviews and null means."""
    sku = check_id(sku, "sku") or sku
    return await service.answer(lambda: service.sentiment(sku=sku))


@router.get(
    "/sentiment-weeks/{sku:path}",
    response_model=SentimentWeeks,
    summary="Review sentiment of a SKU per ISO week",
)
async def get_sentiment_weeks(
    service: Annotated[QueryService, Depends(get_service)],
    sku: Annotated[str, Path(description="The SKU (it may contain `/`).", examples=[EXAMPLE_SKU])],
    start: Annotated[
        str | None,
        Query(description="A date in the first week (default: 25 weeks before `end`'s week)."),
    ] = None,
    end: Annotated[
        str | None, Query(description="A date in the last week (default: today, UTC).")
    ] = None,
) -> SentimentWeeks:
    """Per ISO week (`week` = its Monday, UTC) from `start`'s week to `end`'s: review count,
    mean rating, mean sentiment and label counts, batch + speed merged. Weeks without
    reviews are left out; at most 530 weeks per answer (`MAX_WEEK_POINTS`)."""
    sku = check_id(sku, "sku") or sku
    first, last = week_range(start, end, today=service.today())
    return await service.answer(lambda: service.sentiment_weeks(sku=sku, first=first, last=last))
