"""The serving API: ``create_app(settings)`` builds it, ``serve(settings, host=, port=)`` runs it.

>>> from lambdalake.settings import Settings
>>> app = create_app(Settings(lake_uri="/tmp/lake"))  # doctest: +SKIP
>>> serve(Settings(), host="127.0.0.1", port=8000)  # doctest: +SKIP

``running_server(app)`` runs an app with uvicorn in a thread (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lambdalake.logs import get_logger
from lambdalake.settings import Settings
from serving import dashboard
from serving.batch import BatchCache
from serving.deps import require_api_key
from serving.metrics import ApiMetrics
from serving.params import InvalidParameter
from serving.routers import alerts, forecast, sales, sentiment, system
from serving.service import QueryService
from serving.speed import SpeedClient

log = get_logger(__name__)

DESCRIPTION = """
One query API over the Lambda architecture: every answer is the batch views of
the latest published run merged, exactly at the offset watermark, with the speed
layer's partial aggregates of the events after it.

Every answer carries `as_of` (the batch `run_id`, its `watermark`, and the
`speed_offsets` included) so it can be reproduced. When a speed worker cannot be
reached the answer says so: `"degraded": true` and `missing_partitions`.

Set `LAMBDALAKE_API_KEYS` to require an `X-API-Key` header (`/health` stays open).
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
) -> FastAPI:
    """The FastAPI app over ``settings``' lake and speed workers.

    ``clock`` replaces "now" (alerts and default ranges) in tests; the batch
    cache polls the runs table every ``poll_seconds``; each speed worker's partial
    view is fetched at most every ``speed_cache_ttl`` seconds (0 = one worker query
    per request), and answered from for up to ``speed_stale_grace`` more seconds
    while a background fetch replaces it (see :mod:`serving.speed`).
    """
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
            batch.refresh(force=True)
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
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.batch = batch
    app.state.sentiment_trends = dashboard.SentimentTrends()

    auth = [Depends(require_api_key)]
    for module in (sales, forecast, sentiment, alerts):
        app.include_router(module.router, dependencies=auth)
    app.include_router(system.router)
    app.include_router(dashboard.router)

    @app.exception_handler(InvalidParameter)
    async def invalid_parameter(request: Request, exc: InvalidParameter) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

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
    return app


def serve(settings: Settings, *, host: str, port: int) -> None:
    """Run the API with uvicorn until stopped (SIGINT/SIGTERM)."""
    log.info("serving.start", host=host, port=port, lake=settings.lake_uri)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread; yields its base URL; stops it on exit."""
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
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
