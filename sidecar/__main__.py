"""Command line: ``sidecar run``, ``sidecar check-config``, ``sidecar explain``, ``sidecar demo``.

Exit codes: 0 clean stop, 2 bad configuration or usage, 1 anything else. Start-up errors are
one readable line each on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509

from . import BUILD, __version__, log, tls_sessions, tls_tickets
from .certs import ClientCert, read_certificates
from .config import Config, RouteConfig, load
from .errors import CertificateError, ConfigError
from .hosts import certificate_names
from .identity import Verdict
from .revocation.report import summary as revocation_summary
from .runtime import run_loop, tune_gc, tune_malloc

if TYPE_CHECKING:
    from .revocation.gate import Refusal

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
    run.add_argument("--supervisor-socket", help=argparse.SUPPRESS)
    run.add_argument(
        tls_tickets.PIPE_OPTION, type=int, dest="ticket_secret_fd", help=argparse.SUPPRESS
    )
    run.add_argument(tls_sessions.OPTION, type=int, dest="session_store_fd", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a configuration and print a summary")
    check.add_argument(
        "config", nargs="?", default=os.environ.get("SIDECAR_CONFIG"), help="configuration file"
    )
    explain = sub.add_parser(
        "explain",
        help="say which server and route a request gets, every rule checked, and the decision",
        description="Explain what the policy of a configuration does with one request, without "
        "starting anything. With the static backend the verdict is the configuration's; other "
        "backends are not asked: the answer then assumes they allow the certificate (with "
        "--roles, --trust-score, --local-intrusions).",
    )
    explain.add_argument(
        "--config", default=os.environ.get("SIDECAR_CONFIG"), help="configuration file"
    )
    explain.add_argument("--path", required=True, help="the request target, e.g. /admin/users?x=1")
    explain.add_argument("--method", default="GET")
    explain.add_argument(
        "--cert",
        help="the client certificate, PEM or DER (certificates after the first one are the "
        "chain the client sends with it); none: a request without a certificate",
    )
    explain.add_argument("--host", help="the Host header (default: the server's first name)")
    explain.add_argument(
        "--sni", help="the TLS server name the client sends (default: --host's name)"
    )
    explain.add_argument("--no-sni", action="store_true", help="the client sends no server name")
    explain.add_argument("--address", help="the client's IP address (for addresses rules)")
    explain.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (e.g. X-HTTP-Method-Override); may be repeated",
    )
    explain.add_argument(
        "--roles", default="", help="comma-separated roles an unasked backend is assumed to give"
    )
    explain.add_argument("--trust-score", help="the Identity Plus trust score to assume")
    explain.add_argument(
        "--local-intrusions", type=int, help="the Identity Plus local intrusions to assume"
    )
    explain.add_argument("--json", action="store_true", help="answer in JSON")
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
        if args.command == "explain":
            return explain_request(args)
        if args.command == "run":
            return run(
                args.config,
                log_format=args.log_format,
                worker_socket=args.worker_socket,
                worker_index=args.worker_index,
                supervisor_socket=args.supervisor_socket,
                ticket_secret_fd=args.ticket_secret_fd,
                session_store_fd=args.session_store_fd,
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


def explain_request(args: argparse.Namespace) -> int:
    """``sidecar explain``: the policy's answer for one request, step by step."""
    from .explain import Assumption, Question, default_server_name, explain
    from .identity.static import StaticBackend
    from .servers import build_servers

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    problems: list[str] = []
    cert: ClientCert | None = None
    chain: list[x509.Certificate] = []
    if args.cert:
        try:
            first, *chain = read_certificates(Path(args.cert))
            cert = ClientCert.from_x509(first)
        except CertificateError as exc:
            problems.append(f"--cert: {exc}")
    headers: list[tuple[str, str]] = []
    for line in args.header:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            problems.append(f"--header: not 'Name: value': {line!r}")
        headers.append((name.strip(), value.strip()))
    score: Decimal | None = None
    if args.trust_score is not None:
        try:
            score = Decimal(args.trust_score)
        except InvalidOperation:
            problems.append(f"--trust-score: not a number: {args.trust_score!r}")
    try:
        servers = build_servers(config)
        anchors = [
            c
            for path in (*config.tls.client_ca, *config.tls.pinned_certificates)
            for c in read_certificates(path)
        ]
    except CertificateError as exc:
        problems.append(str(exc))
    for problem in problems:
        print(f"sidecar explain: {problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    server_name = None if args.no_sni else args.sni or default_server_name(args.host)
    if args.host is None and server_name is None and not args.no_sni:
        # as a browser would ask for the first server's first name
        names = servers.servers[0].names.names
        server_name = default_server_name(names[0]) if names else None
    static = StaticBackend(config.identity.static) if config.identity.backend == "static" else None

    def verdict_of(certificate: ClientCert) -> tuple[Verdict | None, str]:
        if static is not None:
            return static.lookup_now(certificate), "the static backend"
        return None, f"identity.backend is {config.identity.backend}: explain does not ask it"

    revocation, note = _offline_revocation(config)
    answer = explain(
        servers,
        Question(
            path=args.path,
            method=args.method,
            host=args.host,
            server_name=server_name,
            address=args.address,
            cert=cert,
            headers=headers,
        ),
        verdict_of=verdict_of,
        enrol=_can_enrol(config),
        now=time.time(),
        anchors=anchors,
        chain=chain,
        assumption=Assumption(
            roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
            trust_score=score,
            local_intrusions=args.local_intrusions,
        ),
        revocation=revocation,
        revocation_note=note,
    )
    print(json.dumps(answer.as_dict(), indent=1) if args.json else answer.text())
    return EXIT_OK


def _offline_revocation(
    config: Config,
) -> tuple[Callable[[ClientCert], Refusal | None] | None, str]:
    """Revocation as ``sidecar explain`` can tell it without the network: the deny-list and
    the CRL files (and a note on what it does not ask)."""
    from .config import CRLFetchConfig
    from .revocation.gate import Revocation, prepare

    tls = config.tls
    if not (tls.crl or tls.deny or tls.ocsp != "off" or tls.crl_fetch.enabled):
        return None, ""
    skipped = [
        what
        for what, on in (
            ("OCSP", tls.ocsp != "off"),
            ("distribution points", tls.crl_fetch.enabled),
        )
        if on
    ]
    offline = tls.model_copy(update={"ocsp": "off", "crl_fetch": CRLFetchConfig()})

    def no_network(timeout: float) -> Any:
        raise RuntimeError("sidecar explain asks no network")

    revocation = Revocation(prepare(offline), transports=no_network)
    note = f" ({' and '.join(skipped)} not asked by sidecar explain)" if skipped else ""
    return revocation.status, note


def _can_enrol(config: Config) -> bool:
    identity = config.identity
    if identity.backend == "identityplus" and identity.identityplus is not None:
        return identity.identityplus.enrol_missing
    if identity.backend == "http" and identity.http is not None:
        return identity.http.enrol_missing
    return False


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
        f"  tls         {_served(config)}",
        f"  client cert {config.tls.client_certificate}; {len(config.tls.client_ca)} CA file(s), "
        f"{len(config.tls.pinned_certificates)} pinned certificate(s)",
        f"  identity    backend={config.identity.backend}, cache ttl {config.identity.cache.ttl:g}s",
        *revocation_summary(config.tls),
    ]
    shared = config.identity.cache.shared
    if shared is not None:
        lines.append(
            f"  shared      {shared.target().describe()}  prefix {shared.key_prefix!r}, "
            f"timeout {shared.timeout * 1000:g} ms"
            + (", password from a file" if shared.password_file else "")
        )
    identityplus = config.identity.identityplus
    if config.identity.backend == "identityplus" and identityplus and identityplus.issuers:
        names = ", ".join(c.subject.rfc4514_string() for c in identityplus.issuer_certificates())
        lines.append(f"  issuers     {names}")
    if config.identity.backend == "identityplus" and identityplus and identityplus.legacy:
        lines.append(
            "  legacy      HTTP legacy: browsers without a certificate sign on at Identity Plus; "
            f"sessions last {config.identity.cache.ttl:g}s, "
            f"{len(identityplus.session_keys)} session key(s)"
        )
    if config.identity.backend == "static":
        users = config.identity.static.users
        bound = sum(len(u.certificates) for u in users)
        lines.append(f"  users       {len(users)} user(s), {bound} certificate(s) bound")
    if config.servers is None:
        lines.append("  routes")
        lines += _route_lines(config.routes, "    ")
    else:
        for i, server in enumerate(config.servers):
            mode = server.client_certificate or config.tls.client_certificate
            lines.append(
                f"  servers[{i}]  {', '.join(server.names)}  (client_certificate {mode}"
                f"{'; also clients without SNI' if i == 0 else ''})"
            )
            lines += _route_lines(server.routes, "    ")
    lines.append(f"  admin       http://{config.admin.host}:{config.admin.port}")
    return "\n".join(lines)


def _route_lines(routes: Sequence[RouteConfig], indent: str) -> list[str]:
    """One line per route, longest path first (the order they are tried in)."""
    lines = []
    for route in sorted(routes, key=lambda r: len(r.path), reverse=True):
        if route.access == "public":
            rule = "public"
        elif route.access == "certificate":
            rule = "the certificate alone"
        else:
            rule = f"roles any of {', '.join(route.roles)}" if route.roles else "authenticated"
        if route.methods is not None:
            rule += f"; methods {', '.join(route.methods)}"
        if route.allow is not None:
            keys = [
                k for k in type(route.allow).model_fields if getattr(route.allow, k) is not None
            ]
            rule += f"; allow {', '.join(keys)}"
        if route.addresses is not None:
            for key in ("allow", "exempt"):
                networks = getattr(route.addresses, key)
                if networks is not None:
                    rule += f"; addresses {key} {', '.join(str(n) for n in networks)}"
        if route.identityplus is not None:
            trust = route.identityplus
            if trust.min_trust_score is not None:
                rule += f"; trust score >= {trust.min_trust_score}"
            if trust.max_local_intrusions is not None:
                rule += f"; local intrusions <= {trust.max_local_intrusions}"
        lines.append(f"{indent}{route.path:<24} {rule}")
    return lines


def _names(config: Config) -> str:
    """The names requests may address, and where they come from."""
    if config.servers is not None:
        return "per server (servers[].names)"
    if config.listen.server_names is not None:
        return f"{', '.join(config.listen.server_names)} (listen.server_names)"
    if config.tls.certificate is None:
        return "(no tls.certificate)"
    try:
        leaf = read_certificates(config.tls.certificate)[0]
    except CertificateError:
        return "(unreadable tls.certificate)"
    return f"{', '.join(certificate_names(leaf))} (from tls.certificate)"


def _served(config: Config) -> str:
    certificate = config.tls.certificate
    if certificate is None:
        return "none: plain HTTP (listen.tls: false)"
    return f"{certificate}{_expiry(certificate)}"


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
    supervisor_socket: str | None = None,
    ticket_secret_fd: int | None = None,
    session_store_fd: int | None = None,
) -> int:
    # The supervisor's ticket secret, read before anything else so its pipe is not left open.
    ticket_secret = None if ticket_secret_fd is None else tls_tickets.read_secret(ticket_secret_fd)
    # ... and its table of sessions, mapped, the descriptor closed
    shared_sessions, store_problem = None, None
    if session_store_fd is not None:
        try:
            shared_sessions = tls_sessions.SessionStore.inherited(session_store_fd)
        except ValueError as exc:
            store_problem = str(exc)
    # SIGHUP's default action is to terminate. Hold it until the event loop's handler is in
    # place (_serve, Supervisor.run): one that arrives meanwhile is delivered then and reloads,
    # since the file may have changed after it was read here. A supervisor's workers start
    # with it held already (workers.Child); it stays held from the drain to the exit.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    config = _load_or_report(path)
    if config is None or path is None:
        return EXIT_CONFIG
    log.configure(log_format or config.log.format, config.log.level)
    if store_problem is not None:
        log.get_logger("sidecar").warning(
            "tls_sessions_not_shared",
            reason=store_problem,
            # a worker resumes its siblings' sessions from tickets; a process alone, from its
            # own cache
            hint="session tickets are used" if worker_socket else "this process's cache is used",
        )
    config_path = Path(path).resolve()
    try:
        if worker_socket is None and config.listen.worker_count() > 1:
            from .workers import Supervisor

            return run_loop(Supervisor(config, config_path, log_format=log_format).run())
        if worker_index is not None:
            structlog.contextvars.bind_contextvars(worker=worker_index)
        return run_loop(
            _serve(
                config,
                config_path,
                Path(worker_socket) if worker_socket else None,
                Path(supervisor_socket) if supervisor_socket else None,
                ticket_secret,
                shared_sessions,
            )
        )
    except CertificateError as exc:
        print(f"tls: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(
            f"sidecar: cannot start: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE


async def _serve(
    config: Config,
    path: Path | None,
    worker_socket: Path | None = None,
    supervisor_socket: Path | None = None,
    ticket_secret: bytes | None = None,
    shared_sessions: tls_sessions.SessionStore | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal stops at once. SIGHUP reloads."""
    from .app import Sidecar

    sidecar = Sidecar(
        config,
        config_path=path,
        reuse_port=worker_socket is not None,
        admin_socket=worker_socket,
        supervisor_socket=supervisor_socket,
        ticket_secret=ticket_secret,
        shared_sessions=shared_sessions,
    )
    await sidecar.start()
    tune_gc()
    untuned = tune_malloc()
    if untuned is not None:
        log.get_logger("sidecar").debug("malloc_not_tuned", reason=untuned)
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


if __name__ == "__main__":
    sys.exit(main())
