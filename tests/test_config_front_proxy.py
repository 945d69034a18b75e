"""The configuration of issue #15 (front proxy, PROXY protocol, certificate formats, HTTP
legacy): each key checked with its dotted path, and the rules that tie them together.

The keys are not accepted by ``Config`` yet (a key the sidecar accepts must work, and the
listener does not use them yet): ``ConfigWithFrontProxy`` is checked here, and the first test
pins that the running configuration still refuses them.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from sidecar import config as config_mod
from sidecar.config import Config, ConfigError, ConfigWithFrontProxy

from .conftest import ConfigDir

FINGERPRINT = "AB:" * 31 + "AB"


def check(config_dir: ConfigDir, data: dict[str, Any]) -> ConfigWithFrontProxy:
    cfg = config_mod.parse(data, base_dir=config_dir.path, env={}, model=ConfigWithFrontProxy)
    assert isinstance(cfg, ConfigWithFrontProxy)
    return cfg


def problems(config_dir: ConfigDir, data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check(config_dir, data)
    return info.value.problems


def session_key(config_dir: ConfigDir, name: str = "session.key") -> str:
    (config_dir.path / name).write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return name


def identityplus(config_dir: ConfigDir, **extra: Any) -> dict[str, Any]:
    return {"certificate": "alice.pem", "key": "alice.key", **extra}


def front(config_dir: ConfigDir, **sections: Any) -> dict[str, Any]:
    data = config_dir.base()
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def test_the_running_configuration_accepts_them_all(config_dir: ConfigDir) -> None:
    data = front(
        config_dir,
        listen={"tls": False, "proxy_protocol": True, "server_names": ["app.example"]},
        front_proxy={"trusted": ["10.0.0.0/8"], "certificate_header": "xfcc"},
        headers={"certificate_formats": ["client-cert"]},
    )
    cfg = config_mod.parse(data, base_dir=config_dir.path, env={})
    assert (cfg.listen.tls, cfg.listen.proxy_protocol) == (False, True)
    assert cfg.front_proxy.certificate_header == "xfcc"
    assert cfg.headers.certificate_formats == ("client-cert",)
    # and the extended model is a Config: the rest of the sidecar takes it as one
    assert issubclass(ConfigWithFrontProxy, Config)


def test_defaults_change_nothing(config_dir: ConfigDir) -> None:
    cfg = check(config_dir, config_dir.base())
    assert (cfg.listen.tls, cfg.listen.proxy_protocol) == (True, False)
    assert cfg.front_proxy.trusted == () and cfg.front_proxy.certificate_header is None
    assert cfg.headers.certificate_formats == ("app-certificate",)
    assert cfg.identity.identityplus is None


def test_a_front_proxy_setup(config_dir: ConfigDir) -> None:
    data = front(
        config_dir,
        listen={"tls": False, "proxy_protocol": True, "server_names": ["app.example"]},
        front_proxy={
            "trusted": ["10.1.2.3/8", "2001:db8::/32", "10.0.0.0/8", "192.0.2.7"],
            "certificate_header": "ssl-client-cert",
        },
        headers={"certificate_formats": ["app-certificate", "client-cert", "xfcc"]},
    )
    cfg = check(config_dir, data)
    assert cfg.front_proxy.trusted == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32")
    assert [str(n) for n in cfg.front_proxy.networks()] == list(cfg.front_proxy.trusted)
    assert cfg.front_proxy.fingerprints() == frozenset()
    assert cfg.headers.certificate_formats == ("app-certificate", "client-cert", "xfcc")


def test_a_proxy_that_connects_with_mtls(config_dir: ConfigDir) -> None:
    data = front(config_dir, front_proxy={"trusted": [FINGERPRINT], "certificate_header": "xfcc"})
    cfg = check(config_dir, data)
    assert cfg.front_proxy.fingerprints() == frozenset({"ab" * 32})
    assert cfg.front_proxy.networks() == ()


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"front_proxy": {"certificate_header": "xfcc"}},
            "front_proxy.trusted: empty, but front_proxy.certificate_header is set",
        ),
        (
            {"listen": {"tls": False, "server_names": ["app.example"]}},
            "front_proxy.trusted: empty, but listen.tls is false",
        ),
        (
            {"listen": {"proxy_protocol": True}, "front_proxy": {"trusted": [FINGERPRINT]}},
            "listen.proxy_protocol: needs the load balancers' addresses (CIDRs)",
        ),
        (
            {
                "listen": {"tls": False, "server_names": ["app.example"]},
                "front_proxy": {"trusted": ["10.0.0.0/8", FINGERPRINT]},
            },
            "front_proxy.trusted[1]: a certificate fingerprint needs listen.tls: true",
        ),
        (
            {"listen": {"tls": False}, "front_proxy": {"trusted": ["10.0.0.0/8"]}},
            "listen.server_names: required with listen.tls: false",
        ),
        (
            {"front_proxy": {"trusted": ["10.0.0.0/8", "0.0.0.0/0"]}},
            "front_proxy.trusted[1]: 0.0.0.0/0 trusts every address",
        ),
        ({"front_proxy": {"trusted": ["::/0"]}}, "front_proxy.trusted[0]: ::/0 trusts every"),
        (
            {"front_proxy": {"trusted": ["lb.internal"]}},
            "front_proxy.trusted[0]: not a CIDR or a SHA-256 certificate fingerprint: 'lb.internal'",
        ),
        (
            {"front_proxy": {"trusted": ["10.0.0.0/8"], "certificate_header": "x-ssl-cert"}},
            "front_proxy.certificate_header: Input should be 'client-cert', 'xfcc', "
            "'ssl-client-cert', 'traefik' or 'amzn-mtls'",
        ),
        (
            {"headers": {"certificate_formats": ["xfcc", "client-cert", "xfcc"]}},
            "headers.certificate_formats[2]: xfcc is listed twice",
        ),
        (
            {"headers": {"certificate_formats": ["pem"]}},
            "headers.certificate_formats[0]: Input should be 'app-certificate'",
        ),
        (
            {"headers": {"certificate": "Client-Cert"}},
            "headers.certificate: 'Client-Cert' is a certificate header of another format",
        ),
        (
            {"headers": {"userinfo": "X_Forwarded_Client_Cert"}},
            "headers.userinfo: 'X_Forwarded_Client_Cert' is a certificate header",
        ),
    ],
)
def test_rules_with_their_paths(
    config_dir: ConfigDir, sections: dict[str, Any], expected: str
) -> None:
    found = problems(config_dir, front(config_dir, **sections))
    assert any(p.startswith(expected) for p in found), found


def test_legacy(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    key = session_key(config_dir)
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus(config_dir, legacy=True, session_keys=[key]),
    }
    cfg = check(config_dir, data)
    assert cfg.identity.identityplus is not None and cfg.identity.identityplus.legacy
    keys = cfg.identity.identityplus.session_key_bytes()
    assert keys == (base64.b64decode((config_dir.path / key).read_text()),)
    assert keys[0].hex() not in repr(cfg) and repr(keys[0]) not in repr(cfg)
    # a rewritten key file is a changed configuration (a reload builds a new sealer)
    again = check(config_dir, data)
    assert again == cfg
    session_key(config_dir)
    assert check(config_dir, data) != cfg


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ({"legacy": True}, "identity.identityplus.session_keys: required with legacy"),
        ({"session_keys": ["session.key"]}, "identity.identityplus.session_keys: only used with"),
        (
            {"legacy": True, "session_keys": ["missing.key"]},
            "identity.identityplus.session_keys[0]: file not found",
        ),
        (
            {"legacy": True, "session_keys": ["alice.pem"]},
            "identity.identityplus.session_keys[0]: ",
        ),
        (
            {"legacy": True, "session_keys": ["session.key", "copy.key"]},
            "identity.identityplus.session_keys[1]: the same key as session_keys[0]",
        ),
    ],
)
def test_legacy_keys(config_dir: ConfigDir, identity: dict[str, Any], expected: str) -> None:
    session_key(config_dir)
    (config_dir.path / "copy.key").write_bytes((config_dir.path / "session.key").read_bytes())
    data = config_dir.base()
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus(config_dir, **identity),
    }
    found = problems(config_dir, data)
    assert any(p.startswith(expected) for p in found), found
    if "alice.pem" in str(identity):
        assert any("not a session key" in p for p in found), found


def test_legacy_needs_the_identityplus_backend_and_a_lifetime(config_dir: ConfigDir) -> None:
    key = session_key(config_dir)
    data = config_dir.base()
    data["identity"]["identityplus"] = identityplus(config_dir, legacy=True, session_keys=[key])
    assert problems(config_dir, data) == [
        "identity.identityplus.legacy: needs identity.backend: identityplus (Identity Plus "
        "resolves the sign-on)"
    ]
    data["identity"]["backend"] = "identityplus"
    data["identity"]["cache"] = {"ttl": 0}
    assert problems(config_dir, data) == [
        "identity.cache.ttl: must be above 0 with identityplus.legacy: it is the session "
        "cookie's lifetime"
    ]


def test_every_problem_at_once(config_dir: ConfigDir) -> None:
    data = front(
        config_dir,
        front_proxy={"trusted": ["0.0.0.0/0", "nope"], "certificate_header": "envoy"},
        headers={"certificate_formats": ["xfcc", "xfcc"]},
        listen={"proxy_protocol": "sometimes"},
    )
    found = problems(config_dir, data)
    for start in (
        "front_proxy.trusted[0]:",
        "front_proxy.trusted[1]:",
        "front_proxy.certificate_header:",
        "headers.certificate_formats[1]: xfcc is listed twice",
        "listen.proxy_protocol:",
    ):
        assert any(p.startswith(start) for p in found), (start, found)


def test_relative_key_paths_follow_the_file(config_dir: ConfigDir) -> None:
    (config_dir.path / "keys").mkdir()
    key = session_key(config_dir, "keys/session.key")
    data = config_dir.base()
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus(config_dir, legacy=True, session_keys=key),
    }
    cfg = check(config_dir, data)
    assert cfg.identity.identityplus is not None
    assert cfg.identity.identityplus.session_keys == (config_dir.path / "keys" / "session.key",)
