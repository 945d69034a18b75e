"""A real Redis (or Valkey) server for the tests: started on a free 127.0.0.1 port, without
persistence, in a temporary folder; and the ways the tests hurt it (kill, restart, pause).

``valkey-server`` is used when installed, ``redis-server`` otherwise (``.ci/run`` installs it
with apt when neither is). Tests that need one and find neither are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from .ports import free_port


def server_binary() -> str | None:
    return shutil.which("valkey-server") or shutil.which("redis-server")


@dataclass
class RedisServer:
    """One server process; ``start`` again after ``kill`` brings it back on the same port,
    empty (no persistence)."""

    folder: Path
    port: int = field(default_factory=free_port)
    #: extra arguments (TLS, a password, cluster mode)
    extra: Sequence[str] = ()
    #: a client for the test's own checks (None: plain TCP without a password)
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        binary = server_binary()
        if binary is None:
            pytest.skip("neither valkey-server nor redis-server is installed (.ci/run installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--daemonize",
            "no",
            "--enable-debug-command",
            "local",
            "--logfile",
            str(self.folder / "server.log"),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis did not start: {log}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis did not answer within 10 s")

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5
        )

    def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is kept."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung or partitioned server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.kill()

    def key_names(self, pattern: str = "*") -> list[str]:
        return sorted(k.decode() for k in self.client().scan_iter(match=pattern, count=1000))

    def members(self, key: str) -> set[str]:
        """The members of the set ``key``, as text."""
        return {m.decode() if isinstance(m, bytes) else m for m in self.client().smembers(key)}


@contextlib.contextmanager
def running_cluster(folder: Path, nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``nodes`` masters (no replicas), its slots spread over them."""
    servers = [
        RedisServer(
            folder / f"node-{i}",
            extra=(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                # the bus port, by default the port + 10000: chosen here, free and in range
                "--cluster-port",
                str(free_port()),
            ),
        )
        for i in range(nodes)
    ]
    try:
        for server in servers:
            server.start()
        cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        if cli is None:
            pytest.skip("redis-cli is needed to make a cluster")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while any(
            b"cluster_state:ok" not in s.client().execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            for s in servers
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.1)
        yield servers
    finally:
        for server in servers:
            server.stop()


@dataclass
class SentinelSetup:
    master: RedisServer
    sentinel_port: int
    service: str = "mymaster"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}"


@contextlib.contextmanager
def running_sentinel(folder: Path) -> Iterator[SentinelSetup]:
    """A master and one Sentinel watching it as ``mymaster``."""
    binary = server_binary()
    if binary is None:
        pytest.skip("neither valkey-server nor redis-server is installed")
    master = RedisServer(folder / "master")
    setup = SentinelSetup(master, free_port())
    sentinel_dir = folder / "sentinel"
    sentinel_dir.mkdir(parents=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        master.start()
        conf = sentinel_dir / "sentinel.conf"
        conf.write_text(
            f"port {setup.sentinel_port}\nbind 127.0.0.1\ndir {sentinel_dir}\n"
            f"logfile {sentinel_dir / 'sentinel.log'}\n"
            f"sentinel monitor {setup.service} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {setup.service} 2000\n"
        )
        proc = subprocess.Popen(
            [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=setup.sentinel_port, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "get-master-addr-by-name", setup.service
                ):
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the sentinel did not start")
            time.sleep(0.1)
        yield setup
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        master.stop()


@contextlib.contextmanager
def running_redis(folder: Path, **kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(folder, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty server for one test."""
    with running_redis(tmp_path / "redis") as server:
        yield server


__all__ = [
    "RedisServer",
    "SentinelSetup",
    "free_port",
    "redis_server",
    "running_cluster",
    "running_redis",
    "running_sentinel",
    "server_binary",
]
