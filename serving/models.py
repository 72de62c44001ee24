"""Pydantic models of every API answer (they are the OpenAPI schema, with examples)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer

from serving.params import GROUP_FIELDS

_WATERMARK_EXAMPLE: Any = {"orders": {"0": 1200, "1": 1175}, "reviews": {"0": 310, "1": 298}}


class AsOf(BaseModel):
    """What an answer was computed from, so it can be reproduced."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "run_id": "20240501T120000Z-3f2a",
                "watermark": _WATERMARK_EXAMPLE,
                "speed_offsets": {"orders": {"0": 1250, "1": 1190}},
            }
        }
    )

    run_id: str | None = Field(description="The batch run whose views were used (null: none yet).")
    watermark: dict[str, dict[str, int]] = Field(
        description="The run's watermark: per topic and partition, the exclusive upper offset "
        "the batch views cover."
    )
    speed_offsets: dict[str, dict[str, int]] = Field(
        description="Per topic and partition, the exclusive upper offset of the speed partials "
        "included (events in [watermark, speed_offset) came from the speed layer)."
    )


class Answer(BaseModel):
    """Fields every answer carries."""

    as_of: AsOf
    degraded: bool = Field(
        False,
        description="True when a speed worker was unreachable: the answer lacks the recent "
        "events of `missing_partitions`.",
    )
    missing_partitions: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Per topic, the partitions whose recent events are not in the answer.",
    )


class SalesPoint(BaseModel):
    period: str = Field(
        description="The period's start: a UTC date (day), the ISO week's Monday (week), the "
        "month's first day (month), or an hour start `YYYY-MM-DDTHH:00:00Z` (hour)."
    )
    sku: str | None = Field(None, description="With `group_by` including `sku` only.")
    store_id: str | None = Field(None, description="With `group_by` including `store_id` only.")
    category: str | None = Field(
        None,
        description="With `group_by` including `category` only: the SKU's category as the "
        "`products` topic says now (null for SKUs it has no record of).",
    )
    region: str | None = Field(
        None,
        description="With `group_by` including `region` only: the store's region as the "
        "`stores` topic says now (null for stores it has no record of).",
    )
    units: int = Field(description="sum(quantity); returns subtract.")
    revenue: float = Field(description="sum(quantity * unit_price).")
    order_lines: int = Field(description="count of order lines.")
    # The group fields this point carries (a null category is a value then, not an absence).
    _groups: tuple[str, ...] = PrivateAttr(default=())

    # No return annotation: the OpenAPI schema stays the model's.
    @model_serializer(mode="wrap")
    def _without_absent_groups(self, handler: Any):
        # A point carries the group fields it was broken down by, and no others.
        out = handler(self)
        for name in GROUP_FIELDS:
            if name not in self._groups and out.get(name) is None:
                out.pop(name, None)
        return out


class SalesAnswer(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "points": [
                    {"period": "2024-05-01", "units": 42, "revenue": 1033.5, "order_lines": 37},
                    {"period": "2024-05-02", "units": 38, "revenue": 921.0, "order_lines": 35},
                ],
                "as_of": {
                    "run_id": "20240501T120000Z-3f2a",
                    "watermark": _WATERMARK_EXAMPLE,
                    "speed_offsets": {"orders": {"0": 1250, "1": 1190}},
                },
                "degraded": False,
                "missing_partitions": {},
            }
        }
    )

    points: list[SalesPoint]
    next_cursor: str | None = Field(
        None,
        description="Pass it back as `cursor=` (with the same parameters) for the next page; "
        "null on the last page. Every page is as of the first page's `as_of`.",
    )


class ForecastPoint(BaseModel):
    date: str
    forecast: float
    lower_80: float | None = None
    upper_80: float | None = None
    lower_95: float | None = None
    upper_95: float | None = None


class SeriesAccuracy(BaseModel):
    """How one forecast series scored on the batch layer's backtest (rolling origins on
    its own history, before the forecast was made)."""

    sku: str = Field(description="The SKU, or `*` for a series over all SKUs.")
    store_id: str = Field(description="The store, or `*` for a series over all stores.")
    model: str | None = Field(description="The model that forecasts this series.")
    mase: float | None = Field(
        description="Backtest MASE: mean absolute error over the mean absolute weekly "
        "difference of the history (below 1: better than last week's value)."
    )
    coverage_80: float | None = Field(description="Share of backtest actuals in the 80 % band.")
    coverage_95: float | None = Field(description="Share of backtest actuals in the 95 % band.")
    n_train_days: int | None = Field(description="Days of history the model learned from.")


class ActualPoint(BaseModel):
    date: str
    units: int


class ForecastAnswer(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "sku": "SKU-00001",
                "store_id": "S001",
                "level": "sku_store",
                "model": "FourierETS+LightGBM",
                "accuracy": [
                    {
                        "sku": "SKU-00001",
                        "store_id": "S001",
                        "model": "FourierETS+LightGBM",
                        "mase": 0.71,
                        "coverage_80": 0.82,
                        "coverage_95": 0.96,
                        "n_train_days": 730,
                    }
                ],
                "points": [
                    {
                        "date": "2024-05-02",
                        "forecast": 40.2,
                        "lower_80": 31.0,
                        "upper_80": 49.4,
                        "lower_95": 26.1,
                        "upper_95": 54.3,
                    }
                ],
                "actuals": [{"date": "2024-05-01", "units": 42}],
                "as_of": {"run_id": "20240501T120000Z-3f2a", "watermark": {}, "speed_offsets": {}},
                "degraded": False,
                "missing_partitions": {},
            }
        }
    )

    sku: str | None = Field(description="The SKU, or null for the sum over SKUs.")
    store_id: str | None = Field(description="The store, or null for the sum over stores.")
    level: str = Field(
        description="The level of the hierarchy answered: `sku_store`, `sku` (one SKU over "
        "all stores), `store` (one store over all SKUs) or `total`. The levels are "
        "reconciled: a SKU's forecast is the sum of its stores', day by day."
    )
    model: str | None = Field(description="The model the batch layer chose (null: no forecast).")
    accuracy: list[SeriesAccuracy] = Field(
        default_factory=list,
        description="The backtest of the series answered (its own model, forecast before "
        "reconciliation; empty: no forecast).",
    )
    points: list[ForecastPoint]
    actuals: list[ActualPoint] = Field(description="Merged daily units of recent days.")


class SentimentItem(BaseModel):
    sku: str
    reviews: int
    mean_rating: float | None
    mean_sentiment: float | None = Field(description="Mean sentiment score in [-1, 1].")
    positive: int
    neutral: int
    negative: int


class SentimentAnswer(SentimentItem, Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "sku": "SKU-00001",
                "reviews": 120,
                "mean_rating": 4.1,
                "mean_sentiment": 0.43,
                "positive": 90,
                "neutral": 18,
                "negative": 12,
                "as_of": {"run_id": "20240501T120000Z-3f2a", "watermark": {}, "speed_offsets": {}},
                "degraded": False,
                "missing_partitions": {},
            }
        }
    )


class SentimentRanking(Answer):
    items: list[SentimentItem]


class SentimentWeek(BaseModel):
    week: str = Field(description="The ISO week's Monday, `YYYY-MM-DD` (UTC).")
    reviews: int
    mean_rating: float | None
    mean_sentiment: float | None = Field(description="Mean sentiment score in [-1, 1].")
    positive: int
    neutral: int
    negative: int


class SentimentWeeks(Answer):
    """A SKU's review sentiment per ISO week: weeks without reviews are left out."""

    sku: str
    weeks: list[SentimentWeek]


class DemandAlert(BaseModel):
    sku: str
    store_id: str | None
    kind: str = Field(description="`above_upper_95` or `below_lower_95`.")
    units: int = Field(description="Merged units so far today.")
    forecast: float
    lower_95: float | None
    upper_95: float | None
    threshold: float = Field(
        description="What `units` was compared with: `upper_95`, or for `below_lower_95` "
        "half of `lower_95` pro-rated to the time of day."
    )
    severity: float = Field(
        description="How far past `threshold`, in half-widths of the 95 % interval on that "
        "side (at least one unit): `(units - upper_95) / (upper_95 - forecast)` above, "
        "`(threshold - units) / ((forecast - lower_95) x day_fraction)` below. Items are "
        "ranked by it, worst first."
    )


class AlertsAnswer(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "date": "2024-05-02",
                "day_fraction": 0.8,
                "items": [
                    {
                        "sku": "SKU-00042",
                        "store_id": "S001",
                        "kind": "above_upper_95",
                        "units": 97,
                        "forecast": 40.2,
                        "lower_95": 26.1,
                        "upper_95": 54.3,
                        "threshold": 54.3,
                        "severity": 3.03,
                    }
                ],
                "total": 1,
                "next_cursor": None,
                "as_of": {"run_id": "20240501T120000Z-3f2a", "watermark": {}, "speed_offsets": {}},
                "degraded": False,
                "missing_partitions": {},
            }
        }
    )

    date: str
    day_fraction: float = Field(description="Fraction of the UTC day elapsed when answered.")
    items: list[DemandAlert]
    total: int = Field(description="Alerts in the whole ranking (every page).")
    next_cursor: str | None = Field(
        default=None,
        description="Pass back as `cursor=` (same `limit`) for the next page, computed as of "
        "this answer's `as_of` and time; null on the last page.",
    )


class Health(BaseModel):
    status: str = "ok"
    run_id: str | None = None


class StatusAnswer(BaseModel):
    """The same object as ``lambdalake status --json``."""

    model_config = ConfigDict(extra="allow")

    batch: dict[str, Any]
    speed: dict[str, Any]
    quarantine: dict[str, dict[str, int]]


class ErrorAnswer(BaseModel):
    detail: str


class Product(BaseModel):
    sku: str
    category: str = Field(description="As the SKU's last `products` message says.")
    name: str | None = None
    brand: str | None = None


class Store(BaseModel):
    store_id: str
    region: str = Field(description="As the store's last `stores` message says.")
    name: str | None = None
    city: str | None = None


class ProductsAnswer(Answer):
    """Every product record, current (the last message of each SKU, batch + speed merged)."""

    items: list[Product]

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "items": [
                    {"sku": "SKU-00001", "category": "Kitchen", "name": "Pan", "brand": "Acme"}
                ],
                "as_of": {
                    "run_id": "20260101T000000Z-abc123",
                    "watermark": {},
                    "speed_offsets": {},
                },
                "degraded": False,
                "missing_partitions": {},
            }
        }
    )


class StoresAnswer(Answer):
    """Every store record, current (the last message of each store, batch + speed merged)."""

    items: list[Store]
