"""Signals on the real process: SIGTERM drains, a second signal stops at once, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import ConfigDir
from .ports import free_port
from .servers import serve_app
from .test_operations import read_response


@pytest.fixture
async def slow_upstream() -> AsyncIterator[int]:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("sleep", "0")))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner, port = await serve_app(app, shutdown_timeout=0.1)
    yield port
    await runner.cleanup()


async def start(
    config_dir: ConfigDir,
    data: dict[str, Any],
    *args: str,
    pass_fds: tuple[int, ...] = (),
) -> tuple[asyncio.subprocess.Process, int, int]:
    """``sidecar run`` on ``data`` (and ``args`` after it, with ``pass_fds`` inherited), once
    its admin listener says it is ready."""
    port, admin_port = free_port(), free_port()
    data["listen"]["port"] = port
    data["admin"]["port"] = admin_port
    path: Path = config_dir.write(data)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        pass_fds=pass_fds,
    )
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                    if resp.status == 200:
                        return proc, port, admin_port
            except aiohttp.ClientError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"sidecar did not become ready: {err.decode()}")


def client_ctx(config_dir: ConfigDir, name: str) -> Any:
    import ssl

    ctx = ssl.create_default_context(cafile=str(config_dir.path / "server-ca.pem"))
    ctx.load_cert_chain(config_dir.path / f"{name}.pem", config_dir.path / f"{name}.key")
    return ctx


@pytest.mark.own_process
async def test_sigterm_lets_a_slow_request_finish_then_exits_0(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    data["shutdown"] = {"drain_delay": "300ms", "grace_period": "10s"}
    proc, port, admin_port = await start(config_dir, data)
    ctx = client_ctx(config_dir, "bob")
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(
            session.get(f"https://localhost:{port}/app/?sleep=1.5", ssl=ctx)
        )
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
            assert ready.status == 503  # draining, at once
        resp = await slow
        assert resp.status == 200 and await resp.text() == "done"
        resp.release()
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    _, err = await proc.communicate()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(e["event"] == "draining" for e in events) and any(
        e["event"] == "stopped" for e in events
    )


@pytest.mark.own_process
async def test_second_signal_stops_at_once(config_dir: ConfigDir, slow_upstream: int) -> None:
    data = config_dir.base(slow_upstream)
    data["shutdown"] = {"drain_delay": "30s", "grace_period": "30s"}
    proc, _, _ = await start(config_dir, data)
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert proc.returncode is None  # draining for 30 s
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 5) == 0
    await proc.communicate()


@pytest.mark.own_process
async def test_sighup_adds_a_user_while_a_keepalive_connection_stays_open(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    proc, port, _ = await start(config_dir, data)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(config_dir, "stranger"), server_hostname="localhost"
        )
        get = b"GET /app/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
        writer.write(get)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 403")
        data["identity"]["static"]["users"].append(
            {"sub": "sub-m", "username": "mallory", "certificates": [{"file": "stranger.pem"}]}
        )
        config_dir.write(data)
        proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.1)
            writer.write(get)  # the same connection, kept alive across the reload
            if (await read_response(reader)).startswith(b"HTTP/1.1 200"):
                break
        else:
            pytest.fail("SIGHUP did not reload")
        writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await proc.communicate()


@pytest.mark.own_process
async def test_two_workers_serve_and_metrics_count_them_all(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    try:
        ctx = client_ctx(config_dir, "bob")
        statuses = []
        for _ in range(20):  # new connections, so both workers get some
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://localhost:{port}/app/", ssl=ctx) as resp,
            ):
                statuses.append(resp.status)
        assert statuses == [200] * 20
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                text = await resp.text()
            async with session.post(
                f"http://127.0.0.1:{admin_port}/cache/purge", headers={"X-Sidecar-Admin": "1"}
            ) as resp:
                purged = await resp.json()
        from .test_operations import metric

        assert metric(text, "sidecar_requests_total", decision="forwarded") == 20
        assert metric(text, "sidecar_workers") == 2
        assert purged["workers"] == 2 and 1 <= purged["purged"] <= 2
        assert metric(text, "sidecar_cache_entries") == purged["purged"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proc.communicate()


@pytest.mark.own_process
async def test_a_worker_that_dies_is_restarted(config_dir: ConfigDir, slow_upstream: int) -> None:
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        from .test_operations import metric

        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                await asyncio.sleep(0.1)
                async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                    text = await resp.text()
                if metric(text, "sidecar_worker_restarts_total") == 1:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                        if ready.status == 200:
                            break
            else:
                pytest.fail("the dead worker was not restarted")
            async with session.get(
                f"https://localhost:{port}/app/", ssl=client_ctx(config_dir, "bob")
            ) as resp:
                assert resp.status == 200
        new_children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(new_children) == 2 and children[0] not in new_children
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        _, err = await proc.communicate()
    assert b'"worker_died"' in err


# ---- SIGHUP while starting -------------------------------------------------------------------


async def spawn(
    config_dir: ConfigDir, data: dict[str, Any]
) -> tuple[asyncio.subprocess.Process, int, int]:
    """``sidecar run`` on ``data``, not waited for."""
    port, admin_port = free_port(), free_port()
    data["listen"]["port"] = port
    data["admin"]["port"] = admin_port
    path: Path = config_dir.write(data)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return proc, port, admin_port


async def wait_ready(proc: asyncio.subprocess.Process, admin_port: int) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    if proc.returncode is None:
        proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"sidecar did not become ready (exit {proc.returncode}): {err.decode()}")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def until_children(pid: int, count: int, *, other_than: Sequence[int] = ()) -> list[int]:
    for _ in range(2000):
        found = [c for c in children(pid) if c not in other_than]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.005)
    raise AssertionError(f"{pid} did not start {count} worker(s)")


def sighup_state(pid: int) -> str:
    """What SIGHUP would do to ``pid`` now: "blocked", "caught", "ignored" or "default"
    (terminate)."""
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    bit = 1 << (signal.SIGHUP - 1)
    for name, state in (("SigBlk", "blocked"), ("SigIgn", "ignored"), ("SigCgt", "caught")):
        if int(fields[name], 16) & bit:
            return state
    return "default"


def sighup(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)


def add_mallory(config_dir: ConfigDir, data: dict[str, Any]) -> None:
    data["identity"]["static"]["users"].append(
        {"sub": "sub-m", "username": "mallory", "certificates": [{"file": "stranger.pem"}]}
    )
    config_dir.write(data)


async def statuses(config_dir: ConfigDir, port: int, count: int) -> list[int]:
    """``count`` requests from mallory's certificate, each on a new connection (so that every
    worker gets some)."""
    out = []
    ctx = client_ctx(config_dir, "stranger")
    for _ in range(count):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://localhost:{port}/app/", ssl=ctx) as resp,
        ):
            out.append(resp.status)
    return out


async def stop(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 20)
    _, err = await proc.communicate()
    assert code == 0, err.decode()
    return err


@pytest.mark.own_process
async def test_sighup_while_the_process_starts_is_held_then_applied(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    proc, port, admin_port = await spawn(config_dir, data)
    try:
        state = "default"
        for _ in range(4000):  # until the process has taken SIGHUP in hand
            state = sighup_state(proc.pid)
            if state != "default":
                break
            await asyncio.sleep(0.002)
        add_mallory(config_dir, data)  # the file changes while it starts, then SIGHUP
        proc.send_signal(signal.SIGHUP)
        await wait_ready(proc, admin_port)
        assert state == "blocked", (
            f"SIGHUP was {state} at the first look, not held: until the handler is installed "
            "its default action (terminate) applies"
        )
        for _ in range(50):
            if await statuses(config_dir, port, 1) == [200]:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the change made while the process started was never applied")
    finally:
        await stop(proc)


@pytest.mark.own_process
async def test_sighup_while_workers_start_kills_none_and_applies_everywhere(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await spawn(config_dir, data)
    try:
        workers = await until_children(proc.pid, 2)
        add_mallory(config_dir, data)
        for _ in range(10):  # to the supervisor and to each worker, while they start
            sighup(proc.pid, *workers)
            await asyncio.sleep(0.05)
        await wait_ready(proc, admin_port)
        assert sorted(children(proc.pid)) == sorted(workers), "a worker died"
        for _ in range(50):
            if await statuses(config_dir, port, 20) == [200] * 20:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the new configuration is not in force in every worker")
    finally:
        err = await stop(proc)
    assert b'"worker_died"' not in err


@pytest.mark.own_process
async def test_sighup_while_a_worker_restarts_reaches_it_once_started(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    try:
        first = children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        [new] = await until_children(proc.pid, 1, other_than=first)
        add_mallory(config_dir, data)
        for _ in range(10):  # while the new worker starts
            sighup(proc.pid, new)
            await asyncio.sleep(0.05)
        for _ in range(100):
            if new in children(proc.pid) and await statuses(config_dir, port, 20) == [200] * 20:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the new configuration is not in force in every worker")
        assert sorted(children(proc.pid)) == sorted([first[1], new]), "the new worker died"
        from .test_operations import metric

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
        ):
            assert metric(await resp.text(), "sidecar_worker_restarts_total") == 1
    finally:
        err = await stop(proc)
    assert err.count(b'"worker_died"') == 1


#: a stand-in worker: records each SIGHUP; unblocks SIGHUP (held since its start) once told to
STAND_IN = """
import os, signal, sys, time
folder = sys.argv[1]
signal.signal(signal.SIGHUP, lambda *_: open(os.path.join(folder, "hup"), "a").write("hup\\n"))
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.01)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
time.sleep(60)
"""


async def test_the_supervisor_relays_sighup_to_a_starting_worker_once_it_has_started(
    config_dir: ConfigDir, tmp_path: Path
) -> None:
    from sidecar import config as config_mod
    from sidecar.workers import Child, Supervisor

    data = config_dir.base()
    data["listen"]["workers"] = 2
    path = config_dir.write(data)
    supervisor = Supervisor(config_mod.load(path), path, log_format=None)
    folders = [tmp_path / f"worker-{w.index}" for w in supervisor.workers]
    for worker, folder in zip(supervisor.workers, folders, strict=True):
        folder.mkdir()
        worker.process = Child([sys.executable, "-c", STAND_IN, str(folder)])
        # it starts with SIGHUP held, so none can kill it before its handler is in place
        assert sighup_state(worker.process.pid) == "blocked"
    running, starting = supervisor.workers
    try:
        for folder in folders:
            (folder / "go").touch()

        def hups(folder: Path) -> int:
            file = folder / "hup"
            return len(file.read_text().splitlines()) if file.exists() else 0

        async def until_hups(folder: Path, count: int) -> None:
            for _ in range(500):
                if hups(folder) >= count:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{folder.name} got {hups(folder)} SIGHUP(s), not {count}")

        supervisor._note_readiness(running, (200, '{"ready": true}'))
        supervisor._relay_reload()
        await until_hups(folders[0], 1)
        supervisor._note_readiness(starting, (503, '{"ready": false, "reason": "starting"}'))
        await asyncio.sleep(0.3)
        assert hups(folders[1]) == 0  # still starting: held for it
        # started, though not ready (e.g. its identity backend's credentials are broken)
        supervisor._note_readiness(starting, (503, '{"ready": false, "reason": "identity"}'))
        await until_hups(folders[1], 1)
        supervisor._relay_reload()  # now both at once
        await until_hups(folders[0], 2)
        await until_hups(folders[1], 2)
    finally:
        for worker in supervisor.workers:
            assert worker.process is not None
            worker.process.kill()
            assert await asyncio.wait_for(worker.process.wait(), 10) == -signal.SIGKILL
        shutil.rmtree(supervisor.runtime, ignore_errors=True)
