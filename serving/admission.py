"""Admission control: a process answers what it can and refuses the rest at once.

Without it an overloaded API does not shed load, it queues it: every request waits
behind every earlier one, latency grows to seconds, clients time out and reconnect,
connections pile up, and the server keeps working on answers nobody waits for any
more (measured: p99 9.5 s and 12,700 open connections at 1,200 req/s offered).

:class:`AdmissionControl` (pure ASGI middleware) bounds two things per process:

* **in flight**: at most ``max_in_flight`` requests are being answered at once;
  up to ``max_queued`` more wait for a slot, in arrival order;
* **queueing delay**: a request that has already waited ``max_queue_seconds``
  since its bytes were read from the socket (behind other requests on the event
  loop) is not started any more once requests have been arriving that late, with
  others waiting too, for ``sustained_seconds`` (a standing backlog, as in CoDel).
  A late request alone is answered (refusing it would free nothing), and so are
  the requests of a short burst.

Past either bound the answer is ``503`` with ``Retry-After`` and a one-line JSON
``detail``, written without touching the app (tens of microseconds), so refusing
stays cheap exactly when the process is short of CPU. ``/health`` is never refused
(an orchestrator must not kill a busy but healthy process).

The arrival time comes from :class:`StampingHttpToolsProtocol`, uvicorn's
httptools protocol with one addition: it stamps each request's scope when its
first bytes are parsed (with the server's set of live request tasks, to see
whether others wait). Under another server there is no stamp and only the
in-flight and queue bounds apply.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

RECEIVED_AT = "lambdalake.received_at"  # scope["extensions"] key: time.monotonic() of arrival
REQUESTS = "lambdalake.requests"  # scope["extensions"] key: the server's live request tasks
NEVER_REFUSED = frozenset({"/health"})


@dataclass(frozen=True)
class AdmissionLimits:
    """Per-process bounds (see the module docstring); ``None`` disables admission control."""

    max_in_flight: int = 32
    max_queued: int = 64
    max_queue_seconds: float = 0.02
    retry_after_seconds: int = 1
    # Late requests are shed once lateness has lasted this long: a burst (a page firing
    # a few calls at once on a busy machine) passes, a standing queue does not.
    sustained_seconds: float = 0.1


class StampingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, plus the time each request's bytes were parsed."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {  # type: ignore[dict-item]
            RECEIVED_AT: time.monotonic(),
            REQUESTS: self.tasks,  # one set per server: every request being handled or waiting
        }


class AdmissionControl:
    """Pure ASGI middleware: bounded in-flight and queued requests, fast 503 past them.

    Runs on the event loop only (no locks needed): the counters change between awaits.
    ``on_refused(reason)`` is called for every refusal (a metric)."""

    def __init__(
        self,
        app: Any,
        limits: AdmissionLimits,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_refused = on_refused or (lambda reason: None)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._late_since: float | None = None  # start of the current run of late requests

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in NEVER_REFUSED:
            await self.app(scope, receive, send)
            return
        limits = self.limits
        extensions = scope.get("extensions") or {}
        received = extensions.get(RECEIVED_AT)
        now = time.monotonic()
        waited = now - received if received is not None else 0.0
        # Late, with others waiting behind it, for a while: a standing backlog, so shed
        # (as CoDel does). A request late on its own (the process was descheduled) has
        # nobody to make room for; a short burst drains by itself.
        if waited > limits.max_queue_seconds and len(extensions.get(REQUESTS, ())) > 1:
            if self._late_since is None:
                self._late_since = now
            if now - self._late_since >= limits.sustained_seconds:
                await self._refuse(
                    send, "queue_delay", f"it waited {waited * 1000:.0f} ms to start"
                )
                return
        else:
            self._late_since = None
        if self.in_flight >= limits.max_in_flight:
            if len(self._waiters) >= limits.max_queued:
                await self._refuse(send, "queue_full", f"{len(self._waiters)} requests wait")
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, limits.max_queue_seconds - waited))
            except BaseException as exc:  # timed out, or the client went away
                handed_over = waiter.done() and not waiter.cancelled()
                if not waiter.done():
                    waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                if handed_over:  # a slot arrived just as the wait ended: pass it on
                    self._release()
                if isinstance(exc, TimeoutError):
                    await self._refuse(send, "queue_timeout", "no slot freed in time")
                    return
                raise
            # The slot was handed over by _release: in_flight already counts this request.
        else:
            self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    def _release(self) -> None:
        """Hand the slot to the oldest waiter still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    async def _refuse(self, send: Callable, reason: str, why: str) -> None:
        self.on_refused(reason)
        retry = self.limits.retry_after_seconds
        body = json.dumps(
            {"detail": f"server busy ({why}); retry after {retry} s"}, separators=(",", ":")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
