"""Route bypass through the request target, attacked from outside over real TLS.

An application may read the path it is sent differently from the sidecar (dot segments,
``%2e``, ``;params``, ``%252e``, ``#``, merged slashes), so the sidecar must never forward a
target whose readings could fall under another route than the one whose policy it applied.
Examples first, then the invariant itself with generated targets (hypothesis): through the
listener and aiohttp's fallback path with a raw upstream that records the bytes it got, and,
for long runs, at the level of the pure policy. ``SIDECAR_PATH_EXAMPLES=100000`` makes both
property tests run that many examples from a random seed (CI: a few hundred, derandomised).

Also here: a flood of distinct long paths (anonymous input) keeps the path caches bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar import request as listener
from sidecar.policy import BadPath, Route, RouteTable

from . import path_oracle as oracle
from .conftest import ConfigDir, Running, SidecarFactory
from .pki import Issued
from .servers import Scripted, StartScripted, keep_alive_ok
from .test_listener import Response, read_response

ROUTES = ("/public/", "/admin/", "/")
#: the routes of ``ConfigDir.base``: who may pass each (None: anonymous)
ALLOWED: dict[str, set[str | None]] = {
    "/public/": {None, "bob", "alice"},
    "/admin/": {"alice"},
    "/": {"bob", "alice"},
}
EXAMPLES = int(os.environ.get("SIDECAR_PATH_EXAMPLES", "0"))


# ---- a raw keep-alive client per identity ---------------------------------------------------


class Client:
    """One TLS connection for one identity, opened again when the sidecar closes it."""

    def __init__(self, running: Running, who: Issued | None) -> None:
        self._running = running
        self._ssl = running.client_ssl(who)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, target: str, body: bytes = b"") -> Response:
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        payload = (head + "\r\n").encode("latin-1") + body
        reused = self._conn is not None
        try:
            response = await self._exchange(payload, method)
        except asyncio.IncompleteReadError as exc:
            # A kept-alive connection the server had closed (aiohttp closes after some of
            # its 400s without saying so): what any client does, once, on a new connection.
            if not reused or exc.partial:
                raise
            response = await self._exchange(payload, method)
        if "close" in response.tokens("Connection"):
            await self.close()
        return response

    async def _exchange(self, payload: bytes, method: str) -> Response:
        reader, writer = await self._open()
        try:
            writer.write(payload)
            async with asyncio.timeout(10):
                return await read_response(reader, method)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            await self.close()
            raise

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is None:
            self._conn = await asyncio.open_connection(
                "127.0.0.1",
                self._running.sidecar.port,
                ssl=self._ssl,
                server_hostname="localhost",
                limit=1 << 20,
            )
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(conn[1].wait_closed(), 2)


class Clients:
    def __init__(self, running: Running) -> None:
        certs = running.certs
        self.by_name = {
            None: Client(running, None),
            "bob": Client(running, certs.bob),
            "alice": Client(running, certs.alice),
        }

    async def close(self) -> None:
        for client in self.by_name.values():
            await client.close()


@pytest.fixture
async def recorder(scripted: StartScripted) -> Scripted:
    """A raw upstream: every request head exactly as it arrived, answered 200."""
    return await scripted(keep_alive_ok)


@pytest.fixture
async def gate(start_sidecar: SidecarFactory, config_dir: ConfigDir, recorder: Scripted) -> Running:
    running: Running = await start_sidecar(config_dir.base(recorder.port))
    return running


@pytest.fixture
async def clients(gate: Running) -> AsyncIterator[Clients]:
    made = Clients(gate)
    yield made
    await made.close()


class Harness:
    """The clients and the recorder (with a short repr: hypothesis prints its arguments)."""

    def __init__(self, clients: Clients, recorder: Scripted) -> None:
        self.clients = clients
        self.recorder = recorder

    def __repr__(self) -> str:
        return "Harness()"


@pytest.fixture
def harness(clients: Clients, recorder: Scripted) -> Harness:
    return Harness(clients, recorder)


def forwarded_targets(recorder: Scripted, since: int) -> list[str]:
    return [head.split(b" ", 2)[1].decode("latin-1") for head in recorder.requests[since:]]


async def access_event(events: Sequence[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    """The request's access event (written when the request ends, which may be just after
    the client has read the last byte)."""
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in events if e.get("event") == "request"]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, "no access event"
        await asyncio.sleep(0.005)


# ---- examples ---------------------------------------------------------------------------------

REFUSED = [
    "/admin/../public/x",  # the first example: judged under /public/ before
    "/admin/../app/x",  # a member's identity on an admin path
    "/public/../admin/x",
    "/public/./x",
    "/public/x/.",
    "/public/x/..",
    "/public/.",
    "/public/..",
    "/./public/x",
    "/a/..;x/b",  # Tomcat drops ;params before resolving
    "/a/.;/b",
    "/public/..;/admin/",
    "/public/%2e%2e/admin/x",
    "/public/%2E%2e/admin/x",
    "/public/.%2e/admin/x",  # mixed
    "/public/%2e./admin/x",
    "/public/%2e/x",
    "/public/%2e%2e;x/admin/",
    "/public/..%3bx/admin/",  # an encoded ; that a decoding server then strips
    "/public/..%3Fx",  # a server that decodes, then cuts at ?
    "/public/%2e%2e%23x",  # ... or at #
    "/public%2f..%2fadmin/x",
    "/public/%252e%252e/admin/x",  # %25: decoded twice, a dot
    "/public/%252E./admin/x",
    "/public%252f..%252fadmin/x",  # ... a slash
    "/public/%25%32%65%25%32%65/admin/",  # %2e spelled with escapes: a dot when decoded twice
    "/public/%25252e%25252e/admin/",  # three times
    "/public/%255c",  # a backslash, decoded twice
    "/public/x#frag",  # a fragment has no business in a request target
    "/public/x?q=1#frag",
    "/public/#/../admin/",
    "/public/%zz",  # not percent-encoding at all (nginx: 400)
    "/public/%u002e%u002e/admin/",  # IIS's %u escapes
    "/public/%2",
    "/public/%c0%ae%c0%ae/admin/",  # overlong UTF-8 dots (old Tomcat, IIS)
    "/public/%e0%80%ae%e0%80%ae/admin/",
    "http://localhost/public/x",  # absolute-form: an origin server has no use for it
    "http://localhost/admin/../public/x",
    "HTTP://localhost//admin/%2e%2e/x",
    "*",  # asterisk-form
]


@pytest.mark.parametrize("who", [None, "bob"])
@pytest.mark.parametrize("method", ["GET", "POST"], ids=["listener", "aiohttp"])
@pytest.mark.parametrize("target", REFUSED)
async def test_targets_that_could_be_read_as_another_path_are_400_and_never_forwarded(
    clients: Clients, recorder: Scripted, target: str, method: str, who: str | None
) -> None:
    body = b"x" if method == "POST" else b""  # a body: served by aiohttp's server
    response = await clients.by_name[who].request(method, target, body)
    assert response.status == 400, (target, response.status, forwarded_targets(recorder, 0))
    assert recorder.requests == []


FORWARDED = [
    ("/public/a%20b/c%2Bd", None),
    ("/public/...", None),
    ("/public/.hidden/a./..b/b..", None),
    ("/public/x?a=../admin/&b=%2e%2e&c=/./", None),  # dots in the query are no path
    ("/public/100%25", None),  # a percent sign, encoded once
    ("/public/50%2520off", None),  # %25 before something harmless
    ("/public//x", None),  # merged or not, still /public/
    ("/app/%C3%A9t%C3%A9?x=%23", "bob"),
    ("/admin/a%2Fb", "alice"),
]


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["listener", "aiohttp"])
@pytest.mark.parametrize(("target", "who"), FORWARDED)
async def test_harmless_targets_are_forwarded_byte_for_byte(
    clients: Clients, recorder: Scripted, target: str, who: str | None, method: str
) -> None:
    body = b"x" if method == "POST" else b""
    response = await clients.by_name[who].request(method, target, body)
    assert response.status == 200, (target, response.status)
    assert forwarded_targets(recorder, 0) == [target]


# ---- the invariant, with generated targets ---------------------------------------------------

PIECES = [
    "/",
    "/",
    "/",
    "a",
    "admin",
    "public",
    "app",
    "Admin",
    "PUBLIC",
    "adm",
    "in",
    "%69",
    "69",
    "%20",
    ".",
    "..",
    "\\",
    ";",
    ";x",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%25",
    "%5c",
    "%5C",
    "%3b",
    "%3B",
    "%3f",
    "%23",
    "2e",
    "2E",
    "2f",
    "2F",
    "5c",
    "25",
    "%",
    "#",
    "?",
    "=",
    "&",
    # scripts (PATH_INFO), format suffixes, letters that fold to ASCII (issue #12, 2nd round)
    "index.php",
    "x.PHP",
    ".php",
    "php",
    "%68",
    "app.cgi",
    ".aspx",
    ".json",
    "json",
    "adm%C4%B1n",  # the dotless i: "admin" to re.I and Java
    "%C4%B1",
    "%C4%B0",  # the capital I with a dot: "i" to Java
    "%C5%BF",  # the long s
    "%E2%84%AA",  # the Kelvin sign: "k"
    "ADMIN",
    "publ",
    "c",
]
STARTS = [
    "/",
    "/",
    "/",
    "/public/",
    "/public",
    "/admin/",
    "/Admin/",
    "/app/",
    "//",
    "http://localhost/",
    "*",
    "/index.php/",
    "/admin.json",
    "/adm%C4%B1n/",
    "/public/x.php/",
]
targets = st.builds(
    lambda start, pieces: start + "".join(pieces),
    st.sampled_from(STARTS),
    st.lists(st.sampled_from(PIECES), max_size=14),
)


def must_refuse(target: str) -> str | None:
    """Why the sidecar must answer 400 (None: it need not): the issue's rules and the
    README's."""
    if "#" in target:
        return "a # in the target"
    if not target.startswith("/"):
        return "not origin-form"
    path = oracle.path_of(target)
    if oracle.has_dot_segment(path):
        return "a dot segment in some reading"
    once = oracle.decode(path)
    if "\\" in once:
        return "a backslash"
    if _ESCAPED_DOT_OR_SLASH.search(once):
        return "a %25 that decodes to a dot or a slash"
    return None


_ESCAPED_DOT_OR_SLASH = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def check_forwarded(target: str, sent: str, applied: str, who: str | None) -> None:
    """The invariant: every reading of what the application got falls under the route whose
    policy was applied, and that route lets ``who`` in."""
    assert sent == target, "the target must reach the application byte for byte"
    routes = {oracle.route_of(r, ROUTES) for r in oracle.routing_readings(oracle.path_of(sent))}
    assert routes == {applied}, f"{sent!r} judged under {applied}, readable under {routes}"
    assert who in ALLOWED[applied]


@settings(
    max_examples=EXAMPLES or 300,
    derandomize=not EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    target=targets,
    method=st.sampled_from(["GET", "POST"]),
    who=st.sampled_from([None, "bob", "alice"]),
)
@example(target="/admin/../public/x", method="GET", who=None)
@example(target="/admin/../app/x", method="GET", who="bob")
@example(target="/admin/..;/public/x", method="POST", who=None)
async def test_whatever_is_forwarded_is_read_under_the_route_applied(
    harness: Harness, target: str, method: str, who: str | None
) -> None:
    clients, recorder = harness.clients, harness.recorder
    before = len(recorder.requests)
    with capture_logs() as events:
        response = await clients.by_name[who].request(
            method, target, b"x" if method == "POST" else b""
        )
        sent = forwarded_targets(recorder, before)
        event(f"answered {response.status}")
        if response.status == 200:
            [one] = sent
            applied = (await access_event(events))["route"]
            check_forwarded(target, one, applied, who)
        else:
            assert sent == []
    reason = must_refuse(target)
    if reason is not None:
        assert response.status == 400, f"{target!r}: {reason}, answered {response.status}"


TABLE = RouteTable(
    [
        Route("/public/", public=True),
        Route("/admin/", roles=frozenset({"administrator"})),
        Route("/"),
    ]
)


@settings(max_examples=EXAMPLES or 2000, derandomize=not EXAMPLES, database=None, deadline=None)
@given(target=targets)
@example(target="/admin/../public/x")
def test_the_pure_policy_keeps_the_invariant(target: str) -> None:
    """The same invariant on ``RouteTable.match`` alone (fast: for the long runs)."""
    try:
        route = TABLE.match(target)
    except BadPath:
        event("refused")
        return
    event("matched" if route is not None else "no route")
    assert must_refuse(target) is None, target
    if route is not None:
        check_forwarded(target, target, route.path, "alice")


# ---- bounded caches ------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@contextlib.contextmanager
def no_access_events() -> Iterator[None]:
    """Drop log events (the flood's own would be held by pytest's capture)."""

    def drop(*_: Any) -> Any:
        raise structlog.DropEvent

    previous = structlog.get_config()
    structlog.configure(processors=[drop])
    try:
        yield
    finally:
        structlog.configure(**previous)


async def test_a_flood_of_distinct_long_paths_keeps_memory_bounded(
    clients: Clients, gate: Running
) -> None:
    """Anonymous clients choose the paths: 4,096 distinct 8 KB ones (32 MiB) must not stay."""
    client = clients.by_name[None]
    filler = "f" * 8000

    async def flood(first: int, count: int, batch: int = 64) -> None:
        for start in range(first, first + count, batch):
            reader, writer = await client._open()
            writer.write(
                b"".join(
                    f"GET /x/{i:06d}/{filler} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                    for i in range(start, start + batch)
                )
            )
            for _ in range(batch):
                async with asyncio.timeout(10):
                    assert (await read_response(reader)).status == 401

    with no_access_events():
        await flood(0, 256)  # warm: buffers, the TLS connection, a first fill of the caches
        before = rss()
        await flood(256, 4096)
        grown = rss() - before
    assert grown < 8 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"
    assert listener.decoded_paths.size <= listener.decoded_paths.budget


def test_the_route_cache_is_bounded_in_bytes() -> None:
    table = RouteTable([Route("/public/", public=True), Route("/")])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(15_000):
            assert table.match(f"/x/{i:06d}/" + "p" * 490) == Route("/")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2 * 1024 * 1024, f"{grown / 2**20:.1f} MiB held"
    assert table.match("/public/x") == Route("/public/", public=True)  # still caches
