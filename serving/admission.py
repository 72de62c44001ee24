"""Admission control: a process answers what it can and refuses the rest at once.

Without it an overloaded API does not shed load, it queues it: every request waits
behind every earlier one, latency grows to seconds, clients time out and reconnect,
connections pile up, and the server keeps working on answers nobody waits for any
more (measured: p99 9.5 s and 12,700 open connections at 1,200 req/s offered).

:class:`AdmissionControl` (pure ASGI middleware) bounds two things per process:

* **in flight**: at most ``max_in_flight`` requests are being answered at once;
  up to ``max_queued`` more wait for a slot, in arrival order;
* **queueing delay**, in two bounds. As a request is read, its wait to start is
  predicted (the requests ahead of it times the interval between starts, or between slots
  handed over; :meth:`Waiting.refuse_at_arrival`); past ``max_queue_seconds`` (counted
  since its bytes reached the machine) it is refused there and then, which is quick.
  A request let in is refused after all only when it has waited ``max_wait_seconds``
  to start while more than ``burst`` others wait too (a standing backlog the prediction
  missed): refusing what was let in as soon as the first bound passed made those
  refusals the slow ones (measured at 4x overload: 14 % of refusals over 10 ms by the
  server's clock with one bound of 20 ms, 4 % with bounds of 25 and 45 ms). A late request
  alone is answered (refusing it would free nothing), and so are the requests of a
  burst no larger than ``burst`` (a dashboard page firing its calls at once behind a
  pause).

  Why a count and not a duration: the event loop serves in batches (every socket
  found readable in one pass, then every request parsed in it), so within a batch
  the first requests are on time and the later ones late. A rule "late for a while"
  is reset by each batch's first request and never sheds (measured: at 2x the
  sustainable rate it refused almost nothing and p99 reached 0.1-1 s), while a
  standing backlog is exactly many requests waiting at once.

Past either bound the answer is ``503`` with ``Retry-After`` and a one-line JSON
``detail``, written without touching the app (tens of microseconds), so refusing
stays cheap exactly when the process is short of CPU. ``/health`` is never refused
(an orchestrator must not kill a busy but healthy process).

The arrival time comes from :class:`StampingHttpToolsProtocol`, uvicorn's
httptools protocol with two additions: it stamps each request's scope with the time
its bytes reached the machine, and counts the requests parsed but not yet started
(:class:`Waiting`, one per server), to see whether others wait. On Linux the time
is the kernel's own figure (``TCP_INFO``'s ``last_data_recv``, milliseconds since
the socket last received data), so the time
a request spent where the process cannot see it counts too: in the listen
backlog before the connection was accepted, and in the socket buffer while the
event loop was busy. Measured at 2x overload, that wait was seconds (the accept
queue overflowed and clients fell back on SYN retransmits) while the wait after
parsing stayed under 0.2 s, so a stamp taken at parse time alone never shed.
Elsewhere the stamp is the parse time. Under another server there is no stamp and
only the in-flight and queue bounds apply.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

RECEIVED_AT = "lambdalake.received_at"  # scope["extensions"] key: time.monotonic() of arrival
WAITING = "lambdalake.waiting"  # scope["extensions"] key: the server's Waiting counter
NEVER_REFUSED = frozenset({"/health"})


@dataclass(frozen=True)
class AdmissionLimits:
    """Per-process bounds (see the module docstring); ``None`` disables admission control."""

    max_in_flight: int = 32
    max_queued: int = 64
    max_queue_seconds: float = 0.025
    retry_after_seconds: int = 1
    # Late requests are answered while at most this many others wait with them: a
    # burst (a page firing a few calls at once on a busy machine) passes, a standing
    # queue does not.
    burst: int = 8
    # At most this many requests start per event-loop turn (0: no bound).
    starts_per_turn: int = 0
    # A request let in (not predicted to wait past max_queue_seconds) is refused after all
    # only once it has waited this long (or max_queue_seconds, if longer): a misprediction
    # costs some latency, not a slow refusal (see the module docstring).
    max_wait_seconds: float = 0.045

    @property
    def give_up_seconds(self) -> float:
        """How long a request let in may wait to start before it is refused after all."""
        return max(self.max_wait_seconds, self.max_queue_seconds)


# struct tcp_info (linux/tcp.h): eight one-byte fields, then u32s; last_data_recv is
# the 12th u32 (rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
# last_data_sent, last_ack_sent, last_data_recv).
_TCP_INFO_BYTES = 104
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_AT = 8 + 11 * 4
_KERNEL_AGE = sys.platform == "linux" and hasattr(socket, "TCP_INFO")


def kernel_age(sock: Any) -> float:
    """Seconds since ``sock`` last received data, by the kernel's clock (Linux ``TCP_INFO``);
    0.0 where that is not available. About 1.5 µs."""
    if not _KERNEL_AGE or sock is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except OSError:  # not TCP (a Unix socket), or closed meanwhile
        return 0.0
    if len(info) < _LAST_DATA_RECV_AT + 4:
        return 0.0
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)[0]) / 1000.0


class Waiting:
    """One server's account of its queue, shared by the protocol and the middleware.

    ``n``: requests parsed but not yet started by the app (including those held back
    for a later event-loop turn); ``delay``: how long the last request to start had
    waited since its bytes reached the machine, and ``started_at`` when it started.
    Once the middleware has seen a request it sets ``limits`` and ``on_refused``, and
    from then on the protocol refuses at arrival (:meth:`refuse_at_arrival`)."""

    __slots__ = (
        "delay",
        "last_slot_at",
        "limits",
        "n",
        "on_refused",
        "slot_gap",
        "start_gap",
        "started_at",
        "turn_s",
        "waiters",
    )

    # The last start's wait speaks for the queue for this long (a backlog starts
    # requests every event-loop turn; after a pause it says nothing about now).
    FRESH_S = 0.1

    def __init__(self) -> None:
        self.n = 0
        self.delay = 0.0
        self.started_at = 0.0
        # With a bound on starts per turn: how long a busy event-loop turn lasts (a moving
        # average, measured by the middleware), to tell how long the backlog takes to start.
        self.turn_s = 0.0
        # The requests started and waiting for a slot (the middleware's queue, shared), and
        # how often a slot is handed over while some wait (a moving average, seconds): what
        # a new request would wait for one.
        self.waiters: deque[Any] = deque()
        self.slot_gap = 0.0
        # How often a parsed request starts while others wait to (a moving average, seconds).
        self.start_gap = 0.0
        self.last_slot_at = 0.0
        self.limits: AdmissionLimits | None = None
        self.on_refused: Callable[[str, float], None] = lambda reason, waited: None

    def refuse_at_arrival(self, waited: float, now: float) -> bool:
        """Would this request be refused after waiting? Then refuse it now, as it is read.

        Predicted, while a queue is moving (a start in the last ``FRESH_S``): the requests
        parsed ahead of it (more than a burst) times the interval between starts, or, while
        every slot is taken and requests wait for one, all those ahead of it times the
        interval between slots handed over, past the bound. Otherwise,
        a standing backlog (more than a burst waits) and either this request has already
        waited longer than allowed or it would wait that long: with a bound on starts per
        turn, the turns the requests ahead of it need; without, as long as the requests
        starting now waited. Refusing it as it is read saves it that wait (measured: the
        share of refusals within 10 ms went from about half to 83 %); checked at every
        arrival, so requests are let in again as soon as the backlog drains."""
        limits = self.limits
        if limits is None:
            return False
        bound = limits.max_queue_seconds
        # Predictions only while a queue is moving (a start in the last FRESH_S): the
        # intervals measured in an earlier backlog say nothing about a burst after a pause.
        if now - self.started_at < self.FRESH_S:
            # More than a burst parsed ahead of it, started one start_gap apart.
            if self.n > limits.burst and waited + self.n * self.start_gap > bound:
                return True
            # Every slot is taken and requests wait for one: it would get one after those
            # parsed and those queued ahead of it, one slot_gap apart.
            queued = len(self.waiters)
            if queued and waited + (self.n + queued + 1) * self.slot_gap > bound:
                return True
        if self.n <= limits.burst:
            return False
        if waited > limits.max_queue_seconds:
            return True
        if limits.starts_per_turn and self.turn_s:
            # The backlog starts starts_per_turn a turn: this request would start after
            # the turns needed for those ahead of it.
            turns = self.n // limits.starts_per_turn + 1
            return waited + turns * self.turn_s > limits.max_queue_seconds
        return self.delay > limits.max_queue_seconds and now - self.started_at < self.FRESH_S


class StampingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, plus the time each request's bytes reached the machine
    and a count of the requests waiting to start."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._sock = transport.get_extra_info("socket")
        waiting = getattr(self.server_state, "lambdalake_waiting", None)
        if waiting is None:
            waiting = self.server_state.lambdalake_waiting = Waiting()  # type: ignore[attr-defined]
        self._waiting = waiting

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: Any = {
            RECEIVED_AT: time.monotonic() - kernel_age(self._sock),
            WAITING: self._waiting,
        }
        self.scope["extensions"] = extensions

    def on_headers_complete(self) -> None:
        cycle = self.cycle
        self._refused_at_arrival = False
        super().on_headers_complete()
        if self.cycle is not cycle and not self._refused_at_arrival:
            self._waiting.n += 1  # the app's first step takes it back (AdmissionControl)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """Refuse in the read callback itself when a backlog stands (no task, no turn of
        waiting behind the requests already started); otherwise start as uvicorn does."""
        waiting = self._waiting
        now = time.monotonic()
        waited = now - cycle.scope["extensions"][RECEIVED_AT]
        limits = waiting.limits  # None until the middleware has seen a request
        if (
            limits is not None
            and waiting.refuse_at_arrival(waited, now)
            and not self.flow.write_paused
            and cycle.scope.get("path") not in NEVER_REFUSED
            and not self.parser.should_upgrade()
            and _bodiless(cycle.scope)
        ):
            waiting.on_refused("arrival", waited)
            # The refusal never suspends (the transport is not paused), so it runs to its
            # end here, with uvicorn's own response writing and keep-alive handling.
            step = cycle.run_asgi(
                _refusal(limits, f"{waiting.n} requests wait, {waited * 1000:.0f} ms in")
            )
            try:
                step.send(None)
            except StopIteration:  # written; the cycle called on_response_complete itself
                self._refused_at_arrival = True
                return
            raise RuntimeError("a refusal at arrival suspended")  # pragma: no cover
        super()._start_asgi_task(cycle, app)


def _bodiless(scope: dict) -> bool:
    """A request without a body (a refusal must not leave a body unread on a kept-alive
    connection); requests with one are left to the middleware."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return False
    return True


def _refusal(limits: AdmissionLimits, why: str) -> Callable:
    """The ASGI app of one refusal: 503, ``Retry-After``, a JSON ``detail``."""
    retry = limits.retry_after_seconds
    body = json.dumps(
        {"detail": f"server busy ({why}); retry after {retry} s"}, separators=(",", ":")
    ).encode()
    start = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry).encode()),
        ],
    }

    async def refuse(scope: dict, receive: Callable, send: Callable) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return refuse


class AdmissionControl:
    """Pure ASGI middleware: bounded in-flight and queued requests, fast 503 past them.

    Runs on the event loop only (no locks needed): the counters change between awaits.
    ``on_refused(reason, waited)`` is called for every refusal (metrics), with the seconds
    from the request's bytes reaching the machine to its refusal."""

    def __init__(
        self,
        app: Any,
        limits: AdmissionLimits,
        on_refused: Callable[[str, float], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_refused = on_refused or (lambda reason, waited: None)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._later: deque[asyncio.Future[None]] = deque()  # held back for a later turn
        self._turn_starts = 0
        self._turn_scheduled = False
        self._last_turn_at: float | None = None
        self._waiting: Waiting | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        extensions = scope.get("extensions") or {}
        waiting = extensions.get(WAITING)
        if waiting is not None and waiting.limits is None:  # arm refusal at arrival
            waiting.limits, waiting.on_refused = self.limits, self.on_refused
            waiting.waiters = self._waiters  # the queue for slots, seen at arrival
            self._waiting = waiting
        if scope["type"] != "http" or scope.get("path") in NEVER_REFUSED:
            if waiting is not None:
                waiting.n -= 1
            await self.app(scope, receive, send)
            return
        limits = self.limits
        received = extensions.get(RECEIVED_AT)
        if limits.starts_per_turn and (self._later or self._turn_starts >= limits.starts_per_turn):
            # Enough started in this turn of the event loop: the rest start in later
            # turns, in order, so a turn (and the wait to be read, or refused) stays short.
            later: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._later.append(later)
            self._schedule_turn()
            try:
                await later
            except BaseException:
                if later in self._later:
                    self._later.remove(later)
                if waiting is not None:
                    waiting.n -= 1
                raise
        self._turn_starts += 1
        if limits.starts_per_turn:
            self._schedule_turn()  # the count starts again next turn
        others = 0
        now = time.monotonic()
        if waiting is not None:
            waiting.n -= 1  # started: no longer waiting
            others = waiting.n
            gap = now - waiting.started_at
            if others and gap < 1.0:  # consecutive starts of a standing queue
                w = waiting
                w.start_gap = gap if not w.start_gap else 0.9 * w.start_gap + 0.1 * gap
        waited = now - received if received is not None else 0.0
        if waiting is not None:
            waiting.delay, waiting.started_at = waited, now
        # Late, with more than a burst waiting: a standing backlog, so shed. A request
        # late on its own (the process was descheduled) has nobody to make room for;
        # a burst drains by itself.
        if waited > limits.give_up_seconds and others > limits.burst:
            await self._refuse(
                send, "queue_delay", f"it waited {waited * 1000:.0f} ms to start", received
            )
            return
        if self.in_flight >= limits.max_in_flight:
            if len(self._waiters) >= limits.max_queued:
                await self._refuse(
                    send, "queue_full", f"{len(self._waiters)} requests wait", received
                )
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, limits.give_up_seconds - waited))
            except BaseException as exc:  # timed out, or the client went away
                handed_over = waiter.done() and not waiter.cancelled()
                if not waiter.done():
                    waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                if handed_over:  # a slot arrived just as the wait ended: pass it on
                    self._release()
                if isinstance(exc, TimeoutError):
                    await self._refuse(send, "queue_timeout", "no slot freed in time", received)
                    return
                raise
            # The slot was handed over by _release: in_flight already counts this request.
        else:
            self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """Once per event-loop turn while requests are held back: a new turn's allowance,
        given to the oldest held-back requests first. call_soon, not the selector: the
        loop never sleeps in select() while work is held back."""
        self._turn_scheduled = False
        self._turn_starts = 0
        now = time.monotonic()
        if self._last_turn_at is not None and self._waiting is not None:
            w = self._waiting  # a turn's length, while turns follow each other
            w.turn_s = (
                now - self._last_turn_at
                if not w.turn_s
                else 0.8 * w.turn_s + 0.2 * (now - self._last_turn_at)
            )
        released = 0
        while self._later and released < self.limits.starts_per_turn:
            later = self._later.popleft()
            if not later.done():
                later.set_result(None)
                released += 1
        # The released ones count themselves as they start, early in the coming turn.
        if self._later or released:
            self._schedule_turn()
            self._last_turn_at = now
        else:
            self._last_turn_at = None  # idle: the next gap is not a turn's length

    def _release(self) -> None:
        """Hand the slot to the oldest waiter still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._slot_handed_over()
                return
        self.in_flight -= 1

    def _slot_handed_over(self) -> None:
        """While requests wait for slots, how often one is handed over (Waiting.slot_gap)."""
        w = self._waiting
        if w is None:
            return
        now = time.monotonic()
        gap = now - w.last_slot_at
        if w.last_slot_at and gap < 1.0:  # consecutive hand-overs of one standing queue
            w.slot_gap = gap if not w.slot_gap else 0.9 * w.slot_gap + 0.1 * gap
        w.last_slot_at = now

    async def _refuse(self, send: Callable, reason: str, why: str, received: float | None) -> None:
        self.on_refused(reason, 0.0 if received is None else time.monotonic() - received)
        await _refusal(self.limits, why)({}, _no_receive, send)


async def _no_receive() -> dict:  # pragma: no cover - a refusal reads nothing
    return {"type": "http.disconnect"}
