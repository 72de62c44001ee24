"""Benchmark: one full batch run (Spark) next to the same work in one process (DuckDB).

    .venv/bin/python bench/batch.py                        # 2 years x 200 SKUs x 10 stores
    .venv/bin/python bench/batch.py --days 90 --skus 20 --stores 3   # a quick check
    .venv/bin/python bench/batch.py --maintenance          # also: compaction, both engines

Master tables are generated straight into a temporary lake (``batch.synthetic``:
the master schema, partitioned by day, with ingest positions), then

* **spark**: ``batch.run.run_batch`` with a fresh session (``--master``,
  default ``local[*]``; delta-spark reads the pinned master versions and writes
  the views), per-stage seconds as the run recorded them;
* **duckdb**: the same stages in this one process: delta-rs reads the same
  snapshot, DuckDB deduplicates and aggregates with the same SQL definitions
  (``lambdalake.contract.views``), the same sentiment training and scorer, the same
  ``forecast_series`` over all series at once, and delta-rs writes the views;
* **maintenance** (``--maintenance``): ``lambdalake maintenance compact`` on a
  copy of the master tables rewritten as ``--commits`` small ingest commits,
  once per engine (delta-rs, then delta-spark; the Spark session's start is
  reported apart).

Prints a table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("LAMBDALAKE_LOG_LEVEL", "WARNING")


def _stages() -> tuple[str, ...]:
    from batch.run import STAGES as RUN_STAGES

    return tuple(s for s in RUN_STAGES if s not in ("pin", "publish"))


STAGES = _stages()


def build(lake_root: Path, days: int, skus: int, stores: int, seed: int) -> dict:
    from batch.synthetic import SalesSpec, build_master
    from lambdalake.contract.lake import Lake

    spec = SalesSpec(days=days, skus=skus, stores=stores, end_date=date(2026, 10, 31), seed=seed)
    t0 = time.perf_counter()
    written = build_master(Lake(str(lake_root)), spec, commits=4)
    return {
        "orders": written["orders"].num_rows,
        "reviews": written["reviews"].num_rows,
        "series": skus * stores,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run_spark(lake_root: Path, master: str) -> dict:
    from batch.run import run_batch
    from batch.spark import get_spark
    from lambdalake.contract.lake import RUNS, Lake
    from lambdalake.contract.manifest import latest_published_run
    from lambdalake.settings import Settings

    settings = Settings(_env_file=None, lake_uri=str(lake_root), spark_master=master)  # type: ignore[call-arg]
    t0 = time.perf_counter()
    spark = get_spark(settings)
    startup = time.perf_counter() - t0
    try:
        run_batch(settings, spark=spark)
    finally:
        spark.stop()
    run = latest_published_run(Lake(str(lake_root)).table(RUNS))
    assert run is not None
    stages = {k: float(v) for k, v in run.stage_seconds.items()}
    stages["session_start"] = round(startup, 2)
    return {"stages": stages, "row_counts": run.row_counts}


def run_duckdb(lake_root: Path, out_root: Path) -> dict:
    """The batch run's work in one process: delta-rs + DuckDB + the same models."""
    import duckdb
    import pyarrow as pa

    # Imports are not part of the work measured (Spark's workers import in their daemon).
    import sklearn.linear_model  # noqa: F401
    import statsforecast.models  # noqa: F401
    import vaderSentiment.vaderSentiment  # noqa: F401
    from deltalake import DeltaTable, write_deltalake

    from batch.forecast import forecast_series
    from batch.sentiment_train import train_sentiment
    from lambdalake.contract.lake import Lake
    from lambdalake.contract.views import SALES, SENTIMENT

    lake = Lake(str(lake_root))
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'").fetchall()
    con.execute(f"SET threads={os.cpu_count() or 1}").fetchall()

    def stage(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 3)

    def write(name: str, table: pa.Table) -> None:
        write_deltalake(str(out_root / name), table, mode="overwrite")

    t = time.perf_counter()
    for topic, key in (("orders", "event_id"), ("reviews", "review_id")):
        ds = DeltaTable(lake.master(topic)).to_pyarrow_dataset()
        con.register(f"master_{topic}", ds)
        con.execute(
            f"CREATE TABLE {topic} AS SELECT * FROM master_{topic} QUALIFY row_number() "
            f"OVER (PARTITION BY {key} ORDER BY _offset, _partition) = 1"
        ).fetchall()
        counts[topic] = con.execute(f"SELECT count(*) FROM {topic}").fetchall()[0][0]
    stage("read", t)

    t = time.perf_counter()
    daily = con.sql(
        f"SELECT * RENAME (period AS date) FROM ({SALES.aggregate_sql('orders')})"
    ).to_arrow_table()
    write("daily_sales", daily)
    counts["daily_sales"] = daily.num_rows
    stage("daily_sales", t)

    t = time.perf_counter()
    hourly = con.sql(
        f"SELECT * RENAME (period AS hour) FROM "
        f"({SALES.aggregate_sql('orders', granularity='hour')})"
    ).to_arrow_table()
    write("hourly_sales", hourly)
    counts["hourly_sales"] = hourly.num_rows
    stage("hourly_sales", t)

    t = time.perf_counter()
    sample = con.execute(
        "SELECT text, title, rating FROM reviews ORDER BY review_id LIMIT 100000"
    ).df()
    model = train_sentiment(sample).model
    stage("sentiment_train", t)

    t = time.perf_counter()
    reviews = con.execute(
        "SELECT review_id, sku, event_time, rating, title, text FROM reviews"
    ).df()
    sentiment, label = model.score(reviews["text"].tolist(), reviews["title"].tolist())
    scores = reviews.drop(columns=["title", "text"]).assign(
        sentiment=sentiment, label=label, model_version=model.version
    )
    con.register("scores", scores)
    write("review_scores", pa.Table.from_pandas(scores, preserve_index=False))
    counts["review_scores"] = len(scores)
    stage("review_scores", t)

    t = time.perf_counter()
    derived = ", ".join(d.sql() for d in SENTIMENT.derived)
    by_sku = con.sql(
        f"SELECT *, {derived} FROM ({SENTIMENT.aggregate_sql('scores', granularity=None)})"
    ).to_arrow_table()
    write("sentiment_by_sku", by_sku)
    stage("sentiment_by_sku", t)

    t = time.perf_counter()
    daily_df = daily.select(["sku", "store_id", "date", "units"]).to_pandas()
    last = daily_df["date"].max()
    result = forecast_series(daily_df, last)
    write("demand_forecast", pa.Table.from_pandas(result.forecasts, preserve_index=False))
    write("forecast_accuracy", pa.Table.from_pandas(result.accuracy, preserve_index=False))
    counts["series"] = len(result.accuracy)
    stage("forecast", t)
    seconds["total"] = round(sum(seconds.values()), 3)
    return {"stages": seconds, "row_counts": counts}


def run_maintenance(work: Path, days: int, skus: int, stores: int, seed: int, commits: int,
                    master: str) -> dict:  # fmt: skip
    """Compaction of the same many-commit master tables by each engine."""
    from batch.maintenance import compact
    from batch.spark import get_spark
    from batch.synthetic import SalesSpec, synthetic_orders, synthetic_reviews, write_master
    from lambdalake.contract.lake import Lake
    from lambdalake.settings import Settings

    spec = SalesSpec(days=days, skus=skus, stores=stores, end_date=date(2026, 10, 31), seed=seed)
    orders = synthetic_orders(spec)
    reviews = synthetic_reviews(spec, orders)
    source = work / "maintenance-source"
    write_master(Lake(str(source)), "orders", orders, partitions=spec.partitions, commits=commits)
    write_master(Lake(str(source)), "reviews", reviews, partitions=spec.partitions, commits=commits)
    out: dict = {"commits": commits}
    for engine in ("delta-rs", "spark"):
        root = work / f"maintenance-{engine}"
        shutil.copytree(source, root)
        settings = Settings(_env_file=None, lake_uri=str(root), spark_master=master)  # type: ignore[call-arg]
        spark = None
        if engine == "spark":
            t0 = time.perf_counter()
            spark = get_spark(settings)
            out["spark_session_start"] = round(time.perf_counter() - t0, 2)
        try:
            t0 = time.perf_counter()
            stats = compact(settings, retention_hours=168, engine=engine, spark=spark)  # type: ignore[arg-type]
            out[engine] = {
                "seconds": round(time.perf_counter() - t0, 2),
                "files": {t: [s["files_before"], s["files_after"]] for t, s in stats.items()},
            }
        finally:
            if spark is not None:
                spark.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--days", type=int, default=730)
    ap.add_argument("--skus", type=int, default=200)
    ap.add_argument("--stores", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--skip-duckdb", action="store_true")
    ap.add_argument("--skip-spark", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary lake")
    ap.add_argument("--maintenance", action="store_true", help="also time compaction per engine")
    ap.add_argument("--commits", type=int, default=200, help="ingest commits for --maintenance")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lambdalake-bench-batch-"))
    try:
        print(f"building master tables in {work} ...", file=sys.stderr)
        data = build(work / "lake", args.days, args.skus, args.stores, args.seed)
        print(f"  {data}", file=sys.stderr)
        spark = {"stages": {"session_start": 0.0}, "row_counts": {}}
        if not args.skip_spark:
            print("spark run ...", file=sys.stderr)
            spark = run_spark(work / "lake", args.master)
        duck = None
        if not args.skip_duckdb:
            print("duckdb run ...", file=sys.stderr)
            duck = run_duckdb(work / "lake", work / "duckdb-views")

        maintenance = None
        if args.maintenance:
            print("maintenance (compaction per engine) ...", file=sys.stderr)
            maintenance = run_maintenance(work, args.days, args.skus, args.stores, args.seed,
                                          args.commits, args.master)  # fmt: skip

        n_series = spark["row_counts"].get("views/forecast_accuracy", data["series"])
        cores = os.cpu_count() or 1
        print(f"\n{args.days} days x {args.skus} SKUs x {args.stores} stores: "
              f"{data['orders']:,} order lines, {data['reviews']:,} reviews, {n_series:,} series, "
              f"{cores} cores, master {args.master}")  # fmt: skip
        print(f"{'stage':<18}{'spark s':>10}{'duckdb s':>10}")
        for name in (*STAGES, "total"):
            s = spark["stages"].get(name)
            d = duck["stages"].get(name) if duck else None
            print(f"{name:<18}{s if s is not None else '-':>10}{d if d is not None else '-':>10}")
        print(f"{'(session start)':<18}{spark['stages']['session_start']:>10}")
        fc = spark["stages"].get("forecast") or 0
        rate = {
            "spark_series_per_s": round(n_series / fc, 1) if fc else None,
            "spark_series_per_s_per_core": round(n_series / fc / cores, 1) if fc else None,
        }
        if duck:
            dfc = duck["stages"]["forecast"]
            rate["duckdb_series_per_s_one_core"] = round(n_series / dfc, 1) if dfc else None
        print(f"forecast rate: {rate}")
        if maintenance:
            print(f"maintenance: {maintenance}")
        print(
            json.dumps(
                {
                    "args": vars(args),
                    "machine": {"cores": cores, "python": platform.python_version()},
                    "data": data,
                    "spark": spark,
                    "duckdb": duck,
                    "forecast_rate": rate,
                    "maintenance": maintenance,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
