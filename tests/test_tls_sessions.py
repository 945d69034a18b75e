"""The table of TLS sessions a supervisor's workers share (``tls_sessions``).

Two sidecars in this process stand for two workers: each has its own contexts, caches and
ticket secret (so a ticket from one is a forgery to the other), and they share one table. A
session made by one must resume on the other through the table, as the same client, and
only where trust is decided the same way. The table itself is checked with generated
operations, torn writes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import tls_groups, tls_sessions, tls_tickets
from sidecar.tls import TLSState, listener_contexts
from sidecar.tls_sessions import SessionStore

from .conftest import ConfigDir, Running, SidecarFactory
from .pki import make_ca
from .test_listener import upstream
from .test_signals import start
from .test_tls_tickets_workers import client, fetch

__all__ = ["upstream"]


def cb_hits(context: ssl.SSLContext) -> int:
    """OpenSSL's count of sessions its get-session callback gave (SSL_CTRL_SESS_CB_HIT);
    Python's session_stats() leaves it out."""
    lib = tls_groups._libssl()
    assert not isinstance(lib, str)
    pointer = tls_groups._ssl_ctx(context)
    assert lib.ctrl(pointer, 27, 0, None) == context.session_stats()["hits"]  # the neighbour
    return int(lib.ctrl(pointer, 28, 0, None))


def bound(context: ssl.SSLContext) -> bool:
    return tls_groups._ssl_ctx(context) in tls_sessions._BOUND


def table(slots: int = 64) -> SessionStore:
    return SessionStore.inherited(tls_sessions.create(slots))


def stored(store: SessionStore) -> list[bytes]:
    """The sessions the table holds now (each slot's, checked by its digest)."""
    found = []
    for slot in range(store.slots):
        key = store._map[tls_sessions._FIRST + slot * tls_sessions.SLOT + 16 :][:16]
        der = store.get(key) if key != bytes(16) else None
        if der is not None:
            found.append(der)
    return found


def peer_and_appdata(der: bytes) -> tuple[int | None, bytes]:
    """What OpenSSL decodes from a session's DER: its peer (an address) and its application
    data."""
    functions = tls_sessions._functions()
    assert not isinstance(functions, str)
    get0_peer = tls_groups.function(
        tls_groups.ssl_library(), "SSL_SESSION_get0_peer", ctypes.c_void_p, ctypes.c_void_p
    )
    buffer = (ctypes.c_ubyte * len(der)).from_buffer_copy(der)
    cursor = ctypes.cast(buffer, tls_sessions._Bytes)
    session = functions.d2i(None, ctypes.byref(cursor), len(der))
    assert session, "OpenSSL does not decode the table's session"
    try:
        data, length = ctypes.c_void_p(), ctypes.c_size_t()
        assert functions.get0_appdata(session, ctypes.byref(data), ctypes.byref(length)) == 1
        assert data.value is not None
        return get0_peer(session), ctypes.string_at(data.value, length.value)
    finally:
        functions.free(session)


async def two(
    start_sidecar: SidecarFactory,
    data: dict[str, Any],
    other: dict[str, Any] | None = None,
    *,
    shared: bool = True,
    store: SessionStore | None = None,
) -> tuple[Running, Running]:
    """Two "workers": separate secrets, one table (``store``, a new one, or none)."""
    store = store or (table() if shared else None)
    first: Running = await start_sidecar(
        data, ticket_secret=tls_tickets.new_secret(), shared_sessions=store
    )
    second: Running = await start_sidecar(
        other or data, ticket_secret=tls_tickets.new_secret(), shared_sessions=store
    )
    return first, second


async def test_a_session_made_by_one_worker_resumes_on_another(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any
) -> None:
    """Bob's session from worker A resumes on worker B (OpenSSL asked the table: a callback
    hit), as Bob; B keeps it in its own cache after that (a cache hit, no callback)."""
    a, b = await two(start_sidecar, config_dir.base(upstream.port))
    assert a.sidecar.tls.current.options & ssl.OP_NO_TICKET  # session ids, not tickets
    bob = a.client_ssl(a.certs.bob)
    alice = a.client_ssl(a.certs.alice)
    made = await fetch(a.sidecar.port, bob, "/app/bob")
    await fetch(a.sidecar.port, alice, "/app/alice")
    context = b.sidecar.tls.current
    assert (context.session_stats()["hits"], cb_hits(context)) == (0, 0)
    there = await fetch(b.sidecar.port, bob, "/app/bob-there", made.session)
    assert (made.status, there.status, there.reused) == (200, 200, True)
    assert cb_hits(context) == 1
    again = await fetch(b.sidecar.port, bob, "/app/bob-again", there.session)
    assert (again.status, again.reused) == (200, True)
    assert (context.session_stats()["hits"], cb_hits(context)) == (2, 1)
    bobs, alices, resumed, resumed_again = (
        seen.header("X-APP-CERTIFICATE") for seen in upstream.seen
    )
    assert resumed == resumed_again == bobs != alices


@pytest.mark.parametrize("tls12", [False, True], ids=["TLS 1.3", "TLS 1.2"])
async def test_the_table_keeps_the_client_certificate_as_bytes_and_it_still_names_the_client(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any, tls12: bool
) -> None:
    """Every session in the table decodes without OpenSSL's ``peer`` (no certificate is
    parsed to resume on another worker) and carries Bob's certificate after its line's start
    in the application data. B resumes it, and the session B makes from it, as Bob: OpenSSL
    knows no peer there, and the upstream is still told Bob's certificate, on /admin/ still
    refused as Bob (a member)."""
    store = table()
    a, b = await two(start_sidecar, config_dir.base(upstream.port), store=store)
    bob = a.client_ssl(a.certs.bob)
    if tls12:
        bob.maximum_version = ssl.TLSVersion.TLSv1_2
    made = await fetch(a.sidecar.port, bob, "/app/made")
    kept = [peer_and_appdata(der) for der in stored(store)]
    assert kept and all(
        peer is None and appdata[8:] == a.certs.bob.der for peer, appdata in kept
    ), kept
    there = await fetch(b.sidecar.port, bob, "/app/there", made.session)
    again = await fetch(b.sidecar.port, bob, "/app/again", there.session)
    admin = await fetch(b.sidecar.port, bob, "/admin/x", again.session)
    assert [(f.status, f.reused) for f in (there, again, admin)] == [
        (200, True),
        (200, True),
        (403, True),
    ]
    assert cb_hits(b.sidecar.tls.current) == 1
    certificates = [seen.header("X-APP-CERTIFICATE") for seen in upstream.seen]
    assert len(certificates) == 3 and certificates[0]
    assert certificates[0] == certificates[1] == certificates[2]


async def test_where_no_ssl_is_found_the_table_keeps_the_certificate_in_the_session(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Python whose SSLObject is not laid out as CPython's: no session leaves its peer for
    the application data (a connection's certificate could not be read back), it is said
    once, and Bob still resumes on the other worker as Bob."""
    monkeypatch.setattr(tls_sessions, "_ssl_of", lambda ssl_object, functions: None)
    unmade = functools.cache(tls_sessions.peerless.__wrapped__)  # not this process's answer
    monkeypatch.setattr(tls_sessions, "peerless", unmade)
    store = table()
    a, b = await two(start_sidecar, config_dir.base(upstream.port), store=store)
    bob = a.client_ssl(a.certs.bob)
    made = await fetch(a.sidecar.port, bob, "/app/made")
    kept = [peer_and_appdata(der) for der in stored(store)]
    assert kept and all(peer is not None and len(appdata) == 8 for peer, appdata in kept), kept
    there = await fetch(b.sidecar.port, bob, "/app/there", made.session)
    assert (there.status, there.reused) == (200, True)
    first, second = (seen.header("X-APP-CERTIFICATE") for seen in upstream.seen)
    assert first == second and first
    assert "tls_sessions_keep_certificates" in capsys.readouterr().out


async def test_an_anonymous_session_resumes_on_another_worker_as_anonymous(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any
) -> None:
    """A client without a certificate (``client_certificate: optional``) resumes across the
    table as no one: its public page is served, and /app/ asks for a certificate."""
    store = table()
    a, b = await two(start_sidecar, config_dir.base(upstream.port), store=store)
    nobody = a.client_ssl()
    made = await fetch(a.sidecar.port, nobody, "/public/made")
    kept = [peer_and_appdata(der) for der in stored(store)]
    assert kept and all(peer is None and len(appdata) == 8 for peer, appdata in kept), kept
    there = await fetch(b.sidecar.port, nobody, "/public/there", made.session)
    app = await fetch(b.sidecar.port, nobody, "/app/x", there.session)
    assert [(f.status, f.reused) for f in (made, there, app)] == [
        (200, False),
        (200, True),
        (401, True),
    ]
    assert [seen.header("X-APP-CERTIFICATE") for seen in upstream.seen] == [[], []]


async def test_without_the_table_the_session_does_not_cross(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any
) -> None:
    """The control: the same two workers without a table (tickets under different secrets)."""
    a, b = await two(start_sidecar, config_dir.base(upstream.port), shared=False)
    bob = a.client_ssl(a.certs.bob)
    made = await fetch(a.sidecar.port, bob, "/app/bob")
    there = await fetch(b.sidecar.port, bob, "/app/bob-there", made.session)
    assert (there.status, there.reused) == (200, False)


@pytest.mark.parametrize("tls12", [False, True], ids=["TLS 1.3", "TLS 1.2"])
async def test_a_session_does_not_cross_to_a_worker_that_decides_trust_otherwise(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any, tls12: bool
) -> None:
    """Worker B trusts one more CA (what a reload that changed trust gives): Alice is still
    trusted there, but her session from A is not found, and she makes a full handshake."""
    data = config_dir.base(upstream.port)
    other = config_dir.base(upstream.port)
    (config_dir.path / "another-ca.pem").write_bytes(make_ca("Another client CA").pem)
    other["tls"]["client_ca"] = [*other["tls"]["client_ca"], "another-ca.pem"]
    a, b = await two(start_sidecar, data, other)
    alice = a.client_ssl(a.certs.alice)
    if tls12:
        alice.maximum_version = ssl.TLSVersion.TLSv1_2
    made = await fetch(a.sidecar.port, alice, "/app/first")
    again = await fetch(a.sidecar.port, alice, "/app/again", made.session)
    there = await fetch(b.sidecar.port, alice, "/app/there", again.session)
    assert (again.reused, there.status, there.reused) == (True, 200, False)
    assert cb_hits(b.sidecar.tls.current) == 0


async def test_without_libssl_the_workers_use_tickets_and_it_is_said(
    config_dir: ConfigDir,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(tls_sessions, "_functions", lambda: "no libssl here")
    from sidecar.config import load

    config = load(config_dir.write(config_dir.base()))
    state = TLSState(
        *listener_contexts(config.tls, config.servers),
        ticket_secret=tls_tickets.new_secret(),
        shared_sessions=table(),
    )
    assert not state.current.options & ssl.OP_NO_TICKET
    out = capsys.readouterr().out
    assert "tls_sessions_not_shared" in out and "no libssl here" in out
    state.start_rotation()  # tickets: their keys rotate hourly
    assert state._rotation is not None
    state.stop_rotation()


async def test_a_process_handed_no_table_says_so_closes_it_and_serves(
    config_dir: ConfigDir, upstream: Any
) -> None:
    """``sidecar run --session-store-fd`` on memory that is not a sealed table: the process
    logs ``tls_sessions_not_shared`` with the reason, keeps no descriptor to it, and serves
    (resuming from its own cache)."""
    memory = os.memfd_create("not-a-table")  # no sealing allowed: refused before the header
    os.ftruncate(memory, 4096)
    data = config_dir.base(upstream.port)
    data["log"] = {"level": "info", "format": "json"}
    try:
        # the hidden option a supervisor passes
        proc, port, _ = await start(
            config_dir, data, tls_sessions.OPTION, str(memory), pass_fds=(memory,)
        )
    finally:
        os.close(memory)
    try:
        assert not any(  # the descriptor it was handed is closed
            "not-a-table" in os.readlink(fd)
            for fd in Path(f"/proc/{proc.pid}/fd").iterdir()
            if fd.is_symlink()
        )
        ctx = client(config_dir)
        first = await fetch(port, ctx, "/app/first")
        again = await fetch(port, ctx, "/app/again", first.session)
        assert (first.status, again.status, again.reused) == (200, 200, True)
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    lines = err.decode().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    said = [e for e in events if e["event"] == "tls_sessions_not_shared"]
    assert len(said) == 1 and said[0]["level"] == "warning"
    assert "not sealed" in said[0]["reason"] and said[0]["hint"] == "this process's cache is used"


async def test_a_reload_to_zero_turns_the_table_off_and_back_on(config_dir: ConfigDir) -> None:
    from sidecar.config import load

    config = load(config_dir.write(config_dir.base()))
    state = TLSState(
        *listener_contexts(config.tls, config.servers),
        ticket_secret=tls_tickets.new_secret(),
        shared_sessions=table(),
    )
    context = state.current
    assert context.options & ssl.OP_NO_TICKET
    assert bound(context)
    state.size_session_cache(0)
    assert not context.options & ssl.OP_NO_TICKET
    assert not bound(context)
    rotation = state._rotation
    assert rotation is not None  # ticket keys rotate again
    state.size_session_cache(16)
    assert context.options & ssl.OP_NO_TICKET
    assert bound(context)
    assert state._rotation is None and rotation.cancelled()


def test_the_table_cannot_be_resized_under_the_workers() -> None:
    """Whoever gets hold of the descriptor cannot shrink the table (every worker's mapping
    would fault) nor take the seals off."""
    fd = tls_sessions.create(4)
    store = SessionStore(fd)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 1 << 30)
    store.put(b"k" * 16, 10**10, b"still here")
    assert store.get(b"k" * 16, now=0) == b"still here"
    os.close(fd)


_FREED = """
import gc, ssl, sys, tempfile
from pathlib import Path
from tests.memory_tls import handshake
from tests.pki import PKI
from sidecar import tls_groups, tls_sessions, tls_tickets
pki = PKI.create()
folder = Path(tempfile.mkdtemp())
cert, key = pki.server.write(folder, "server")
(folder / "ca.pem").write_bytes(pki.server_ca.pem)
store = tls_sessions.SessionStore.inherited(tls_sessions.create(8))
client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
for round in range(20):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    server.sni_callback = lambda *_: None
    assert tls_tickets.use_session_cache(server, 16) is None
    assert tls_sessions.bind(server, b"label", store) is None
    address = tls_groups._ssl_ctx(server)
    for _ in range(3):
        s, c = handshake(server, client, rounds=6)
    assert server.session_stats()["number"] >= 3
    del s, c, server
    gc.collect()
    assert address not in tls_sessions._BOUND
print("freed")
"""


def test_a_context_freed_with_sessions_in_its_cache_is_forgotten_first() -> None:
    """OpenSSL calls the remove callback for every session a context still holds while it
    frees the context, after Python let go of what the context held: the callbacks are made
    once and never freed, and a context's state goes before it (a crash here kills only
    the child process)."""
    run = subprocess.run(
        [sys.executable, "-c", _FREED],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert (run.returncode, run.stdout.strip()) == (0, "freed"), run.stderr


def test_the_supervisor_can_make_itself_non_dumpable() -> None:
    """Its table descriptor is then not for other processes of its user (/proc/<pid>/fd)."""
    code = (
        "import ctypes; from sidecar import tls_sessions; "
        "print(tls_sessions.not_dumpable(), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["None", "0"]


async def test_a_session_openssl_invalidated_is_not_found_in_the_table(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any
) -> None:
    """A TLS 1.2 connection ends in a fatal alert (a record that does not decrypt): OpenSSL
    drops its session (RFC 5246 7.2.2), and so does the table."""
    a, b = await two(start_sidecar, config_dir.base(upstream.port))
    ctx = a.client_ssl(a.certs.alice)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    made = await fetch(a.sidecar.port, ctx, "/app/first")
    assert made.session is not None
    await asyncio.to_thread(_break, a.sidecar.port, ctx, made.session)
    here = await fetch(a.sidecar.port, ctx, "/app/here", made.session)
    there = await fetch(b.sidecar.port, ctx, "/app/there", made.session)
    assert (here.status, here.reused, there.status, there.reused) == (200, False, 200, False)


def _break(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> None:
    """Resume ``session``, then send a record that does not decrypt."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        assert tls.session_reused
        with socket.socket(fileno=os.dup(tls.fileno())) as plain:
            plain.sendall(b"\x17\x03\x03\x00\x30" + os.urandom(0x30))
            with contextlib.suppress(ssl.SSLError, OSError):
                tls.recv(100)  # the alert, then the end


@pytest.mark.parametrize("workers", [1, 2])
async def test_no_line_of_sessions_resumes_beyond_its_age(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """TLS 1.3 makes a new session at every resumption. Resumed again and again, a line of
    sessions still ends MAX_AGE after its full handshake (here 3 s; an hour in use), on one
    worker and across two: the client is verified again. (OpenSSL counts whole seconds.)"""
    monkeypatch.setattr(tls_sessions, "MAX_AGE", 3)
    if workers == 1:
        alone: Running = await start_sidecar(config_dir.base(upstream.port))
        a = b = alone
    else:
        a, b = await two(start_sidecar, config_dir.base(upstream.port))
    ctx = a.client_ssl(a.certs.alice)
    made = await fetch(a.sidecar.port, ctx, "/app/first")
    await asyncio.sleep(1.2)
    middle = await fetch(b.sidecar.port, ctx, "/app/middle", made.session)
    await asyncio.sleep(3.0)  # 4.2 s after the full handshake, 3 after the last resumption
    late = await fetch(a.sidecar.port, ctx, "/app/late", middle.session)
    assert (middle.reused, late.status, late.reused) == (True, 200, False)
    again = await fetch(b.sidecar.port, ctx, "/app/again", late.session)
    assert again.reused  # a new line begins with the full handshake


# ---- the table ------------------------------------------------------------------------------

KEYS = st.binary(min_size=16, max_size=16)
DERS = st.binary(min_size=1, max_size=tls_sessions.MAX_SESSION)


def test_a_session_is_found_under_its_key_until_it_expires() -> None:
    store = table(8)
    key, der = os.urandom(16), os.urandom(1500)
    assert store.put(key, 2_000, der)
    assert store.get(key, now=1_999) == der
    assert store.get(key, now=2_000) is None  # expired
    assert store.get(os.urandom(16), now=0) is None  # another key
    assert not store.put(key, 2_000, b"x" * (tls_sessions.MAX_SESSION + 1))


def test_a_new_session_takes_the_slot_written_longest_ago() -> None:
    """Two slots per key: two live sessions of one pair both stay; a third replaces the one
    written first (whatever their expiry, which OpenSSL counts in whole seconds), and a
    session written again keeps its slot; an expired one goes first."""
    store = table(2)  # one pair: every key
    a, b, c, d = (bytes([n]) * 16 for n in (1, 2, 3, 4))
    store.put(a, 3_000, b"A", now=1)
    store.put(b, 9_000, b"B", now=2)
    assert (store.get(a, now=0), store.get(b, now=0)) == (b"A", b"B")
    store.put(a, 3_000, b"A2", now=3)  # a again: its own slot, b stays
    assert (store.get(a, now=0), store.get(b, now=0)) == (b"A2", b"B")
    store.put(c, 2_000, b"C", now=4)  # b was written longest ago
    assert (store.get(a, now=0), store.get(b, now=0), store.get(c, now=0)) == (b"A2", None, b"C")
    store.put(d, 5_000, b"D", now=2_500)  # c expired at 2,000: its slot, though a is older
    assert (store.get(a, now=0), store.get(c, now=0), store.get(d, now=0)) == (b"A2", None, b"D")


def test_a_torn_slot_reads_as_empty() -> None:
    """Two workers writing one slot at once: the first half of one record over the other."""
    store = table(1)  # every key in the one slot
    first, second = os.urandom(16), os.urandom(16)
    store.put(first, 10**10, b"a" * 3000)
    assert store._slots(first) == store._slots(second) == (tls_sessions._FIRST,) * 2
    offset = tls_sessions._FIRST
    whole = bytes(store._map[offset : offset + tls_sessions.SLOT])
    store.put(second, 10**10, b"b" * 3000)
    store._map[offset + 1000 : offset + tls_sessions.SLOT] = whole[1000:]  # a mixture
    assert store.get(first, now=0) is None and store.get(second, now=0) is None
    store._map[offset : offset + tls_sessions.SLOT] = whole
    assert store.get(first, now=0) == b"a" * 3000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(6)), DERS, st.booleans()), max_size=40))
def test_a_key_gives_its_last_session_or_nothing(operations: list[tuple[int, bytes, bool]]) -> None:
    """Whatever is written in whatever order, a key is never read as another's session or an
    older one of its own: its latest, or nothing (slots are shared and forget)."""
    store = table(3)
    keys = [bytes([i]) * 16 for i in range(6)]
    latest: dict[int, bytes] = {}
    for index, der, write in operations:
        if write:
            assert store.put(keys[index], 10**10, der)
            latest[index] = der
        found = store.get(keys[index], now=0)
        assert found is None or found == latest.get(index), (index, found)
    store.close()


def test_what_is_not_a_table_is_refused() -> None:
    read, write = os.pipe()
    os.close(write)
    with pytest.raises(ValueError, match="session table"):
        SessionStore.inherited(read)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(read)  # closed all the same
    fd = os.memfd_create("not-a-table", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, tls_sessions._FIRST + tls_sessions.SLOT)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    with pytest.raises(ValueError, match="header is not a sidecar's"):
        SessionStore(fd)
    os.close(fd)
    with pytest.raises(ValueError, match="cannot be mapped"):
        SessionStore.inherited(read)  # no longer open
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, tls_sessions._FIRST + tls_sessions.SLOT)
    os.pwrite(unsealed, tls_sessions._HEADER.pack(tls_sessions._MAGIC, 1), 0)
    with pytest.raises(ValueError, match="not sealed"):
        SessionStore(unsealed)
    os.close(unsealed)
    for slots in (0, tls_sessions.MAX_SLOTS + 1):
        with pytest.raises(ValueError, match="1 to"):
            tls_sessions.create(slots)


# ---- the client's certificate, as the table keeps it -----------------------------------------


def _fields(der: bytes) -> list[tuple[int, bytes]]:
    """A SEQUENCE's fields (tag, content): a reading of DER of its own, for the checks."""
    assert der[0] == 0x30

    def read(at: int) -> tuple[int, int, int]:
        tag, first = der[at], der[at + 1]
        if first < 0x80:
            return tag, at + 2, at + 2 + first
        count = first & 0x7F
        length = int.from_bytes(der[at + 2 : at + 2 + count], "big")
        return tag, at + 2 + count, at + 2 + count + length

    _, at, end = read(0)
    assert end == len(der)
    fields = []
    while at < end:
        tag, start, stop = read(at)
        fields.append((tag, der[start:stop]))
        at = stop
    assert at == end
    return fields


def _octets(data: bytes) -> bytes:
    return tls_sessions._tlv(0x04, data)


#: a session's fields as OpenSSL 3.0 writes them: five universal ones, then [1] to [19]
#: EXPLICIT, each optional; the peer [3] a certificate (a SEQUENCE), the application data
#: [18] an OCTET STRING of a line's start and perhaps more
SESSION_FIELDS = st.tuples(
    st.lists(st.binary(max_size=40), min_size=5, max_size=5),
    st.dictionaries(
        st.sampled_from([1, 2, 4, 5, 6, 9, 13, 14, 16, 19]), st.binary(max_size=300), max_size=10
    ),
    st.none() | st.binary(max_size=3000),
    st.none() | st.binary(min_size=8, max_size=1200),
)


def _session(fields: tuple[list[bytes], dict[int, bytes], bytes | None, bytes | None]) -> bytes:
    universal, explicit, peer, appdata = fields
    parts = [
        tls_sessions._tlv(tag, data) for tag, data in zip([2, 2, 4, 4, 4], universal, strict=True)
    ]
    tagged = {n: _octets(data) for n, data in explicit.items()}
    if peer is not None:
        tagged[3] = tls_sessions._tlv(0x30, peer)
    if appdata is not None:
        tagged[18] = _octets(appdata)
    parts += [tls_sessions._tlv(0xA0 | n, tagged[n]) for n in sorted(tagged)]
    return tls_sessions._tlv(0x30, b"".join(parts))


@settings(max_examples=300, deadline=None)
@given(SESSION_FIELDS)
def test_the_table_takes_the_certificate_out_of_the_peer_and_changes_nothing_else(
    fields: tuple[list[bytes], dict[int, bytes], bytes | None, bytes | None],
) -> None:
    """With a peer: the table's encoding has no [3], and its [18] is the line's start then
    the certificate, whole; every other field is as it was, in its place. Without one: the
    encoding as it was. Without application data: not kept (no line's start to keep)."""
    _, _, peer, appdata = fields
    der = _session(fields)
    kept = tls_sessions.for_the_table(der)
    if appdata is None:
        assert kept is None
        return
    assert kept is not None
    if peer is None:
        assert kept == der
        return
    certificate = tls_sessions._tlv(0x30, peer)
    before, after = _fields(der), _fields(kept)
    expected = [
        (tag, _octets(appdata[:8] + certificate) if tag == 0xB2 else content)
        for tag, content in before
        if tag != 0xA3
    ]
    assert after == expected


@settings(max_examples=500, deadline=None)
@given(SESSION_FIELDS, st.data())
def test_what_is_not_a_session_is_not_kept_and_nothing_is_read_past_its_end(
    fields: tuple[list[bytes], dict[int, bytes], bytes | None, bytes | None], data: st.DataObject
) -> None:
    """A session cut short, grown, or with a byte changed: either not kept, or kept as a
    well-formed SEQUENCE without a peer; never an exception (the callback would make any of
    them a miss, but the table must not hold a certificate OpenSSL's peer did not)."""
    der = bytearray(_session(fields))
    change = data.draw(st.sampled_from(["cut", "grow", "byte"]))
    if change == "cut":
        del der[data.draw(st.integers(0, len(der) - 1)) :]
    elif change == "grow":
        der += data.draw(st.binary(min_size=1, max_size=8))
    else:
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    kept = tls_sessions.for_the_table(bytes(der))
    if kept is not None:
        assert all(tag != 0xA3 for tag, _ in _fields(kept))


def test_an_ssl_object_not_made_by_cpythons_ssl_has_no_ssl_to_read() -> None:
    """``resumed_peer`` reads the ``SSL`` where CPython keeps it only when the fields around
    it are CPython's; an object that merely looks like an SSLObject gives nothing."""

    class Fake:
        _sslobj = object()
        context = ssl.create_default_context()

    functions = tls_sessions._functions()
    assert not isinstance(functions, str)
    assert tls_sessions._ssl_of(Fake(), functions) is None  # type: ignore[arg-type]
    assert tls_sessions.resumed_peer(Fake()) is None  # type: ignore[arg-type]
    context = ssl.create_default_context()
    real = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
    pointer = tls_sessions._ssl_of(real, functions)
    assert pointer is not None
    assert functions.get_ssl_ctx(pointer) == tls_groups._ssl_ctx(context)
    assert tls_sessions.resumed_peer(real) is None  # no session yet
    assert tls_sessions.peerless() is None
