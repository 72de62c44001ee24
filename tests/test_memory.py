"""Heap hygiene of the long-lived processes (lambdalake/memory.py), on this machine's libc."""

from __future__ import annotations

import sys

import pytest

from lambdalake import memory

glibc = pytest.mark.skipif(memory._LIBC is None, reason="not glibc")


@glibc
def test_trim_gives_freed_heap_back_and_heap_tells_in_use_from_free() -> None:
    import psutil

    rss = psutil.Process().memory_info
    # Many small blocks (below the mmap threshold, so they live in the heap), then free
    # all but the last: the live block on top keeps free() from shrinking the heap, so
    # the freed 200 MB stay in the process until trimmed.
    blocks = [bytearray(4000) for _ in range(50_000)]
    before = memory.heap()
    assert before is not None and before["in_use"] > 150 * 2**20
    del blocks[:-1]
    freed = memory.heap()
    assert freed is not None and freed["in_use"] < before["in_use"] - 150 * 2**20
    assert freed["free"] > 150 * 2**20  # retained: what fragmentation looks like
    held = rss().rss
    assert memory.trim() is True
    assert rss().rss < held - 100 * 2**20  # given back to the OS


@glibc
def test_long_lived_caps_arenas_once_and_starts_one_trimmer() -> None:
    import threading

    memory.long_lived(every_s=3600)
    memory.long_lived(every_s=3600)
    assert [t.name for t in threading.enumerate()].count("malloc-trim") == 1


def test_elsewhere_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_LIBC", None)
    assert memory.heap() is None
    assert memory.trim() is False
    assert memory.limit_arenas() is False
    assert sys.platform  # nothing raised


_IDLE_THREAD_FREES = """
import sys, threading, time
import numpy as np, psutil, pyarrow as pa, pyarrow.compute as pc
from lambdalake import memory
rss = lambda: psutil.Process().memory_info().rss
done, stop, out = threading.Event(), threading.Event(), {}
def work():  # allocates ~300 MB of Arrow buffers, frees them, then stays idle (a scan thread)
    base = pa.array(np.arange(2000))
    arrays = [pc.add(base, i) for i in range(20000)]  # each result from Arrow's pool
    out["held"] = rss()
    del arrays
    done.set()
    stop.wait()
t = threading.Thread(target=work)
t.start()
done.wait()
memory.trim()
print(pa.default_memory_pool().backend_name, out["held"] - rss())
stop.set()
t.join()
"""


@glibc
@pytest.mark.parametrize("pool", ["system", "bundled"])
def test_arrow_buffers_freed_by_an_idle_thread_go_back_to_the_os_on_malloc(pool: str) -> None:
    """Arrow's bundled mimalloc keeps the pages an idle thread freed (an API's reload grew by
    them); on malloc (what arrow_on_malloc starts the API with) the trimmer gives them back."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != memory.ARROW_POOL_ENV}
    if pool == "system":
        env[memory.ARROW_POOL_ENV] = "system"
    out = subprocess.run(
        [sys.executable, "-c", _IDLE_THREAD_FREES, pool],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    ).stdout.split()
    backend, given_back = out[0], int(out[1])
    if pool == "system":
        assert backend == "system"
        assert given_back > 200 * 2**20, given_back
    else:  # what arrow_on_malloc is for: the bundled allocator keeps them
        assert backend != "system"
        assert given_back < 100 * 2**20, given_back
