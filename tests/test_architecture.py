"""The shape of the code (issue #13): imports point down the request path, never in a circle,
and aiohttp stays behind the fallback and the clients that need it.

The imports are read with ``ast`` from the source, every one of them: at module level, inside
functions (imported late to save start-up time) and under ``TYPE_CHECKING`` (a cycle that only
the type checker sees is still a cycle a reader must untangle).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"

#: the request path's layers, top to bottom: a module imports its own layer or lower ones
LAYERS: tuple[tuple[str, ...], ...] = (
    # the entry points: the command line, assembly, the admin listener (with its status page
    # and trust reports, #18), the demo
    (
        "__main__",
        "app",
        "workers",
        "demo",
        "demo_echo",
        "admin",
        "admin_reports",
        "status",
        "revocation.admin",
    ),
    # the listener: accepts, counts and ends connections; holds both protocols
    ("listener",),
    # the protocols: TLS, our HTTP/1.1, aiohttp's (the fallback)
    ("tls_transport", "http1.client", "fallback.*"),
    # what the protocols share
    ("listener_state",),
    # what happens to a request, and where a forwarded one goes
    ("gateway", "request", "plan", "forwarder"),
    # the steps and the wire: pure leaves and small I/O pieces
    (
        "policy",
        "headers",
        "frontproxy",
        "responses",
        "identity",
        "identity.*",
        "http1.heads",
        "http1.bodies",
        "http1.inbound",
        "http1.upstream",
        "http1.pool",
        "flow",
        "tls",
        "log",
        # the access event's line and the log's writer (#19), compiled: log chooses them
        "accesslog",
        "loglines",
        "metrics",
        # route policy (#16): the sites by SNI and their routes, what a route asks of a
        # client, the ClientHello reader, and the decision explained for people
        "servers",
        "rules",
        "sni",
        "explain",
        # what the gateway observes for the status page (#18)
        "observe",
        # revocation (#14): the request path's question (gate) and what answers it: the
        # chain above a certificate, CRLs fetched, OCSP, the network (client, given to gate
        # by app), the identity backend's word (watch), check-config's report
        "revocation.gate",
        "revocation.chain",
        "revocation.fetch",
        "revocation.ocsp",
        "revocation.client",
        "revocation.watch",
        "revocation.report",
        # handshake admission (#19): the worker's handshake budget per turn of the loop
        "handshakes",
    ),
    # the ground everything stands on
    (
        "",
        "build",
        "config",
        "certs",
        "hosts",
        "addresses",
        "header_names",
        "errors",
        "tls_groups",
        "tls_tickets",
        # the TLS sessions a supervisor's workers share (#19)
        "tls_sessions",
        # many TLS records decrypted in one call (#19)
        "tls_records",
        "runtime",
        "http1",
        "fallback",
        # for running behind a front proxy (on main since #15; config reads two of them)
        "certformats",
        "sfv",
        "xfcc",
        "proxyproto",
        "sessions",
        # where the shared verdict cache lives (config reads it)
        "redis_url",
        # SPIFFE IDs and email addresses, as the configuration and the matchers read them
        "identifiers",
        # CRL files and deny entries, as the configuration reads and verifies them (#14)
        "revocation",
        "revocation.crl",
        "revocation.deny",
        # how applications may read a request path (#12): policy's route readings
        "readings",
    ),
)

#: the only modules that may import aiohttp: the fallback (aiohttp's server and, for
#: WebSockets, its client), the identity clients, the admin listener (and its pages: the status
#: page, trust reports) and what assembles or demonstrates the whole
AIOHTTP_ALLOWED = (
    "fallback.*",
    "identity.http",
    "identity.identityplus",
    "revocation.client",
    "revocation.admin",
    "admin",
    "admin_reports",
    "status",
    "app",
    "workers",
    "demo",
    "demo_echo",
)


def _name(path: Path) -> str:
    """``sidecar/http1/client.py`` -> ``http1.client``; the package itself is ``""``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = modules()[module].name == "__init__.py"
    parts = ["sidecar", *module.split(".")] if module else ["sidecar"]
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """The package's modules ``module`` imports, and the other top-level packages."""
    ours: set[str] = set()
    theirs: set[str] = set()
    tree = ast.parse(modules()[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            base = ""
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "sidecar" or name.startswith("sidecar."):
                inner = name.removeprefix("sidecar").removeprefix(".")
                if inner not in modules():  # ``from .x import Name``: the module is x
                    inner = base.removeprefix("sidecar").removeprefix(".")
                ours.add(inner)
                # importing a module runs its packages' __init__ first
                while "." in inner:
                    inner = inner.rsplit(".", 1)[0]
                    ours.add(inner)
                ours.add("")
            else:
                theirs.add(name.split(".")[0])
    ours.discard(module)
    return frozenset(ours), frozenset(theirs)


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return module.startswith(pattern[:-1])
    return module == pattern


def layer(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(_matches(module, pattern) for pattern in members):
            return index
    raise AssertionError(f"sidecar.{module} is in no layer of tests/test_architecture.py")


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer(module)


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(imports(module)[0]):
            if state.get(imported) == 1:
                loop = [*path[path.index(imported) :], imported]
                cycles.append(" -> ".join(f"sidecar.{m}".rstrip(".") for m in loop))
            elif imported not in state:
                walk(imported)
        path.pop()
        state[module] = 2

    for module in modules():
        if module not in state:
            walk(module)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down(module: str) -> None:
    upward = [
        f"sidecar.{imported}"
        for imported in sorted(imports(module)[0])
        if layer(imported) < layer(module)
    ]
    assert upward == [], f"sidecar.{module} imports a layer above its own"


def test_aiohttp_stays_behind_the_fallback_and_the_clients() -> None:
    importing = sorted(module for module in modules() if "aiohttp" in imports(module)[1])
    allowed = [m for m in importing if any(_matches(m, p) for p in AIOHTTP_ALLOWED)]
    assert importing == allowed


def test_the_http1_path_imports_no_aiohttp_at_all() -> None:
    """Everything the HTTP/1.1 protocol runs, directly or not: the hot path."""
    seen: set[str] = set()
    todo = ["http1.client"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module)[0])
    assert sorted(m for m in seen if "aiohttp" in imports(m)[1]) == []
    assert "fallback" not in seen
