"""check-config for the route policy keys (issue #16): every new key is validated with its
dotted path, and rules that can never match are refused, each problem reported at once."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Config, load
from sidecar.errors import ConfigError

from .conftest import ConfigDir
from .pki import make_ca
from .policy_helpers import sha256_of, spki_of, write_pem


def problems_of(config_dir: ConfigDir, data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(config_dir.write(data), env={})
    return info.value.problems


def routes(config_dir: ConfigDir, *entries: dict[str, Any]) -> dict[str, Any]:
    return config_dir.base(routes=list(entries))


def test_every_rule_loads(config_dir: ConfigDir) -> None:
    pki = config_dir.certs.pki
    ca_file = write_pem(config_dir.path, "issuing-ca", pki.client_intermediate)
    data = routes(
        config_dir,
        {
            "path": "/svc/",
            "access": "certificate",
            "methods": ["GET", "POST"],
            "allow": {
                "san_dns": ["orders.svc.example", "*.jobs.example"],
                "san_uri": ["spiffe://prod.example/ns/shop/", "spiffe://prod.example/sa/x"],
                "san_email": "Ops@Example.COM",
                "san_ip": ["10.0.0.0/8", "fd00::/8"],
                "subject": {"CN": "orders", "OU": ["Payments"], "O": ["Acme"]},
                "issuer": [ca_file, spki_of(pki.client_root).upper()],
                "fingerprint": [bytes.fromhex(sha256_of(config_dir.certs.alice)).hex(":").upper()],
            },
            "addresses": {"allow": ["10.0.0.0/8", "::1"], "exempt": ["10.9.0.0/16"]},
        },
        {"path": "/"},
    )
    config = load(config_dir.write(data), env={})
    route = config.routes[0]
    assert route.allow is not None and route.addresses is not None
    assert route.allow.san_email == ("Ops@example.com",)
    assert route.allow.san_dns == ("orders.svc.example", "*.jobs.example")
    assert route.allow.subject is not None and route.allow.subject.attributes() == [
        ("CN", ("orders",)),
        ("OU", ("Payments",)),
        ("O", ("Acme",)),
    ]
    keys = route.allow.issuer_keys()
    assert keys[f"sha256:{spki_of(pki.client_root)}"] == {spki_of(pki.client_root)}
    assert keys[ca_file] == {spki_of(pki.client_intermediate)}


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ({"path": "/a/", "methods": []}, "routes[0].methods: an empty list covers no method"),
        ({"path": "/a/", "methods": ["get"]}, "routes[0].methods[0]: methods are case-sensitive"),
        ({"path": "/a/", "methods": ["GET", "GET"]}, "routes[0].methods[1]: GET is listed twice"),
        ({"path": "/a/", "methods": ["G T"]}, "routes[0].methods[0]: not a method name"),
        ({"path": "/a/", "allow": {}}, "routes[0].allow: give at least one of"),
        (
            {"path": "/a/", "allow": {"san_dns": []}},
            "routes[0].allow.san_dns: an empty list matches nothing",
        ),
        (
            {"path": "/a/", "allow": {"san_dns": ["a b"]}},
            "routes[0].allow.san_dns[0]: not a host name",
        ),
        (
            {"path": "/a/", "allow": {"san_dns": ["10.0.0.1"]}},
            "routes[0].allow.san_dns[0]: an IP address is matched by san_ip",
        ),
        (
            {"path": "/a/", "allow": {"san_dns": ["a.*.example"]}},
            "routes[0].allow.san_dns[0]: a wildcard is",
        ),
        (
            {"path": "/a/", "allow": {"san_uri": ["spiffe://Prod/x"]}},
            "routes[0].allow.san_uri[0]: not a SPIFFE ID",
        ),
        (
            {"path": "/a/", "allow": {"san_uri": ["spiffe://prod/../x"]}},
            "routes[0].allow.san_uri[0]: not a SPIFFE ID",
        ),
        (
            {"path": "/a/", "allow": {"san_uri": ["not a uri"]}},
            "routes[0].allow.san_uri[0]: not a URI",
        ),
        (
            {"path": "/a/", "allow": {"san_email": ["nobody"]}},
            "routes[0].allow.san_email[0]: not an email address",
        ),
        (
            {"path": "/a/", "allow": {"san_ip": ["10.0.0.0/33"]}},
            "routes[0].allow.san_ip[0]: not an IP address or CIDR",
        ),
        (
            {"path": "/a/", "allow": {"san_ip": ["::ffff:10.0.0.0/104"]}},
            "routes[0].allow.san_ip[0]: write IPv4 networks as IPv4",
        ),
        (
            {"path": "/a/", "allow": {"subject": {}}},
            "routes[0].allow.subject: give at least one of CN, OU, O",
        ),
        (
            {"path": "/a/", "allow": {"subject": {"cn": ["x"]}}},
            "routes[0].allow.subject.cn: unknown key",
        ),
        (
            {"path": "/a/", "allow": {"subject": {"OU": []}}},
            "routes[0].allow.subject.OU: an empty list matches nothing",
        ),
        (
            {"path": "/a/", "allow": {"fingerprint": ["abc"]}},
            "routes[0].allow.fingerprint[0]: not a SHA-256 fingerprint",
        ),
        (
            {"path": "/a/", "allow": {"issuer": ["missing.pem"]}},
            "routes[0].allow.issuer[0]: file not found",
        ),
        ({"path": "/a/", "allow": {"issuer": ["alice.pem"]}}, "routes[0].allow.issuer[0]:"),
        (
            {"path": "/a/", "allow": {"san_dns": ["x.example"], "bogus": 1}},
            "routes[0].allow.bogus: unknown key",
        ),
        ({"path": "/a/", "addresses": {}}, "routes[0].addresses: give allow and/or exempt"),
        (
            {"path": "/a/", "addresses": {"allow": []}},
            "routes[0].addresses.allow: an empty list matches nothing",
        ),
        (
            {"path": "/a/", "addresses": {"allow": ["nope"]}},
            "routes[0].addresses.allow[0]: not an IP address or CIDR",
        ),
        (
            {"path": "/a/", "addresses": {"allow": ["10.0.0.0/8"], "exempt": ["192.168.0.0/16"]}},
            "routes[0].addresses.exempt[0]: 192.168.0.0/16 is not within addresses.allow",
        ),
        (
            {"path": "/a/", "access": "certificate"},
            "routes[0].allow: required with access: certificate",
        ),
        (
            {
                "path": "/a/",
                "access": "certificate",
                "allow": {"san_dns": ["x.example"]},
                "roles": ["r"],
            },
            "routes[0].roles: with access: certificate",
        ),
        (
            {"path": "/a/", "access": "public", "allow": {"san_dns": ["x.example"]}},
            "routes[0].allow: a public route",
        ),
        (
            {"path": "/a/", "access": "public", "addresses": {"exempt": ["10.0.0.0/8"]}},
            "routes[0].addresses.exempt: a public route",
        ),
        (
            {"path": "/a/", "access": "public", "identityplus": {"min_trust_score": 1}},
            "routes[0].identityplus: a public route",
        ),
        ({"path": "/a/", "access": "anyone"}, "routes[0].access:"),
        (
            {"path": "/a/", "identityplus": {}},
            "routes[0].identityplus: give min_trust_score and/or max_local_intrusions",
        ),
        (
            {"path": "/a/", "identityplus": {"min_trust_score": 5.5}},
            "routes[0].identityplus.min_trust_score:",
        ),
        (
            {"path": "/a/", "identityplus": {"min_trust_score": True}},
            "routes[0].identityplus.min_trust_score: a number, not true or false",
        ),
        (
            {"path": "/a/", "identityplus": {"max_local_intrusions": -1}},
            "routes[0].identityplus.max_local_intrusions:",
        ),
    ],
)
def test_each_bad_rule_is_named_with_its_path(
    config_dir: ConfigDir, route: dict[str, Any], expected: str
) -> None:
    problems = problems_of(config_dir, routes(config_dir, route, {"path": "/"}))
    assert any(p.startswith(expected) for p in problems), problems


def test_routes_that_can_never_apply_are_refused(config_dir: ConfigDir) -> None:
    data = routes(
        config_dir,
        {"path": "/a/", "methods": ["GET"]},
        {"path": "/a/", "methods": ["HEAD", "POST"]},  # HEAD came with GET
        {"path": "/a/"},  # the rest of the methods: fine
        {"path": "/a/"},  # never: the one before covers every method
        {"path": "/"},
    )
    problems = problems_of(config_dir, data)
    assert problems == [
        "routes[1].methods: HEAD already covered by routes[0], which has the same path: it "
        "could never apply to them",
        "routes[3].path: duplicate of routes[2]: /a/",
    ]


def test_rules_that_can_never_match_are_refused(config_dir: ConfigDir) -> None:
    foreign = make_ca("Some Other CA")
    foreign_file = write_pem(config_dir.path, "foreign-ca", foreign)
    data = routes(
        config_dir,
        {"path": "/b/", "allow": {"issuer": [foreign_file, spki_of(foreign)]}},  # not trusted
        {"path": "/c/", "identityplus": {"min_trust_score": 3}},  # static backend: no scores
        {"path": "/"},
    )
    problems = problems_of(config_dir, data)
    for k in (0, 1):
        assert any(
            p.startswith(f"routes[0].allow.issuer[{k}]: ")
            and "not one of the CAs the listener trusts" in p
            for p in problems
        ), problems
    assert any(
        p.startswith("routes[1].identityplus: only the identityplus backend") for p in problems
    ), problems


def test_same_path_with_disjoint_methods_loads(config_dir: ConfigDir) -> None:
    data = routes(
        config_dir,
        {"path": "/a/", "methods": ["GET"], "roles": ["reader"]},
        {"path": "/a/", "methods": ["POST", "DELETE"], "roles": ["writer"]},
        {"path": "/a/", "roles": ["administrator"]},
        {"path": "/"},
    )
    assert len(load(config_dir.write(data), env={}).routes) == 4


def test_trust_scores_are_decimals(config_dir: ConfigDir) -> None:
    data = routes(config_dir, {"path": "/a/", "identityplus": {"min_trust_score": 3.7}})
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {"certificate": "alice.pem", "key": "alice.key"},
    }
    config = load(config_dir.write(data), env={})
    trust = config.routes[0].identityplus
    assert trust is not None and trust.min_trust_score == Decimal("3.7")


def test_role_translation_keys(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "certificate": "alice.pem",
            "key": "alice.key",
            "roles": {"Administrator": "admin", "administrator": ["x"], "member": [], "": "y"},
            "remove_org_prefix": "sometimes",
        },
    }
    problems = problems_of(config_dir, data)
    assert any(
        p.startswith("identity.identityplus.roles.administrator: the same role as 'Administrator'")
        for p in problems
    ), problems
    assert any(
        p.startswith("identity.identityplus.roles.member: give the local role name")
        for p in problems
    ), problems
    assert any(
        p.startswith("identity.identityplus.roles: an Identity Plus role name is empty")
        for p in problems
    ), problems
    assert any(p.startswith("identity.identityplus.remove_org_prefix:") for p in problems), problems


# ---- servers ---------------------------------------------------------------------------------


def server(names: list[str], *, mode: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "names": names,
        "certificate": "server.pem",
        "key": "server.key",
        "routes": [{"path": "/"}],
    }
    if mode is not None:
        entry["client_certificate"] = mode
    entry.update(extra)
    return entry


def with_servers(config_dir: ConfigDir, *servers: dict[str, Any]) -> dict[str, Any]:
    data = config_dir.base()
    del data["routes"]
    del data["tls"]["certificate"], data["tls"]["key"]
    data["servers"] = list(servers)
    return data


def test_servers_load_and_the_first_stands_for_tls_certificate(config_dir: ConfigDir) -> None:
    data = with_servers(
        config_dir,
        server(["app.example", "*.app.example"]),
        server(["www.example"], mode="none", routes=[{"path": "/", "access": "public"}]),
    )
    config: Config = load(config_dir.write(data), env={})
    assert config.servers is not None and config.tls.certificate == config.servers[0].certificate


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d.update(routes=[{"path": "/"}]),
            "routes: with servers, each server lists its routes",
        ),
        (
            lambda d: d["listen"].update(server_names=["x.example"]),
            "listen.server_names: with servers",
        ),
        (
            lambda d: d["tls"].update(certificate="alice.pem", key="alice.key"),
            "tls.certificate: with servers",
        ),
        (lambda d: d.update(servers=[]), "servers: an empty list serves nothing"),
        (
            lambda d: d["servers"][0].update(names=[]),
            "servers[0].names: an empty list names nothing",
        ),
        (
            lambda d: d["servers"][0].update(names=["bad name"]),
            "servers[0].names[0]: not a host name",
        ),
        (
            lambda d: d["servers"][0].update(routes=[]),
            "servers[0].routes: an empty list allows nothing",
        ),
        (lambda d: d["servers"][0].update(key="alice.key"), "servers[0].key: the private key"),
        (
            lambda d: d["servers"][0].update(client_certificate="sometimes"),
            "servers[0].client_certificate:",
        ),
        (
            lambda d: d["servers"][1].update(names=["app.example"]),
            "servers[1].names[0]: app.example is served by servers[0] already",
        ),
        (
            lambda d: d["servers"][1].update(client_certificate="none"),
            "servers[1].routes[0].access: the server asks for no client certificate",
        ),
        (
            lambda d: d["servers"][1]["routes"].append({"path": "/"}),
            "servers[1].routes[1].path: duplicate of routes[0]: /",
        ),
        (
            lambda d: d["servers"][1].pop("certificate"),
            "servers[1].certificate: required key is missing",
        ),
    ],
)
def test_bad_servers_are_named_with_their_path(
    config_dir: ConfigDir, change: Any, expected: str
) -> None:
    data = with_servers(config_dir, server(["app.example"]), server(["api.example"]))
    change(data)
    problems = problems_of(config_dir, data)
    assert any(p.startswith(expected) for p in problems), problems


def test_none_needs_no_trust_anchors_but_the_others_do(config_dir: ConfigDir) -> None:
    data = with_servers(
        config_dir, server(["www.example"], mode="none", routes=[{"path": "/", "access": "public"}])
    )
    data["tls"] = {}  # every server says none: nothing asks, no trust anchor needed
    load(config_dir.write(data), env={})
    data["tls"] = {"client_certificate": "none"}
    data["servers"].append(server(["app.example"], mode="optional"))
    problems = problems_of(config_dir, data)
    assert any(
        p.startswith("servers[1].client_certificate: optional needs trust anchors")
        for p in problems
    ), problems


def test_check_config_prints_the_rules(config_dir: ConfigDir) -> None:
    data = routes(
        config_dir,
        {
            "path": "/svc/",
            "access": "certificate",
            "methods": ["POST"],
            "allow": {"san_uri": ["spiffe://prod.example/"]},
        },
        {"path": "/healthz", "addresses": {"exempt": ["10.0.0.0/8"]}},
        {"path": "/"},
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(config_dir.write(data))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "the certificate alone; methods POST; allow san_uri" in result.stdout
    assert "addresses exempt 10.0.0.0/8" in result.stdout


def test_the_example_configuration_shows_the_mixed_policy() -> None:
    text = (Path(__file__).resolve().parents[1] / "config" / "sidecar.example.yaml").read_text()
    for needle in ("spiffe://", "access: certificate", "exempt:", "methods:", "servers:"):
        assert needle in text, needle
