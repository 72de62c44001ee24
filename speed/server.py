"""The query endpoint of a speed worker: an Arrow Flight server in a thread.

``do_get`` answers a :class:`lambdalake.contract.speed_protocol.SpeedQuery` with partial
aggregates; ``do_action("status")`` returns the worker's status object. Each
request reads the state through a pooled DuckDB cursor inside one read
transaction (MVCC), so answers are consistent and never wait for, nor stall,
the micro-batch commits.

Errors carry their kind (see :mod:`lambdalake.contract.speed_protocol`): a bad request is
``bad_request``; anything else that fails is logged with an error id and
answered as ``worker_failed`` with that id only, never the exception's text.
With a shared secret (``token``) every call must carry ``authorization: Bearer
<token>``.
"""

from __future__ import annotations

import hmac
import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow.flight as flight

from lambdalake.contract.speed_protocol import META_KEY, SpeedQuery, flight_error
from lambdalake.logs import get_logger
from speed.state import SpeedState

log = get_logger(__name__)


class _RequireToken(flight.ServerMiddlewareFactory):
    """Refuses calls without ``authorization: Bearer <token>`` (constant-time check)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> None:
        sent = (headers.get("authorization") or [""])[0]
        got = sent.encode() if isinstance(sent, str) else bytes(sent)
        if not hmac.compare_digest(got, self.expected):
            raise flight_error("unauthenticated", "a valid speed token is required")
        return None


class SpeedFlightServer(flight.FlightServerBase):
    """Flight service over a :class:`SpeedState` (see the module doc)."""

    def __init__(
        self,
        state: SpeedState,
        status: Callable[[], dict[str, Any]],
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        token: str | None = None,
    ) -> None:
        middleware = {"auth": _RequireToken(token)} if token else None
        super().__init__(f"grpc://{host}:{port}", middleware=middleware)
        self.state = state
        self.status = status
        # The address clients use: the bind address unless it is a wildcard or told otherwise.
        self.host = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"grpc://{self.host}:{self.port}"

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        try:
            q = SpeedQuery.from_json(ticket.ticket)
        except ValueError as exc:
            raise flight_error("bad_request", str(exc)) from None
        try:
            table, meta = self.state.query(q)
        except flight.FlightError:
            raise  # a stale watermark, already of its kind
        except Exception as exc:
            # The caller gets an id to quote, not our internals.
            error_id = uuid.uuid4().hex[:12]
            log.error(
                "speed.query_failed",
                error_id=error_id,
                query=q.to_json().decode(),
                error=f"{type(exc).__name__}: {exc}",
            )
            raise flight_error(
                "worker_failed", f"speed query failed (error id {error_id})", error_id=error_id
            ) from None
        table = table.replace_schema_metadata({META_KEY: meta.to_json()})
        return flight.RecordBatchStream(table)

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [("status", "The worker's status object (JSON).")]

    def do_action(self, context: Any, action: flight.Action) -> list[bytes]:
        if action.type == "status":
            return [json.dumps(self.status(), default=str).encode()]
        raise flight_error("bad_request", f"unknown action {action.type!r}; try 'status'")

    def start(self) -> SpeedFlightServer:
        """Serve in a daemon thread (returns at once)."""
        self._thread = threading.Thread(target=self.serve, name="speed-flight", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
