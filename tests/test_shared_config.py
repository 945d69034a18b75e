"""``identity.cache.shared``: every mistake is named with its key path, nothing secret is
accepted in the YAML or shown by the configuration's repr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, load
from sidecar.redis_url import RedisTarget, parse_redis_url

from .conftest import ConfigDir


def with_shared(config_dir: ConfigDir, **shared: Any) -> Path:
    data = config_dir.base()
    data["identity"]["cache"] = {"shared": shared}
    return config_dir.write(data)


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    return info.value.problems


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://cache", RedisTarget("standalone", False, (("cache", 6379),))),
        ("rediss://cache:6380/2", RedisTarget("standalone", True, (("cache", 6380),), db=2)),
        ("redis://[::1]:7000", RedisTarget("standalone", False, (("::1", 7000),))),
        (
            "redis+sentinel://s1,s2:26380/mymaster",
            RedisTarget("sentinel", False, (("s1", 26379), ("s2", 26380)), service="mymaster"),
        ),
        (
            "rediss+sentinel://s1/mymaster/3",
            RedisTarget("sentinel", True, (("s1", 26379),), db=3, service="mymaster"),
        ),
        (
            "redis+cluster://n1:7000,n2:7001,n3",
            RedisTarget("cluster", False, (("n1", 7000), ("n2", 7001), ("n3", 6379))),
        ),
        ("REDISS+CLUSTER://n1", RedisTarget("cluster", True, (("n1", 6379),))),
    ],
)
def test_redis_urls(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target
    # what is logged parses to the same target
    assert parse_redis_url(target.describe()) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache", "not a Redis URL"),
        ("cache:6379", "not a Redis URL"),
        ("redis://:secret@cache", "no credentials in the URL"),
        ("redis://user:secret@cache", "no credentials in the URL"),
        ("redis://cache?password=x", "no query"),
        ("redis://", "no host"),
        ("redis://a,b", "one host"),
        ("redis://cache:0", "not a port"),
        ("redis://cache:99999", "not a port"),
        ("redis://ca che", "not a host name"),
        ("redis://cache/x", "database number"),
        ("redis://cache/1/2", "database number"),
        ("redis+sentinel://s1", "names its service"),
        ("redis+sentinel://s1/bad name", "not a Sentinel service"),
        ("redis+cluster://n1/1", "database 0 only"),
        ("redis://[zz]:1", "not an IPv6 address"),
    ],
)
def test_bad_redis_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_a_shared_cache_configuration_loads(config_dir: ConfigDir) -> None:
    (config_dir.path / "redis-password").write_text("s3cret\n")
    cfg = load(
        with_shared(
            config_dir,
            url="rediss://cache.internal:6380",
            username="sidecar",
            password_file="redis-password",
            ca="server-ca.pem",
            key_prefix="shop:",
            timeout="20ms",
        ),
        env={},
    )
    shared = cfg.identity.cache.shared
    assert shared is not None
    assert shared.timeout == 0.02 and shared.key_prefix == "shop:"
    assert shared.password_file == config_dir.path / "redis-password"
    assert "s3cret" not in repr(cfg)


def test_the_defaults(config_dir: ConfigDir) -> None:
    cfg = load(with_shared(config_dir, url="redis://cache"), env={})
    shared = cfg.identity.cache.shared
    assert shared is not None
    assert (shared.timeout, shared.key_prefix, shared.password_file) == (0.05, "sidecar:", None)
    assert load(config_dir.write(config_dir.base()), env={}).identity.cache.shared is None


def test_every_mistake_is_reported_with_its_path(config_dir: ConfigDir) -> None:
    (config_dir.path / "empty").write_text("\n")
    found = problems(
        with_shared(
            config_dir,
            url="redis://:pw@cache",
            password_file="empty",
            key_prefix="a {tag}",
            timeout="10s",
            pool=5,
        )
    )
    text = "\n".join(found)
    assert "identity.cache.shared.url: no credentials in the URL" in text
    assert "identity.cache.shared.password_file:" in text and "is empty" in text
    assert "identity.cache.shared.key_prefix: not a key prefix" in text
    assert "identity.cache.shared.timeout:" in text
    assert "identity.cache.shared.pool: unknown key" in text


def test_tls_files_need_rediss_and_go_together(config_dir: ConfigDir) -> None:
    found = problems(with_shared(config_dir, url="redis://cache", ca="server-ca.pem"))
    assert found == ["identity.cache.shared.ca: only with TLS: use a rediss:// URL"]
    found = problems(with_shared(config_dir, url="rediss://cache", certificate="alice.pem"))
    assert found == [
        "identity.cache.shared.certificate: certificate and key go together (mTLS to Redis)"
    ]
    found = problems(with_shared(config_dir, url="rediss://cache", password_file="nope"))
    assert found == [
        f"identity.cache.shared.password_file: file not found: {config_dir.path / 'nope'}"
    ]


def test_a_client_certificate_for_redis_is_pem(config_dir: ConfigDir) -> None:
    certs = config_dir.certs
    (config_dir.path / "alice.der").write_bytes(certs.alice.der)
    ok = load(
        with_shared(config_dir, url="rediss://cache", certificate="alice.pem", key="alice.key"),
        env={},
    )
    assert ok.identity.cache.shared is not None
    found = problems(
        with_shared(config_dir, url="rediss://cache", certificate="alice.der", key="alice.key")
    )
    assert len(found) == 1 and found[0].startswith("identity.cache.shared.certificate: "), found
    assert "must be a PEM certificate" in found[0]


def test_check_config_shows_where_verdicts_are_shared(
    config_dir: ConfigDir, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.__main__ import main

    (config_dir.path / "pw").write_text("s3cret\n")
    path = with_shared(config_dir, url="rediss://cache:6380/1", password_file="pw")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "  shared      rediss://cache:6380/1  prefix 'sidecar:', timeout 50 ms, "
        "password from a file" in out
    )
    assert "s3cret" not in out
