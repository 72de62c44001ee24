"""``/dashboard``: the page an analyst opens first.

Per SKU: the merged sales history with the batch forecast and its 80 / 95 % bands
and today's live actuals, the sentiment mix and its weekly trend, the demand
alerts, and a freshness banner (batch run age, speed lag). The page is static
HTML + JavaScript that calls the public API (so it shows exactly what an analyst
would get from it); charts are drawn with Chart.js, vendored from the npm
registry (``static/chart.umd.min.js``, MIT) so the page works offline.

Two small helper endpoints live here, not in the public ``/v1`` API: the SKU list
of the served run and a SKU's weekly sentiment trend (batch view, cached per run).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

from lambdalake.lake import VIEW_REVIEW_SCORES, Lake
from lambdalake.views import ALL
from serving.deps import refuse_key_in_url, require_api_key

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"chart.umd.min.js", "dashboard.js", "dashboard.css"}

router = APIRouter(tags=["dashboard"], include_in_schema=True)


# The page runs only its own files: no inline script or style, no other origin, no
# framing, no plugins. Data never reaches the DOM as HTML (dashboard.js sets text only).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@router.get(
    "/dashboard",
    response_class=HTMLResponse,
    summary="The analyst dashboard",
    description="A static page (no data in it): with API keys set, it asks for a key, keeps "
    "it in the tab's sessionStorage and sends it as `X-API-Key`; every data call needs it. "
    "A key in the URL is refused.",
)
def dashboard_page(request: Request) -> HTMLResponse:
    refuse_key_in_url(request)
    return HTMLResponse((STATIC / "index.html").read_text(), headers=SECURITY_HEADERS)


@router.get("/dashboard/static/{name}", include_in_schema=False)
def dashboard_static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    media = "text/css" if name.endswith(".css") else "application/javascript"
    return FileResponse(STATIC / name, media_type=media, headers=SECURITY_HEADERS)


@router.get(
    "/dashboard/api/skus",
    dependencies=[Depends(require_api_key)],
    summary="SKUs and stores of the served run (for the dashboard's selector)",
)
def dashboard_skus(request: Request) -> dict[str, Any]:
    snap = request.app.state.batch.current()
    skus: set[str] = set()
    stores: set[str] = set()
    for name in ("forecast", "sales_day"):
        table = snap.tables.get(name)
        if table is None:
            continue
        skus.update(table.spans)
        if table.table.num_rows and "store_id" in table.table.column_names:
            stores.update(table.table.column("store_id").unique().to_pylist())
    # The forecast's aggregate levels carry ALL ("*") for "every SKU" or "every store".
    skus.discard(ALL)
    stores.discard(ALL)
    return {"run_id": snap.run_id, "skus": sorted(skus), "stores": sorted(s for s in stores if s)}


class SentimentTrends:
    """Weekly mean sentiment per SKU from the served run's ``views/review_scores``,
    read once per run (one instance per app: ``app.state.sentiment_trends``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run_id: str | None = None
        self._by_sku: dict[str, list[dict[str, Any]]] = {}

    def get(self, lake: Lake, run: Any, sku: str) -> list[dict[str, Any]]:
        with self._lock:
            if run is None:
                return []
            if run.run_id != self._run_id:
                self._by_sku = self._load(lake, run)
                self._run_id = run.run_id
            return self._by_sku.get(sku, [])

    @staticmethod
    def _load(lake: Lake, run: Any) -> dict[str, list[dict[str, Any]]]:
        import duckdb
        from deltalake import DeltaTable

        version = run.view_versions.get(VIEW_REVIEW_SCORES)
        if version is None:
            return {}
        scores = (
            DeltaTable(
                lake.table(VIEW_REVIEW_SCORES),
                version=int(version),
                storage_options=lake.storage_options,
            )
            .to_pyarrow_dataset()
            .to_table(columns=["sku", "event_time", "sentiment", "rating"])
        )
        con = duckdb.connect()
        con.execute("SET TimeZone='UTC'")
        con.register("scores", scores)
        rows = con.execute(
            "SELECT sku, CAST(date_trunc('week', event_time) AS DATE) AS week, COUNT(*) AS reviews,"
            " AVG(sentiment) AS mean_sentiment, AVG(rating) AS mean_rating"
            " FROM scores GROUP BY ALL ORDER BY sku, week"
        ).fetchall()
        out: dict[str, list[dict[str, Any]]] = {}
        for sku, week, n, sentiment, rating in rows:
            out.setdefault(sku, []).append(
                {
                    "week": week.isoformat(),
                    "reviews": int(n),
                    "mean_sentiment": float(sentiment),
                    "mean_rating": float(rating),
                }
            )
        return out


@router.get(
    "/dashboard/api/sentiment-trend/{sku:path}",
    dependencies=[Depends(require_api_key)],
    summary="A SKU's weekly mean sentiment (batch view of the served run)",
)
def dashboard_sentiment_trend(request: Request, sku: Annotated[str, "SKU"]) -> dict[str, Any]:
    state = request.app.state
    snap = state.batch.current()
    lake = Lake(state.settings.lake_uri)
    return {
        "sku": sku,
        "run_id": snap.run_id,
        "weeks": state.sentiment_trends.get(lake, snap.run, sku),
    }
