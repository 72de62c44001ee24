"""One batch run: pin the master snapshot, recompute every view, train the models, publish.

``run_batch(settings)`` is what ``lambdalake batch run`` (and the Airflow DAG)
calls. Stages, each logged with its counts and seconds:

``pin``              current version, files and ingest positions of each master table
``read``             read exactly those files, deduplicate (lowest offset wins)
``daily_sales``      ``lambdalake.contract.views.SALES`` per day, store and SKU
``hourly_sales``     ``lambdalake.contract.views.SALES`` per UTC hour, store and SKU
``sentiment_train``  the sentiment model from star ratings (or the lexicon), saved
``review_scores``    every review scored in Spark with the broadcast model
``sentiment_by_sku`` ``lambdalake.contract.views.SENTIMENT`` over the scores, all time
``sentiment_weekly`` ``lambdalake.contract.views.SENTIMENT`` over the scores, per ISO week
``forecast``         28-day forecasts of every level (sku x store, sku, store, total), backtest
                     accuracy, reconciled so that the levels add up
``publish``          the ``published`` row in ``runs``

The aggregate stages are not written out one by one: every table of every view definition
(``ViewDef.tables`` in ``lambdalake.contract.views``) is one stage, named after its table, run as
soon as its topic's events (orders; reviews once scored) are ready.

Each view is committed to Delta (by delta-spark) as soon as it is computed, but readers serve
only the views listed by the latest *published* run, so a failure anywhere
leaves the previous run served; the failure is recorded as a ``failed`` row and
raised. A rerun starts clean under a new run id.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import traceback
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from batch.forecast import (
    ACCURACY_COLUMNS,
    ForecastConfig,
    reconcile_collected,
    spark_forecast,
    spark_nodes,
)
from batch.progress import Stages, spark_progress
from batch.publish import RunIdentity, append_run, write_view
from batch.sentiment_train import TrainConfig, train_sentiment
from batch.snapshot import deduplicate, pin_snapshot, read_pinned
from lambdalake.contract.events import REFERENCE_TOPICS
from lambdalake.contract.lake import (
    MASTER_TABLE_BY_TOPIC,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_REVIEW_SCORES,
    Lake,
)
from lambdalake.contract.manifest import RunRecord
from lambdalake.contract.views import PERIOD_COLUMN, SALES, VIEWS_BY_TOPIC, Granularity, ViewDef
from lambdalake.errors import InvalidInput
from lambdalake.logs import get_logger
from lambdalake.sentiment import SentimentModel
from lambdalake.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = get_logger("batch")


def _stage(table: str) -> str:
    """An aggregate table's stage: its name (``views/daily_sales`` -> ``daily_sales``)."""
    return table.rsplit("/", 1)[-1]


def aggregate_stages(topic: str) -> list[tuple[ViewDef, Granularity | None, str]]:
    """``(view, grain, table)`` of each aggregate table over ``topic``'s events, in the
    order the run writes them (coarsest grain first)."""
    return [(v, g, v.tables[g]) for v in VIEWS_BY_TOPIC[topic] for g in reversed(v.grains)]


STAGES = (
    "pin",
    "read",
    *(_stage(t) for topic in REFERENCE_TOPICS for _, _, t in aggregate_stages(topic)),
    *(_stage(t) for _, _, t in aggregate_stages("orders")),
    "sentiment_train",
    "review_scores",
    *(_stage(t) for _, _, t in aggregate_stages("reviews")),
    "forecast",
    "publish",
)
SERIES_PER_BUCKET = 50
# The reconciled forecasts as the driver hands them back to Spark (``reconcile_levels``).
LEVEL_FORECAST_SCHEMA = (
    "sku string, store_id string, date date, forecast double, lower_80 double, "
    "upper_80 double, lower_95 double, upper_95 double, model string, level string"
)


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after_stage`` test hook."""


def _check_injection(stage: str, fail_after_stage: str | None) -> None:
    if fail_after_stage == stage:
        raise InjectedFailure(f"injected failure after stage {stage!r}")


def _temp_name(what: str, run_id: str) -> str:
    return f"lambdalake_{what}_" + re.sub(r"\W", "_", run_id)


def aggregate_frame(
    spark: SparkSession,
    events: DataFrame,
    view: ViewDef,
    granularity: Granularity | None,
    run_id: str,
) -> DataFrame:
    """The rows of ``view``'s table at ``granularity`` from deduplicated ``events`` (orders,
    or scored reviews): its partials, derived measures and ``run_id``, the period column named
    as ``PERIOD_COLUMN`` says."""
    from pyspark.sql import functions as F

    name = _temp_name(view.topic, run_id)
    events.createOrReplaceTempView(name)
    sql = view.aggregate_sql(name, granularity=granularity)
    if view.derived:
        sql = f"SELECT *, {', '.join(d.sql() for d in view.derived)} FROM ({sql})"
    df = spark.sql(sql)
    if granularity is not None:
        df = df.withColumnRenamed("period", PERIOD_COLUMN[granularity])
    return df.withColumn("run_id", F.lit(run_id))


SCORES_SCHEMA = (
    "review_id string, sku string, event_time timestamp, rating int, sentiment double, "
    "label string, model_version string"
)


def score_reviews(spark: SparkSession, reviews: DataFrame, model: SentimentModel) -> DataFrame:
    """Score every review in Spark with ``model`` (broadcast), as ``SentimentModel.score`` does."""
    import pandas as pd

    bc = spark.sparkContext.broadcast(model)

    def score(batches: Any) -> Any:
        m = bc.value
        for pdf in batches:
            titles = [None if t is None or t != t else t for t in pdf["title"].tolist()]
            sentiment, label = m.score(pdf["text"].tolist(), titles)
            yield pd.DataFrame(
                {
                    "review_id": pdf["review_id"],
                    "sku": pdf["sku"],
                    "event_time": pdf["event_time"],
                    "rating": pdf["rating"].astype("int32"),
                    "sentiment": sentiment,
                    "label": label.astype(object),
                    "model_version": m.version,
                }
            )

    cols = ["review_id", "sku", "event_time", "rating", "title", "text"]
    return reviews.select(*cols).mapInPandas(score, schema=SCORES_SCHEMA)


def forecast_frames(
    spark: SparkSession,
    daily: DataFrame,
    cfg: ForecastConfig,
    run_id: str,
    info: dict[str, Any],
    persist: Any,
) -> tuple[DataFrame, DataFrame, str]:
    """Forecast every level of the hierarchy from ``daily`` (with a progress bar), coherent.

    Each (sku, store) series, each SKU over all stores, each store over all SKUs and the
    total are forecast in Spark, then reconciled on the driver (the forecasts are a few
    rows per series). Returns the ``demand_forecast`` and ``forecast_accuracy`` rows (with
    ``level`` and ``run_id``) and the reconciliation used; ``info`` receives the counts.
    """
    from pyspark.sql import functions as F

    # The forecast origin: the last complete day with sales, before today (UTC) on the run's
    # clock. Not a future date (one far-future order must not pad every series to its date),
    # and not today either: a run during the day would otherwise train on today's partial
    # sales as a whole day and forecast from tomorrow, leaving today without a forecast (and
    # the day's alerts without bounds).
    today = datetime.now(UTC).date()
    last, n_series = daily.agg(
        F.max(F.when(F.col("date") < F.lit(today), F.col("date"))),
        F.countDistinct("sku", "store_id"),
    ).collect()[0]
    last = last or date(1970, 1, 1)
    nodes = persist(spark_nodes(daily, last))
    n_nodes = nodes.select("sku", "store_id").distinct().count()
    parallelism = spark.sparkContext.defaultParallelism
    # About SERIES_PER_BUCKET series per Python call, and at least two tasks per core.
    buckets = max(1, min(n_nodes, max(2 * parallelism, math.ceil(n_nodes / SERIES_PER_BUCKET))))
    result = persist(spark_forecast(nodes, last, cfg, buckets=buckets))
    t0 = time.perf_counter()
    with spark_progress(spark, f"forecast-{run_id}", "forecast", log, unit="task"):
        result.count()
    seconds = time.perf_counter() - t0
    held = None
    if cfg.reconcile == "auto":
        cut = last - timedelta(days=cfg.horizon)
        held = nodes.where(F.col("date") > F.lit(cut)).toPandas()
    collected = result.where("kind <> 'accuracy'").toPandas()
    t1 = time.perf_counter()
    levels = reconcile_collected(collected, held, cfg)
    info["series"] = n_series
    info["nodes"] = n_nodes
    info["buckets"] = buckets
    info["series_per_second"] = int(n_nodes / seconds) if seconds > 0 else 0
    info["reconcile"] = levels.method
    info["reconcile_seconds"] = round(time.perf_counter() - t1, 3)
    for method, score in levels.holdout_mase.items():
        info[f"holdout_mase_{method}"] = round(score, 4)
    run_col = F.lit(run_id)
    fc = spark.createDataFrame(levels.forecasts, schema=LEVEL_FORECAST_SCHEMA)
    fc = fc.withColumn("run_id", run_col)
    acc = (
        result.where("kind = 'accuracy'")
        .select(*ACCURACY_COLUMNS, "level")
        .withColumn("run_id", run_col)
    )
    return fc, acc, levels.method


def _training_sample(reviews: DataFrame, n_reviews: int, cap: int) -> Any:
    from pyspark.sql import functions as F

    df = reviews.select("review_id", "text", "title", "rating")
    if n_reviews > cap:
        # A deterministic sample: the same snapshot always trains on the same reviews.
        df = df.orderBy(F.xxhash64("review_id")).limit(cap)
    pdf: Any = df.toPandas()  # pandas (pyspark's stubs type it as a protocol)
    pdf = pdf.sort_values("review_id").reset_index(drop=True)
    return pdf[["text", "title", "rating"]]


def run_batch(
    settings: Settings,
    spark: SparkSession | None = None,
    *,
    forecast_config: ForecastConfig | None = None,
    train_config: TrainConfig | None = None,
    fail_after_stage: str | None = None,
) -> str:
    """Run one batch over the current master snapshot and publish it; returns the run id.

    ``spark``: an existing session to use (one is created, and stopped, otherwise).
    ``fail_after_stage``: test hook, raise after the named stage (any of ``STAGES`` but
    ``publish``).
    Raises on any failure, after recording the run as ``failed``.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from batch.spark import get_spark

    if fail_after_stage is not None and fail_after_stage not in STAGES[:-1]:
        raise InvalidInput(
            f"fail_after_stage must be one of {STAGES[:-1]}, not {fail_after_stage!r}"
        )
    lake = Lake(settings.lake_uri)
    fcfg = forecast_config or ForecastConfig()
    tcfg = train_config or TrainConfig()
    run = RunIdentity.new()
    record = RunRecord(run_id=run.run_id, status="running", started_at=run.started_at)
    stages = Stages(log, run.run_id)
    own_spark = spark is None
    session = spark or get_spark(settings)
    cached: list[DataFrame] = []
    t_start = time.perf_counter()
    log.info("batch.start", run_id=run.run_id, lake=settings.lake_uri, master=settings.spark_master)

    def persist(df: DataFrame) -> DataFrame:
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(df)
        return df

    try:
        with stages.stage("pin") as info:
            snapshot = pin_snapshot(lake)
            record.master_versions = snapshot.master_versions
            record.watermark = snapshot.watermark
            for topic, pin in snapshot.pins.items():
                info[f"{topic}_version"] = -1 if pin.version is None else pin.version
                info[f"{topic}_files"] = len(pin.files)
                if pin.version is None:
                    record.notes.append(f"{MASTER_TABLE_BY_TOPIC[topic]} absent: no events yet")
        append_run(lake, record)
        _check_injection("pin", fail_after_stage)

        with stages.stage("read") as info:
            orders = persist(deduplicate(read_pinned(session, snapshot.pins["orders"]), "orders"))
            reviews = persist(
                deduplicate(read_pinned(session, snapshot.pins["reviews"]), "reviews")
            )
            # Reference data is not deduplicated: every message is a version of its id's
            # record, and the last one wins (the views' ``last`` measures).
            references = {
                t: persist(read_pinned(session, snapshot.pins[t])) for t in REFERENCE_TOPICS
            }
            info["orders"] = orders.count()
            info["reviews"] = reviews.count()
            for topic, df in references.items():
                info[topic] = df.count()
        record.row_counts.update({t: info[t] for t in ("orders", "reviews", *REFERENCE_TOPICS)})
        _check_injection("read", fail_after_stage)

        frames = {"orders": orders, **references}
        files_by_grain = {
            "hour": session.sparkContext.defaultParallelism,
            "week": 1,
            "month": 1,
            None: 1,
        }

        def write_aggregates(topic: str) -> None:
            for view, grain, table in aggregate_stages(topic):
                with stages.stage(_stage(table)) as info:
                    df = aggregate_frame(session, frames[topic], view, grain, run.run_id)
                    if view is SALES and grain == "day":  # the forecasts' history
                        df = frames["daily"] = persist(df)
                    version, rows = write_view(
                        df, lake, table, run, files=files_by_grain.get(grain)
                    )
                    record.view_versions[table] = version
                    record.row_counts[table] = info["rows"] = rows
                _check_injection(_stage(table), fail_after_stage)

        for topic in REFERENCE_TOPICS:
            write_aggregates(topic)
        write_aggregates("orders")

        with stages.stage("sentiment_train") as info:
            sample = _training_sample(reviews, record.row_counts["reviews"], tcfg.max_train_reviews)
            outcome = train_sentiment(sample, tcfg)
            model = outcome.model
            model.save(lake)
            record.model_versions["sentiment"] = model.version
            if outcome.note:
                record.notes.append(outcome.note)
            info["labelled"] = len(sample)
            info["model"] = model.version
            trained = outcome.metrics.get("trained")
            if isinstance(trained, dict):
                info["macro_f1"] = round(float(trained["macro_f1"]), 4)
        _check_injection("sentiment_train", fail_after_stage)

        with stages.stage("review_scores") as info:
            scores = persist(score_reviews(session, reviews, model))
            version, rows = write_view(
                scores.withColumn("run_id", F.lit(run.run_id)), lake, VIEW_REVIEW_SCORES, run
            )
            record.view_versions[VIEW_REVIEW_SCORES] = version
            record.row_counts[VIEW_REVIEW_SCORES] = info["rows"] = rows
        _check_injection("review_scores", fail_after_stage)

        frames["reviews"] = scores
        write_aggregates("reviews")

        with stages.stage("forecast") as info:
            daily = frames["daily"]
            fc, acc, method = forecast_frames(session, daily, fcfg, run.run_id, info, persist)
            files = max(1, session.sparkContext.defaultParallelism)
            version, rows = write_view(fc, lake, VIEW_DEMAND_FORECAST, run, files=files)
            record.view_versions[VIEW_DEMAND_FORECAST] = version
            record.row_counts[VIEW_DEMAND_FORECAST] = info["rows"] = rows
            version, rows = write_view(acc, lake, VIEW_FORECAST_ACCURACY, run, files=1)
            record.view_versions[VIEW_FORECAST_ACCURACY] = version
            record.row_counts[VIEW_FORECAST_ACCURACY] = rows
            record.model_versions["forecast"] = f"{_forecast_version(fcfg)}/levels:{method}"
        _check_injection("forecast", fail_after_stage)

        with stages.stage("publish"):
            record.stage_seconds = dict(stages.seconds)
            record.stage_seconds["total"] = round(time.perf_counter() - t_start, 3)
            record.status = "published"
            record.published_at = datetime.now(UTC)
            append_run(lake, record)
        log.info(
            "batch.published",
            run_id=run.run_id,
            seconds=round(time.perf_counter() - t_start, 3),
            views=record.view_versions,
        )
        return run.run_id
    except BaseException as exc:
        _record_failure(lake, record, stages, exc, t_start)
        raise
    finally:
        for df in cached:
            with contextlib.suppress(Exception):  # the session may already be gone
                df.unpersist()
        if own_spark:
            session.stop()


def _forecast_version(cfg: ForecastConfig) -> str:
    """What made the forecasts: libraries, how smooth series are combined (the mean of the
    ensemble's models, or one selected per series), the intermittent candidates, history
    and backtest. E.g. ``statsforecast-2.1.1+lightgbm-4.7.0/mean(FourierETS+LightGBM)/
    short(FourierETS+SARIMA)/select(SeasonalNaive+CrostonOptimized+TSB+ADIDA)/train1095d/
    bt4x28d`` (``short``: the members of smooth series without a year of history)."""
    from importlib.metadata import version

    libs = "+".join(f"{name}-{version(name)}" for name in ("statsforecast", "lightgbm"))
    return (
        f"{libs}/{cfg.combine}({cfg.ensemble_name})"
        f"/short({cfg.for_short().ensemble_name})"
        f"/select({'+'.join(cfg.intermittent_models)})"
        f"/train{cfg.train_days}d/bt{cfg.backtest_windows}x{cfg.backtest_horizon}d"
    )


def _record_failure(
    lake: Lake, record: RunRecord, stages: Stages, exc: BaseException, t_start: float
) -> None:
    record.status = "failed"
    record.published_at = None
    record.stage_seconds = dict(stages.seconds)
    record.stage_seconds["total"] = round(time.perf_counter() - t_start, 3)
    record.error = f"{type(exc).__name__}: {exc}"[:2000]
    log.error(
        "batch.failed",
        run_id=record.run_id,
        error=record.error,
        trace=traceback.format_exc(limit=5)[-2000:],
    )
    try:
        append_run(lake, record)
    except Exception as write_error:  # the original failure matters more
        log.error("batch.failed_record_not_written", run_id=record.run_id, error=str(write_error))
