"""The process around the event loop: which loop runs the sidecar, and how the garbage
collector is tuned once start-up is over. Used by ``__main__`` (``run``) and ``demo``."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any


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
