"""The query endpoint of a speed worker: an Arrow Flight server in a thread.

``do_get`` answers a :class:`lambdalake.speed_protocol.SpeedQuery` with partial
aggregates; ``do_action("status")`` returns the worker's status object. Each
request reads the state through its own DuckDB connection inside one read
transaction (MVCC), so answers are consistent and never wait for, nor stall,
the micro-batch commits.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pyarrow.flight as flight

from lambdalake.logs import get_logger
from lambdalake.speed_protocol import META_KEY, SpeedQuery
from speed.state import SpeedState

log = get_logger(__name__)


class SpeedFlightServer(flight.FlightServerBase):
    """Flight service over a :class:`SpeedState` (see the module doc)."""

    def __init__(
        self,
        state: SpeedState,
        status: Callable[[], dict[str, Any]],
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
    ) -> None:
        super().__init__(f"grpc://{host}:{port}")
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
            raise flight.FlightServerError(str(exc)) from None
        try:
            table, meta = self.state.query(q)
        except flight.FlightError:
            raise
        except ValueError as exc:  # a bad bound in the request
            raise flight.FlightServerError(f"bad speed query: {exc}") from None
        except Exception as exc:
            log.error("speed.query_failed", error=f"{type(exc).__name__}: {exc}")
            raise flight.FlightInternalError(f"speed query failed: {exc}") from None
        table = table.replace_schema_metadata({META_KEY: meta.to_json()})
        return flight.RecordBatchStream(table)

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [("status", "The worker's status object (JSON).")]

    def do_action(self, context: Any, action: flight.Action) -> list[bytes]:
        if action.type == "status":
            return [json.dumps(self.status(), default=str).encode()]
        raise flight.FlightServerError(f"unknown action {action.type!r}; try 'status'")

    def start(self) -> SpeedFlightServer:
        """Serve in a daemon thread (returns at once)."""
        self._thread = threading.Thread(target=self.serve, name="speed-flight", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
