"""FastAPI dependencies: the settings, the query service, and the API-key check.

They are ``async`` on purpose: they do no I/O, and a sync dependency would cost a
thread-pool round trip per request each.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

from lambdalake.settings import Settings, check_secret
from serving.service import QueryService

API_KEY_HEADER = "X-API-Key"
URL_KEY_PARAMS = ("key", "api_key", "apikey", "x-api-key")


def check_api_keys(keys: frozenset[str]) -> None:
    """Refuse example secrets and short keys, with a one-line ``InvalidInput`` (a ``ValueError``).

    >>> check_api_keys(frozenset({"change-me"}))
    Traceback (most recent call last):
    ...
    lambdalake.errors.InvalidInput: LAMBDALAKE_API_KEYS holds an example value ('change-me'); set real keys (16+ random characters, e.g. `openssl rand -hex 24`)
    """
    for key in sorted(keys):
        check_secret("LAMBDALAKE_API_KEYS", key)


def refuse_key_in_url(request: Request) -> None:
    """400 for an API key sent in the URL: URLs end up in logs, proxies and browser history."""
    for name in URL_KEY_PARAMS:
        if name in request.query_params:
            raise HTTPException(
                status_code=status.HTTP_400_BAD_REQUEST,
                detail=f"invalid parameter {name!r}: never put an API key in a URL; "
                f"send it in the {API_KEY_HEADER} header",
            )


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
    request: Request,
    settings: Settings = Depends(get_settings),
    key: str | None = Security(api_key_header),
) -> None:
    """401 unless the server has no keys configured or ``X-API-Key`` is one of them
    (400 for a key in the URL, whether or not keys are configured)."""
    refuse_key_in_url(request)
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
