"""The serving API: ``create_app(settings)`` builds it, ``serve(settings, host=, port=)`` runs it.

>>> from lambdalake.settings import Settings
>>> app = create_app(Settings(lake_uri="/tmp/lake"))  # doctest: +SKIP
>>> serve(Settings(), host="127.0.0.1", port=8000)  # doctest: +SKIP

``running_server(app)`` runs an app with uvicorn in a thread (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from lambdalake.logs import get_logger
from lambdalake.memory import long_lived
from lambdalake.ops.net import free_port
from lambdalake.ops.status import StatusCache
from lambdalake.settings import Settings
from serving import dashboard
from serving.admission import AdmissionControl, AdmissionLimits, StampingHttpToolsProtocol
from serving.deps import check_api_keys, require_api_key
from serving.loop import PromptEventLoop
from serving.metrics import ApiMetrics
from serving.params import InvalidParameter
from serving.routers import alerts, forecast, reference, sales, sentiment, sql, system
from serving.served_run import BatchCache, ViewMissing
from serving.service import CursorExpired, QueryService
from serving.speed_client import SpeedClient

log = get_logger(__name__)

DESCRIPTION = """
One query API over the Lambda architecture: every answer is the batch views of
the latest published run merged, exactly at the offset watermark, with the speed
layer's partial aggregates of the events after it.

Every answer carries `as_of` (the batch `run_id`, its `watermark`, and the
`speed_offsets` included) so it can be reproduced. When a speed worker cannot be
reached the answer says so: `"degraded": true` and `missing_partitions`.

Set `LAMBDALAKE_API_KEYS` to require an `X-API-Key` header on everything but
`/health` (this page and `/openapi.json` included).

An overloaded process refuses what it cannot answer in time: `503` with
`Retry-After` and a JSON `detail`, in well under 10 ms.
"""


class MetricsMiddleware:
    """Pure ASGI middleware: request latency by route template (bounded label values)."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(
                scope.get("method", ""), path, status_code, time.perf_counter() - start
            )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body")]
        name = ".".join(loc) or "request"
        parts.append(f"invalid parameter {name!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] | None = None,
    poll_seconds: float = 1.0,
    speed_timeout: float = 2.0,
    speed_cache_ttl: float = 0.25,
    speed_stale_grace: float = 0.25,
    admission: AdmissionLimits | bool | None = True,
) -> FastAPI:
    """The FastAPI app over ``settings``' lake and speed workers.

    ``clock`` replaces "now" (alerts and default ranges) in tests; the batch
    cache polls the runs table every ``poll_seconds``; each speed worker's partial
    view is fetched at most every ``speed_cache_ttl`` seconds (0 = one worker query
    per request), and answered from for up to ``speed_stale_grace`` more seconds
    while a background fetch replaces it (see :mod:`serving.speed_client`). ``admission``:
    the per-process limits of :mod:`serving.admission` (``True``: from ``settings``;
    ``None``/``False``: none). Raises ``ValueError`` for an example or too short API key.
    """
    check_api_keys(settings.api_key_set)
    batch = BatchCache(settings, poll_seconds=poll_seconds)
    speed = SpeedClient(
        settings,
        timeout=speed_timeout,
        cache_ttl=speed_cache_ttl,
        stale_grace=speed_stale_grace,
    )
    metrics = ApiMetrics(settings, batch)
    service = QueryService(
        settings,
        batch,
        speed,
        clock=clock,
        on_degraded=lambda kind: metrics.degraded.labels(kind).inc(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        try:
            batch.refresh()
        except Exception as exc:  # still start: /health and /v1/status say what is wrong
            log.warning("serving.batch_initial_load_failed", error=f"{type(exc).__name__}: {exc}")
        batch.start()
        try:
            yield
        finally:
            batch.stop()
            speed.close()

    app = FastAPI(
        title="lambdalake",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served below behind the API key, like every other route but /health.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    # SQL statements running at once in this process; the next is refused (429).
    app.state.sql_gate = threading.BoundedSemaphore(settings.sql_concurrency)
    app.state.batch = batch
    app.state.status = StatusCache(settings)  # /v1/status: one read a second at most

    auth = [Depends(require_api_key)]
    for module in (sales, reference, sql, forecast, sentiment, alerts):
        app.include_router(module.router, dependencies=auth)
    app.include_router(system.router)
    app.include_router(dashboard.router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lambdalake API")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="lambdalake API")

    @app.exception_handler(InvalidParameter)
    async def invalid_parameter(request: Request, exc: InvalidParameter) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(CursorExpired)
    async def cursor_expired(request: Request, exc: CursorExpired) -> JSONResponse:
        return JSONResponse(status_code=410, content={"detail": str(exc)})

    @app.exception_handler(ViewMissing)
    async def view_missing(request: Request, exc: ViewMissing) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": _validation_message(exc)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("serving.error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return JSONResponse(
            status_code=500, content={"detail": "internal error; the server log has the cause"}
        )

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    limits = admission_limits(settings) if admission is True else admission or None
    if limits is not None:  # outermost of ours: a refusal costs no routing, no metrics timer
        app.add_middleware(
            AdmissionControl,
            limits=limits,
            on_refused=metrics.on_refused,
        )
    return app


def admission_limits(settings: Settings) -> AdmissionLimits:
    return AdmissionLimits(
        max_in_flight=settings.api_max_in_flight,
        max_queued=settings.api_max_queued,
        max_queue_seconds=settings.api_max_queue_ms / 1000,
        max_wait_seconds=settings.api_max_wait_ms / 1000,
        burst=settings.api_burst,
        starts_per_turn=settings.api_starts_per_turn,
    )


# The standard library's event loop, not uvloop: under overload uvloop left new connections
# in the accept queue for seconds (they trickled in a few at a time, never a backlog by the
# waiting count, so they were answered late instead of shed), while asyncio accepts them
# within the batch. Measured at 4x the
# sustainable point-query rate: admitted p99 0.8-3.4 s with uvloop, 20 ms with asyncio, at
# the same throughput (docs/serving.md).
SERVING_LOOP = "serving.loop:PromptEventLoop"  # asyncio's, polling between callbacks

SETTINGS_ENV = "LAMBDALAKE_SERVE_SETTINGS"  # the parent's settings, for worker processes


def configure_loop(settings: Settings) -> None:
    """This process's API event loop polls every ``LAMBDALAKE_API_CALLBACKS_PER_POLL``
    callbacks (:mod:`serving.loop`; 0: once per turn)."""
    PromptEventLoop.callbacks_per_poll = settings.api_callbacks_per_poll or sys.maxsize


def app_from_environment() -> FastAPI:
    """The app of one ``serve --workers N`` process: the parent's settings, as JSON."""
    import json

    values = json.loads(os.environ[SETTINGS_ENV])
    long_lived()
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    configure_loop(settings)
    return create_app(settings)


def serve(settings: Settings, *, host: str, port: int, workers: int = 1) -> None:
    """Run the API with uvicorn until stopped (SIGINT/SIGTERM).

    ``workers`` > 1 runs that many processes on one socket (uvicorn's supervisor),
    each with its own app, caches and admission limits."""
    check_api_keys(settings.api_key_set)  # one line before anything starts
    log.info("serving.start", host=host, port=port, lake=settings.lake_uri, workers=workers)
    configure_loop(settings)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 5,
        "http": StampingHttpToolsProtocol,
        "loop": SERVING_LOOP,
    }
    if workers <= 1:
        uvicorn.run(create_app(settings), **options)
        return
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    uvicorn.run("serving.app:app_from_environment", factory=True, workers=workers, **options)


@contextlib.contextmanager
def running_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread; yields its base URL; stops it on exit."""
    port = port or free_port(host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http=StampingHttpToolsProtocol,
        loop=SERVING_LOOP,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
