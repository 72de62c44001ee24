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
    out = busy_turn(prompt_loop, callbacks=60, write_at=5)
    assert out["read_after"] is not None
    # Written during the first portion of the turn: read right after it, before the rest.
    assert 5 < out["read_after"] <= per_poll, out["read_after"]
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
