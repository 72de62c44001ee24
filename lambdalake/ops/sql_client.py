"""``lambdalake sql``: a statement sent to a running API's ``POST /v1/sql``, its answer
printed as a table, CSV or JSON.

>>> api_url(Settings(_env_file=None, api_host="10.0.0.5", api_port=9000))
'http://10.0.0.5:9000'
"""

from __future__ import annotations

import json
import sys
from typing import Any

from lambdalake.errors import InvalidInput, OperationFailed, Unreachable
from lambdalake.settings import Settings

OUTPUTS = ("table", "csv", "json")


def api_url(settings: Settings) -> str:
    """``LAMBDALAKE_API_URL``, else ``http://LAMBDALAKE_API_HOST:LAMBDALAKE_API_PORT``."""
    if settings.api_url:
        return settings.api_url.rstrip("/")
    return f"http://{settings.api_host}:{settings.api_port}"


def run_sql(sql: str, *, url: str, api_key: str | None, output: str, timeout: float) -> None:
    """POST the statement and print the answer; a refusal or failure is one line
    (:class:`InvalidInput` for the API's 4xx, :class:`Unreachable` when nobody answers)."""
    import httpx

    if output not in OUTPUTS:
        raise InvalidInput(f"--format {output!r}; use one of {', '.join(OUTPUTS)}")
    headers = {"X-API-Key": api_key} if api_key else {}
    body = {"sql": sql, "format": "csv" if output == "csv" else "json"}
    try:
        r = httpx.post(f"{url}/v1/sql", json=body, headers=headers, timeout=timeout)
    except httpx.TransportError as exc:
        raise Unreachable(
            f"no API at {url} ({type(exc).__name__}); start `lambdalake serve` "
            "or set --api / LAMBDALAKE_API_URL"
        ) from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text[:300]
        message = f"{r.status_code}: {detail}"
        raise (InvalidInput if r.status_code < 500 else OperationFailed)(message)
    if output == "csv":
        sys.stdout.write(r.text)
        return
    answer = r.json()
    if output == "json":
        sys.stdout.write(json.dumps(answer) + "\n")
        return
    _print_table(answer)


def _print_table(answer: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in answer["columns"]:
        numeric = any(k in col["type"] for k in ("INT", "DOUBLE", "DECIMAL", "FLOAT"))
        table.add_column(col["name"], justify="right" if numeric else "left")
    for row in answer["rows"]:
        table.add_row(*("" if v is None else str(v) for v in row))
    console = Console()
    console.print(table)
    as_of = answer["as_of"]
    note = f"{len(answer['rows'])} rows, run {as_of['run_id']}"
    if answer.get("truncated"):
        note += ", truncated (LAMBDALAKE_SQL_MAX_ROWS)"
    if answer.get("degraded"):
        note += f", degraded: missing {answer['missing_partitions']}"
    console.print(note, style="dim")
