"""Identity Plus trust in route policy (issue #16): ``routes[].identityplus`` with the
profile's ``trust-score`` (a decimal up to 5, never an integer: the Go gateway reads it as
one) and ``local-intrusions``, and the role translation ``identity.identityplus.roles``.
Unit tests of the parsing, then end to end through the listener against the fake API."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from sidecar.identity.identityplus import RoleTranslation, _trust

from .conftest import ConfigDir, decode_userinfo
from .fake_identityplus import fake_identityplus
from .policy_helpers import ask
from .test_identity_e2e import Env, StartIdentityPlus, serial_of, start_ip

__all__ = ["fake_identityplus", "start_ip"]  # fixtures, imported to be used here


@pytest.mark.parametrize(
    ("value", "score"),
    [
        (4.25, Decimal("4.25")),
        (
            3.7,
            Decimal("3.7"),
        ),  # as written, not 3.70000000000000017763568394002504646778106689453125
        ("3.5", Decimal("3.5")),
        (" 2.0 ", Decimal("2.0")),
        (5, Decimal(5)),
        (0, Decimal(0)),
        ("1e0", Decimal(1)),
        (5.0001, None),  # beyond the scale
        (-0.5, None),
        (True, None),  # JSON true is no score
        ("NaN", None),
        (float("nan"), None),
        (float("inf"), None),
        ("high", None),
        ([4], None),
        (None, None),
    ],
)
def test_trust_scores_are_decimals_from_0_to_5(value: object, score: Decimal | None) -> None:
    assert _trust({"trust-score": value}).score == score


@pytest.mark.parametrize(
    ("value", "count"),
    [
        (0, 0),
        (2, 2),
        ("3", 3),
        (2.0, 2),
        (-1, None),
        (True, None),
        ("²", None),
        ("x", None),
        (1.5, None),
    ],
)
def test_local_intrusions_are_counts(value: object, count: int | None) -> None:
    assert _trust({"local-intrusions": value}).local_intrusions == count


def test_role_translation_as_the_gateway_does() -> None:
    table = RoleTranslation(
        {"Administrator": ("admin",), "org. manager": ("lead", "reviewer"), "member": ("user",)},
        remove_org_prefix=True,
    )
    profile = (
        "administrator",
        "org. manager",
        "org. member",
        "org. customer",
        "guest",
        "ADMINISTRATOR",
    )
    assert table.translate(profile) == ("admin", "lead", "reviewer", "user", "customer", "guest")
    plain = RoleTranslation({"member": ("user",)}, remove_org_prefix=False)
    assert plain.translate(("org. member", "Member")) == ("org. member", "user")
    assert RoleTranslation({}, remove_org_prefix=False).translate(("a", "b")) == ("a", "b")
    assert RoleTranslation({}, remove_org_prefix=True).translate(("org.", "Org.  admin")) == (
        "org.",
        "admin",
    )


# ---- end to end -------------------------------------------------------------------------------

ROUTES = [
    {"path": "/pay/", "identityplus": {"min_trust_score": 3.5, "max_local_intrusions": 0}},
    {"path": "/admin/", "roles": ["admin"]},
    {"path": "/"},
]


async def start(start_ip: StartIdentityPlus, config_dir: ConfigDir, **settings: Any) -> Env:
    env = await start_ip(**settings)
    data = config_dir.base(env.upstream.port)
    # the running configuration, with the routes under test
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": env.fake.url,
            "certificate": str(env.fake.agent_certificate),
            "key": str(env.fake.agent_key),
            "ca": str(env.fake.ca_file),
            **settings,
        },
    }
    data["routes"] = ROUTES
    config_dir.write(data)
    assert await env.running.sidecar.reload("test")
    return env


@pytest.mark.parametrize(
    ("extra", "status", "rule"),
    [
        ({"trust-score": 3.7, "local-intrusions": 0}, 200, ""),
        ({"trust-score": "3.5", "local-intrusions": "0"}, 200, ""),
        ({"trust-score": 3.49, "local-intrusions": 0}, 403, "identityplus.min_trust_score"),
        ({"trust-score": 3, "local-intrusions": 0}, 403, "identityplus.min_trust_score"),
        ({"local-intrusions": 0}, 403, "identityplus.min_trust_score"),
        ({"trust-score": 4.9, "local-intrusions": 1}, 403, "identityplus.max_local_intrusions"),
        ({"trust-score": 4.9}, 403, "identityplus.max_local_intrusions"),
        ({"trust-score": 4.9, "local-intrusions": True}, 403, "identityplus.max_local_intrusions"),
    ],
)
async def test_trust_rules_through_the_listener(
    start_ip: StartIdentityPlus,
    config_dir: ConfigDir,
    extra: dict[str, Any],
    status: int,
    rule: str,
) -> None:
    env = await start(start_ip, config_dir)
    who = env.client("Ada")
    env.fake.set_profile(serial_of(who), "OK 0001", organizational_reference="ada", extra=extra)
    answer = await ask(env.running, env.upstream, "/pay/x", who=who)
    assert answer.status == status, answer.response.body
    if status == 200:
        assert answer.seen is not None
        doc = decode_userinfo(answer.seen.header("X-USERINFO")[0])
        # the profile's trust data decides here; it is not announced to the application
        assert set(doc) == {"sub", "username", "roles"} and doc["sub"] == "ada"
    else:
        assert answer.seen is None and rule in answer.reason
        assert str(extra.get("trust-score", "")) not in answer.reason or not extra.get(
            "trust-score"
        )
    # the rest of the site does not ask about trust
    assert (await ask(env.running, env.upstream, "/x", who=who)).status == 200


async def test_roles_are_translated_to_local_names(
    start_ip: StartIdentityPlus, config_dir: ConfigDir
) -> None:
    env = await start(
        start_ip,
        config_dir,
        roles={"administrator": "admin", "member": ["user", "reader"]},
        remove_org_prefix=True,
    )
    who = env.client("Grace")
    env.fake.set_profile(
        serial_of(who),
        "OK 0001",
        organizational_reference="grace",
        service_roles=["org. Administrator", "member", "auditor"],
    )
    answer = await ask(env.running, env.upstream, "/admin/x", who=who)
    assert answer.status == 200 and answer.seen is not None
    doc = decode_userinfo(answer.seen.header("X-USERINFO")[0])
    assert doc["roles"] == ["admin", "user", "reader", "auditor"]


async def test_a_reload_of_the_trust_rule_applies_to_the_next_request(
    start_ip: StartIdentityPlus, config_dir: ConfigDir
) -> None:
    """The verdict stays cached (the identity section did not change): only the rule moved."""
    env = await start(start_ip, config_dir)
    who = env.client("Alan")
    env.fake.set_profile(
        serial_of(who), "OK 0001", extra={"trust-score": 4.0, "local-intrusions": 0}
    )
    assert (await ask(env.running, env.upstream, "/pay/x", who=who)).status == 200
    data = config_dir.base(env.upstream.port)
    data["identity"] = env.running.sidecar.config.identity.model_dump(
        mode="json", exclude_none=True
    )
    data["routes"] = [{"path": "/pay/", "identityplus": {"min_trust_score": "4.01"}}, {"path": "/"}]
    config_dir.write(data)
    assert await env.running.sidecar.reload("test")
    denied = await ask(env.running, env.upstream, "/pay/x", who=who)
    assert denied.status == 403 and "identityplus.min_trust_score" in denied.reason
    assert env.fake.calls[serial_of(who)] == 1  # judged on the cached verdict
