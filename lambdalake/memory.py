"""Heap hygiene for the long-lived processes (API, speed worker, continuous ingest).

A long-lived Python process with many threads (delta-rs' blocking pool, gRPC's Flight
threads, DuckDB's, uvicorn's) grows its RSS under glibc's allocator even when what it
holds stays the same: each thread may get its own malloc arena (up to 8 per core), memory
freed in an arena stays mapped, and a small live block at an arena's top keeps everything
below it from being returned. Two standard remedies, applied at the start of each
long-lived command (:func:`long_lived`):

* at most :data:`ARENAS` arenas (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX=2`` does),
  so threads share arenas and reuse each other's free space;
* ``malloc_trim(0)`` every :data:`TRIM_EVERY_S` seconds on a daemon thread: free pages
  in every arena are given back to the OS.

Neither changes what the process computes; elsewhere than glibc (macOS, musl) both are
no-ops. :func:`heap` reads ``mallinfo2`` (bytes in use vs free inside the heap), which
tells growth that is held (a leak) from growth that is only retained (fragmentation).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any

ARENAS = 2
TRIM_EVERY_S = 60.0
_M_ARENA_MAX = -8  # malloc.h


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # non-mmapped space allocated from the system
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # space in mmapped regions
            "usmblks",
            "fsmblks",
            "uordblks",  # total allocated (in use)
            "fordblks",  # total free inside the heap
            "keepcost",
        )
    ]


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "mallinfo2")):
        return None  # not glibc (musl), or a glibc older than 2.33
    libc.mallinfo2.restype = _Mallinfo2
    return libc


_LIBC = _glibc()
_started = threading.Event()


def limit_arenas(n: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``n`` for threads started from now on."""
    return bool(_LIBC is not None and _LIBC.mallopt(_M_ARENA_MAX, int(n)) == 1)


def trim() -> bool:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``); True if any were."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0) == 1)


def heap() -> dict[str, int] | None:
    """The allocator's own account, in bytes: ``in_use``, ``free`` (retained, not in use) and
    ``mapped`` (large blocks in their own mappings); None where it is not glibc."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mapped": info.hblkhd}


ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def arrow_on_malloc(argv: list[str]) -> None:
    """Run this command again with Arrow allocating from the C library's ``malloc`` (its
    ``system`` pool) instead of its bundled mimalloc, unless ``ARROW_DEFAULT_MEMORY_POOL``
    is set already (then that choice stands and this returns).

    mimalloc keeps a heap per thread, and pages freed into the heap of a thread that does
    not allocate again stay resident: in the API (Flight readers, Arrow's scan threads)
    each batch snapshot reload left ~8 MiB more in mimalloc's region that was never given
    back (the soak, BENCHMARKS.md); in malloc's heap, capped and trimmed by
    :func:`long_lived`, freed pages go back to the OS. Arrow reads the variable once, when
    it is first imported, and its C++ code allocates from that pool whatever pyarrow's
    ``set_memory_pool`` says, hence the new start: ``exec`` keeps the process id and
    costs one interpreter start. ``argv``: the command's arguments after the program."""
    if os.environ.get(ARROW_POOL_ENV):
        return
    os.environ[ARROW_POOL_ENV] = "system"
    os.execv(sys.executable, [sys.executable, "-m", "lambdalake.cli", *argv])


def long_lived(every_s: float = TRIM_EVERY_S) -> None:
    """Call first thing in a long-lived process: cap the arenas, trim every ``every_s`` s
    (once per process, however often called)."""
    if _LIBC is None or _started.is_set():
        return
    _started.set()
    limit_arenas()

    def loop() -> None:
        while True:
            time.sleep(every_s)
            trim()

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()
