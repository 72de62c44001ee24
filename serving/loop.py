"""The API's event loop: the standard library's, looking at its sockets between callbacks.

asyncio's loop works in turns: it polls its sockets once, then runs every callback that is
ready (each request's next step, each read found in the poll), then polls again. Under
load a turn holds dozens of request steps, so bytes that arrive during a turn are read only
after all of them: a request that is to be refused at arrival (:mod:`serving.admission`)
waits a whole turn for that, and the turn is longest exactly when the process is
overloaded. Measured at 2x and 4x the sustainable point-query rate (a quiet machine, 2
vCPUs), refusals took 16 ms at the median and 24-46 ms at the 99th percentile, nearly all
of it this wait.

:class:`PromptEventLoop` runs at most :attr:`~PromptEventLoop.callbacks_per_poll`
callbacks of a turn, then polls the sockets again (a zero-timeout ``select``, a few
microseconds) and handles what arrived first, then the rest of the turn, which keeps its
order ahead of anything scheduled since. A read then waits for the callback running and
at most that many more, not for a turn: a refusal is written that soon, and a new request
is parsed and queued that soon (its handler starts behind the requests already
started). Callbacks keep their order among themselves; only I/O moves forward, as if the
turns were shorter. Timers are looked at in each poll, as in every turn.

It subclasses ``asyncio.SelectorEventLoop`` and wraps its ``_run_once`` (the loop's one
turn) and ``_process_events`` (the poll's callbacks queued), private methods of CPython
3.11 and 3.12, the versions the project supports; where they are missing the loop is the
standard one, unchanged.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections import deque
from typing import Any

CALLBACKS_PER_POLL = 4


class PromptEventLoop(asyncio.SelectorEventLoop):
    """``asyncio.SelectorEventLoop`` that polls its sockets every
    :attr:`callbacks_per_poll` ready callbacks instead of once per turn (module docstring)."""

    callbacks_per_poll = CALLBACKS_PER_POLL

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        super().__init__(selector)
        self._held: deque[Any] = deque()
        # The accept chain (a new connection's task, connection_made, its reader): callbacks
        # scheduled by it run first in the next poll's portion, not after the turn.
        self._urgent: deque[Any] = deque()
        self._accepting = 0

    if all(hasattr(asyncio.SelectorEventLoop, m) for m in ("_run_once", "_process_events")):

        def _run_once(self) -> None:
            ready: deque[Any] = self._ready  # type: ignore[attr-defined]
            held = self._held
            if self._urgent:
                ready.extendleft(reversed(self._urgent))
                self._urgent.clear()
            # Keep the oldest callbacks_per_poll; hold the rest, in order, for after the poll.
            while len(ready) > self.callbacks_per_poll:
                held.appendleft(ready.pop())
            try:
                super()._run_once()  # type: ignore[misc]  # poll (timeout 0: work is ready), run
            finally:
                if held:  # older than anything scheduled meanwhile: they go first
                    ready.extendleft(reversed(held))
                    held.clear()

        def _process_events(self, event_list: list[Any]) -> None:
            ready: deque[Any] = self._ready  # type: ignore[attr-defined]
            before = len(ready)
            super()._process_events(event_list)  # type: ignore[misc]
            found = len(ready) - before
            if found and before:
                ready.rotate(found)  # what the poll found runs first, then the turn's callbacks

    if all(
        hasattr(asyncio.SelectorEventLoop, m)
        for m in ("_run_once", "_accept_connection", "_call_soon")
    ):

        def _accept_connection(self, *args: Any, **kwargs: Any) -> None:
            """Connections accepted now are set up (their task, ``connection_made``, their
            reader) ahead of the turn's callbacks: else a new connection's first request is
            read only after the whole backlog (measured: refusals 28-48 ms late)."""
            self._accepting += 1
            try:
                super()._accept_connection(*args, **kwargs)  # type: ignore[misc]
            finally:
                self._accepting -= 1

        def _call_soon(self, callback: Any, args: Any, context: Any) -> Any:
            if not self._accepting or threading.get_ident() != self._thread_id:  # type: ignore[attr-defined]
                return super()._call_soon(callback, args, context)  # type: ignore[misc]
            handle = super()._call_soon(self._in_accept, (callback, *args), context)  # type: ignore[misc]
            self._ready.pop()  # type: ignore[attr-defined]  # it went last; it goes first
            self._urgent.append(handle)
            return handle

        def _in_accept(self, callback: Any, *args: Any) -> None:
            self._accepting += 1
            try:
                callback(*args)
            finally:
                self._accepting -= 1
