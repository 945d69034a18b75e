"""S4: a thousand distinct client certificates at once, against an identity backend with latency.

Two programs, each run as its own process by ``bench.py``:

``python -m tests.benchmarks.s4 verdicts --port P --latency 0.02``
    A counting verdict service for the sidecar's ``http`` backend: every POST waits
    ``latency`` seconds, then allows the certificate (as a user named after its fingerprint).
    ``GET /stats`` returns how many calls each certificate (SHA-256) got; ``POST /reset``
    forgets them.

``python -m tests.benchmarks.s4 drive --port P [--port Q ...] --certs DIR ... [--mode preconnected|arrival]``
    The load. With several ``--port`` (S4-fleet: the replicas of a fleet), every certificate
    of the burst goes to each of them at the same moment; the hot certificate probes the first. A "hot" certificate is looked up once (its verdict is then cached) and probed
    with sequential requests on a few keep-alive connections (``--hot-connections``): first
    alone (baseline), then all the time while the burst is in flight. The burst is one request for each of ``--count``
    certificates, plus ``--duplicates`` extra connections that reuse the first certificates
    at the same moment (the cache must coalesce them: still one call per certificate).

    ``preconnected``: every burst connection finishes its TLS handshake first, then all the
    requests are written at once, so the only thing in flight is identity lookups.
    ``arrival``: connect, handshake and request all at once (what a restart under load
    looks like); handshakes then compete for the same CPU.

    ``--hot-process``: the hot certificate's probes run in a process of their own
    (``python -m tests.benchmarks.s4 hot ...``). Otherwise they share the driver's event loop
    with the burst's client-side handshakes, and ``driver_stalls`` says how many of them a
    stall of the driver itself delayed.

Prints one JSON document: calls per certificate, burst timing, and the hot certificate's
latency before and during the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Host is the name the TLS connection asks for (SNI localhost, see Conn.open): a Host naming
# another host than the SNI is 421 Misdirected Request.
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: s4-driver\r\n\r\n"


# ---- the verdict service ------------------------------------------------------------------


def serve_verdicts(port: int, latency: float) -> None:
    from aiohttp import web

    calls: Counter[str] = Counter()
    in_flight = 0
    peak = 0

    async def verdict(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        body = await request.json()
        sha = str(body["sha256"])
        calls[sha] += 1
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(latency)
        finally:
            in_flight -= 1
        user = {"sub": f"s4-{sha[:16]}", "username": f"user-{sha[:8]}", "roles": ["member"]}
        return web.json_response({"verdict": "allow", "user": user})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(
            {"calls": sum(calls.values()), "peak_in_flight": peak, "per_certificate": dict(calls)}
        )

    async def reset(_: web.Request) -> web.Response:
        nonlocal peak
        calls.clear()
        peak = 0
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes(
        [web.post("/verdict", verdict), web.get("/stats", stats), web.post("/reset", reset)]
    )
    _run(_serve(app, port))


async def _serve(app: Any, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    await asyncio.Event().wait()


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---- a minimal HTTP/1.1 client over one TLS connection ------------------------------------


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Conn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        return cls(reader, writer)

    def send(self) -> None:
        self.writer.write(REQUEST)

    async def response(self) -> int:
        """Read one response (Content-Length or chunked); return its status."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
        }
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    async def get(self) -> tuple[int, float]:
        started = time.perf_counter()
        self.send()
        status = await self.response()
        return status, time.perf_counter() - started

    def close(self) -> None:
        self.writer.close()


def _context(pem: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(pem))
    return ctx


def _ms(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000, 3)

    return {
        "count": len(values),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
    }


async def _probe(hot: Conn, stop: asyncio.Event, out: list[tuple[float, float, int]]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        status, latency = await hot.get()
        out.append((t, latency, status))


async def _watch_loop(stop: asyncio.Event, stalls: list[tuple[float, float]]) -> None:
    """The driver's own event loop: every turn that took longer than 10 ms (start, length).
    The hot client's probes share this loop with the burst's client-side handshakes, so a
    stall here delays a probe whatever the sidecar does."""
    tick = 0.002
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(tick)
        late = time.perf_counter() - t - tick
        if late > 0.01:
            stalls.append((t, late))


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    certs = sorted(Path(args.certs).glob("client-*.pem"))[: args.count]
    if len(certs) < args.count:
        raise SystemExit(f"only {len(certs)} certificates in {args.certs}")
    contexts = [_context(p) for p in certs]
    burst_contexts = contexts + contexts[: args.duplicates]
    ports: list[int] = args.port
    # each certificate to every port (the replicas of a fleet), interleaved
    burst = [(ctx, port) for ctx in burst_contexts for port in ports]
    hot_ctx = _context(Path(args.hot))
    hot_proc: asyncio.subprocess.Process | None = None
    alone: list[tuple[float, float, int]] = []
    if args.hot_process:
        # The probes in a process of their own: only the sidecar stands between them and
        # their answers (the burst's client-side handshakes do not run on their loop).
        hots: list[Conn] = []
        hot_proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.benchmarks.s4",
            "hot",
            "--port",
            str(ports[0]),
            "--hot",
            str(args.hot),
            "--connections",
            str(args.hot_connections),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert hot_proc.stdout is not None
        first_status, first_latency = json.loads(await hot_proc.stdout.readline())["first"]
        b0 = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in both processes
        await asyncio.sleep(args.baseline_seconds)
        b1 = time.perf_counter()
    else:
        hots = [await Conn.open(ports[0], hot_ctx) for _ in range(args.hot_connections)]
        first_status, first_latency = await hots[0].get()  # a miss: the verdict is now cached
        stop_alone = asyncio.Event()
        tasks = [asyncio.ensure_future(_probe(h, stop_alone, alone)) for h in hots]
        await asyncio.sleep(args.baseline_seconds)
        stop_alone.set()
        await asyncio.gather(*tasks)
        if any(status != 200 for (_, _, status) in alone):
            raise SystemExit(f"hot certificate answered {Counter(s for (_, _, s) in alone)}")
    baseline = [lat for (_, lat, _) in alone]

    result: dict[str, Any] = {
        "mode": args.mode,
        "ports": len(ports),
        "certificates": len(certs),
        "duplicate_connections": args.duplicates,
        "hot_connections": len(hots),
        "hot_first_request": {"status": first_status, "ms": round(first_latency * 1000, 3)},
        "hot_baseline": _ms(baseline),
    }
    probe: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    stalls: list[tuple[float, float]] = []
    watcher = asyncio.ensure_future(_watch_loop(stop, stalls))
    conns: list[Conn] = []
    statuses: Counter[int] = Counter()
    latencies: list[float] = []

    async def one(conn: Conn) -> None:
        status = await conn.response()
        statuses[status] += 1
        latencies.append(time.perf_counter() - t0)

    if args.mode == "preconnected":
        gate = asyncio.Semaphore(128)

        async def connect(ctx: ssl.SSLContext, port: int) -> Conn:
            async with gate:
                return await Conn.open(port, ctx)

        c0 = time.perf_counter()
        conns = list(await asyncio.gather(*(connect(ctx, port) for ctx, port in burst)))
        result["connect_seconds"] = round(time.perf_counter() - c0, 3)
        probe_tasks = [asyncio.ensure_future(_probe(h, stop, probe)) for h in hots]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        for conn in conns:
            conn.send()
        await asyncio.gather(*(one(conn) for conn in conns))
    else:
        probe_tasks = [asyncio.ensure_future(_probe(h, stop, probe)) for h in hots]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()

        async def arrive(ctx: ssl.SSLContext, port: int) -> None:
            try:
                conn = await Conn.open(port, ctx)
            except (OSError, ssl.SSLError):
                statuses[0] += 1
                return
            conns.append(conn)
            conn.send()
            await one(conn)

        await asyncio.gather(*(arrive(ctx, port) for ctx, port in burst))
    t1 = time.perf_counter()
    wall1 = time.time()
    stop.set()
    await asyncio.gather(*probe_tasks, watcher)
    if hot_proc is not None:
        out, _ = await hot_proc.communicate(b"stop\n")
        probe = [(t, lat, status) for t, lat, status in json.loads(out)]
        baseline = [lat for (t, lat, _) in probe if b0 <= t <= b1]
        result["hot_baseline"] = _ms(baseline)
        result["hot_connections"] = args.hot_connections
        result["hot_process"] = True
    during = [lat for (t, lat, _) in probe if t0 <= t <= t1]
    # probes during which the driver's own loop stalled (see _watch_loop)
    stalled = [
        lat
        for (t, lat, _) in probe
        if t0 <= t <= t1 and any(s < t + lat and t < s + d for (s, d) in stalls)
    ]
    result["burst_seconds"] = round(t1 - t0, 3)
    result["burst_window"] = [wall1 - (t1 - t0), wall1]
    result["burst_statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    result["burst_latency"] = _ms(latencies)
    result["hot_during_burst"] = _ms(during)
    burst_stalls = sorted((d for (s, d) in stalls if t0 <= s <= t1), reverse=True)
    result["driver_stalls"] = {
        "count": len(burst_stalls),
        "longest_ms": [round(d * 1000, 1) for d in burst_stalls[:10]],
        "probes_overlapping": len(stalled),
    }
    result["hot_statuses"] = dict(Counter(str(s) for (_, _, s) in probe))

    # A second round on the same connections: every verdict is cached now.
    if args.mode == "preconnected":
        latencies.clear()
        statuses.clear()
        t0 = time.perf_counter()
        for conn in conns:
            conn.send()
        await asyncio.gather(*(one(conn) for conn in conns))
        result["second_round"] = {
            "seconds": round(time.perf_counter() - t0, 3),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "latency": _ms(latencies),
        }
    for conn in [*conns, *hots]:
        conn.close()
    return result


async def hot(args: argparse.Namespace) -> None:
    """The hot client in a process of its own (``drive --hot-process``): its first request
    (a miss), then sequential requests on each connection until a line arrives on stdin;
    then every sample (start on the monotonic clock, latency, status) as JSON."""
    ctx = _context(Path(args.hot))
    hots = [await Conn.open(args.port, ctx) for _ in range(args.connections)]
    status, latency = await hots[0].get()
    print(json.dumps({"first": [status, latency]}), flush=True)
    stop = asyncio.Event()
    out: list[tuple[float, float, int]] = []
    tasks = [asyncio.ensure_future(_probe(h, stop, out)) for h in hots]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks)
    for conn in hots:
        conn.close()
    print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s4")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verdicts")
    v.add_argument("--port", type=int, required=True)
    v.add_argument("--latency", type=float, default=0.02)
    d = sub.add_parser("drive")
    d.add_argument(
        "--port", type=int, action="append", required=True, help="a sidecar's port (repeatable)"
    )
    d.add_argument("--certs", required=True)
    d.add_argument("--hot", required=True, help="PEM with certificate and key of the hot client")
    d.add_argument("--count", type=int, default=1000)
    d.add_argument("--duplicates", type=int, default=200)
    d.add_argument("--mode", choices=("preconnected", "arrival"), default="preconnected")
    d.add_argument("--baseline-seconds", type=float, default=1.5)
    d.add_argument(
        "--hot-connections", type=int, default=4, help="keep-alive probes of the hot certificate"
    )
    d.add_argument(
        "--hot-process",
        action="store_true",
        help="probe the hot certificate from a process of its own (see the hot command)",
    )
    h = sub.add_parser("hot")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--hot", required=True)
    h.add_argument("--connections", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "hot":
        _run(hot(args))
        return 0
    if args.command == "verdicts":
        serve_verdicts(args.port, args.latency)
        return 0
    print(json.dumps(_run(drive(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
