"""The real program: `sidecar run` and `sidecar demo` as processes, driven with the real curl."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ConfigDir, Upstream, decode_userinfo
from .ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"process exited early: {proc.stderr.read() if proc.stderr else ''}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"port {port} never opened")


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=30
    )


async def test_run_with_curl_and_sigterm(config_dir: ConfigDir, upstream: Upstream) -> None:
    port = free_port()
    data = config_dir.base(upstream.port)
    data["listen"]["port"] = port
    path = config_dir.write(data)
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        code, stderr = await _drive_run(proc, port, config_dir, upstream)
    assert code == 0
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    requests = [e for e in events if e.get("event") == "request"]
    assert {e["status"] for e in requests} == {200, 401}


async def _drive_run(
    proc: subprocess.Popen[str], port: int, config_dir: ConfigDir, upstream: Upstream
) -> tuple[int, str]:
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        d = config_dir.path
        out = await asyncio.to_thread(
            curl,
            "--cacert",
            str(d / "server-ca.pem"),
            "--cert",
            str(d / "alice.pem"),
            "--key",
            str(d / "alice.key"),
            "-w",
            "\n%{http_code}",
            f"https://localhost:{port}/admin/x",
        )
        body, _, code = out.stdout.rpartition("\n")
        assert code == "200", out.stderr
        assert json.loads(body)["path"] == "/admin/x"
        assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["username"] == "alice"
        out = await asyncio.to_thread(
            curl,
            "--cacert",
            str(d / "server-ca.pem"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"https://localhost:{port}/app/",
        )
        assert out.stdout == "401"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=15)
        finally:
            proc.kill()
    return proc.returncode, stderr


def test_demo_prints_commands_that_work(tmp_path: Path) -> None:
    port, upstream_port, admin_port = free_port(), free_port(), free_port()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--state",
            str(tmp_path / "demo"),
            "--port",
            str(port),
            "--upstream-port",
            str(upstream_port),
            "--admin-port",
            str(admin_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        _drive_demo(proc, port)


def _drive_demo(proc: subprocess.Popen[str], port: int) -> None:
    try:
        wait_for_port(port, proc)
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        commands = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(commands) >= 6, lines
        # Run each command exactly as a person would paste it into a shell.
        out = [
            subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=30).stdout
            for c in commands
        ]
        assert '"upstream_saw"' in out[0] and '"username": "alice"' in out[0]  # alice on /admin/
        assert '"status": 403' in out[1] and "role" in out[1]  # bob lacks the role
        assert '"username": "bob"' in out[2]  # bob elsewhere
        assert '"status": 401' in out[3]  # no certificate
        assert '"upstream_saw"' in out[4] and '"identity": null' in out[4]  # public, anonymous
        assert '"status": 403' in out[5] and "not bound" in out[5]  # bound to nobody
        assert '"username": "bob"' in out[6] and "admin" not in out[6].split('"identity"')[1]
        assert '"ready": true' in out[7]
        assert "sidecar_requests_total{" in out[8]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert proc.returncode == 0
