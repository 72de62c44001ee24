"""``POST /v1/sql``: one read-only DuckDB statement over the merged views (see
:mod:`serving.sql` for the tables and the sandbox)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import pyarrow as pa
from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serving.deps import get_service
from serving.formats import FORMATS, MEDIA_TYPES, answer_headers, negotiate, table_body
from serving.models import Answer
from serving.service import QueryService
from serving.sql import (
    TABLES,
    SqlBusy,
    SqlFailed,
    SqlLimit,
    SqlLimits,
    SqlRefused,
    check_statement,
    json_value,
)

router = APIRouter(prefix="/v1", tags=["sql"])


class SqlRequest(BaseModel):
    sql: str = Field(
        description="One SELECT (or WITH ... SELECT) statement in DuckDB's dialect over the "
        "tables " + ", ".join(TABLES) + ".",
        examples=[
            "SELECT p.category, date_trunc('week', s.period) AS week, sum(s.units) AS units "
            "FROM sales_daily s JOIN products p USING (sku) "
            "WHERE s.period >= current_date - INTERVAL 90 DAY GROUP BY ALL ORDER BY ALL"
        ],
    )
    format: str | None = Field(
        None, description="`json` (default), `csv`, `parquet` or `arrow`; or send `Accept`."
    )


class SqlColumn(BaseModel):
    name: str
    type: str = Field(description="DuckDB's type name, e.g. BIGINT, DOUBLE, VARCHAR, DATE.")


class SqlAnswer(Answer):
    columns: list[SqlColumn]
    rows: list[list[Any]]
    truncated: bool = Field(description="More rows than LAMBDALAKE_SQL_MAX_ROWS: cut there.")


@router.post(
    "/sql",
    response_model=SqlAnswer,
    summary="SQL over the merged views (read-only, sandboxed)",
    responses={
        200: {
            "content": {media: {} for name, media in MEDIA_TYPES.items() if name != "json"},
            "description": "JSON by default; CSV, Parquet or Arrow IPC with `format` or "
            "`Accept` (then `as_of` is in the `X-As-Of` header).",
        },
        400: {"description": "A refused or failing statement, with the reason."},
        422: {"description": "The statement hit the time or memory limit."},
        429: {"description": "As many statements as allowed are running; retry."},
    },
)
async def post_sql(
    request: Request,
    service: Annotated[QueryService, Depends(get_service)],
    body: Annotated[SqlRequest, Body()],
) -> Any:
    """Runs one read-only statement over `sales_hourly`, `sales_daily`, `products`, `stores`,
    `review_scores`, `forecast` and `forecast_accuracy`: each the exact merge of the latest
    run's view and the speed layer's events at or above its watermark (what the endpoints
    answer), all read at one `as_of`. See `docs/sql.md`."""
    settings = service.settings
    metrics = request.app.state.metrics
    started = time.perf_counter()
    outcome = "ok"
    try:
        form = negotiate(body.format, request.headers.get("accept"))
        stmt = check_statement(body.sql)
        limits = SqlLimits(
            timeout_s=settings.sql_timeout_s,
            max_rows=settings.sql_max_rows,
            memory_limit=settings.sql_memory_limit,
        )
        gate = request.app.state.sql_gate  # LAMBDALAKE_SQL_CONCURRENCY statements at once
        if not gate.acquire(blocking=False):
            raise SqlBusy(
                f"{settings.sql_concurrency} statements are running in this process "
                "(LAMBDALAKE_SQL_CONCURRENCY); retry in a second"
            )
        metrics.sql_running.inc()
        try:
            result, merged = await run_in_threadpool(service.sql, stmt, limits)
        finally:
            metrics.sql_running.dec()
            gate.release()
    except SqlRefused as exc:
        outcome = "refused"
        return _error(400, str(exc))
    except SqlFailed as exc:
        outcome = "failed"
        return _error(400, str(exc))
    except SqlLimit as exc:
        outcome = exc.kind
        return _error(422, str(exc))
    except SqlBusy as exc:
        outcome = "busy"
        return _error(429, str(exc), {"Retry-After": "1"})
    finally:
        metrics.sql_statements.labels(outcome).inc()
        metrics.sql_seconds.labels(outcome).observe(time.perf_counter() - started)
    table: pa.Table = result.table
    answer = SqlAnswer(
        columns=[
            SqlColumn(name=n, type=t) for n, t in zip(table.column_names, result.types, strict=True)
        ],
        rows=[],
        truncated=result.truncated,
        as_of=merged.as_of,
        degraded=merged.degraded,
        missing_partitions=merged.missing,
    )
    if form != "json":
        return Response(
            content=table_body(table, form),
            media_type=MEDIA_TYPES[form],
            headers={**answer_headers(answer), "X-Truncated": str(result.truncated).lower()},
        )
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = [[json_value(c[r]) for c in columns] for r in range(table.num_rows)]
    content = answer.model_dump(mode="json")
    content["rows"] = rows
    return JSONResponse(content=content)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message}, headers=headers)


__all__ = ["FORMATS", "router"]
