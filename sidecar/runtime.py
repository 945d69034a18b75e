"""The process around the event loop: which loop runs the sidecar, and how the garbage
collector and glibc's allocator are tuned once start-up is over. Used by ``__main__``
(``run``) and ``demo``."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
from collections.abc import Coroutine
from typing import Any

from .tls_groups import function

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: what ``tune_malloc`` sets: blocks up to 1 MiB come from the heap (every socket read, and what
#: it decrypts to, is a block of up to about 272 KiB); the heap's free top is given back to the
#: system above 8 MiB, down to 4 MiB
MALLOC_TUNING = ((_M_MMAP_THRESHOLD, 1 << 20), (_M_TRIM_THRESHOLD, 8 << 20), (_M_TOP_PAD, 4 << 20))
#: the environment's own settings of the same, which ``tune_malloc`` leaves as they are
MALLOC_ENVIRONMENT = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def tune_gc() -> None:
    """Move what start-up built (modules, configuration, contexts) out of the collector's way,
    and collect the youngest generation less often: a request allocates many short-lived
    objects, almost none of them in cycles."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def tune_malloc() -> str | None:
    """Set glibc's allocator as ``MALLOC_TUNING`` says; None when done, else why not.

    glibc gives a block above its mmap threshold (128 KiB at first) pages of its own, which a
    write then faults in one by one, and raises the threshold to the largest such block freed.
    A read of a socket (up to 256 KiB) decrypts into a block sized for what it may hold, later
    shrunk to what it held: each one is larger than the last one freed, so each one was
    mapped, faulted in and unmapped again (issue #19: page faults were 10 % of a worker's time
    during uploads, 93,000 in a run against 2,700 with these settings). A fixed threshold
    ends glibc's own adjustment, of the heap's trim threshold too (128 KiB): hence the trim
    threshold and the pad. Left as they are where the environment sets them
    (``MALLOC_ENVIRONMENT``), and where the C library is not glibc."""
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return "the environment sets the allocator's thresholds"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc's, not musl's
        mallopt = function(libc, "mallopt", ctypes.c_int, ctypes.c_int, ctypes.c_int)
    except (OSError, AttributeError):
        return "the C library is not glibc"
    for parameter, value in MALLOC_TUNING:
        if mallopt(parameter, value) != 1:
            return f"glibc refused mallopt({parameter}, {value})"
    return None
