"""Where every table lives in the lake, and the Arrow schemas that are the lake's contract.

Python processes do their Delta I/O with delta-rs (``deltalake``), the batch layer's Spark
with delta-spark; this module only names things.

>>> Lake("/tmp/lake").table("master/orders")
'/tmp/lake/master/orders'
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from lambdalake.contract.events import EVENT_DATE, FIELDS_BY_TOPIC, TOPICS, timed
from lambdalake.contract.views import PRODUCTS, SALES, SENTIMENT, STORES, aggregate_tables

MASTER_ORDERS = "master/orders"
MASTER_REVIEWS = "master/reviews"
MASTER_PRODUCTS = "master/products"
MASTER_STORES = "master/stores"
QUARANTINE = "quarantine"
RUNS = "runs"
# The aggregate views' tables are named by their definitions (``lambdalake.contract.views``).
VIEW_DAILY_SALES = SALES.tables["day"]
VIEW_HOURLY_SALES = SALES.tables["hour"]
VIEW_WEEKLY_SALES = SALES.tables["week"]
VIEW_MONTHLY_SALES = SALES.tables["month"]
VIEW_SENTIMENT_BY_SKU = SENTIMENT.tables[None]
VIEW_SENTIMENT_WEEKLY = SENTIMENT.tables["week"]
DIM_PRODUCTS = PRODUCTS.tables[None]
DIM_STORES = STORES.tables[None]
VIEW_DEMAND_FORECAST = "views/demand_forecast"
VIEW_FORECAST_ACCURACY = "views/forecast_accuracy"
VIEW_REVIEW_SCORES = "views/review_scores"
MODELS_SENTIMENT = "models/sentiment"


@dataclass(frozen=True)
class PublishedView:
    """What every reader may rely on of one view a batch run publishes."""

    table: str
    key: tuple[str, ...]  # the columns that identify a row; none of them is ever empty
    unique: bool = True  # no two rows share the key (a duplicate double-counts in any sum)


# The views every batch run publishes (and lists in its ``runs`` row); the data-quality gate
# and table maintenance take their list from here. Each aggregate table, with its key, comes
# from its view definition.
PUBLISHED_VIEWS = (
    *(PublishedView(table, view.table_key(grain)) for view, grain, table in aggregate_tables()),
    PublishedView(VIEW_REVIEW_SCORES, ("review_id", "sku")),
    # Every level's rows: "*" stands for the key an aggregate sums over, so keys stay unique.
    PublishedView(VIEW_DEMAND_FORECAST, ("sku", "store_id", "date")),
    PublishedView(VIEW_FORECAST_ACCURACY, ("sku", "store_id")),
)
BATCH_VIEWS = tuple(v.table for v in PUBLISHED_VIEWS)

MASTER_TABLE_BY_TOPIC = {
    "orders": MASTER_ORDERS,
    "reviews": MASTER_REVIEWS,
    "products": MASTER_PRODUCTS,
    "stores": MASTER_STORES,
}

UTC_TS = pa.timestamp("us", tz="UTC")

# Columns every master row carries besides the event's own (and ``event_date``).
LINEAGE_FIELDS = [
    pa.field("_topic", pa.string(), nullable=False),
    pa.field("_partition", pa.int32(), nullable=False),
    pa.field("_offset", pa.int64(), nullable=False),
    pa.field("_ingested_at", UTC_TS, nullable=False),
]

# A master table: the topic's fields, ``event_date`` (a timed topic's, its partition
# column), the lineage. Reference data has no time: its tables are not partitioned.
MASTER_SCHEMA_BY_TOPIC = {
    topic: pa.schema(
        [*FIELDS_BY_TOPIC[topic], *([EVENT_DATE] if timed(topic) else []), *LINEAGE_FIELDS]
    )
    for topic in TOPICS
}
MASTER_ORDERS_SCHEMA = MASTER_SCHEMA_BY_TOPIC["orders"]
MASTER_REVIEWS_SCHEMA = MASTER_SCHEMA_BY_TOPIC["reviews"]
# The column each master table is partitioned by (none for reference data).
MASTER_PARTITION_BY = {t: (["event_date"] if timed(t) else None) for t in TOPICS}

QUARANTINE_SCHEMA = pa.schema(
    [
        *LINEAGE_FIELDS,
        pa.field("raw", pa.binary(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class Lake:
    """The lake root (a local path or an object-store URI) and its storage options."""

    root: str
    storage_options: dict[str, str] | None = None

    def table(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def master(self, topic: str) -> str:
        return self.table(MASTER_TABLE_BY_TOPIC[topic])
