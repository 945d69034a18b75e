"""The trust-report keys (headers.reports, identity.identityplus.reports, admin.reports_from):
every problem reported with its dotted path, all at once."""

from __future__ import annotations

from typing import Any

from sidecar.config import load

from .conftest import ConfigDir
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .test_config import problems_of

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here


def with_identityplus(
    config_dir: ConfigDir, fake: FakeIdentityPlus, reports: Any
) -> dict[str, Any]:
    data = config_dir.base()
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "certificate": str(fake.agent_certificate),
            "key": str(fake.agent_key),
            "reports": reports,
        },
    }
    return data


def test_the_defaults_and_the_shorthand(
    config_dir: ConfigDir, fake_identityplus: FakeIdentityPlus
) -> None:
    cfg = load(config_dir.write(config_dir.base()), env={})
    assert cfg.headers.reports.names() == (
        "X-Identity-Bind",
        "X-Identity-Unbind",
        "X-Identity-Trust",
        "X-Identity-Intrusion",
    )
    assert cfg.admin.reports_from == ()
    cfg = load(config_dir.write(with_identityplus(config_dir, fake_identityplus, True)), env={})
    assert cfg.identity.identityplus is not None
    reports = cfg.identity.identityplus.reports
    assert reports.enabled and reports.retries == 3 and reports.backoff == 1.0
    cfg = load(
        config_dir.write(
            with_identityplus(config_dir, fake_identityplus, {"enabled": True, "backoff": "250ms"})
        ),
        env={},
    )
    assert cfg.identity.identityplus is not None
    assert cfg.identity.identityplus.reports.backoff == 0.25


def test_every_bad_key_is_reported_with_its_path(
    config_dir: ConfigDir, fake_identityplus: FakeIdentityPlus
) -> None:
    data = with_identityplus(
        config_dir,
        fake_identityplus,
        {
            "enabled": "sometimes",
            "concurrency": 0,
            "retries": -1,
            "backoff": "2m",
            "max_backoff": "1m",
            "per_certificate": 0,
            "dedupe": "10m",
        },
    )
    data["headers"] = {
        "reports": {"bind": "Set-Cookie", "unbind": "X Bad", "trust": "X-T", "intrusion": "x_t"}
    }
    data["admin"] = {"host": "127.0.0.1", "port": 0, "reports_from": ["10.0.0.0/8", "nowhere"]}

    problems = problems_of(config_dir.write(data))

    expected = [
        "identity.identityplus.reports.enabled:",
        "identity.identityplus.reports.concurrency:",
        "identity.identityplus.reports.retries:",
        "identity.identityplus.reports.per_certificate:",
        "identity.identityplus.reports.dedupe: unknown key",
        "headers.reports.bind: 'Set-Cookie' frames, addresses or describes responses",
        "headers.reports.unbind: not a valid header name",
        "admin.reports_from[1]: not an IP address or CIDR: 'nowhere'",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)


def test_report_names_must_differ_from_each_other_and_the_identity_headers(
    config_dir: ConfigDir,
) -> None:
    data = config_dir.base()
    data["headers"] = {"userinfo": "X-Who", "reports": {"trust": "x_who"}}
    assert any(
        p.startswith("headers.reports.trust: must differ from headers.certificate")
        for p in problems_of(config_dir.write(data))
    )
    data["headers"] = {"reports": {"trust": "X-Same", "intrusion": "x-same"}}
    assert any(
        p.startswith("headers.reports.intrusion: the same header as headers.reports.trust")
        for p in problems_of(config_dir.write(data))
    )
    data["identity"]["identityplus"] = None
    data["headers"] = {"reports": {"bind": "X-Identity-Bind"}}
    cfg = load(config_dir.write(data), env={})
    assert cfg.headers.reports.bind == "X-Identity-Bind"


def test_max_backoff_below_backoff_is_refused(
    config_dir: ConfigDir, fake_identityplus: FakeIdentityPlus
) -> None:
    data = with_identityplus(config_dir, fake_identityplus, {"backoff": "2m", "max_backoff": "1m"})
    problems = problems_of(config_dir.write(data))
    assert "identity.identityplus.reports.max_backoff: must be at least backoff" in problems
