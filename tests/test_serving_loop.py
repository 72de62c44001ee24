"""The API's event loop (serving/loop.py): sockets looked at between callbacks, order kept."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from serving.loop import PromptEventLoop


def busy_turn(loop: asyncio.AbstractEventLoop, callbacks: int, write_at: int) -> dict:
    """``callbacks`` callbacks ready at once, each busy for 1 ms; the ``write_at``-th writes
    to a socket the loop reads. Returns how many had run when the read callback ran, and
    the order they ran in."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    ran: list[int] = []
    seen: dict[str, int] = {}
    done = loop.create_future()

    def on_read() -> None:
        a.recv(16)
        seen.setdefault("read_after", len(ran))
        loop.remove_reader(a.fileno())

    def work(i: int) -> None:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        ran.append(i)
        if i == write_at:
            b.send(b"x")
        if len(ran) == callbacks:
            loop.call_soon(done.set_result, None)

    async def main() -> None:
        loop.add_reader(a.fileno(), on_read)
        for i in range(callbacks):
            loop.call_soon(work, i)
        await done
        await asyncio.sleep(0.01)  # the read, if it has not come yet

    try:
        loop.run_until_complete(main())
    finally:
        a.close()
        b.close()
    return {"read_after": seen.get("read_after"), "order": ran}


@pytest.fixture()
def prompt_loop():
    loop = PromptEventLoop()
    try:
        yield loop
    finally:
        loop.close()


def test_asyncio_reads_a_socket_only_after_the_whole_turn() -> None:
    # What the API's loop changes: the standard loop runs every ready callback first.
    loop = asyncio.SelectorEventLoop()
    try:
        out = busy_turn(loop, callbacks=60, write_at=5)
    finally:
        loop.close()
    assert out["read_after"] == 60


def test_the_prompt_loop_reads_a_socket_within_a_poll_of_callbacks(prompt_loop) -> None:
    per_poll = PromptEventLoop.callbacks_per_poll
    write_at = per_poll + 1  # in the turn's second portion
    out = busy_turn(prompt_loop, callbacks=60, write_at=write_at)
    assert out["read_after"] is not None
    # Written during a portion of the turn: read right after it, before the rest.
    assert write_at < out["read_after"] <= 2 * per_poll, out["read_after"]
    assert out["order"] == list(range(60))  # the callbacks kept their order


def test_callbacks_scheduled_during_a_turn_run_after_the_turns_own(prompt_loop) -> None:
    order: list[str] = []

    def first(i: int) -> None:
        order.append(f"turn-{i}")
        prompt_loop.call_soon(order.append, f"later-{i}")

    async def main() -> None:
        for i in range(3 * PromptEventLoop.callbacks_per_poll):
            prompt_loop.call_soon(first, i)
        await asyncio.sleep(0.01)

    prompt_loop.run_until_complete(main())
    n = 3 * PromptEventLoop.callbacks_per_poll
    assert order[:n] == [f"turn-{i}" for i in range(n)]
    assert order[n:] == [f"later-{i}" for i in range(n)]


def test_timers_and_tasks_behave_as_in_asyncio(prompt_loop) -> None:
    async def main() -> list[str]:
        got: list[str] = []

        async def step(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            got.append(name)

        await asyncio.gather(step("b", 0.02), step("a", 0.01), step("c", 0.03))
        return got

    assert prompt_loop.run_until_complete(main()) == ["a", "b", "c"]


def _connected_after(loop: asyncio.AbstractEventLoop, callbacks: int) -> int | None:
    """``callbacks`` busy callbacks (1 ms each) ready at once; the first connects a client to
    a server on the loop and sends a request. How many had run when the server's protocol
    got the request's bytes (None: not during the turn)."""
    ran: list[int] = []
    seen: dict[str, int] = {}
    done = loop.create_future()

    class Server(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            seen.setdefault("read_after", len(ran))

    async def main() -> None:
        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.socket()

        def work(i: int) -> None:
            if i == 0:
                client.connect(("127.0.0.1", port))  # the kernel completes it; not accepted yet
                client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            end = time.perf_counter() + 0.001
            while time.perf_counter() < end:
                pass
            ran.append(i)
            if len(ran) == callbacks:
                loop.call_soon(done.set_result, None)

        for i in range(callbacks):
            loop.call_soon(work, i)
        await done
        await asyncio.sleep(0.05)
        client.close()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())
    return seen.get("read_after")


def test_a_new_connection_is_accepted_and_read_within_polls_not_after_the_turn(
    prompt_loop,
) -> None:
    """Accepting, connection_made and the new socket's reader are scheduled by the accept
    callback; they go ahead of the turn's callbacks, so the first request on a new
    connection is read after a few polls' worth of callbacks (was: after all 60)."""
    per_poll = PromptEventLoop.callbacks_per_poll
    after = _connected_after(prompt_loop, 60)
    assert after is not None and after <= 4 * per_poll, after
