"""A worker started by a supervisor takes the run-time deny entries from the supervisor's list
(``revocation.admin.Runtime``): the races a second review found, each with a real ``Sidecar``
worker on an admin socket, a real Redis, and the list written as the supervisor writes it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import config as config_module
from sidecar.app import Sidecar
from sidecar.identity.shared.record import Message, encode_message
from sidecar.identity.shared.store import SharedCache
from sidecar.metrics import Metrics
from sidecar.revocation.admin import read_runtime, write_runtime
from sidecar.workers import _sent_to

from .conftest import ConfigDir, Upstream
from .fleet import Verdicts, replica_config, verdicts
from .redisd import RedisServer, redis_server

__all__ = ["redis_server", "verdicts"]  # fixtures

X = "ab" * 32


def fleet_of(url: str, prefix: str) -> str:
    return hashlib.sha256(f"{url}\n{prefix}".encode()).hexdigest()[:16]


async def post(socket: Path, sha256: str) -> tuple[int, str, dict[str, str]]:
    connector = aiohttp.UnixConnector(path=str(socket))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            f"http://localhost/deny?sha256={sha256}", headers={"X-Sidecar-Admin": "1"}
        ) as resp,
    ):
        return resp.status, await resp.text(), dict(resp.headers)


async def up(sidecar: Sidecar) -> None:
    for _ in range(250):
        cache = sidecar._cache()
        shared = cache.shared if cache is not None else None
        if isinstance(shared, SharedCache) and shared.up():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the shared cache did not come up")


def worker(data: dict[str, Any], config_dir: ConfigDir, name: str, socket: Path) -> Sidecar:
    path = config_dir.write(data, f"{name}.yaml")
    return Sidecar(
        config_module.load(path), config_path=path, metrics=Metrics(), admin_socket=socket
    )


async def until_member(redis_server: RedisServer, key: str) -> None:
    """The set ``key`` holds X, and X alone (within 5 s)."""
    for _ in range(100):
        if redis_server.members(key) == {X}:
            return
        await asyncio.sleep(0.05)
    assert redis_server.members(key) == {X}


def runtime_and_config(
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
    tmp_path: Path,
) -> tuple[Path, dict[str, Any]]:
    """The supervisor's folder (empty) and a worker's configuration, with the shared cache."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    data = replica_config(
        config_dir, upstream_port=upstream.port, verdicts=verdicts, redis_url=redis_server.url
    )
    return runtime, data


async def test_a_denial_answered_across_a_reload_names_the_fleet_it_went_to(
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A POST goes to the fleet under ``sidecar:``; before its answer is made, a reload moves
    the worker to ``moved:``. The answer names the fleet the entry went to, so a worker the
    supervisor starts on ``moved:`` does not count the entry as that fleet's: it refuses the
    certificate and sends the entry there."""
    runtime, data = runtime_and_config(config_dir, upstream, verdicts, redis_server, tmp_path)
    moved = copy.deepcopy(data)
    moved["identity"]["cache"]["shared"]["key_prefix"] = "moved:"
    sent = Sidecar._deny_fleet
    reloaded: list[bool] = []

    async def slow_answer(self: Sidecar, sha256: str, add: bool) -> str | bool | None:
        told = await sent(self, sha256, add)
        if not reloaded:  # a SIGHUP's reload completes before the answer is made
            config_dir.write(moved, "first.yaml")
            reloaded.append(await self.reload("SIGHUP"))
        return told

    monkeypatch.setattr(Sidecar, "_deny_fleet", slow_answer)
    first = worker(data, config_dir, "first", runtime / "worker-0.sock")
    await first.start()
    second = None
    try:
        await up(first)
        answer = await post(runtime / "worker-0.sock", X)
        assert reloaded == [True] and answer[0] == 200, answer
        assert _sent_to([answer]) == fleet_of(redis_server.url, "sidecar:")
        assert redis_server.members("sidecar:deny") == {X}
        write_runtime(runtime, {X}, {X: fleet_of(redis_server.url, "sidecar:")})
        monkeypatch.setattr(Sidecar, "_deny_fleet", sent)
        moved["listen"]["port"] = 0
        second = worker(moved, config_dir, "second", runtime / "worker-1.sock")
        await second.start()
        await up(second)
        await until_member(redis_server, "moved:deny")
        assert X in second.revocation.denied()["runtime"]
    finally:
        if second is not None:
            await second.stop(grace=0.5)
        await first.stop(grace=0.5)


async def test_a_denial_made_again_while_a_worker_starts_holds_in_it(
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The list says X went to this fleet, and another replica has taken it off since: the
    starting worker follows the set and allows X. Before its admin socket is bound the
    operator denies X again (the supervisor writes X as unsent; its relay cannot reach the
    worker yet). The worker's second read sees the change: it refuses X and sends it."""
    runtime, data = runtime_and_config(config_dir, upstream, verdicts, redis_server, tmp_path)
    write_runtime(runtime, {X}, {X: fleet_of(redis_server.url, "sidecar:")})
    bind = Sidecar._start_admin

    async def denied_again_meanwhile(self: Sidecar) -> None:
        write_runtime(runtime, {X}, {})
        await bind(self)

    monkeypatch.setattr(Sidecar, "_start_admin", denied_again_meanwhile)
    alone = worker(data, config_dir, "alone", runtime / "worker-0.sock")
    await alone.start()
    try:
        await up(alone)
        await until_member(redis_server, "sidecar:deny")
        assert X in alone.revocation.denied()["runtime"]
        assert read_runtime(runtime).sent == {}
    finally:
        await alone.stop(grace=0.5)


async def test_a_removal_from_the_list_does_not_override_a_denial_heard_since(
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a worker starts (between its two reads of the list), this replica's operator
    takes X off (the list drops it; the fleet hears the removal), then another replica denies
    X again (the worker hears it on the channel). The second read finds X gone from the list,
    but the fleet's latest word is a denial: the worker keeps refusing X."""
    runtime, data = runtime_and_config(config_dir, upstream, verdicts, redis_server, tmp_path)
    redis = redis_server.client()
    redis.sadd("sidecar:deny", X)
    write_runtime(runtime, {X}, {X: fleet_of(redis_server.url, "sidecar:")})
    bind = Sidecar._start_admin

    async def meanwhile(self: Sidecar) -> None:
        await up(self)
        write_runtime(runtime, set(), {})  # DELETE here: the relay cannot reach it yet
        redis.srem("sidecar:deny", X)
        redis.publish("sidecar:events", encode_message(Message("allow", "other-1", sha256=X)))
        await asyncio.sleep(0.2)
        redis.sadd("sidecar:deny", X)  # POST on another replica
        redis.publish("sidecar:events", encode_message(Message("deny", "other-2", sha256=X)))
        await asyncio.sleep(0.2)
        assert X in self.revocation.denied()["runtime"]
        await bind(self)

    monkeypatch.setattr(Sidecar, "_start_admin", meanwhile)
    alone = worker(data, config_dir, "alone", runtime / "worker-0.sock")
    await alone.start()
    try:
        await asyncio.sleep(0.3)
        assert redis_server.members("sidecar:deny") == {X}
        assert X in alone.revocation.denied()["runtime"]
    finally:
        await alone.stop(grace=0.5)
