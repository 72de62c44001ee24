"""``POST /v1/sql`` and ``lambdalake sql``: answers equal a recompute, hostile statements are
refused without touching the file system, and the time, row and concurrency limits hold.

The served run is the one ``tests/test_serving_api.py`` writes (orders with redeliveries,
products and stores records with ids they leave out); the merge with a live speed layer,
through batch runs and restarts, is checked by the invariant suite."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.app import create_app, running_server
from tests.test_serving_api import (
    CATEGORY,
    NOW,
    REGION,
    forecast_table,
    make_orders,
    recompute,
    settings_at,
    write_run,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 2.0
MAX_ROWS = 50


@pytest.fixture(scope="module")
def sql_api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("sql") / "lake"
    orders = make_orders()
    write_run(root, "run-1", orders, hourly_view=True)
    settings = settings_at(root, sql_timeout_s=TIMEOUT_S, sql_max_rows=MAX_ROWS, sql_concurrency=1)
    app = create_app(settings, clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, orders, url


def sql(client: httpx.Client, statement: str, **extra: Any) -> httpx.Response:
    return client.post("/v1/sql", json={"sql": statement, **extra})


def rows_by_key(body: dict[str, Any], n_keys: int) -> dict[tuple, tuple]:
    return {tuple(r[:n_keys]): tuple(r[n_keys:]) for r in body["rows"]}


def assert_rows_equal(got: dict[tuple, tuple], want: dict[tuple, tuple[int, float, int]]) -> None:
    assert set(got) == set(want)
    for k, (units, revenue, lines) in want.items():
        assert got[k][0] == units and got[k][2] == lines, k
        assert got[k][1] == pytest.approx(revenue, rel=1e-9), k


@pytest.mark.parametrize(
    ("statement", "group_by"),
    [
        (
            "SELECT CAST(period AS VARCHAR), sum(units), sum(revenue), sum(order_lines) "
            "FROM sales_daily GROUP BY ALL",
            (),
        ),
        (
            "SELECT CAST(date_trunc('week', s.period) AS DATE)::VARCHAR AS week, p.category, "
            "sum(units), sum(revenue), sum(order_lines) FROM sales_daily s "
            "LEFT JOIN products p USING (sku) GROUP BY ALL",
            ("category",),
        ),
        (
            "WITH m AS (SELECT date_trunc('month', period)::DATE::VARCHAR AS month, sku, "
            "store_id, units, revenue, order_lines FROM sales_hourly) "
            "SELECT month, sku, st.region, sum(units), sum(revenue), sum(order_lines) "
            "FROM m LEFT JOIN stores st USING (store_id) GROUP BY ALL",
            ("sku", "region"),
        ),
    ],
)
def test_aggregates_over_the_merged_tables_equal_a_recompute(
    sql_api: Any, statement: str, group_by: tuple[str, ...]
) -> None:
    client, orders, _ = sql_api
    r = sql(client, statement)
    assert r.status_code == 200, r.text
    body = r.json()
    grain = "day" if "week" not in statement and "month" not in statement else None
    grain = grain or ("week" if "'week'" in statement else "month")
    assert_rows_equal(rows_by_key(body, 1 + len(group_by)), recompute(orders, grain, group_by))
    assert body["as_of"]["run_id"] == "run-1" and body["truncated"] is False
    assert [c["type"] for c in body["columns"]][-3:] == ["HUGEINT", "DOUBLE", "HUGEINT"]
    assert all(type(r[-1]) is int for r in body["rows"])  # an integer sum is a JSON integer


def test_reference_tables_are_the_current_records(sql_api: Any) -> None:
    client, _, _ = sql_api
    body = sql(client, "SELECT sku, category, name FROM products ORDER BY sku").json()
    assert body["rows"] == [[k, v, None] for k, v in sorted(CATEGORY.items())]
    body = sql(client, "SELECT store_id, region FROM stores").json()
    assert body["rows"] == [[k, v] for k, v in sorted(REGION.items())]
    body = sql(client, "SELECT level, count(*) FROM forecast GROUP BY ALL").json()
    assert dict(body["rows"]) == {"sku_store": forecast_table("run-1").num_rows}


def test_table_formats_carry_as_of_in_headers(sql_api: Any) -> None:
    client, _, _ = sql_api
    statement = "SELECT sku, sum(units) AS units FROM sales_daily GROUP BY sku ORDER BY sku"
    want = sql(client, statement).json()
    r = sql(client, statement, format="parquet")
    table = pq.read_table(pa.BufferReader(r.content))
    assert [list(row.values()) for row in table.to_pylist()] == want["rows"]
    assert '"run_id":"run-1"' in r.headers["x-as-of"]
    r = client.post(
        "/v1/sql",
        json={"sql": statement},
        headers={"Accept": "application/vnd.apache.arrow.stream"},
    )
    assert pa.ipc.open_stream(r.content).read_all().num_rows == len(want["rows"])
    r = sql(client, statement, format="csv")
    assert r.text.splitlines()[0].replace('"', "") == "sku,units"


def hostile(canary: Path) -> list[str]:
    """Statements that must be refused: one per class, and tricks that hide them."""
    c, d = str(canary), str(canary.parent)
    return [
        # DDL, DML, and everything that is not one SELECT
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO products VALUES ('x', 'y', NULL, NULL)",
        "UPDATE products SET category = 'x'",
        "DELETE FROM products",
        "DROP VIEW products",
        f"COPY (SELECT 1) TO '{d}/out.csv'",
        f"EXPORT DATABASE '{d}/export'",
        f"ATTACH '{d}/other.db' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET memory_limit = '64GB'",
        "RESET memory_limit",
        "PRAGMA database_list",
        "CALL pragma_version()",
        "EXPLAIN SELECT 1",
        "DESCRIBE sales_daily",
        "SUMMARIZE sales_daily",
        "SHOW TABLES",
        "SELECT 1; SELECT 2",
        "SELECT 1; DROP VIEW products",
        # files, the network, the process
        f"SELECT * FROM read_csv('{c}')",
        f"SELECT * FROM read_csv_auto('{c}')",
        f"SELECT * FROM read_text('{c}')",
        f"SELECT * FROM read_parquet('{c}')",
        f"SELECT * FROM read_json('{c}')",
        f"SELECT * FROM '{c}'",
        f"SELECT * FROM glob('{d}/*')",
        "SELECT * FROM read_csv('https://example.com/x.csv')",
        f"SELECT * FROM delta_scan('{d}')",
        "SELECT getenv('HOME')",
        "SELECT current_setting('memory_limit')",
        "SELECT * FROM query('SELECT 1')",
        # the catalog and the sandbox's own inputs
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM main.sales_daily",
        "SELECT * FROM duckdb_tables()",
        "SELECT * FROM duckdb_settings()",
        "SELECT * FROM pg_catalog.pg_tables",
        "SELECT * FROM _ll_b_sales_day",
        "WITH duckdb_settings AS (SELECT 1) SELECT * FROM duckdb_settings",
        "SELECT * FROM (WITH pg_tables AS (SELECT 1) SELECT 1), pg_tables",
        # tricks: comments, case, quoting, unicode look-alikes
        f"/* just a comment */ SELECT * FROM \"read_csv\"('{c}')",
        f"SeLeCt * FrOm ReAd_CsV('{c}')",
        f"SELECT * FROM \"READ_TEXT\"('{c}')",
        "select 1 -- harmless\n; copy (select 1) to '/tmp/x.csv'",
        "SELECT * FROM ѕales_daily",  # a Cyrillic 's'
        f"SELECT * FROM rеad_csv('{c}')",  # a Cyrillic 'е'
        "SELECT \"getenv\"('HOME')",
        "",
        "   ",
    ]


def test_hostile_statements_are_refused_and_touch_nothing(sql_api: Any, tmp_path: Path) -> None:
    client, _, _ = sql_api
    canary = tmp_path / "canary.csv"
    canary.write_text("secret\n42\n")
    stat = canary.stat()
    for statement in hostile(canary):
        r = sql(client, statement)
        assert r.status_code == 400, (statement, r.status_code, r.text)
        assert r.json()["detail"], statement
        assert "\n" not in r.json()["detail"], statement
        assert client.get("/health").status_code == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.csv"]
    # Nothing read it either (the first read after a write moves atime, even with relatime).
    assert canary.stat().st_atime_ns == stat.st_atime_ns
    assert canary.read_text() == "secret\n42\n"
    # And the server answers as before.
    assert sql(client, "SELECT count(*) FROM sales_daily").status_code == 200
    metrics = client.get("/metrics").text
    assert 'lambdalake_sql_statements_total{outcome="refused"}' in metrics


def test_a_runaway_statement_stops_at_the_time_limit_while_others_are_answered(
    sql_api: Any,
) -> None:
    client, _, url = sql_api
    done: dict[str, Any] = {}

    def runaway() -> None:
        with httpx.Client(base_url=url, timeout=60) as other:
            t0 = time.monotonic()
            done["r"] = sql(other, "SELECT count(*) FROM range(100000000) a, range(100000000) b")
            done["s"] = time.monotonic() - t0

    thread = threading.Thread(target=runaway)
    thread.start()
    # Once the runaway holds the one slot (LAMBDALAKE_SQL_CONCURRENCY is 1 here), another
    # statement is refused at once ...
    deadline = time.monotonic() + 10
    while "lambdalake_sql_running 1.0" not in client.get("/metrics").text:
        assert time.monotonic() < deadline and "r" not in done, done
        time.sleep(0.05)
    busy = sql(client, "SELECT 1")
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
    # ... and other questions are answered meanwhile, not after it.
    assert client.get("/v1/sales", params={"start": "2024-05-01"}).status_code == 200
    assert "r" not in done, "the answer waited for the runaway statement"
    thread.join(timeout=30)
    assert done["r"].status_code == 422, done["r"].text
    assert "time" in done["r"].json()["detail"] or "limit" in done["r"].json()["detail"]
    assert done["s"] < TIMEOUT_S + 2.0
    assert sql(client, "SELECT 1").status_code == 200  # the slot is free again


def test_rows_beyond_the_limit_are_cut_and_said_so(sql_api: Any) -> None:
    client, _, _ = sql_api
    body = sql(client, "SELECT * FROM range(1000)").json()
    assert len(body["rows"]) == MAX_ROWS and body["truncated"] is True
    body = sql(client, f"SELECT * FROM range({MAX_ROWS})").json()
    assert len(body["rows"]) == MAX_ROWS and body["truncated"] is False


def test_a_statement_that_fails_says_why(sql_api: Any) -> None:
    client, _, _ = sql_api
    r = sql(client, "SELECT no_such_column FROM sales_daily")
    assert r.status_code == 400 and "no_such_column" in r.json()["detail"]
    r = sql(client, "SELECT 1/0 = 'x'::INTEGER")
    assert r.status_code == 400


def test_the_cli_prints_answers_and_exits_non_zero_on_a_refusal(sql_api: Any) -> None:
    _, _, url = sql_api
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LAMBDALAKE_API_URL": url}
    cmd = [sys.executable, "-m", "lambdalake.cli", "sql"]
    ok = subprocess.run(
        [*cmd, "SELECT sku, count(*) AS n FROM products GROUP BY sku ORDER BY sku", "--format", "csv"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ['"sku","n"', '"A",1', '"B",1']
    table = subprocess.run(
        [*cmd, "SELECT region FROM stores", "--api", url],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert table.returncode == 0 and "west" in table.stdout and "run run-1" in table.stdout
    bad = subprocess.run(
        [*cmd, "DROP VIEW products"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "lambdalake: error: 400: only one read-only statement (SELECT or WITH ... SELECT) is run"
    ]


def doc_examples() -> list[str]:
    text = (ROOT / "docs" / "sql.md").read_text()
    section = text.split("## Examples", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0].strip() for block in section.split("```sql\n")[1:]]


def test_every_example_in_the_docs_runs(sql_api: Any) -> None:
    client, _, _ = sql_api
    examples = doc_examples()
    assert len(examples) >= 6
    for statement in examples:
        r = sql(client, statement)  # as written, the closing semicolon included
        assert r.status_code == 200, (statement, r.text)
        assert r.json()["columns"], statement


def test_api_keys_apply_to_sql(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    write_run(root, "run-1", make_orders(n=50), hourly_view=True)
    key = "k1-0123456789abcdef"
    app = create_app(settings_at(root, api_keys=key), clock=lambda: NOW)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert sql(client, "SELECT 1").status_code == 401
        r = client.post("/v1/sql", json={"sql": "SELECT 1 AS one"}, headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["rows"] == [[1]]
