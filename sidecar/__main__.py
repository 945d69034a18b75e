"""Command line: ``sidecar run``, ``sidecar check-config``, ``sidecar demo``.

Exit codes: 0 clean stop, 2 bad configuration or usage, 1 anything else. Start-up errors are
one readable line each on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from . import BUILD, __version__, log
from .certs import read_certificates
from .config import Config, load
from .errors import CertificateError, ConfigError
from .hosts import certificate_names
from .revocation.report import summary as revocation_summary

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="mTLS identity sidecar: client certificates in, identity headers out.",
    )
    parser.add_argument(
        "--version", action="version", version=f"sidecar {__version__} ({BUILD.describe()})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy until SIGTERM/SIGINT")
    run.add_argument(
        "--config",
        default=os.environ.get("SIDECAR_CONFIG"),
        help="configuration file (default: $SIDECAR_CONFIG)",
    )
    run.add_argument("--log-format", choices=("json", "console"), help="override log.format")
    # Set by the supervisor when it starts workers (listen.workers > 1); not for people.
    run.add_argument("--worker-socket", help=argparse.SUPPRESS)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a configuration and print a summary")
    check.add_argument(
        "config", nargs="?", default=os.environ.get("SIDECAR_CONFIG"), help="configuration file"
    )
    demo = sub.add_parser(
        "demo", help="run a self-contained demo with a throwaway PKI and an echo upstream"
    )
    demo.add_argument(
        "--state",
        default=".sidecar-demo",
        help="folder for the demo's PKI and config (default: ./.sidecar-demo)",
    )
    demo.add_argument(
        "--port", type=int, default=8443, help="TLS port of the sidecar (default 8443)"
    )
    demo.add_argument(
        "--upstream-port", type=int, default=8081, help="port of the echo upstream (default 8081)"
    )
    demo.add_argument("--admin-port", type=int, default=9090, help="admin port (default 9090)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.config)
        if args.command == "run":
            return run(
                args.config,
                log_format=args.log_format,
                worker_socket=args.worker_socket,
                worker_index=args.worker_index,
            )
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(
                Path(args.state),
                port=args.port,
                upstream_port=args.upstream_port,
                admin_port=args.admin_port,
            )
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_CONFIG


def _load_or_report(path: str | None) -> Config | None:
    if not path:
        print(
            "sidecar: no configuration file given (use --config FILE or set SIDECAR_CONFIG)",
            file=sys.stderr,
        )
        return None
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def check_config(path: str | None) -> int:
    config = _load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    print(summary(config))
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def config_warnings(config: Config) -> list[str]:
    """Risks a valid configuration leaves open, said by check-config and at start-up."""
    from .identity.issuers import issuer_risk
    from .revocation.report import warnings

    risk = issuer_risk(config.tls, config.identity)
    return ([risk] if risk is not None else []) + warnings(config.tls)


def summary(config: Config) -> str:
    """A one-screen description of what this configuration will do."""
    lines = [
        "configuration OK",
        f"  listen      https://{config.listen.host}:{config.listen.port}  workers={config.listen.workers}",
        f"  names       {_names(config)}",
        f"  upstream    {config.upstream.url}  (connect {config.upstream.timeout.connect:g}s, read {config.upstream.timeout.read:g}s)",
        f"  tls         {config.tls.certificate}{_expiry(config.tls.certificate)}",
        f"  client cert {config.tls.client_certificate}; {len(config.tls.client_ca)} CA file(s), "
        f"{len(config.tls.pinned_certificates)} pinned certificate(s)",
        f"  identity    backend={config.identity.backend}, cache ttl {config.identity.cache.ttl:g}s",
        *revocation_summary(config.tls),
    ]
    identityplus = config.identity.identityplus
    if config.identity.backend == "identityplus" and identityplus and identityplus.issuers:
        names = ", ".join(c.subject.rfc4514_string() for c in identityplus.issuer_certificates())
        lines.append(f"  issuers     {names}")
    if config.identity.backend == "static":
        users = config.identity.static.users
        bound = sum(len(u.certificates) for u in users)
        lines.append(f"  users       {len(users)} user(s), {bound} certificate(s) bound")
    lines.append("  routes")
    for route in sorted(config.routes, key=lambda r: len(r.path), reverse=True):
        rule = (
            "public"
            if route.access == "public"
            else (f"roles any of {', '.join(route.roles)}" if route.roles else "authenticated")
        )
        lines.append(f"    {route.path:<24} {rule}")
    lines.append(f"  admin       http://{config.admin.host}:{config.admin.port}")
    return "\n".join(lines)


def _names(config: Config) -> str:
    """The names requests may address, and where they come from."""
    if config.listen.server_names is not None:
        return f"{', '.join(config.listen.server_names)} (listen.server_names)"
    try:
        leaf = read_certificates(config.tls.certificate)[0]
    except CertificateError:
        return "(unreadable tls.certificate)"
    return f"{', '.join(certificate_names(leaf))} (from tls.certificate)"


def _expiry(path: Path) -> str:
    try:
        cert = read_certificates(path)[0]
    except CertificateError:
        return ""
    left = cert.not_valid_after_utc - datetime.now(UTC)
    if left.total_seconds() < 0:
        return "  (EXPIRED)"
    return f"  (expires {cert.not_valid_after_utc:%Y-%m-%d}, in {left.days} days)"


def run(
    path: str | None,
    *,
    log_format: str | None = None,
    worker_socket: str | None = None,
    worker_index: int | None = None,
) -> int:
    # SIGHUP's default action is to terminate. Hold it until the event loop's handler is in
    # place (_serve, Supervisor.run): one that arrives meanwhile is delivered then and reloads,
    # since the file may have changed after it was read here. A supervisor's workers start
    # with it held already (workers.Child); it stays held from the drain to the exit.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    config = _load_or_report(path)
    if config is None or path is None:
        return EXIT_CONFIG
    log.configure(log_format or config.log.format, config.log.level)
    config_path = Path(path).resolve()
    try:
        if worker_socket is None and config.listen.worker_count() > 1:
            from .workers import Supervisor

            return run_loop(Supervisor(config, config_path, log_format=log_format).run())
        if worker_index is not None:
            structlog.contextvars.bind_contextvars(worker=worker_index)
        return run_loop(_serve(config, config_path, Path(worker_socket) if worker_socket else None))
    except CertificateError as exc:
        print(f"tls: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(
            f"sidecar: cannot start: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE


async def _serve(config: Config, path: Path | None, worker_socket: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal stops at once. SIGHUP reloads."""
    from .app import Sidecar

    sidecar = Sidecar(
        config, config_path=path, reuse_port=worker_socket is not None, admin_socket=worker_socket
    )
    await sidecar.start()
    _tune_gc()
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_stop() -> None:
        (force if stop.is_set() else stop).set()

    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.ensure_future(sidecar.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # see run()
    await stop.wait()
    # Draining: nothing is reloaded any more, and after the loop has removed its handler a
    # SIGHUP would end the process with the wrong exit code.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    draining = asyncio.create_task(sidecar.shutdown())
    forced = asyncio.create_task(force.wait())
    await asyncio.wait({draining, forced}, return_when=asyncio.FIRST_COMPLETED)
    # A reload still under way is abandoned; it closes what it had built.
    for task in reloads:
        task.cancel()
    await asyncio.gather(*reloads, return_exceptions=True)
    if not draining.done():
        sidecar.log.warning("stopping_at_once", reason="second signal")
        draining.cancel()
        return EXIT_OK
    forced.cancel()
    draining.result()
    return EXIT_OK


def _tune_gc() -> None:
    """Move what start-up built (modules, configuration, contexts) out of the collector's way,
    and collect the youngest generation less often: a request allocates many short-lived
    objects, almost none of them in cycles."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
