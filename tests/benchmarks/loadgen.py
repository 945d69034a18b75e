"""wrk with a client certificate, and what the machine was doing meanwhile.

wrk cannot present a client certificate; ``client_cert_shim.so`` (``LD_PRELOAD``) loads one
into every ``SSL_CTX`` wrk creates, and counts full and resumed handshakes. A Lua ``done``
hook prints wrk's own numbers (latency percentiles from its histogram, error counts) as one
JSON line, so nothing is scraped from the human-readable report.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"mean_us":%.1f,"max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99)))
end
"""

_SHIM_LINE = re.compile(r"client_cert_shim: handshakes full=(\d+) resumed=(\d+)")


def lua_script(
    folder: Path,
    name: str,
    *,
    method: str = "GET",
    body_size: int = 0,
    close: bool = False,
    headers: dict[str, str] | None = None,
    think_ms: float | None = None,
) -> Path:
    """``think_ms``: each connection waits a random time of this mean (exponential: the
    connections' requests together arrive about as a Poisson process) between an answer and
    its next request, so the offered rate is about connections / (think_ms + latency); wrk
    times a request from its write, so the wait is not in its latency. wrk's delay is in
    whole milliseconds: the mean must be at least a few."""
    lines = [f'wrk.method = "{method}"']
    # values without quotes or backslashes (e.g. URL-encoded PEM), so a plain Lua string holds them
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items()]
    if body_size:
        lines.append(f'wrk.body = string.rep("x", {body_size})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    if close:
        lines.append('wrk.headers["Connection"] = "close"')
    if think_ms is not None:
        lines += [
            f"local think_ms = {think_ms:.3f}",
            "math.randomseed(os.time() + math.floor(os.clock() * 1e6))",
            "function delay()",
            "  return math.floor(-math.log(1 - math.random()) * think_ms + 0.5)",
            "end",
        ]
    path = folder / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    bytes: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    handshakes_full: int
    handshakes_resumed: int
    #: CPU seconds wrk itself used (user + system), from its rusage
    cpu_seconds: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk not found (tests/benchmarks/run.sh installs it)")
    return found


def run_wrk(
    url: str,
    *,
    connections: int,
    threads: int,
    seconds: float,
    script: Path,
    shim: Path | None,
    cert: Path | None,
    key: Path | None,
    resume: bool = True,
    cpus: Sequence[int] | None = None,
    folder: Path,
) -> WrkResult:
    """One wrk run; ``shim`` None runs wrk as it is (no client certificate)."""
    threads = max(1, min(threads, connections))
    argv = [
        wrk_binary(),
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    env = dict(os.environ)
    if shim is not None:
        assert cert is not None and key is not None
        env.update(
            LD_PRELOAD=str(shim),
            BENCH_CERT=str(cert),
            BENCH_KEY=str(key),
            BENCH_TLS_RESUME="1" if resume else "0",
        )
    out_path, err_path = folder / "wrk.out", folder / "wrk.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(argv)}\n{stdout}\n{stderr}")
    doc = json.loads(line[len("BENCHJSON ") :])
    full = resumed = 0
    for match in _SHIM_LINE.finditer(stderr):
        full, resumed = int(match.group(1)), int(match.group(2))
    secs = doc["duration_us"] / 1e6
    return WrkResult(
        requests=doc["requests"],
        seconds=secs,
        rps=doc["requests"] / secs if secs else 0.0,
        bytes=doc["bytes"],
        errors={k: doc[k] for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=doc["p50_us"] / 1000,
        p90_ms=doc["p90_us"] / 1000,
        p99_ms=doc["p99_us"] / 1000,
        mean_ms=doc["mean_us"] / 1000,
        max_ms=doc["max_us"] / 1000,
        handshakes_full=full,
        handshakes_resumed=resumed,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )


# ---- idle connections ----------------------------------------------------------------------


def hold_idle(
    port: int, count: int, ctx: ssl.SSLContext, measure: Callable[[], T]
) -> tuple[int, T]:
    """Open ``count`` TLS connections to ``port``, make one ``GET /`` on each (so that every
    proxy has done its per-connection work: handshake, client certificate, upstream), keep
    them open and idle, call ``measure()``, then close them. Returns how many were open with
    a 200 answer, and what ``measure`` returned."""

    async def one(gate: asyncio.Semaphore) -> asyncio.StreamWriter | None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
                    ),
                    10,
                )
                # the Host the SNI names: the sidecar answers 421 to a request for another host
                writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                fields = head.lower()
                match = re.search(rb"\r\ncontent-length: *(\d+)", fields)
                if match:
                    await asyncio.wait_for(reader.readexactly(int(match.group(1))), 10)
                elif b"\r\ntransfer-encoding: chunked" in fields:
                    await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
                if head.startswith(b"HTTP/1.1 200"):
                    return writer
                writer.close()
            except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
                pass
            except asyncio.LimitOverrunError:
                pass
            return None

    async def main() -> tuple[int, T]:
        gate = asyncio.Semaphore(64)
        opened = [w for w in await asyncio.gather(*(one(gate) for _ in range(count))) if w]
        await asyncio.sleep(0.5)  # let the proxies settle (buffers released, timers armed)
        try:
            return len(opened), measure()
        finally:
            for writer in opened:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for w in opened), return_exceptions=True)

    return asyncio.run(main())


# ---- the rest of the machine --------------------------------------------------------------


def busy_seconds() -> tuple[float, float]:
    """CPU seconds spent busy on the whole machine, and stolen by the hypervisor, so far."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def wait_quiet(max_wait: float, threshold: float = 0.25, probe: float = 1.0) -> float:
    """Wait (at most ``max_wait`` seconds) until the machine is idle but for us; return the load
    seen last, in cores. Call it between measurements, when none of our processes works. The
    CPU time the hypervisor gives other guests (steal) counts as load: a run started while
    it takes a large share of the CPUs is measured on less machine than the others."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, s0 = busy_seconds()
        t0 = time.monotonic()
        time.sleep(probe)
        b1, s1 = busy_seconds()
        load = (b1 - b0 + s1 - s0) / (time.monotonic() - t0)
        if load <= threshold or time.monotonic() >= deadline:
            return load
