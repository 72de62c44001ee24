"""``/dashboard``: the page an analyst opens first.

Per SKU: the merged sales history with the batch forecast and its 80 / 95 % bands
and today's live actuals, the sentiment mix and its weekly trend (merged, from
``/v1/sentiment-weeks``), the demand
alerts, and a freshness banner (batch run age, speed lag). The page is static
HTML + JavaScript that calls the public API (so it shows exactly what an analyst
would get from it); charts are drawn with Chart.js, vendored from the npm
registry (``static/chart.umd.min.js``, MIT) so the page works offline.

One small helper endpoint lives here, not in the public ``/v1`` API: the SKU list
of the served run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

from lambdalake.contract.views import ALL
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
