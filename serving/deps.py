"""FastAPI dependencies: the settings, the query service, and the API-key check.

They are ``async`` on purpose: they do no I/O, and a sync dependency would cost a
thread-pool round trip per request each.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

from lambdalake.settings import Settings
from serving.service import QueryService

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Required when the server sets LAMBDALAKE_API_KEYS.",
)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> QueryService:
    return request.app.state.service


async def require_api_key(
    settings: Settings = Depends(get_settings), key: str | None = Security(api_key_header)
) -> None:
    """401 unless the server has no keys configured or ``X-API-Key`` is one of them."""
    keys = settings.api_key_set
    if not keys:
        return
    # Compare against every key in constant time, so timing tells nothing about a key.
    given = (key or "").encode()
    if not key or not any(hmac.compare_digest(given, k.encode()) for k in keys):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=f"missing or invalid API key: send a valid key in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
