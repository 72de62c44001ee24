"""Admission control over real HTTP (uvicorn with the stamping protocol, httpx clients).

A small app whose handlers hold their slot until the test lets them go makes the
limits deterministic: requests past the in-flight and queue bounds must be refused at
once (503, ``Retry-After``, a JSON ``detail``) while the admitted ones are still
answered; a request that waited too long on the event loop is refused, not started;
``/health`` is never refused; the real app wires it in with a refusal metric.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from lambdalake.settings import Settings
from serving.admission import AdmissionControl, AdmissionLimits, Waiting
from serving.app import admission_limits, create_app, running_server


def held_app(
    limits: AdmissionLimits, on_refused: Callable[[str, float], None] | None = None
) -> tuple[FastAPI, threading.Event, list[str]]:
    app = FastAPI()
    release = threading.Event()
    started: list[str] = []

    @app.get("/hold/{name}")
    async def hold(name: str) -> dict:
        started.append(name)
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {"name": name}

    @app.get("/busy")
    def busy_loop() -> dict:  # blocks its thread, not the loop
        return {}

    @app.get("/block")
    async def block() -> dict:
        time.sleep(0.3)  # holds the event loop: requests arriving meanwhile wait for it
        return {}

    @app.get("/work/{name}")
    async def work(name: str) -> dict:
        started.append(name)
        time.sleep(0.01)  # 10 ms of CPU on the loop
        return {"name": name}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_middleware(AdmissionControl, limits=limits, on_refused=on_refused)
    return app, release, started


def test_requests_past_in_flight_and_queue_bounds_are_refused_at_once() -> None:
    limits = AdmissionLimits(max_in_flight=2, max_queued=1, max_queue_seconds=5.0)
    app, release, started = held_app(limits)
    with running_server(app) as base, ThreadPoolExecutor(8) as pool:

        def get(path: str) -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            r = httpx.get(base + path, timeout=30)
            return r, time.monotonic() - t0

        held = [pool.submit(get, f"/hold/{i}") for i in range(2)]
        deadline = time.monotonic() + 10
        while len(started) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = pool.submit(get, "/hold/queued")
        time.sleep(0.2)  # it is waiting for a slot now
        refused = [get("/hold/refused") for _ in range(3)]
        health = httpx.get(base + "/health", timeout=5)
        assert all(not f.done() for f in held) and not queued.done()
        for r, seconds in refused:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"] == "application/json"
            assert "server busy" in r.json()["detail"]
            assert seconds < 1.0  # not queued behind the held requests
        assert health.status_code == 200  # never refused
        release.set()
        assert [f.result()[0].status_code for f in held] == [200, 200]
        assert queued.result()[0].status_code == 200  # it got the first slot freed
        assert "queued" in started and "refused" not in started


def test_a_queued_request_is_refused_when_no_slot_frees_in_time() -> None:
    limits = AdmissionLimits(max_in_flight=1, max_queued=4, max_queue_seconds=0.2)
    app, release, started = held_app(limits)
    with running_server(app) as base, ThreadPoolExecutor(2) as pool:
        held = pool.submit(httpx.get, base + "/hold/0", timeout=30)
        while not started:
            time.sleep(0.01)
        t0 = time.monotonic()
        r = httpx.get(base + "/hold/late", timeout=30)
        assert r.status_code == 503 and "no slot freed" in r.json()["detail"]
        assert 0.15 < time.monotonic() - t0 < 2.0
        release.set()
        assert held.result().status_code == 200
        # The slot is free again: the next request is admitted.
        assert httpx.get(base + "/hold/again", timeout=30).status_code == 200


def test_a_request_let_in_is_refused_only_past_the_longer_bound() -> None:
    """A request that was not predicted to be late is answered when its wait passes
    max_queue_seconds (a refusal then would be a slow one), and refused only past
    max_wait_seconds."""
    limits = AdmissionLimits(
        max_in_flight=1, max_queued=4, max_queue_seconds=0.05, max_wait_seconds=0.6
    )
    app, release, started = held_app(limits)
    with running_server(app) as base, ThreadPoolExecutor(2) as pool:
        held = pool.submit(httpx.get, base + "/hold/0", timeout=30)
        while not started:
            time.sleep(0.01)
        queued = pool.submit(httpx.get, base + "/hold/queued", timeout=30)
        time.sleep(0.25)  # past the first bound, well inside the second
        release.set()
        assert held.result().status_code == 200
        assert queued.result().status_code == 200, queued.result().text
        release.clear()
        held = pool.submit(httpx.get, base + "/hold/1", timeout=30)
        while "1" not in started:
            time.sleep(0.01)
        t0 = time.monotonic()
        r = httpx.get(base + "/hold/late", timeout=30)
        assert r.status_code == 503 and "no slot freed" in r.json()["detail"]
        assert 0.5 < time.monotonic() - t0 < 3.0
        release.set()
        assert held.result().status_code == 200
    assert AdmissionLimits(max_queue_seconds=0.1, max_wait_seconds=0.05).give_up_seconds == 0.1


def _raw_get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


def _raw_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_requests_that_waited_on_a_busy_event_loop_are_refused_not_started() -> None:
    limits = AdmissionLimits(max_in_flight=100, max_queued=100, max_queue_seconds=0.05)
    app, _, _ = held_app(limits)
    with running_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(41)]
        time.sleep(0.2)  # every connection accepted and read from
        try:
            _raw_get(socks[0], "/block")
            time.sleep(0.1)  # the loop is blocked now: these arrive and wait behind it
            for i, sock in enumerate(socks[1:]):
                _raw_get(sock, f"/work/{i}")
            codes = [_raw_status(sock) for sock in socks[1:]]
            assert _raw_status(socks[0]) == 200
        finally:
            for sock in socks:
                sock.close()
    # They reached the machine during the block, so all are late; while more than a
    # burst waits (a standing backlog) they are refused instead of answered late, and
    # the last burst's worth drains normally.
    assert codes.count(200) >= AdmissionLimits().burst - 1, codes
    assert codes.count(503) >= 10, codes
    assert set(codes) <= {200, 503}


def _raw_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response (status, headers, body by Content-Length) off a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(4096)
    return int(lines[0].split(" ", 2)[1]), headers, body


def test_while_a_backlog_stands_new_requests_are_refused_as_they_are_read() -> None:
    """Requests arriving while late requests are being started are refused in the read
    callback (no task, no turn of waiting behind the started ones), answer JSON with
    Retry-After, and leave the connection usable."""
    limits = AdmissionLimits(max_in_flight=100, max_queued=100, max_queue_seconds=0.05)
    reasons: list[str] = []
    app, _, started = held_app(limits, on_refused=lambda reason, waited: reasons.append(reason))
    with running_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(41)]
        first, second = socks[1:21], socks[21:]
        time.sleep(0.2)
        try:
            _raw_get(socks[0], "/block")  # 0.3 s with the loop held
            time.sleep(0.1)
            for i, sock in enumerate(first):  # late: they wait behind the block
                _raw_get(sock, f"/work/a{i}")
            time.sleep(0.22)  # the block ends; the late ones are being started (10 ms each)
            for i, sock in enumerate(second):  # arriving while that backlog stands
                _raw_get(sock, f"/work/b{i}")
            answers = [_raw_response(sock) for sock in second]
            for sock in first:
                _raw_response(sock)
            block = _raw_response(socks[0])
            assert block[0] == 200, block
            refused = [a for a in answers if a[0] == 503]
            for sock in second:  # kept alive, and answered once the backlog is gone
                _raw_get(sock, "/health")
                health = _raw_response(sock)
                assert health[0] == 200, health
        finally:
            for sock in socks:
                sock.close()
    # The late ones (first) too are refused as they are read: they had waited past the
    # bound already. The second group found the backlog being worked off: refused at once.
    at_arrival = [a for a in refused if b"requests wait" in a[2]]  # the protocol's refusal
    assert len(at_arrival) >= 5, refused
    assert reasons.count("arrival") >= len(at_arrival), reasons
    for _, headers, body in refused:
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        assert b"server busy" in body
    refused_names = {f"b{i}" for i, a in enumerate(answers) if a[0] == 503}
    assert not refused_names & set(started)  # a refused request never ran
    assert len([n for n in started if n.startswith("b")]) == len(answers) - len(refused)


def test_a_short_burst_behind_a_busy_loop_is_answered_not_shed() -> None:
    limits = AdmissionLimits(max_in_flight=100, max_queued=100, max_queue_seconds=0.02)
    app, _, _ = held_app(limits)
    with running_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(5)]
        time.sleep(0.2)
        try:
            _raw_get(socks[0], "/block")
            time.sleep(0.1)
            for i, sock in enumerate(socks[1:]):
                _raw_get(sock, f"/work/{i}")
            codes = [_raw_status(sock) for sock in socks[1:]]
        finally:
            for sock in socks:
                sock.close()
    # All late (they reached the machine during the block), but no more than a burst:
    # all answered.
    assert codes == [200] * 4, codes


def test_the_api_refuses_overload_with_a_metric(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        lake_uri=str(tmp_path / "lake"),
        home=tmp_path / "home",
        api_max_in_flight=1,
        api_max_queued=0,
        api_max_queue_ms=1000,
    )
    app = create_app(settings)
    release = threading.Event()

    @app.get("/slow-for-test")
    async def slow() -> dict:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {}

    with running_server(app) as base, ThreadPoolExecutor(2) as pool:
        held = pool.submit(httpx.get, base + "/slow-for-test", timeout=30)
        deadline = time.monotonic() + 10
        while True:
            r = httpx.get(base + "/v1/sales", timeout=10)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        release.set()
        assert held.result().status_code == 200
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert 'lambdalake_api_refused_requests_total{reason="queue_full"}' in metrics
        assert "lambdalake_api_refusal_wait_seconds_count 1.0" in metrics


def test_the_stamp_counts_time_spent_in_the_kernel_before_the_server_read() -> None:
    """A request that sat in the listen backlog or a socket buffer waited, even though
    the process only saw it later: the stamp is the kernel's receive time."""
    import sys

    import pytest

    from serving.admission import kernel_age

    if sys.platform != "linux":
        pytest.skip(reason="TCP_INFO is Linux's")
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        try:
            _raw_get(client, "/")
            time.sleep(0.3)  # the request waits in the accept queue, unread
            conn, _ = server.accept()
            with conn:
                assert 0.25 <= kernel_age(conn) < 2.0
                conn.recv(4096)
                _raw_get(client, "/again")
                time.sleep(0.05)
                assert kernel_age(conn) < 0.25  # fresh data: a fresh age
        finally:
            client.close()


def _health_while_a_backlog_starts(starts_per_turn: int) -> tuple[float, float]:
    """Seconds to answer /health sent just behind 20 requests of 10 ms of loop CPU each,
    and seconds until all 20 were answered."""
    limits = AdmissionLimits(
        max_in_flight=100, max_queued=100, max_queue_seconds=5.0, starts_per_turn=starts_per_turn
    )
    app, _, _ = held_app(limits)
    with running_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(21)]
        time.sleep(0.2)
        try:
            for i, sock in enumerate(socks[:20]):
                _raw_get(sock, f"/work/{i}")
            time.sleep(0.005)
            t0 = time.monotonic()
            _raw_get(socks[20], "/health")
            assert _raw_response(socks[20])[0] == 200
            health = time.monotonic() - t0
            assert [_raw_response(sock)[0] for sock in socks[:20]] == [200] * 20
            return health, time.monotonic() - t0
        finally:
            for sock in socks:
                sock.close()


def test_a_bound_on_starts_per_turn_keeps_the_loop_reading_between_starts() -> None:
    """With at most 2 starts a turn the loop reads (and could refuse) new requests every
    ~20 ms instead of after the whole backlog: the turn, not the backlog, bounds the wait."""
    health, backlog = _health_while_a_backlog_starts(2)
    assert health < backlog / 3, (health, backlog)


def test_a_request_is_refused_as_it_is_read_when_those_ahead_would_make_it_late() -> None:
    """The wait is predicted from the requests ahead and how often they start (or get a slot),
    so a request that would be refused after waiting is refused before it waits."""
    limits = AdmissionLimits(max_queue_seconds=0.02, burst=8)
    w = Waiting()
    w.limits = limits
    now = time.monotonic()
    w.started_at = now - 0.001  # a queue is moving: a request started a moment ago
    w.n = 10  # parsed, not started: more than a burst
    w.start_gap = 0.001  # ten starts take 10 ms: in time
    assert not w.refuse_at_arrival(0.0, now)
    w.start_gap = 0.003  # ten starts take 30 ms: it would be late
    assert w.refuse_at_arrival(0.0, now)
    # Within a burst, starts are not predicted (a page's calls at once are answered) ...
    w.n = 5
    assert not w.refuse_at_arrival(0.0, now)
    # ... but when every slot is taken and requests wait for one, those count too.
    w.waiters, w.slot_gap = deque([None] * 6), 0.002  # (5 + 6 + 1) slots at 2 ms: 24 ms
    assert w.refuse_at_arrival(0.0, now)
    w.slot_gap = 0.001
    assert not w.refuse_at_arrival(0.0, now)
    # Intervals measured in an earlier backlog do not refuse a burst after a pause.
    w.n, w.start_gap, w.slot_gap = 10, 0.003, 0.002
    assert w.refuse_at_arrival(0.0, now)
    w.started_at = now - 1.0
    assert not w.refuse_at_arrival(0.0, now)


def test_the_admission_settings_reach_the_limits(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        lake_uri=str(tmp_path / "lake"),
        home=tmp_path / "home",
        api_max_in_flight=5,
        api_max_queued=6,
        api_max_queue_ms=7,
        api_max_wait_ms=30,
        api_burst=3,
        api_starts_per_turn=2,
    )
    limits = admission_limits(settings)
    assert (limits.max_in_flight, limits.max_queued, limits.burst, limits.starts_per_turn) == (
        5,
        6,
        3,
        2,
    )
    assert limits.max_queue_seconds == pytest.approx(0.007)
    assert limits.give_up_seconds == pytest.approx(0.030)
