"""BI readers: every view reads the same with DuckDB (through delta-rs) and polars, and the
examples in docs/bi.md run.

The lake is the one a real ``airflow dags test lambdalake_batch`` left (built once per
session by ``test_dags_batch.published_lake``): real Spark output, real Delta commits.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import polars as pl
import pytest
from deltalake import DeltaTable

from lambdalake.contract.lake import (
    RUNS,
    VIEW_DAILY_SALES,
    VIEW_DEMAND_FORECAST,
    VIEW_FORECAST_ACCURACY,
    VIEW_HOURLY_SALES,
    VIEW_REVIEW_SCORES,
    VIEW_SENTIMENT_BY_SKU,
    Lake,
)
from lambdalake.contract.manifest import RunRecord, latest_published_run
from tests.test_dags_batch import PublishedLake, published_lake

ROOT = Path(__file__).resolve().parents[1]
# Each view's key: the columns that identify a row (what BI tools group and join on).
KEYS = {
    VIEW_DAILY_SALES: ["date", "store_id", "sku"],
    VIEW_HOURLY_SALES: ["hour", "store_id", "sku"],
    VIEW_DEMAND_FORECAST: ["sku", "store_id", "date"],
    VIEW_FORECAST_ACCURACY: ["sku", "store_id"],
    VIEW_REVIEW_SCORES: ["review_id"],
    VIEW_SENTIMENT_BY_SKU: ["sku"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> PublishedLake:
    lake = published_lake(tmp_path_factory)
    assert lake.returncode == 0, lake.output[-3000:]
    return lake


@pytest.fixture(scope="module")
def served(built: PublishedLake) -> RunRecord:
    run = latest_published_run(Lake(built.settings.lake_uri).table(RUNS))
    assert run is not None
    return run


def _duckdb_read(uri: str, version: int) -> pl.DataFrame:
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    con.register("view", DeltaTable(uri, version=version).to_pyarrow_dataset())
    return pl.from_arrow(con.execute("SELECT * FROM view").to_arrow_table())


@pytest.mark.slow
@pytest.mark.parametrize("view", list(KEYS))
def test_each_view_reads_the_same_with_duckdb_and_polars(
    built: PublishedLake, served: RunRecord, view: str
) -> None:
    uri = Lake(built.settings.lake_uri).table(view)
    version = served.view_versions[view]

    via_duckdb = _duckdb_read(uri, version).sort(KEYS[view])
    via_polars = pl.read_delta(uri, version=version).sort(KEYS[view])

    assert via_duckdb.height == served.row_counts[view] > 0
    assert via_duckdb.columns == via_polars.columns
    assert via_duckdb.equals(via_polars)
    assert via_polars.select(pl.col(KEYS[view]).null_count()).sum_horizontal().item() == 0
    assert via_polars.select(pl.col(KEYS[view])).is_duplicated().sum() == 0
    assert via_polars["run_id"].unique().to_list() == [served.run_id]


@pytest.mark.slow
def test_daily_sales_in_bi_add_up_to_the_orders_the_run_read(
    built: PublishedLake, served: RunRecord
) -> None:
    uri = Lake(built.settings.lake_uri).table(VIEW_DAILY_SALES)
    con = duckdb.connect()
    con.register("daily_sales", DeltaTable(uri).to_pyarrow_dataset())
    (lines,) = con.execute("SELECT sum(order_lines) FROM daily_sales").fetchone()
    assert lines == served.row_counts["orders"]


def _doc_examples() -> list[str]:
    text = (ROOT / "docs" / "bi.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [b for b in blocks if "not run by the tests" not in b]


def test_the_bi_page_has_runnable_examples() -> None:
    assert len(_doc_examples()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_docs_bi_examples_run_against_a_real_lake(built: PublishedLake, index: int) -> None:
    code = _doc_examples()[index]
    assert 'lake = "./lake"' in code
    code = code.replace('lake = "./lake"', f"lake = {built.settings.lake_uri!r}")
    exec(compile(code, f"docs/bi.md example {index + 1}", "exec"), {})
