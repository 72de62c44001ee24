"""``/v1/status``, ``/health`` and ``/metrics``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.deps import get_service, require_api_key
from serving.models import Health, StatusAnswer
from serving.service import QueryService

router = APIRouter(tags=["system"])


@router.get(
    "/v1/status",
    response_model=StatusAnswer,
    dependencies=[Depends(require_api_key)],
    summary="Freshness (the `lambdalake status --json` object)",
)
def get_status(request: Request) -> dict:
    """Latest run and watermark, speed workers' offsets and lag, quarantine counts (read at
    most once a second however many ask; ``generated_at`` says when)."""
    return request.app.state.status.get()


@router.get("/health", response_model=Health, summary="Liveness (open without an API key)")
def get_health(service: Annotated[QueryService, Depends(get_service)]) -> Health:
    return Health(status="ok", run_id=service.batch.current().run_id)


@router.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    summary="Prometheus metrics",
    response_class=Response,
)
async def get_metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
