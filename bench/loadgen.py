"""A small HTTP/1.1 load generator on asyncio streams: keep-alive GETs (and JSON POSTs).

Why not httpx: on a 2-core machine the load generator shares the CPU with the
server it measures. httpx spends about a millisecond of CPU per request in
Python; this client writes one request line and reads one ``Content-Length``
body, a few tens of microseconds, so the figures are mostly the server's.

* :func:`closed_loop` — ``clients`` connections, each sending its next request
  when the previous answer arrives (throughput, latency per kind);
* :func:`open_loop` — requests sent on a fixed schedule (``rate`` per second),
  each on an idle connection (a new one if none is idle), latency measured from
  the *scheduled* time, so a slow server cannot hide its queue (no coordinated
  omission).

>>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
3.0
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

Request = tuple[str, str, dict]  # (kind, path, query parameters)
JSON_BODY = "__json__"  # a request whose parameters are {JSON_BODY: obj} POSTs obj as JSON


class HttpError(Exception):
    """The server closed the connection or answered something this client does not read."""


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, base: str) -> Connection:
        url = urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
        return cls(reader, writer, f"{url.hostname}:{url.port or 80}")

    async def get(self, path: str, params: dict) -> tuple[int, bytes]:
        """GET ``path?params``; with ``params={JSON_BODY: obj}`` a POST of ``obj`` as JSON."""
        if JSON_BODY in params:
            body = json.dumps(params[JSON_BODY]).encode()
            self.writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        else:
            target = f"{path}?{urlencode(params)}" if params else path
            self.writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise HttpError(f"connection closed: {exc}") from exc
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise HttpError("answer without Content-Length")
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        self.writer.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: int = 0  # transport errors and non-200 answers (refusals included)
    why: Counter = field(default_factory=Counter)  # "HTTP 500", "TimeoutError", ...
    refused: list[float] = field(default_factory=list)  # latencies of 503 answers (shed load)
    # Open loop: how late this client itself got to each request (its own event loop's lag
    # on a shared machine), which every latency it reports includes.
    send_lag: list[float] = field(default_factory=list)

    def failed(self, why: str) -> None:
        self.errors += 1
        self.why[why] += 1

    def summary(self, elapsed: float) -> dict:
        every = [x for v in self.latencies.values() for x in v]
        return {
            "requests": len(every),
            "errors": self.errors,
            "throughput_rps": round(len(every) / elapsed, 1),
            "p50_ms": round(percentile(every, 0.5) * 1000, 2),
            "p99_ms": round(percentile(every, 0.99) * 1000, 2),
            "error_kinds": dict(self.why),
            "refused": len(self.refused),
            "refused_p50_ms": round(percentile(self.refused, 0.5) * 1000, 2),
            "refused_p99_ms": round(percentile(self.refused, 0.99) * 1000, 2),
            "client_lag_p99_ms": round(percentile(self.send_lag, 0.99) * 1000, 2),
            "by_kind": {
                k: {
                    "n": len(v),
                    "p50_ms": round(percentile(v, 0.5) * 1000, 2),
                    "p99_ms": round(percentile(v, 0.99) * 1000, 2),
                }
                for k, v in sorted(self.latencies.items())
            },
        }


async def closed_loop(
    base: str, next_request: Callable[[int], Request], clients: int, duration: float
) -> dict:
    """``clients`` connections sending back to back for ``duration`` seconds."""
    tally = Tally()
    deadline = time.perf_counter() + duration

    async def client(i: int) -> None:
        conn = await Connection.open(base)
        try:
            while time.perf_counter() < deadline:
                kind, path, params = next_request(i)
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.get(path, params)
                except HttpError as exc:
                    tally.failed(type(exc).__name__)
                    conn.close()
                    conn = await Connection.open(base)
                    continue
                tally.latencies[kind].append(time.perf_counter() - t0)
                if status != 200:
                    tally.failed(f"HTTP {status}")
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally.summary(time.perf_counter() - started)


async def open_loop(
    base: str,
    next_request: Callable[[int], Request],
    rate: float,
    duration: float,
    *,
    timeout: float = 10.0,
    record: list[tuple[float, float, int]] | None = None,
) -> dict:
    """``rate`` requests/s for ``duration`` s on a fixed schedule; latency from the schedule.

    A request not answered ``timeout`` seconds after its scheduled time counts as an
    error (``timeouts``), so an overwhelmed server ends the run instead of queueing it.
    Latencies of 200 answers are the figures; 503 answers (load shed by the server) are
    counted apart (``refused``, with their own percentiles). ``max_open_connections`` is
    the most connections open at once (a server that queues instead of refusing makes it
    grow). ``record`` gets ``(scheduled time from start, latency, status)`` per request
    (status 0: transport error or timeout)."""
    tally = Tally()
    timeouts = 0
    idle: list[Connection] = []
    n = int(rate * duration)
    tasks: set[asyncio.Task] = set()
    opened = 0
    open_now = 0
    max_open = 0

    async def one(i: int, at: float) -> None:
        nonlocal opened, timeouts, open_now, max_open
        tally.send_lag.append(time.perf_counter() - at)
        kind, path, params = next_request(i)
        conn = idle.pop() if idle else None
        try:
            async with asyncio.timeout(max(0.001, at + timeout - time.perf_counter())):
                if conn is not None:
                    try:
                        status, _ = await conn.get(path, params)
                    except HttpError:  # the server closed an idle keep-alive connection
                        conn.close()
                        open_now -= 1
                        conn = None
                if conn is None:
                    open_now += 1
                    max_open = max(max_open, open_now)
                    conn = await Connection.open(base)
                    opened += 1
                    status, _ = await conn.get(path, params)
        except (HttpError, OSError, TimeoutError) as exc:
            tally.failed(type(exc).__name__)
            timeouts += isinstance(exc, TimeoutError)
            if conn is not None:
                conn.close()
            open_now -= 1
            if record is not None:
                record.append((at - start, time.perf_counter() - at, 0))
            return
        latency = time.perf_counter() - at
        if record is not None:
            record.append((at - start, latency, status))
        if status == 503:
            tally.refused.append(latency)
        else:
            tally.latencies[kind].append(latency)
        if status != 200:
            tally.failed(f"HTTP {status}")
        idle.append(conn)

    start = time.perf_counter() + 0.1
    for i in range(n):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for conn in idle:
        conn.close()
    out = tally.summary(elapsed)
    out.update(
        target_rps=rate,
        achieved_rps=out["throughput_rps"],
        connections=opened,
        max_open_connections=max_open,
        timeouts=timeouts,
    )
    return out
