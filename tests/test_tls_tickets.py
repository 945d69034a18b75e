"""Session ticket keys (``sidecar.tls_tickets``): derivation, rotation over real TLS, the secret's
way from the supervisor to its workers, and the soft failure where libssl cannot be reached."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import tls_groups, tls_sessions, tls_tickets, workers
from sidecar.config import ConfigError, load
from sidecar.tls import TLSState, listener_contexts

from .conftest import ConfigDir, Running, SidecarFactory
from .test_listener import upstream
from .test_operations import admin, metric
from .test_reload_security import edit
from .test_tls_tickets_workers import fetch

__all__ = ["upstream"]

HOUR = tls_tickets.ROTATE_EVERY


def keys_of(context: ssl.SSLContext) -> bytes:
    lib = tls_groups._libssl()
    assert not isinstance(lib, str)
    pointer = tls_groups._ssl_ctx(context)
    back = ctypes.create_string_buffer(80)
    assert lib.ctrl(pointer, 58, 80, back) == 1
    return back.raw


@settings(max_examples=200, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    label=st.binary(max_size=64),
    epoch=st.integers(min_value=0, max_value=2**40),
)
def test_keys_differ_with_every_input(secret: bytes, label: bytes, epoch: int) -> None:
    keys = tls_tickets.derive(secret, label, epoch)
    assert len(keys) == 80 and keys == tls_tickets.derive(secret, label, epoch)
    others = {
        tls_tickets.derive(bytes(32) if secret != bytes(32) else b"\1" * 32, label, epoch),
        tls_tickets.derive(secret, label + b"x", epoch),
        tls_tickets.derive(secret, label, epoch + 1),
    }
    # the key name (first 16 bytes) differs too: OpenSSL tells keys apart by it
    assert keys[:16] not in {o[:16] for o in others}


def test_epochs_are_wall_clock_hours() -> None:
    assert tls_tickets.epoch(HOUR * 10 + 0.5) == 10
    assert tls_tickets.epoch(HOUR * 11 - 0.001) == 10
    assert tls_tickets.next_rotation(HOUR * 10 + 5) == HOUR * 11


def _state(config_dir: ConfigDir, secret: bytes | None) -> TLSState:
    config = load(config_dir.write(config_dir.base()))
    return TLSState(*listener_contexts(config.tls, config.servers), ticket_secret=secret)


def test_one_secret_gives_every_process_the_same_keys(config_dir: ConfigDir) -> None:
    secret = tls_tickets.new_secret()
    a, b = _state(config_dir, secret), _state(config_dir, secret)
    assert keys_of(a.current) == keys_of(b.current)
    assert keys_of(_state(config_dir, None).current) != keys_of(a.current)


def test_keys_rotate_with_the_epoch_and_only_then(config_dir: ConfigDir) -> None:
    state = _state(config_dir, tls_tickets.new_secret())
    before = keys_of(state.current)
    state.rotate_tickets(time.time())
    assert keys_of(state.current) == before
    state.rotate_tickets(time.time() + HOUR)
    assert keys_of(state.current) != before


def test_without_libssl_contexts_keep_their_own_keys_and_it_is_said(
    config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tls_tickets, "_libssl", lambda: "no libssl here")
    secret = tls_tickets.new_secret()
    a, b = _state(config_dir, secret), _state(config_dir, secret)
    assert keys_of(a.current) != keys_of(b.current)  # OpenSSL's random keys, each its own
    out = capsys.readouterr()
    assert "tls_ticket_keys_not_shared" in out.out + out.err
    assert "no libssl here" in out.out + out.err


@pytest.fixture
async def worker(start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Any) -> Running:
    """A sidecar as one worker of several is: given the supervisor's ticket secret."""
    result: Running = await start_sidecar(
        config_dir.base(upstream.port), ticket_secret=tls_tickets.new_secret()
    )
    return result


async def test_a_session_from_the_previous_epoch_does_not_resume(worker: Running) -> None:
    running = worker
    ctx = running.client_ssl(running.certs.alice)
    port = running.sidecar.port
    first = await fetch(port, ctx, "/app/first")
    again = await fetch(port, ctx, "/app/again", first.session)
    assert (again.status, again.reused) == (200, True)
    running.sidecar.tls.rotate_tickets(time.time() + HOUR)
    after = await fetch(port, ctx, "/app/after", again.session)
    assert (after.status, after.reused) == (200, False)
    resumed = await fetch(port, ctx, "/app/resumed", after.session)
    assert (resumed.status, resumed.reused) == (200, True)


async def test_rotation_is_scheduled_at_the_next_epoch(worker: Running) -> None:
    handle = worker.sidecar.tls._rotation
    assert handle is not None
    due = handle.when() - asyncio.get_running_loop().time() + time.time()
    assert abs(due - tls_tickets.next_rotation()) < 5


# ---- one process: sessions resume from its cache -------------------------------------------------


def cache_size_of(context: ssl.SSLContext) -> int:
    lib = tls_groups._libssl()
    assert not isinstance(lib, str)
    return int(lib.ctrl(tls_groups._ssl_ctx(context), 43, 0, None))


async def test_one_process_resumes_from_its_cache_not_from_tickets(running: Running) -> None:
    """No supervisor, no secret: the ticket a client gets names a session in the context's
    bounded cache, which is where it resumes from (OpenSSL's hit count says so)."""
    context = running.sidecar.tls.current
    assert context.options & ssl.OP_NO_TICKET
    assert cache_size_of(context) == tls_tickets.SESSION_CACHE_SIZE
    assert running.sidecar.tls._rotation is None  # no keys to rotate
    ctx = running.client_ssl(running.certs.alice)
    port = running.sidecar.port
    first = await fetch(port, ctx, "/app/first")
    hits = context.session_stats()["hits"]
    again = await fetch(port, ctx, "/app/again", first.session)
    assert (first.reused, again.status, again.reused) == (False, 200, True)
    assert context.session_stats()["hits"] == hits + 1
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_tls_handshakes_total", resumed="true") == 1
    assert metric(text, "sidecar_tls_handshakes_total", resumed="false") == 1
    # and from the cache only: a worker's stateless ticket (another process's keys) is not
    # taken for a session here
    other = TLSState(
        *listener_contexts(running.sidecar.config.tls, running.sidecar.config.servers),
        ticket_secret=tls_tickets.new_secret(),
    )
    assert not other.current.options & ssl.OP_NO_TICKET


async def test_a_cached_session_keeps_its_certificate(running: Running, upstream: Any) -> None:
    """A resumed session is the same client: Bob's session is Bob's, not the last client's."""
    port = running.sidecar.port
    alice = running.client_ssl(running.certs.alice)
    bob = running.client_ssl(running.certs.bob)
    first = await fetch(port, bob, "/app/bob")
    await fetch(port, alice, "/app/alice")
    again = await fetch(port, bob, "/app/bob-again", first.session)
    assert (again.status, again.reused) == (200, True)
    bobs, alices, resumed = (seen.header("X-APP-CERTIFICATE") for seen in upstream.seen)
    assert resumed == bobs != alices


def test_without_libssl_the_cache_is_used_at_its_default_size_and_it_is_said(
    config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tls_tickets, "_libssl", lambda: "no libssl here")
    state = _state(config_dir, None)
    assert state.current.options & ssl.OP_NO_TICKET
    assert cache_size_of(state.current) == 20480  # OpenSSL's
    out = capsys.readouterr()
    assert "tls_session_cache_not_sized" in out.out + out.err
    assert "no libssl here" in out.out + out.err


# ---- the secret's way to the workers -----------------------------------------------------------


def test_the_secret_reaches_a_worker_through_a_pipe_only(
    config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], tuple[int, ...], bytes]] = []

    class FakeChild:
        pid = 4242

        def __init__(self, args: list[str], pass_fds: tuple[int, ...] = ()) -> None:
            # what the worker would read: its inherited end, before the supervisor closes it
            fd = int(args[args.index(tls_tickets.PIPE_OPTION) + 1])
            seen.append((list(args), tuple(pass_fds), tls_tickets.read_secret(os.dup(fd))))

    monkeypatch.setattr(workers, "Child", FakeChild)
    data = config_dir.base()
    data["listen"]["workers"] = 2
    path = config_dir.write(data)
    supervisor = workers.Supervisor(load(path), path, log_format=None)
    environ = dict(os.environ)

    async def spawn_twice() -> None:
        await supervisor._spawn(supervisor.workers[0])
        await supervisor._spawn(supervisor.workers[1])

    asyncio.run(spawn_twice())
    secret = supervisor._ticket_secret
    assert [s[2] for s in seen] == [secret, secret]  # the same for every worker
    for args, pass_fds, _ in seen:
        fd = int(args[args.index(tls_tickets.PIPE_OPTION) + 1])
        # and the table of sessions (tls_sessions), sealed memory shared with the workers
        assert pass_fds == (fd, supervisor._sessions)
        table = int(args[args.index(tls_sessions.OPTION) + 1])
        assert table == supervisor._sessions
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)  # the supervisor closed its copy
        assert not any(secret.hex() in a or secret.hex().upper() in a for a in args)
    assert os.environ == environ
    assert not any(secret.hex() in v for v in os.environ.values())
    assert supervisor._sessions is not None
    os.close(supervisor._sessions)


def test_a_short_secret_is_refused() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 10)
    os.close(write_end)
    with pytest.raises(ValueError, match="10 bytes"):
        tls_tickets.read_secret(read_end)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(read_end)


async def test_a_worker_reads_the_secret_and_keeps_no_descriptor_open(
    config_dir: ConfigDir, upstream: Any
) -> None:
    """The real ``sidecar run`` with two workers: no worker has a pipe open after start."""
    from .test_tls_tickets_workers import two_workers

    async with two_workers(config_dir, config_dir.base(upstream.port)) as sidecar:
        children = Path(f"/proc/{sidecar.proc.pid}/task/{sidecar.proc.pid}/children")
        pids = [int(p) for p in children.read_text().split()]
        supervisor_environ = Path(f"/proc/{sidecar.proc.pid}/environ").read_bytes()
        assert len(pids) == 2
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            fd = cmdline[cmdline.index(tls_tickets.PIPE_OPTION.encode()) + 1].decode()
            assert not Path(f"/proc/{pid}/fd/{fd}").exists() or "pipe" not in os.readlink(
                f"/proc/{pid}/fd/{fd}"
            )
            # nothing added to the environment the supervisor has
            assert Path(f"/proc/{pid}/environ").read_bytes() == supervisor_environ


def test_each_server_has_its_own_keys(config_dir: ConfigDir) -> None:
    """With ``servers[]``, a ticket made for one server must not resume on another (whose
    ``client_certificate`` mode or names differ): each context's keys differ."""
    from .test_servers_security import sites

    class Port:
        port = 1

    data = sites(config_dir, Port())  # type: ignore[arg-type]
    config = load(config_dir.write(data))
    secret = tls_tickets.new_secret()
    state = TLSState(*listener_contexts(config.tls, config.servers), ticket_secret=secret)
    assert state.servers is not None
    keys = [keys_of(context) for context in state.servers.contexts]
    assert len(set(keys)) == len(keys) == 3
    again = TLSState(*listener_contexts(config.tls, config.servers), ticket_secret=secret)
    assert again.servers is not None
    assert [keys_of(context) for context in again.servers.contexts] == keys


def _request_then_reset(port: int, ctx: ssl.SSLContext) -> ssl.SSLSession | None:
    """One keep-alive request, then a reset (SO_LINGER 0): no close_notify, no FIN."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET /app/reset HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 ")
    session = tls.session
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()
    return session


async def test_a_session_outlives_a_connection_that_was_reset(running: Running) -> None:
    """OpenSSL drops a cached session when its connection is freed without our close_notify;
    a client whose connection was reset (a phone changing networks) would then make a full
    handshake, where a ticket would have resumed. The transport ends such a connection's TLS
    as if it had closed it."""
    ctx = running.client_ssl(running.certs.alice)
    port = running.sidecar.port
    session = await asyncio.to_thread(_request_then_reset, port, ctx)
    await asyncio.sleep(0.1)  # the reset reaches the sidecar
    again = await fetch(port, ctx, "/app/again", session)
    assert (again.status, again.reused) == (200, True)


def rotating(tls: TLSState) -> bool:
    """A ticket key rotation is scheduled (a function: mypy would narrow the attribute)."""
    return tls._rotation is not None


async def test_session_cache_zero_gives_stateless_tickets_and_a_reload_switches(
    running: Running, config_dir: ConfigDir
) -> None:
    """``tls.session_cache: 0``: one process resumes from stateless tickets (its own random
    keys, rotated); a reload turns the cache on again, or resizes it, for the next handshakes,
    without a new context (trust is unchanged, so open sessions keep resuming). A negative
    size is refused, named, and the running one kept."""
    ctx = running.client_ssl(running.certs.alice)
    port = running.sidecar.port
    tls = running.sidecar.tls
    edit(config_dir, tls={"session_cache": 0})
    assert await running.sidecar.reload("test")
    context = tls.current
    assert not context.options & ssl.OP_NO_TICKET and rotating(tls)
    first = await fetch(port, ctx, "/app/first")
    again = await fetch(port, ctx, "/app/again", first.session)
    assert (again.status, again.reused) == (200, True)
    assert context.session_stats()["number"] == 0  # nothing cached: the ticket is the session
    edit(config_dir, tls={"session_cache": 10})
    assert await running.sidecar.reload("test")
    assert tls.current is context and context.options & ssl.OP_NO_TICKET
    assert cache_size_of(context) == 10 and not rotating(tls)
    cached = await fetch(port, ctx, "/app/cached")
    again = await fetch(port, ctx, "/app/again", cached.session)
    assert (again.status, again.reused) == (200, True)
    assert context.session_stats()["number"] == 2  # both handshakes' sessions
    edit(config_dir, tls={"session_cache": -1})
    assert not await running.sidecar.reload("test")
    assert cache_size_of(context) == 10


def test_a_session_cache_size_out_of_range_is_named(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    for size in (-1, 1 << 21, "big"):
        data["tls"]["session_cache"] = size
        with pytest.raises(ConfigError, match=r"tls\.session_cache"):
            load(config_dir.write(data))


def test_a_boolean_for_a_number_is_named_in_every_section(config_dir: ConfigDir) -> None:
    """``session_cache: true`` was read as 1 (pydantic's lax mode), and so was a boolean for
    every number in the configuration: each numeric key of every section refuses it (a
    duration in its own words, as before)."""
    from pydantic import ValidationError

    from sidecar.config import Section, _numbers_only, parse_duration

    def sections(kind: type[Section]) -> list[type[Section]]:
        return [kind, *(s for sub in kind.__subclasses__() for s in sections(sub))]

    # derived from what the user gives (sha256, or issuer and serial), never given
    derived = {("DenyEntry", "serial_number")}
    checked = []
    for kind in sections(Section):
        for name, field in kind.model_fields.items():
            if not _numbers_only(field.annotation) or (kind.__name__, name) in derived:
                continue
            duration = any(getattr(m, "func", None) is parse_duration for m in field.metadata)
            said = (
                "a duration is a number of seconds" if duration else "a number, not true or false"
            )
            for value in (True, False):
                with pytest.raises(ValidationError) as caught:
                    kind.model_validate({name: value})
                assert any(
                    e["loc"][:1] == (name,) and said in e["msg"] for e in caught.value.errors()
                ), (kind.__name__, name)
            checked.append(f"{kind.__name__}.{name}")
    assert "TLSConfig.session_cache" in checked and "ListenConfig.port" in checked
    assert "ReloadConfig.interval" in checked  # a duration
    assert "RouteTrustConfig.min_trust_score" in checked  # a decimal
    assert len(checked) > 20
    data = config_dir.base()
    data["tls"]["session_cache"] = True
    with pytest.raises(ConfigError, match=r"tls\.session_cache: .*a number, not true"):
        load(config_dir.write(data))
