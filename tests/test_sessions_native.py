"""The session table's callbacks in C (``sidecar/_sessions_c.c``), against the Python ones.

The compiled build makes OpenSSL call C for every new and every dropped session; the
interpreted build calls ``tls_sessions._Bound.made`` and ``.dropped``. Both must leave the
same bytes in the table: the same encoding (``for_the_table``), the same key, the same slot,
the same digest. Each piece is compared on generated inputs, then the whole over real TLS
between two sidecars in this process (``test_tls_sessions`` runs its tests on whichever
callbacks the build has: the C ones in CI's compiled runs, the Python ones in the
interpreted run).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar import BUILD, tls_groups, tls_sessions, tls_tickets
from sidecar.tls_sessions import SessionStore

from .conftest import ConfigDir, SidecarFactory
from .memory_tls import handshake
from .test_listener import upstream
from .test_tls_sessions import (
    SESSION_FIELDS,
    _session,
    cb_hits,
    peer_and_appdata,
    stored,
    table,
    two,
)
from .test_tls_tickets_workers import fetch

__all__ = ["upstream"]


def native() -> Any:
    found = tls_sessions._native()
    if found is None:
        pytest.skip(f"the {BUILD.describe()} build calls the Python callbacks")
    return found.module


def test_the_compiled_build_calls_the_c_callbacks_and_the_interpreted_one_python() -> None:
    assert (tls_sessions._native() is not None) is BUILD.compiled


# ---- the pieces ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(SESSION_FIELDS, st.sampled_from(["whole", "cut", "grow", "byte"]), st.data())
def test_c_rewrites_a_session_for_the_table_as_python_does(
    fields: tuple[list[bytes], dict[int, bytes], bytes | None, bytes | None],
    change: str,
    data: st.DataObject,
) -> None:
    """The same bytes, or None for both, for sessions as OpenSSL encodes them and for the
    same cut short, grown or with a byte changed."""
    module = native()
    der = bytearray(_session(fields))
    if change == "cut":
        del der[data.draw(st.integers(0, len(der) - 1)) :]
    elif change == "grow":
        der += data.draw(st.binary(min_size=1, max_size=8))
    elif change == "byte":
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    assert module.for_the_table(bytes(der)) == tls_sessions.for_the_table(bytes(der))


@pytest.mark.parametrize("appdata", [None, b"", b"1234567", b"12345678", b"x" * 200])
@pytest.mark.parametrize("peer", [None, b"", b"\x02\x01\x05", b"c" * 130, b"c" * 3000])
def test_c_and_python_agree_at_the_edges(appdata: bytes | None, peer: bytes | None) -> None:
    """Application data one byte short of a line's start, exactly one, longer; no peer, an
    empty one, one whose length takes one, two or three bytes."""
    module = native()
    der = _session(([b"\x01"] * 5, {4: b"cipher", 9: b"x" * 150}, peer, appdata))
    assert module.for_the_table(der) == tls_sessions.for_the_table(der)
    if appdata is not None and len(appdata) >= 8:
        assert module.for_the_table(der) is not None


def test_c_and_python_agree_on_repeated_fields() -> None:
    """Two peers (both dropped, the last one's certificate kept) and two application data
    fields (the last one replaced), which OpenSSL never writes: C counts what it drops
    as Python does."""
    module = native()
    tlv = tls_sessions._tlv
    fields = [
        tlv(0x02, b"\x01"),
        tlv(0xA3, tlv(0x30, b"a" * 200)),
        tlv(0xA3, tlv(0x30, b"b" * 50)),
        tlv(0xA4, tlv(0x04, b"x")),
        tlv(0xB2, tlv(0x04, b"12345678 and more")),
        tlv(0xB2, tlv(0x04, b"ABCDEFGH")),
    ]
    der = tlv(0x30, b"".join(fields))
    kept = tls_sessions.for_the_table(der)
    assert kept is not None and module.for_the_table(der) == kept


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=300))
@example(b"\0" * 32, b"")
@example(b"k" * 32, b"n" * 128)  # a whole block after the key's
def test_c_keys_a_session_name_as_python_does(namespace: bytes, name: bytes) -> None:
    """Keyed BLAKE2b, written in C, as hashlib's (the key the table is read with)."""
    module = native()
    expected = hashlib.blake2b(name, digest_size=16, key=namespace).digest()
    assert module.key(namespace, name) == expected


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(range(5)),  # key
        st.integers(0, 3_000),  # expires
        st.binary(min_size=0, max_size=300) | st.binary(min_size=4000, max_size=4100),
        st.integers(0, 3_000),  # now, in seconds
        st.sampled_from([0.0, 0.25, 0.999999]),  # and its fraction
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 3, 5]), OPERATIONS)
def test_c_writes_the_same_table_as_python(
    slots: int, operations: list[tuple[int, int, bytes, int, float]]
) -> None:
    """Every write, byte for byte: the slot chosen (written longest ago, expired first, the
    key's own), the head, the digest, the DER; and what each refuses (too large)."""
    module = native()
    keys = [bytes([n]) * 8 + os.urandom(8) for n in range(5)]
    ours, theirs = table(slots), table(slots)
    try:
        for index, expires, der, seconds, fraction in operations:
            when = seconds + fraction
            written = module.put(ours._map, keys[index], expires, der, when)
            assert written == theirs.put(keys[index], expires, der, now=when)
            assert bytes(ours._map) == bytes(theirs._map)
            assert ours.get(keys[index], now=0) == theirs.get(keys[index], now=0)
            for key in keys:  # C's read, as the get callback reads (nothing: None, not b"")
                for at in (0.0, when):
                    assert module.get(ours._map, key, at) == (theirs.get(key, now=at) or None)
    finally:
        ours.close()
        theirs.close()


def test_a_torn_slot_reads_as_nothing_to_c() -> None:
    """As ``test_tls_sessions.test_a_torn_slot_reads_as_empty``, read by C's lookup."""
    module = native()
    store = table(1)
    first, second = os.urandom(16), os.urandom(16)
    store.put(first, 10**10, b"a" * 3000)
    offset = tls_sessions._FIRST
    whole = bytes(store._map[offset : offset + tls_sessions.SLOT])
    store.put(second, 10**10, b"b" * 3000)
    assert module.get(store._map, second, 0.0) == b"b" * 3000
    store._map[offset + 1000 : offset + tls_sessions.SLOT] = whole[1000:]  # a mixture
    assert module.get(store._map, first, 0.0) is None
    assert module.get(store._map, second, 0.0) is None
    store._map[offset : offset + tls_sessions.SLOT] = whole
    assert module.get(store._map, first, 0.0) == b"a" * 3000
    assert module.get(store._map, first, 10.0**10) is None  # expired
    store.close()


def test_a_table_that_is_not_one_is_refused() -> None:
    module = native()
    with pytest.raises(ValueError, match="session table's size"):
        module.put(bytearray(100), b"k" * 16, 1, b"der", 0.0)
    with pytest.raises(BufferError):
        module.put(b"read-only" * 1000, b"k" * 16, 1, b"der", 0.0)
    with pytest.raises(ValueError, match="16-byte key"):
        module.put(bytearray(64 + 4096), b"k", 1, b"der", 0.0)
    with pytest.raises(ValueError, match="namespace"):
        module.bind(1, b"short", None, True, 3600)


# ---- the whole, over TLS -------------------------------------------------------------------


async def test_c_writes_each_new_session_and_python_is_not_called(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the C callbacks bound, a full handshake's session reaches the table with no call
    to the Python ones, as ``for_the_table`` writes it (Bob's certificate after the line's
    start), and the other worker finds it there (C's lookup: OpenSSL counts a callback hit)
    and resumes it as Bob."""
    native()
    calls: list[str] = []
    monkeypatch.setattr(tls_sessions._Bound, "made", lambda *a: calls.append("made"))
    monkeypatch.setattr(tls_sessions._Bound, "dropped", lambda *a: calls.append("dropped"))
    monkeypatch.setattr(tls_sessions._Bound, "lookup", lambda *a: calls.append("lookup"))
    store = table()
    a, b = await two(start_sidecar, config_dir.base(upstream.port), store=store)
    bob = a.client_ssl(a.certs.bob)
    made = await fetch(a.sidecar.port, bob, "/app/made")
    kept = [peer_and_appdata(der) for der in stored(store)]
    assert kept and all(peer is None and app[8:] == a.certs.bob.der for peer, app in kept)
    there = await fetch(b.sidecar.port, bob, "/app/there", made.session)
    assert (made.status, there.status, there.reused) == (200, 200, True)
    assert cb_hits(b.sidecar.tls.current) == 1
    assert calls == []
    first, second = (seen.header("X-APP-CERTIFICATE") for seen in upstream.seen)
    assert first == second


async def test_a_closed_table_is_let_go_and_new_sessions_stay_their_workers(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any
) -> None:
    """``SessionStore.close`` first detaches the table from the C callbacks (an exported
    buffer would otherwise keep the map open, and a callback must never write to memory
    unmapped): handshakes after that still complete and write nothing."""
    module = native()
    store = table()
    a, _ = await two(start_sidecar, config_dir.base(upstream.port), store=store)
    bob = a.client_ssl(a.certs.bob)
    assert (await fetch(a.sidecar.port, bob, "/app/one")).status == 200
    store.close()
    assert module.detach(store._map) == 0  # nothing left to let go
    again = await fetch(a.sidecar.port, bob, "/app/two")
    assert again.status == 200


def test_a_context_bound_then_freed_is_forgotten_by_c() -> None:
    module = native()
    store = table(4)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tls_sessions.bind(context, b"label", store) is None
    pointer = tls_groups._ssl_ctx(context)
    del context
    import gc

    gc.collect()
    assert pointer not in tls_sessions._BOUND
    assert module.forget(pointer) is False  # already forgotten when the context went
    store.close()


async def test_sessions_made_at_once_in_threads_all_reach_the_table(
    config_dir: ConfigDir,
) -> None:
    """Handshakes in several threads at once call the C callback concurrently (it takes no
    GIL): every session is written whole (its digest matches), none lost to a race on the
    bound contexts."""
    native()
    store = table(256)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*config_dir.certs.pki.server.write(config_dir.path, "server"))
    assert tls_tickets.use_session_cache(server, 128) is None
    assert tls_sessions.bind(server, b"label", store) is None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is made in the handshake

    kept: list[ssl.SSLObject] = []  # a session whose connection is freed unclosed is dropped

    def handshakes(count: int) -> None:
        for _ in range(count):
            kept.append(handshake(server, client)[0])

    await asyncio.gather(*(asyncio.to_thread(handshakes, 20) for _ in range(4)))
    assert len(kept) == 80 and all(s.version() == "TLSv1.2" for s in kept)
    assert len(stored(store)) >= 60  # 80 sessions in 256 slots (pairs), each read back whole
    tls_sessions.unbind(server)
    store.close()


_THREADS = """
import ssl, sys, tempfile, threading
from pathlib import Path
from tests.memory_tls import handshake
from tests.pki import PKI
from sidecar import tls_sessions, tls_tickets
assert tls_sessions._native() is not None
pki = PKI.create()
folder = Path(tempfile.mkdtemp())
cert, key = pki.server.write(folder, "server")
store = tls_sessions.SessionStore.inherited(tls_sessions.create(64))
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain(cert, key)
assert tls_tickets.use_session_cache(server, 4) is None  # full at once: every new one evicts
tls_sessions.MAX_AGE = 100  # below the sessions' timeout: every new one's is set again
assert tls_sessions.bind(server, b"label", store) is None
client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client.check_hostname = False
client.verify_mode = ssl.CERT_NONE
client.maximum_version = ssl.TLSVersion.TLSv1_2
done = []

def handshakes():
    kept = [handshake(server, client) for _ in range(300)]  # alive: the cache fills, evicts
    done.append(len(kept))

threads = [threading.Thread(target=handshakes, daemon=True) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
print(sum(done), server.session_stats()["cache_full"] > 1000)
"""


def test_threads_evicting_and_making_sessions_at_once_never_wait_on_each_other() -> None:
    """OpenSSL calls the remove callback with the context's lock held (a full cache evicts),
    while another thread's new-session callback runs: the C callbacks call no libssl
    function while they hold their own lock, so the two locks are never taken in both
    orders (a process of its own: a deadlock would hang it, not the suite)."""
    native()
    run = subprocess.run(
        [sys.executable, "-c", _THREADS],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert (run.returncode, run.stdout.split()) == (0, ["1200", "True"]), run.stderr


def test_a_table_c_cannot_take_is_not_bound_and_says_why() -> None:
    """A closed table: ``bind`` answers why (the worker then uses tickets), and nothing of
    the binding stays, in Python or in C."""
    module = native()
    store = table(4)
    store.close()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    reason = tls_sessions.bind(context, b"label", store)
    assert reason is not None and "cannot be bound" in reason
    pointer = tls_groups._ssl_ctx(context)
    assert pointer not in tls_sessions._BOUND
    assert module.forget(pointer) is False


def test_an_extension_built_for_another_table_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_sessions_c`` says what it assumes of the table (``LAYOUT``); where that is not
    this ``tls_sessions``' table, the Python callbacks are used."""
    module = native()
    assert module.LAYOUT == tls_sessions._LAYOUT
    monkeypatch.setattr(tls_sessions, "_LAYOUT", (*tls_sessions._LAYOUT[:-1], b"other"))
    tls_sessions._native.cache_clear()
    try:
        assert tls_sessions._native() is None
    finally:
        monkeypatch.undo()
        tls_sessions._native.cache_clear()
    assert tls_sessions._native() is not None


def test_store_close_is_still_plain_without_c() -> None:
    """The table closes as before where nothing was bound."""
    store = SessionStore.inherited(tls_sessions.create(2))
    store.close()
