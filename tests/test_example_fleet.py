"""``examples/fleet``: the plain-shell example runs and does what its README says, and the
compose file gives both replicas a configuration the sidecar accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config import load

from .redisd import free_port, server_binary

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fleet"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None or shutil.which("curl") is None:
        pytest.skip("the example needs openssl and curl")
    folder = tmp_path / "fleet"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(".fleet"))
    subprocess.run([str(folder / "pki.sh")], check=True, capture_output=True, timeout=60)
    return folder


def test_run_sh_check(example: Path) -> None:
    if server_binary() is None:
        pytest.skip("needs valkey-server or redis-server")
    ports = {
        name: str(free_port())
        for name in ("REDIS_PORT", "UPSTREAM_PORT", "A_PORT", "A_ADMIN", "B_PORT", "B_ADMIN")
    }
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **ports, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(example / "run.sh"), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    logs = "\n".join(p.read_text() for p in (example / ".fleet").glob("*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "fleet example: OK" in result.stdout


def test_compose_gives_each_replica_a_valid_configuration(example: Path) -> None:
    compose = yaml.safe_load((EXAMPLE / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"valkey", "upstream", "sidecar-a", "sidecar-b"}
    for name in ("sidecar-a", "sidecar-b"):
        service = services[name]
        env = {k: str(v) for k, v in service["environment"].items()}
        assert env["SIDECAR_CONFIG"] == "/etc/sidecar/sidecar.yaml"
        assert service["volumes"] == ["./:/etc/sidecar:ro"] and service["read_only"] is True
        config = load(example / "sidecar.yaml", env=env)
        shared = config.identity.cache.shared
        assert shared is not None and shared.url == "redis://valkey:6379"
        assert config.upstream.url == "http://upstream:8080"
        assert config.listen.port == 8443 and config.admin.port == 9090
    valkey = services["valkey"]["command"]
    assert valkey[valkey.index("--save") + 1] == "" and "--appendonly" in valkey
