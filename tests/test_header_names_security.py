"""Header names spelled with punctuation, attacked from outside over real TLS (issue #12,
second round, finding 1).

``X.USERINFO``, ``X~USERINFO``, ``X!USERINFO`` are RFC 9110 tokens, and servers read them as
``X-USERINFO``: PHP turns ``.`` (and space) into ``_`` in ``$_SERVER``, lighttpd every
character that is not a letter or digit, and ``_`` is ``-`` to every CGI-style server. The
invariant: **no client header whose name, with every character that is not a letter or digit
read as ``-`` and letter case ignored, equals a protected name reaches the application**;
protected are the identity headers, the forwarding, re-routing and client-address headers,
``headers.strip``, the hop-by-hop headers and the names listed in ``Connection``. The names the
sidecar writes itself arrive once each, spelled as the sidecar spells them.

Checked with a raw upstream that records the bytes it gets, on the listener's path (GET) and
aiohttp's (POST), by example and with generated names (hypothesis), and once against PHP itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import string
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.config import ConfigError, load
from sidecar.headers import HeaderRules, request_fields
from sidecar.identity import User

from .conftest import ConfigDir, Running, SidecarFactory, decode_userinfo
from .php_server import PhpServer, php_server
from .pki import Issued
from .servers import Scripted, StartScripted, keep_alive_ok
from .test_listener import read_response

__all__ = ["php_server"]  # the fixture, imported to be used here

#: RFC 9110 §5.6.2 tchar, less letters and digits
PUNCTUATION = "!#$%&'*+-.^_`|~"
IDENTITY = {"x-app-certificate", "x-userinfo"}
#: what only trusted proxies may send (written here from the README's tables, not imported)
FORWARDING = {
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
}
REROUTING = {"x-original-url", "x-rewrite-url"}
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
STRIP = {"x-debug-user"}  # the fixture's headers.strip
PROTECTED = IDENTITY | FORWARDING | REROUTING | HOP_BY_HOP | STRIP | {"x-request-id"}
#: the lines the sidecar adds itself, as it spells them (identity headers only with a user)
OURS = ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP", "X-Request-ID"]
OURS_IDENTIFIED = [*OURS, "X-APP-CERTIFICATE", "X-USERINFO"]


def normal(name: str) -> str:
    """A header name as PHP, lighttpd and CGI read it: every character that is not an ASCII
    letter or digit is a ``-``, letter case ignored."""
    return re.sub(r"[^a-z0-9]", "-", name.lower())


# ---- a raw client and the recorded heads -------------------------------------------------------


class Client:
    """One keep-alive TLS connection for one identity, opened again when closed."""

    def __init__(self, running: Running, who: Issued | None) -> None:
        self._running = running
        self._ssl = running.client_ssl(who)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, method: str, target: str, fields: list[tuple[str, str]]) -> int:
        body = b"body" if method == "POST" else b""
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
        lines += [f"{name}: {value}" for name, value in fields]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            reader, writer = await self._open()
            try:
                writer.write(payload)
                async with asyncio.timeout(10):
                    response = await read_response(reader, method)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                await self.close()
                if attempt:
                    raise
                continue
            if "close" in response.tokens("Connection"):
                await self.close()
            return response.status
        raise AssertionError("unreachable")

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is None:
            self._conn = await asyncio.open_connection(
                "127.0.0.1",
                self._running.sidecar.port,
                ssl=self._ssl,
                server_hostname="localhost",
            )
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(conn[1].wait_closed(), 2)


def received_fields(recorder: Scripted) -> list[tuple[str, str]]:
    """The header fields of the last request the application got, as bytes arrived."""
    head = recorder.requests[-1].split(b"\r\n\r\n", 1)[0]
    fields = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return fields


def check_received(
    fields: list[tuple[str, str]], *, identified: bool, extra: frozenset[str] = frozenset()
) -> None:
    """The invariant: a received name that reads as a protected one is one of ours, spelled
    as we spell it, once."""
    protected = PROTECTED | extra
    ours = sorted(OURS_IDENTIFIED if identified else OURS)
    seen = sorted(name for name, _ in fields if normal(name) in protected)
    assert seen == ours, f"protected names that reached the application: {fields}"
    assert not [v for _, v in fields if v == "forged"], fields


@pytest.fixture
async def recorder(scripted: StartScripted) -> Scripted:
    return await scripted(keep_alive_ok)


@pytest.fixture
async def gate(start_sidecar: SidecarFactory, config_dir: ConfigDir, recorder: Scripted) -> Running:
    data = config_dir.base(recorder.port)
    data["headers"] = {"strip": ["X-Debug-User"]}
    running: Running = await start_sidecar(data)
    return running


@pytest.fixture
async def clients(gate: Running) -> AsyncIterator[dict[str | None, Client]]:
    made = {None: Client(gate, None), "bob": Client(gate, gate.certs.bob)}
    yield made
    for client in made.values():
        await client.close()


METHODS = pytest.mark.parametrize("method", ["GET", "POST"], ids=["listener", "aiohttp"])


# ---- examples --------------------------------------------------------------------------------

SPELLINGS = [f"X{mark}USERINFO" for mark in PUNCTUATION] + [
    "X.APP.CERTIFICATE",
    "x~app|certificate",
    "X.Original.URL",
    "X!Rewrite!URL",
    "True.Client.IP",
    "X.Client.IP",
    "CF.Connecting.IP",
    "X.Cluster.Client.IP",
    "X.Forwarded.Prefix",
    "X.Forwarded.For",
    "X*Forwarded*Host",
    "X.Forwarded.Server",
    "X.Real.IP",
    "X.Request.ID",
    "X.Debug.User",
    "x'debug'user",
    "Keep.Alive",
    "Proxy.Authorization",
    "Transfer.Encoding",
]


@METHODS
@pytest.mark.parametrize("who", [None, "bob"])
async def test_protected_names_spelled_with_punctuation_never_arrive(
    clients: dict[str | None, Client], recorder: Scripted, method: str, who: str | None
) -> None:
    fields = [(name, "forged") for name in SPELLINGS]
    target = "/public/x" if who is None else "/app/x"
    assert await clients[who].send(method, target, fields) == 200
    received = received_fields(recorder)
    check_received(received, identified=who is not None)
    if who is not None:
        [userinfo] = [v for k, v in received if k == "X-USERINFO"]
        assert decode_userinfo(userinfo)["username"] == "bob"


@METHODS
@pytest.mark.parametrize("listed", ["X.Secret", "x~secret", "X_SECRET", "X-Secret"])
@pytest.mark.parametrize("sent", ["X-Secret", "X_Secret"])
async def test_names_listed_in_connection_are_read_the_same_way(
    clients: dict[str | None, Client], recorder: Scripted, method: str, listed: str, sent: str
) -> None:
    fields = [("Connection", f"keep-alive, {listed}"), (sent, "forged")]
    assert await clients[None].send(method, "/public/x", fields) == 200
    check_received(received_fields(recorder), identified=False, extra=frozenset({"x-secret"}))


@METHODS
async def test_other_names_with_punctuation_are_dropped_as_nginx_does(
    clients: dict[str | None, Client], recorder: Scripted, method: str
) -> None:
    """nginx's ``ignore_invalid_headers on``: a name with a character outside letters, digits,
    ``-`` and ``_`` is dropped whatever it reads as; the others pass unchanged."""
    fields = [("X.Custom", "1"), ("X~Tilde", "2"), ("X-Kept", "3"), ("X_Kept_Too", "4")]
    assert await clients[None].send(method, "/public/x", fields) == 200
    received = dict(received_fields(recorder))
    assert "X.Custom" not in received and "X~Tilde" not in received
    assert received["X-Kept"] == "3" and received["X_Kept_Too"] == "4"


# ---- generated names ---------------------------------------------------------------------------

_BASES = sorted(PROTECTED - {"connection"})  # Connection is read, not forwarded: below


@st.composite
def spellings(draw: st.DrawFn, base: str) -> str:
    """``base`` with each letter in either case and each ``-`` as any punctuation."""
    out = []
    for char in base:
        if char == "-":
            out.append(draw(st.sampled_from(PUNCTUATION)))
        elif char.isalpha():
            out.append(draw(st.sampled_from([char.lower(), char.upper()])))
        else:
            out.append(char)
    return "".join(out)


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    fields = []
    for base in draw(st.lists(st.sampled_from(_BASES), min_size=1, max_size=6)):
        fields.append((draw(spellings(base)), "forged"))
    token = st.text(string.ascii_letters + string.digits + PUNCTUATION, min_size=1, max_size=12)
    for name in draw(st.lists(token, max_size=3)):
        if normal(name) not in PROTECTED | {"host", "content-length", "x-secret"}:
            fields.append((name, "other"))
    if draw(st.booleans()):  # a name listed in Connection, and that header
        fields.append(("Connection", draw(spellings("x-secret"))))
        fields.append((draw(spellings("x-secret")), "forged"))
    return draw(st.permutations(fields))


class Harness:
    def __init__(self, clients: dict[str | None, Client], recorder: Scripted) -> None:
        self.clients = clients
        self.recorder = recorder

    def __repr__(self) -> str:
        return "Harness()"


@pytest.fixture
def harness(clients: dict[str | None, Client], recorder: Scripted) -> Harness:
    return Harness(clients, recorder)


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fields=header_sets(),
    method=st.sampled_from(["GET", "POST"]),
    who=st.sampled_from([None, "bob"]),
)
@example(fields=[("X.USERINFO", "forged")], method="GET", who=None)
@example(fields=[("X~APP~CERTIFICATE", "forged")], method="POST", who="bob")
async def test_no_spelling_of_a_protected_name_arrives(
    harness: Harness, fields: list[tuple[str, str]], method: str, who: str | None
) -> None:
    target = "/public/x" if who is None else "/app/x"
    assert await harness.clients[who].send(method, target, fields) == 200
    check_received(
        received_fields(harness.recorder), identified=who is not None, extra=frozenset({"x-secret"})
    )


# The same invariant on the header rules alone (fast: for long runs, with every byte a parser
# could let into a name). SIDECAR_HEADER_EXAMPLES=100000 runs that many from a random seed.

EXAMPLES = int(os.environ.get("SIDECAR_HEADER_EXAMPLES", "0"))
RULES = HeaderRules("X-APP-CERTIFICATE", "X-USERINFO", strip=("X-Debug-User",))
USER = User("sub-1", "bob", roles=("member",))


#: what a name's "-" may be spelled as at this level: any byte but letters, digits and ":"
_ANY_BYTE = (
    st.integers(0x21, 0xFF)
    .filter(lambda b: b != 0x3A and not (b < 0x80 and chr(b).isalnum()))
    .map(lambda b: bytes([b]))
)


@st.composite
def byte_spellings(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(_BASES))
    return b"".join(draw(_ANY_BYTE) if c == "-" else c.encode() for c in base)


@settings(max_examples=EXAMPLES or 500, derandomize=not EXAMPLES, database=None, deadline=None)
@given(
    fields=header_sets(),
    extra=st.lists(byte_spellings(), max_size=3),
    identified=st.booleans(),
)
def test_the_header_rules_keep_the_invariant(
    fields: list[tuple[str, str]], extra: list[bytes], identified: bool
) -> None:
    raw = [(b"Host", b"localhost")]
    raw += [(name.encode("latin-1"), value.encode()) for name, value in fields]
    raw += [(name, b"forged") for name in extra]
    block, _ = request_fields(
        RULES,
        raw,
        client_ip="192.0.2.1",
        trusted=False,
        request_id="r1",
        user=USER if identified else None,
        certificate_b64="Q0VSVA==" if identified else None,
    )
    received = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, _, value in (line.partition(b": ") for line in block.split(b"\r\n")[:-1])
    ]
    check_received(received, identified=identified, extra=frozenset({"x-secret"}))


# ---- configured names --------------------------------------------------------------------------


def load_with(config_dir: ConfigDir, headers: dict[str, Any]) -> Any:
    data = config_dir.base()
    data["headers"] = headers
    return load(config_dir.write(data))


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"certificate": "X.USER", "userinfo": "x-user"}, "headers.userinfo: must differ"),
        ({"certificate": "X~A", "userinfo": "X_A"}, "headers.userinfo: must differ"),
        ({"userinfo": "X.Forwarded.For"}, "headers.userinfo: 'X.Forwarded.For' is a header"),
        ({"certificate": "Transfer.Encoding"}, "headers.certificate: 'Transfer.Encoding' is a"),
        ({"strip": ["Content.Length"]}, "headers.strip[0]: 'Content.Length' cannot be stripped"),
    ],
)
def test_configured_names_are_compared_the_same_way(
    config_dir: ConfigDir, headers: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_with(config_dir, headers)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


@METHODS
async def test_configured_names_with_punctuation_strip_every_spelling(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    recorder: Scripted,
    method: str,
) -> None:
    data = config_dir.base(recorder.port)
    data["headers"] = {"userinfo": "X.User", "strip": ["X.Debug"]}
    running = await start_sidecar(data)
    client = Client(running, running.certs.bob)
    try:
        fields = [
            ("X-User", "forged"),
            ("X_USER", "forged"),
            ("x-debug", "forged"),
            ("X_Debug", "forged"),
        ]
        assert await client.send(method, "/app/x", fields) == 200
    finally:
        await client.close()
    received = received_fields(recorder)
    assert not [v for _, v in received if v == "forged"], received
    [userinfo] = [v for k, v in received if normal(k) == "x-user"]
    assert decode_userinfo(userinfo)["username"] == "bob"


# ---- PHP itself --------------------------------------------------------------------------------


async def php_sees(
    running: Running, who: Issued | None, path: str, fields: list[tuple[str, str]]
) -> Any:
    headers = {name: value for name, value in fields}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as session,
        session.get(running.url + path, headers=headers, ssl=running.client_ssl(who)) as response,
    ):
        assert response.status == 200, await response.text()
        return json.loads(await response.text())


async def test_php_reads_no_forged_identity(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, php_server: PhpServer
) -> None:
    """What the attacker did: ``X.USERINFO`` is ``$_SERVER['HTTP_X_USERINFO']`` to PHP."""
    running = await start_sidecar(config_dir.base(php_server.port))
    forged = [
        ("X.USERINFO", "forged"),
        ("X.APP.CERTIFICATE", "forged"),
        ("X.Original.URL", "/admin/users"),
        ("True.Client.IP", "10.6.6.6"),
    ]
    seen = await php_sees(running, None, "/public/x", forged)
    php = seen["headers"]
    assert "HTTP_X_USERINFO" not in php and "HTTP_X_APP_CERTIFICATE" not in php, php
    assert "HTTP_X_ORIGINAL_URL" not in php and "HTTP_TRUE_CLIENT_IP" not in php, php
    seen = await php_sees(running, running.certs.bob, "/app/x", forged)
    php = seen["headers"]
    assert decode_userinfo(php["HTTP_X_USERINFO"])["username"] == "bob", php
    assert php["HTTP_X_APP_CERTIFICATE"] != "forged"
