"""The Python cost of one forwarded request, without sockets, TLS or other processes.

    .venv/bin/python -m tests.benchmarks.hotpath [--requests N] [--profile] [--routes N]
        [--revocation none|ocsp|crl] [--front-proxy] [--log off|json|console]

Drives the real listener protocol (``ClientConnection``), gateway, header rules, forwarder
and pool with in-memory transports: a keep-alive ``GET /`` from a client whose verdict
is cached, an upstream answer of 2 bytes with nginx's headers. What it reports is the CPU time
the sidecar's own Python spends per request (microseconds, best of several rounds), the part a
change to the request path can move; the full benchmark (``run.sh``) adds TLS, system calls and
the event loop, and is noisy on a shared machine, while this is stable to a few percent.
``--profile`` prints cProfile's top functions for the same loop (compiled functions are
invisible to cProfile: profile with ``SIDECAR_PURE=1``). The build measured is printed.
``--revocation ocsp`` measures with ``tls.ocsp: soft`` and the client's answer held,
``--revocation crl`` with a 10,000-entry CRL of the client's CA. ``--log json`` (or
``console``) measures with the access log on (``log.level: info``), its lines written to
``/dev/null`` in the batches ``sidecar run`` writes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sidecar import BUILD, log
from sidecar.app import Sidecar
from sidecar.certs import ClientCert
from sidecar.config import load
from sidecar.gateway import Gateway
from sidecar.http1.upstream import UpstreamConnection
from sidecar.listener import Listener
from sidecar.runtime import tune_gc, tune_malloc
from tests.benchmarks.stack import matcher_routes
from tests.pki import make_ca, make_leaf

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 21:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)


class _Transport:
    """Just enough of an asyncio transport; ``on_write`` sees what the protocol sends."""

    def __init__(self, on_write: Any, extra: dict[str, Any] | None = None) -> None:
        self.on_write = on_write
        self.extra = extra or {}

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, data: list[bytes]) -> None:
        self.on_write(b"".join(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        raise AssertionError("a connection of the harness was aborted")


def _front_header(cert_pem: bytes) -> bytes:
    """The request as nginx in front passes it: the certificate in ``ssl-client-cert``."""
    return (
        REQUEST[:-2]
        + b"ssl-client-cert: "
        + quote(cert_pem.decode(), safe="").encode()
        + b"\r\n\r\n"
    )


def _config(
    folder: Path, routes: int = 0, revocation: str = "none", front: bool = False
) -> tuple[Path, ClientCert]:
    ca = make_ca("Hot path CA")
    server = make_leaf(ca, "localhost", server=True)
    client = make_leaf(ca, "bench")
    for name, data in {
        "ca.pem": ca.pem,
        "server.pem": server.pem,
        "server.key": server.key_pem,
        "client.pem": client.pem,
    }.items():
        (folder / name).write_bytes(data)
    extra = {"none": "", "ocsp": ", ocsp: soft", "crl": ", crl: [ca.crl]"}[revocation]
    if revocation == "crl":
        from tests.revocation_parts import der, make_crl

        (folder / "ca.crl").write_bytes(der(make_crl(ca, range(1, 10_001))))
    # --routes N: N routes each with matchers (issue #16), the one asked for among them
    table = matcher_routes(routes, client.der, ca.cert) if routes else [{"path": "/"}]
    listen = "listen: {host: 127.0.0.1, port: 8443}\n"
    if front:  # --front-proxy: plain HTTP from a trusted nginx, the certificate in a header
        listen = (
            "listen: {host: 127.0.0.1, port: 8443, tls: false, server_names: [127.0.0.1]}\n"
            "front_proxy: {trusted: [127.0.0.1/32], certificate_header: ssl-client-cert}\n"
        )
    (folder / "sidecar.yaml").write_text(
        listen + f"tls: {{certificate: server.pem, key: server.key, client_ca: [ca.pem]{extra}}}\n"
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        "identity:\n  backend: static\n  static:\n    users:\n"
        "    - {sub: s-1, username: bench, certificates: [{file: client.pem}]}\n"
        f"routes: {json.dumps(table)}\n"
        "log: {level: warning}\n"
    )
    return folder / "sidecar.yaml", ClientCert.from_der(client.der)


async def measure(
    requests: int,
    rounds: int,
    profile: bool,
    routes: int = 0,
    revocation: str = "none",
    front: bool = False,
    log_format: str = "off",
) -> None:
    loop = asyncio.get_running_loop()
    if log_format != "off":  # as `sidecar run` sets it up, writing to /dev/null
        sink = open(os.devnull, "w")  # noqa: SIM115 (open for the whole run)
        log._stderr = lambda: sink
        log.configure(log_format, "info")
    request = REQUEST
    with tempfile.TemporaryDirectory() as tmp:
        path, cert = _config(Path(tmp), routes, revocation, front)
        if front:
            request = _front_header((Path(tmp) / "client.pem").read_bytes())
        config = load(path)
        sidecar = Sidecar(config, config_path=path)
        plan = await sidecar._build_plan(config)
    if revocation == "ocsp":  # the responder's answer, held (a warm cache)
        from sidecar.revocation.ocsp import Answer

        now = time.time()
        sidecar.revocation._ocsp._answers[cert.sha256] = Answer("good", now, now + 3600, now + 3000)
    gateway = Gateway(
        plan, metrics=sidecar.metrics, logger=sidecar.log, access_log=log_format != "off"
    )
    listener = Listener(
        gateway,
        tls=sidecar.tls,
        limits=config.limits,
        peer_certs=sidecar.peer_certs,
        metrics=sidecar.metrics,
    )

    # The upstream side: one pooled keep-alive connection that answers every request at once.
    upstream = UpstreamConnection(loop, read_timeout=60.0)
    upstream.connection_made(
        _Transport(lambda _: loop.call_soon(upstream.data_received, RESPONSE))  # type: ignore[arg-type]
    )
    pool = plan.upstream._pool
    assert pool is not None
    pool._open = 1
    upstream.on_lost = pool._lost
    upstream.idle = True
    pool._idle.append(upstream)

    done: asyncio.Future[None] | None = None
    answers = 0

    def on_answer(data: bytes) -> None:
        nonlocal answers
        answers += 1
        if not data.startswith(b"HTTP/1.1 200 OK\r\n"):
            raise AssertionError(f"unexpected answer: {data[:200]!r}")
        if done is not None and not done.done():
            done.set_result(None)

    client = listener.protocol()
    client.connection_made(_Transport(on_answer, {"peername": ("127.0.0.1", 50000)}))  # type: ignore[arg-type]
    client._peer = None if front else cert

    async def run(n: int) -> float:
        nonlocal done
        started = time.process_time()
        for _ in range(n):
            done = loop.create_future()
            client.data_received(request)
            await done
        return time.process_time() - started

    await run(1000)  # warm-up: caches, the route table, the pool
    tune_gc()  # as `sidecar run` does once started
    tune_malloc()
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await run(requests)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    else:
        best = min([await run(requests) for _ in range(rounds)])
        print(
            f"{best / requests * 1e6:.1f} us of CPU per request (best of {rounds} x {requests};"
            f" {BUILD.describe()} build, log {log_format})"
        )
        assert answers >= requests * rounds
    if revocation != "none":
        counts = sidecar.revocation.outcome_counts()
        assert counts["good"] >= requests * rounds, counts  # every request was checked
    await plan.upstream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--routes", type=int, default=0, help="that many routes, each with certificate matchers"
    )
    parser.add_argument("--revocation", choices=("none", "ocsp", "crl"), default="none")
    parser.add_argument(
        "--front-proxy",
        action="store_true",
        help="plain HTTP from a trusted front proxy, the certificate in ssl-client-cert",
    )
    parser.add_argument(
        "--log",
        choices=("off", "json", "console"),
        default="off",
        help="the access log on (log.level info) in that format, written to /dev/null",
    )
    args = parser.parse_args(argv)
    run = measure(
        args.requests,
        args.rounds,
        args.profile,
        args.routes,
        args.revocation,
        args.front_proxy,
        args.log,
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(run)
    else:
        uvloop.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
