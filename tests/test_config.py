"""Configuration: every error class reported with its dotted path, all at once."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, load, parse_duration

from .conftest import ConfigDir
from .pki import make_leaf

REPO = Path(__file__).resolve().parent.parent


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env=env or {})
    return info.value.problems


def test_valid_config_loads(config_dir: ConfigDir) -> None:
    cfg = load(config_dir.write(config_dir.base()), env={})
    assert cfg.tls.client_certificate == "optional"
    assert cfg.upstream.timeout.connect == 2.0
    users = cfg.identity.static.users
    assert [u.username for u in users] == ["alice", "bob"]
    assert all(len(b.fingerprint) == 64 for u in users for b in u.certificates)
    # sections are frozen
    with pytest.raises(Exception, match="frozen"):
        cfg.listen.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2", 2.0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "-1s", "", True, [1]])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_every_problem_at_once_with_paths(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["listen"]["prot"] = 8443  # unknown key
    data["listen"]["port"] = "eighty"  # wrong type
    data["tls"]["key"] = "missing.key"  # missing file
    data["upstream"]["timeout"]["read"] = "soon"  # bad duration
    data["routes"].append({"path": "/admin/"})  # duplicate route
    problems = problems_of(config_dir.write(data))
    joined = "\n".join(problems)
    assert "listen.prot: unknown key" in joined
    assert any(p.startswith("listen.port:") for p in problems)
    assert any(p.startswith("tls.key: file not found") and "missing.key" in p for p in problems)
    assert any(p.startswith("upstream.timeout.read:") and "duration" in p for p in problems)
    assert any(p.startswith("routes[3].path: duplicate of routes[1]") for p in problems)
    assert len(problems) >= 5


def test_key_that_does_not_match_certificate(config_dir: ConfigDir) -> None:
    config_dir.certs.alice.write(config_dir.path, "other")
    data = config_dir.base()
    data["tls"]["key"] = "other.key"
    problems = problems_of(config_dir.write(data))
    assert any(
        p.startswith("tls.key: the private key") and "does not match" in p for p in problems
    ), problems


def test_unreadable_certificate(config_dir: ConfigDir) -> None:
    (config_dir.path / "garbage.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
    )
    (config_dir.path / "random.der").write_bytes(b"\x30\x03\x02\x01\x01garbage")
    data = config_dir.base()
    data["tls"]["client_ca"] = ["garbage.pem", "random.der"]
    problems = problems_of(config_dir.write(data))
    assert any(p.startswith("tls.client_ca[0]:") for p in problems), problems
    assert any(p.startswith("tls.client_ca[1]:") and "not a PEM or DER" in p for p in problems), (
        problems
    )


def test_der_files_are_accepted(config_dir: ConfigDir) -> None:
    (config_dir.path / "root.der").write_bytes(config_dir.certs.pki.client_root.der)
    data = config_dir.base()
    data["tls"]["client_ca"] = ["root.der"]
    assert load(config_dir.write(data), env={}).tls.client_ca[0].name == "root.der"


def test_too_many_certificates_for_a_user(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    extra = [make_leaf(config_dir.certs.pki.client_intermediate, f"c{i}") for i in range(5)]
    bindings = data["identity"]["static"]["users"][0]["certificates"]
    bindings.extend({"sha256": hashlib.sha256(c.der).hexdigest()} for c in extra)
    problems = problems_of(config_dir.write(data))
    assert any(
        p.startswith("identity.static.users[0].certificates:")
        and "6 certificates" in p
        and "at most 5" in p
        for p in problems
    ), problems
    data["identity"]["static"]["max_certificates_per_user"] = 6
    assert load(config_dir.write(data), env={})


def test_certificate_bound_twice_and_bad_fingerprint(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    users = data["identity"]["static"]["users"]
    users[1]["certificates"].append({"file": "alice.pem"})
    problems = problems_of(config_dir.write(data))
    assert (
        "identity.static.users[1].certificates[1]: certificate already bound to users[0]"
        in problems
    )
    users[1]["certificates"].pop()
    users[0]["certificates"].append({"sha256": "12:34"})
    users[0]["certificates"].append({"file": "nope.pem"})
    problems = problems_of(config_dir.write(data))
    assert any(
        p.startswith("identity.static.users[0].certificates[1].sha256: not a SHA-256")
        for p in problems
    ), problems
    assert any(
        p.startswith("identity.static.users[0].certificates[2].file: file not found")
        for p in problems
    ), problems


def test_env_interpolation_and_relative_paths(config_dir: ConfigDir, tmp_path: Path) -> None:
    data = config_dir.base()
    data["upstream"]["url"] = "http://${APP_HOST}:${APP_PORT:-9000}"
    data["tls"]["certificate"] = "${TLS_DIR}/server.pem"
    cfg = load(
        config_dir.write(data), env={"APP_HOST": "10.1.2.3", "TLS_DIR": str(config_dir.path)}
    )
    assert cfg.upstream.url == "http://10.1.2.3:9000"
    # relative paths are resolved against the config file's folder, not the working directory
    assert cfg.tls.key == config_dir.path / "server.key"
    problems = problems_of(config_dir.write(data), env={"TLS_DIR": str(config_dir.path)})
    assert "upstream.url: environment variable APP_HOST is not set" in problems


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    assert "configuration file not found" in problems_of(tmp_path / "nope.yaml")[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  port: [1,\n")
    assert "not valid YAML" in problems_of(bad)[0]
    dup = tmp_path / "dup.yaml"
    dup.write_text("listen:\n  port: 1\n  port: 2\n")
    assert "duplicate key 'port'" in problems_of(dup)[0]


def test_upstream_url_without_credentials(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["upstream"]["url"] = "http://user:secret@127.0.0.1:8080"
    problems = problems_of(config_dir.write(data))
    assert any(p.startswith("upstream.url: credentials in upstream.url") for p in problems), (
        problems
    )
    assert not any("secret" in p for p in problems)


def test_backend_section_required(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["identity"]["backend"] = "identityplus"
    problems = problems_of(config_dir.write(data))
    assert any(p.startswith("identity.identityplus: required") for p in problems), problems


def test_no_trust_anchor_and_bad_route(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["tls"]["client_ca"] = []
    data["routes"] = [
        {"path": "admin"},
        {"path": "/x/../y"},
        {"path": "/p/", "access": "public", "roles": ["a"]},
    ]
    data["trusted_proxies"] = ["10.0.0.0/8", "not-an-ip"]
    problems = problems_of(config_dir.write(data))
    assert any(p.startswith("tls.client_ca: no trust anchors") for p in problems), problems
    assert any(p.startswith("routes[0].path:") for p in problems), problems
    assert any(p.startswith("routes[1].path:") for p in problems), problems
    assert any(p.startswith("routes[2].roles:") for p in problems), problems
    assert any(p.startswith("trusted_proxies[1]:") for p in problems), problems


def test_example_config_loads(tmp_path: Path, config_dir: ConfigDir) -> None:
    """The documented example is a working configuration once its files exist."""
    pki = config_dir.certs.pki
    shutil.copy(REPO / "config" / "sidecar.example.yaml", tmp_path / "sidecar.yaml")
    pki.server.write(tmp_path / "tls", "tls")
    (tmp_path / "tls" / "tls.pem").rename(tmp_path / "tls" / "tls.crt")
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "ca.pem").write_bytes(pki.client_root.pem + pki.client_intermediate.pem)
    config_dir.certs.alice.write(tmp_path / "certs", "alice-laptop")
    cfg = load(tmp_path / "sidecar.yaml", env={})
    assert cfg.listen.port == 8443
    assert cfg.identity.static.users[0].username == "alice"
    assert [r.path for r in cfg.routes] == ["/healthz", "/public/", "/admin/", "/api/orders/", "/"]
    assert cfg.limits.header_timeout == 60.0


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_check_config_cli(config_dir: ConfigDir) -> None:
    good = config_dir.write(config_dir.base())
    ok = _cli("check-config", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout and "2 user(s)" in ok.stdout

    data = config_dir.base()
    data["tls"]["key"] = "missing.key"
    data["bogus"] = 1
    bad = _cli("check-config", str(config_dir.write(data, "bad.yaml")))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert any(line.startswith("tls.key: file not found") for line in lines)
    assert "bogus: unknown key" in lines
    assert "Traceback" not in bad.stderr


def test_run_with_bad_config_is_one_line_each(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["tls"]["certificate"] = "nope.pem"
    result = _cli("run", "--config", str(config_dir.write(data)))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tls.certificate: file not found")
    assert "Traceback" not in result.stderr


def test_run_with_a_port_in_use_is_one_line(config_dir: ConfigDir) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = config_dir.base()
        data["admin"]["port"] = taken.getsockname()[1]
        result = _cli("run", "--config", str(config_dir.write(data)))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sidecar: cannot start:") and "address already in use" in lines[0]
