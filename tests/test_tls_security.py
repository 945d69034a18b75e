"""The TLS layer attacked from outside (issue #12 items 4, 11, 13 and 14).

Real clients against the real listener: ``openssl s_client`` and ``sslyze`` for the alerts and
the key-exchange groups, Python's ``ssl`` for session resumption across a reload, raw TCP
sockets for the connection limit and the handshake deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from .conftest import ConfigDir, Running, SidecarFactory
from .pki import PKI, Issued, make_ca, make_leaf
from .test_config import problems_of
from .test_limits import raw_exchange, request, status_of
from .test_listener import App, connect, eventually, open_connections, upstream
from .test_operations import admin, metric
from .test_signals import start as start_process

__all__ = ["upstream"]  # conftest's echo upstream, with test_listener's endpoints

ROOT = Path(__file__).resolve().parents[1]
#: sslyze pins its own dependencies (cryptography < 47 among them): it gets a venv of its own
SSLYZE = "sslyze==6.3.1"


# ---- clients ------------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    reused: bool
    session: ssl.SSLSession | None
    version: str | None


def _get(port: int, ctx: ssl.SSLContext, path: str, session: ssl.SSLSession | None) -> Fetched:
    """One request on a new connection (blocking: run it in a thread)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return Fetched(status_of(data), bool(tls.session_reused), tls.session, tls.version())


async def fetch(
    running: Running, ctx: ssl.SSLContext, path: str, session: ssl.SSLSession | None = None
) -> Fetched:
    """A request from a client that can resume a session (aiohttp's client cannot)."""
    return await asyncio.to_thread(_get, running.sidecar.port, ctx, path, session)


async def refused(
    running: Running, ctx: ssl.SSLContext, path: str, session: ssl.SSLSession | None = None
) -> bool:
    """True when the connection ends without an answer (a TLS 1.3 refusal arrives on read)."""
    try:
        await fetch(running, ctx, path, session)
    except (ssl.SSLError, ConnectionError, AssertionError):
        return True
    return False


def client_ctx(running: Running, who: Issued | None, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = running.client_ssl(who)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def s_client(
    port: int, *args: str, folder: Path, who: str | None = None, wait: bool = True
) -> str:
    """``openssl s_client``'s whole output for one connection that sends nothing. With
    ``wait`` it waits for the server to end the connection (a refusal shows as the alert
    OpenSSL received, if any); without, it leaves once the handshake is done."""
    command = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(folder / "server-ca.pem"),
        *(["-ign_eof"] if wait else []),
        *args,
    ]
    if who is not None:
        command += ["-cert", str(folder / f"{who}.pem"), "-key", str(folder / f"{who}.key")]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return out.decode(errors="replace") + "\n[s_client timed out: the server never closed]"
    return out.decode(errors="replace")


# ---- 13. a refused handshake ends with OpenSSL's alert ---------------------------------------


@pytest.fixture
async def required(start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App) -> Running:
    data = config_dir.base(upstream.port)
    data["tls"]["client_certificate"] = "required"
    running: Running = await start_sidecar(data)
    return running


@pytest.mark.parametrize(
    ("version", "alert"),
    [
        ([], "alert certificate required"),  # TLS 1.3: certificate_required (116)
        (["-tls1_2"], "alert handshake failure"),  # TLS 1.2: handshake_failure (40)
    ],
)
async def test_no_certificate_in_required_mode_gets_the_alert(
    required: Running, config_dir: ConfigDir, upstream: App, version: list[str], alert: str
) -> None:
    out = await s_client(required.sidecar.port, *version, folder=config_dir.path)
    assert alert in out, out
    assert upstream.seen == []


@pytest.mark.parametrize("version", [[], ["-tls1_2"]])
async def test_untrusted_certificate_gets_the_alert(
    required: Running, config_dir: ConfigDir, upstream: App, version: list[str]
) -> None:
    make_leaf(make_ca("Not trusted CA"), "outsider").write(config_dir.path, "outsider")
    out = await s_client(required.sidecar.port, *version, folder=config_dir.path, who="outsider")
    assert "alert unknown ca" in out, out
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("kwargs", "alert"),
    [
        ({"days_valid": (-30, -1)}, "alert certificate expired"),
        ({"days_valid": (2, 30)}, "alert bad certificate"),  # not yet valid
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "alert unsupported certificate"),
    ],
)
async def test_certificate_that_fails_verification_gets_the_alert(
    required: Running, config_dir: ConfigDir, upstream: App, kwargs: dict[str, Any], alert: str
) -> None:
    config_dir.certs.pki.client("bad", **kwargs).write(config_dir.path, "bad")
    out = await s_client(required.sidecar.port, folder=config_dir.path, who="bad")
    assert alert in out, out
    assert upstream.seen == []


async def test_trusted_certificate_still_gets_through_in_required_mode(
    required: Running, config_dir: ConfigDir, upstream: App
) -> None:
    ctx = client_ctx(required, config_dir.certs.alice)
    assert (await fetch(required, ctx, "/app/x")).status == 200
    assert upstream.paths() == ["/app/x"]


@pytest.fixture(scope="session")
def sslyze() -> Path:
    """The sslyze command, in a venv of its own under ``build/`` (made once, then reused):
    sslyze's pins (cryptography < 47) cannot live beside ours."""
    venv = ROOT / "build" / "sslyze"
    command = venv / "bin" / "sslyze"
    marker = venv / "installed"
    venv.parent.mkdir(exist_ok=True)
    # CI runs the compiled and the interpreted suites at once: one makes the venv, the other
    # waits for it (never a venv cleared under a running sslyze)
    with (venv.parent / "sslyze.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not command.exists() or not marker.exists() or marker.read_text() != SSLYZE:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, SSLYZE], check=True, timeout=900)
            marker.write_text(SSLYZE)
    return command


async def run_sslyze(sslyze: Path, port: int, *args: str, folder: Path) -> tuple[int, str, Any]:
    """sslyze against 127.0.0.1:port (as localhost); its exit code, its text and its JSON."""
    report = folder / f"sslyze-{port}.json"
    proc = await asyncio.create_subprocess_exec(
        str(sslyze),
        f"--json_out={report}",
        f"--certinfo_ca_file={folder / 'server-ca.pem'}",
        *args,
        f"localhost:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), json.loads(report.read_text())


@pytest.mark.slow
async def test_sslyze_sees_that_a_client_certificate_is_required(
    sslyze: Path, required: Running, config_dir: ConfigDir
) -> None:
    _, out, report = await run_sslyze(
        sslyze, required.sidecar.port, "--compression", folder=config_dir.path
    )
    result = report["server_scan_results"][0]
    assert result["scan_status"] == "COMPLETED", out
    assert result["connectivity_result"]["client_auth_requirement"] == "REQUIRED", out


# ---- 4. no session from before a trust change is served --------------------------------------


async def refused_after_reload(
    running: Running, ctx: ssl.SSLContext, change: Callable[[], object]
) -> bool:
    """Make a session and resume it once (so resumption is known to work here), ``change`` the
    files and reload: True when resuming the session now is refused."""
    first = await fetch(running, ctx, "/app/first")
    again = await fetch(running, ctx, "/app/again", first.session)
    assert (first.status, again.status, again.reused) == (200, 200, True), "no resumption at all"
    change()
    assert await running.sidecar.reload("test")
    return await refused(running, ctx, "/app/after", again.session)


def _other_ca(config_dir: ConfigDir) -> None:
    """client-ca.pem trusts another CA only: the one that issued alice's certificate is gone."""
    (config_dir.path / "client-ca.pem").write_bytes(make_ca("Another client CA").pem)


@pytest.mark.parametrize(
    "kind",
    ["TLS 1.3 ticket", "TLS 1.2 ticket", "TLS 1.2 session id"],
)
async def test_session_from_before_a_ca_was_removed_is_not_resumed(
    running: Running, config_dir: ConfigDir, upstream: App, kind: str
) -> None:
    ctx = client_ctx(running, config_dir.certs.alice, tls12="1.2" in kind)
    if "session id" in kind:
        ctx.options |= ssl.OP_NO_TICKET  # the server's session cache, not a ticket
    assert await refused_after_reload(running, ctx, lambda: _other_ca(config_dir))
    assert upstream.paths() == ["/app/first", "/app/again"]


async def test_session_from_before_a_certificate_was_unpinned_is_not_resumed(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    device = make_leaf(None, "device-7")
    device.write(config_dir.path, "device-7")
    make_leaf(None, "device-8").write(config_dir.path, "device-8")
    data = config_dir.base(upstream.port)
    data["tls"]["client_ca"] = []
    data["tls"]["pinned_certificates"] = ["device-7.pem"]
    data["identity"]["static"]["users"].append(
        {
            "sub": "device-7",
            "username": "device7",
            "certificates": [{"sha256": hashlib.sha256(device.der).hexdigest()}],
        }
    )
    running = await start_sidecar(data)
    data["tls"]["pinned_certificates"] = ["device-8.pem"]
    assert await refused_after_reload(
        running, client_ctx(running, device), lambda: config_dir.write(data)
    )
    assert upstream.paths() == ["/app/first", "/app/again"]


async def test_reload_that_changes_nothing_in_tls_keeps_sessions(
    running: Running, config_dir: ConfigDir, upstream: App
) -> None:
    ctx = client_ctx(running, config_dir.certs.alice)
    first = await fetch(running, ctx, "/app/first")
    data = config_dir.base(upstream.port)
    data["routes"].insert(0, {"path": "/extra/", "access": "public"})
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    again = await fetch(running, ctx, "/app/again", first.session)
    assert (again.status, again.reused) == (200, True)


async def test_keepalive_connection_from_before_a_ca_was_removed_serves_no_new_request(
    running: Running, config_dir: ConfigDir, upstream: App
) -> None:
    async with connect(running, config_dir.certs.alice) as conn:
        conn.send(request("/app/before"))
        assert (await conn.response()).status == 200
        _other_ca(config_dir)
        assert await running.sidecar.reload("test")
        conn.send(request("/app/after"))
        assert await conn.ended() == b""
    assert upstream.paths() == ["/app/before"]


async def test_request_in_flight_at_a_trust_change_finishes_and_is_the_last(
    running: Running, config_dir: ConfigDir, upstream: App
) -> None:
    async with connect(running, config_dir.certs.alice) as conn:
        conn.send(request("/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request to reach the upstream")
        _other_ca(config_dir)
        assert await running.sidecar.reload("test")
        upstream.release.set()
        response = await conn.response()
        assert (response.status, response.body) == (200, b"late")
        assert "close" in response.tokens("Connection")
        assert await conn.ended() == b""


# ---- 11. connections are counted from accept, handshakes included ------------------------------


@contextlib.asynccontextmanager
async def plain_tcp(running: Running, count: int = 1) -> AsyncIterator[list[Plain]]:
    """Connections that never start a TLS handshake (unless the test sends something)."""
    conns: list[Plain] = []
    try:
        for _ in range(count):
            conns.append(await asyncio.open_connection("127.0.0.1", running.sidecar.port))
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


Plain = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def closed_by_the_server(reader: asyncio.StreamReader) -> bool:
    """True when the sidecar ends the connection (an end of file or a reset) within 10 s."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionError:
        return True


async def tls_served(running: Running) -> bool:
    try:
        response = await raw_exchange(running, request("/public/x"), timeout=5)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return False
    return response != b"" and status_of(response) == 200


async def test_connections_that_never_handshake_are_counted_and_bounded(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    data = config_dir.base(upstream.port)
    data["limits"] = {"max_connections": 3}
    running = await start_sidecar(data)
    async with plain_tcp(running, 3):
        await eventually(lambda: open_connections(running) == 3, "3 silent connections counted")
        async with plain_tcp(running) as [(reader, _)]:
            # at once, not after limits.handshake_timeout (60 s)
            assert await closed_by_the_server(reader)
        assert not await tls_served(running), "a TLS client was served past the limit"
        _, text = await admin(running, "GET", "/metrics")
        assert metric(text, "sidecar_connections_refused_total") == 2
    await eventually(lambda: open_connections(running) == 0, "the slots given back")
    assert await tls_served(running)


async def test_silent_connection_is_closed_at_the_handshake_deadline(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    data = config_dir.base(upstream.port)
    data["limits"] = {"handshake_timeout": "500ms"}
    running = await start_sidecar(data)
    async with plain_tcp(running) as [(reader, _)]:
        assert await closed_by_the_server(reader)
    await eventually(lambda: open_connections(running) == 0, "the slot given back")
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_tls_handshake_failures_total") == 1


def test_handshake_timeout_must_be_positive(config_dir: ConfigDir) -> None:
    # asyncio's ssl= refused 0 when the listener started; the sidecar's own TLS layer needs
    # the configuration to
    data = config_dir.base()
    data["limits"] = {"handshake_timeout": 0}
    problems = problems_of(config_dir.write(data))
    assert [p for p in problems if p.startswith("limits.handshake_timeout:")], problems


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Counting must not wait for the garbage collector (it used to happen in ``__del__``)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_gc")
async def test_each_failed_handshake_is_counted_once(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    data = config_dir.base(upstream.port)
    data["tls"]["client_certificate"] = "required"
    data["limits"] = {"handshake_timeout": "500ms"}
    running = await start_sidecar(data)

    async def failures() -> float:
        _, text = await admin(running, "GET", "/metrics")
        return metric(text, "sidecar_tls_handshake_failures_total")

    alice = client_ctx(running, config_dir.certs.alice)
    assert (await fetch(running, alice, "/app/ok")).status == 200
    assert await failures() == 0
    # 1. no certificate; 2. a certificate from an unknown CA
    assert await refused(running, client_ctx(running, None), "/app/x")
    assert await refused(running, client_ctx(running, PKI.create().client("stranger")), "/app/x")
    # 3. not TLS at all; 4. connects and leaves; 5. connects and says nothing until the deadline
    async with plain_tcp(running) as [(reader, writer)]:
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert await closed_by_the_server(reader)
    async with plain_tcp(running):
        pass
    async with plain_tcp(running) as [(reader, _)]:
        assert await closed_by_the_server(reader)
    await eventually(lambda: open_connections(running) == 0, "every slot given back")
    assert await failures() == 5
    assert (await fetch(running, alice, "/app/ok")).status == 200
    assert await failures() == 5
    assert upstream.paths() == ["/app/ok", "/app/ok"]


# ---- 14. Mozilla's intermediate profile: X25519, P-256 and P-384 only ---------------------------


@pytest.mark.parametrize(
    ("group", "offered"),
    [("X25519", True), ("P-256", True), ("P-384", True), ("P-521", False), ("X448", False)],
)
async def test_key_exchange_groups(
    running: Running, config_dir: ConfigDir, group: str, offered: bool
) -> None:
    out = await s_client(running.sidecar.port, "-groups", group, folder=config_dir.path, wait=False)
    assert ("TLSv1.3" in out and "Verify return code: 0 (ok)" in out) is offered, out


@pytest.mark.parametrize(("group", "offered"), [("P-256", True), ("P-521", False)])
async def test_key_exchange_groups_in_tls12(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, group: str, offered: bool
) -> None:
    # An RSA certificate: with an ECDSA one, a TLS 1.2 client's groups also bound the
    # certificate's curve, and a P-521-only client would find no suite for that reason alone.
    rsa_ca = make_ca("RSA server CA", key_kind="rsa")
    make_leaf(rsa_ca, "localhost", server=True, key_kind="rsa").write(config_dir.path, "rsa")
    (config_dir.path / "server-ca.pem").write_bytes(rsa_ca.pem)
    data = config_dir.base(upstream.port)
    data["tls"].update(certificate="rsa.pem", key="rsa.key")
    running = await start_sidecar(data)
    out = await s_client(
        running.sidecar.port, "-tls1_2", "-groups", group, folder=config_dir.path, wait=False
    )
    assert ("ECDHE-RSA" in out and "Verify return code: 0 (ok)" in out) is offered, out


@pytest.fixture
async def process(config_dir: ConfigDir, upstream: App) -> AsyncIterator[int]:
    """``sidecar run`` in a process of its own; its TLS port."""
    data = config_dir.base(upstream.port)
    proc, port, _ = await start_process(config_dir, data)
    try:
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await proc.communicate()


@pytest.mark.own_process
@pytest.mark.slow
async def test_sslyze_finds_the_listener_compliant_with_mozilla_intermediate(
    sslyze: Path, process: int, config_dir: ConfigDir
) -> None:
    code, out, _ = await run_sslyze(
        sslyze, process, "--mozilla_config=intermediate", folder=config_dir.path
    )
    assert f"localhost:{process}: OK - Compliant." in out, out
    assert code == 0, out
