"""The process's tuning (``sidecar.runtime``): glibc's allocator."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sidecar import runtime

from .conftest import ConfigDir
from .ports import free_port

# A block sized for what a socket read may decrypt to, written, shrunk to what it did, freed:
# as `_records_c.read` does once per read. Prints the page faults of 300 of them.
_READS = textwrap.dedent(
    """
    import ctypes, resource, sys
    from sidecar.runtime import tune_malloc

    if sys.argv[1] == "tuned":
        assert tune_malloc() is None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def read(n):
        block = libc.malloc(n + 16384)
        ctypes.memset(block, 1, n + 16384)
        libc.free(libc.realloc(block, n))

    for i in range(50):
        read(262144 + i * 100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(300):
        read(262144 + (i % 7) * 1000)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(how: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in runtime.MALLOC_ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", _READS, how], capture_output=True, text=True, env=env, check=True
    )
    return int(done.stdout)


def test_reads_of_a_socket_do_not_fault_in_fresh_pages_once_malloc_is_tuned() -> None:
    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("glibc's allocator only")
    untuned, tuned = _faults("untuned"), _faults("tuned")
    # glibc's own thresholds: each block mapped afresh (about 70 pages each)
    assert untuned > 300 * 30, untuned
    assert tuned < 300, tuned


def test_the_environment_s_own_allocator_settings_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in runtime.MALLOC_ENVIRONMENT:
        monkeypatch.setenv(name, "1")
        assert runtime.tune_malloc() == "the environment sets the allocator's thresholds"
        monkeypatch.delenv(name)


@pytest.mark.own_process
async def test_a_serving_process_tunes_its_allocator_unless_the_environment_does(
    config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sidecar run`` calls ``tune_malloc`` once started: with ``MALLOC_TOP_PAD_`` in its
    environment it says, at debug level, that it left the allocator alone."""
    from .test_signals import start

    data = config_dir.base(free_port())
    data["log"] = {"level": "debug"}
    monkeypatch.setenv("MALLOC_TOP_PAD_", "131072")
    proc, _, _ = await start(config_dir, data)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    _, err = await proc.communicate()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    untuned = [e for e in events if e["event"] == "malloc_not_tuned"]
    assert [e["reason"] for e in untuned] == ["the environment sets the allocator's thresholds"]
