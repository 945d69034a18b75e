"""Only certificates issued by Identity Plus are asked about (issue #12, item 6).

Identity Plus identifies a certificate by its serial number alone. When the listener also
trusts another issuer (a second ``client_ca``, a pinned certificate), the holder of a
certificate from that issuer carrying an Identity Plus user's serial would be given that
user's profile and roles. ``identity.identityplus.issuers`` names the Identity Plus client CA:
a certificate not signed by one of those certificates is refused (403) without an API call.
Without the key, ``check-config`` and start-up warn when more than one issuer is trusted.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar import config as config_mod
from sidecar.certs import ClientCert
from sidecar.config import IdentityPlusConfig
from sidecar.errors import ConfigError
from sidecar.identity import LookupContext
from sidecar.identity.identityplus import IdentityPlusBackend
from sidecar.identity.issuers import Issuers, issuer_risk, trusted_issuers

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .pki import Issued, make_ca, make_leaf

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

VICTIM_SERIAL = 0x1D_E17A_0000_0001


@dataclass
class IdentityPlusPKI:
    """Identity Plus's client CA (a root and the intermediate that signs client
    certificates), the victim's certificate from it, and an impostor CA of the same name."""

    root: Issued
    intermediate: Issued
    impostor: Issued

    def client(self, cn: str, **kwargs: Any) -> Issued:
        return make_leaf(self.intermediate, cn, **kwargs)


@pytest.fixture(scope="module")
def ip_pki() -> IdentityPlusPKI:
    root = make_ca("Identity Plus Root CA")
    intermediate = make_ca("Identity Plus Client CA", issuer=root)
    impostor = make_ca("Identity Plus Client CA")  # the same name, another key
    return IdentityPlusPKI(root, intermediate, impostor)


@dataclass
class Setup:
    running: Running
    fake: FakeIdentityPlus
    upstream: Upstream
    config_dir: ConfigDir
    ip: IdentityPlusPKI

    async def get(self, path: str, who: Issued) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.running.url + path, ssl=self.running.client_ssl(who)) as response,
        ):
            body = await response.read()
            return response.status, json.loads(body) if body.startswith(b"{") else {}


def write_files(config_dir: ConfigDir, ip: IdentityPlusPKI) -> None:
    folder = config_dir.path
    (folder / "identityplus-ca.pem").write_bytes(ip.root.pem + ip.intermediate.pem)
    (folder / "identityplus-root.pem").write_bytes(ip.root.pem)
    (folder / "identityplus-intermediate.pem").write_bytes(ip.intermediate.pem)
    (folder / "impostor-ca.pem").write_bytes(ip.impostor.pem)


def identityplus_section(fake: FakeIdentityPlus, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint": fake.url,
        "certificate": str(fake.agent_certificate),
        "key": str(fake.agent_key),
        "ca": str(fake.ca_file),
        "signon_url": "https://signon.example",
        "timeout": "2s",
        **extra,
    }


@pytest.fixture
def start(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    ip_pki: IdentityPlusPKI,
) -> Any:
    """Starts a sidecar that trusts the test PKI's client CA, Identity Plus's client CA and
    an impostor CA, with the identityplus backend aimed at the fake."""
    write_files(config_dir, ip_pki)

    async def run(**identityplus: Any) -> Setup:
        data = config_dir.base(upstream.port)
        data["tls"]["client_ca"] = ["client-ca.pem", "identityplus-ca.pem", "impostor-ca.pem"]
        data["identity"] = {
            "backend": "identityplus",
            "identityplus": identityplus_section(fake_identityplus, **identityplus),
        }
        running = await start_sidecar(data)
        return Setup(running, fake_identityplus, upstream, config_dir, ip_pki)

    return run


def program_victim(setup: Setup) -> Issued:
    victim = setup.ip.client("Victor Victim", serial=VICTIM_SERIAL)
    setup.fake.set_profile(
        VICTIM_SERIAL, "OK 0001", organizational_reference="victim", service_roles=["administrator"]
    )
    return victim


def forwarded_sub(upstream: Upstream) -> str:
    [value] = upstream.last.header("X-USERINFO")
    return str(json.loads(base64.b64decode(value))["sub"])


# ---- through the sidecar ----------------------------------------------------------------------


async def test_a_foreign_certificate_with_the_victims_serial_is_403_without_an_inquiry(
    start: Any,
) -> None:
    setup: Setup = await start(issuers=["identityplus-ca.pem"])
    victim = program_victim(setup)
    attacker = setup.config_dir.certs.pki.client("Mallory Forger", serial=VICTIM_SERIAL)
    impostor = make_leaf(setup.ip.impostor, "Mallory Impostor", serial=VICTIM_SERIAL)

    status, _ = await setup.get("/admin/reports", victim)
    assert status == 200
    assert forwarded_sub(setup.upstream) == "victim"
    forwarded = len(setup.upstream.seen)

    for who in (attacker, impostor):
        status, problem = await setup.get("/admin/reports", who)
        assert status == 403, problem
        assert "Identity Plus" in problem["detail"]
    assert len(setup.upstream.seen) == forwarded
    # one inquiry, the victim's: the fake never heard of the others
    assert setup.fake.calls[VICTIM_SERIAL] == 1
    assert len(setup.fake.requests) == 1


async def test_issuers_may_list_only_the_intermediate(start: Any) -> None:
    setup: Setup = await start(issuers=["identityplus-intermediate.pem"])
    victim = program_victim(setup)
    assert (await setup.get("/admin/reports", victim))[0] == 200


async def test_a_root_alone_does_not_vouch_for_what_its_intermediates_sign(start: Any) -> None:
    # Python cannot show the chain the client sent: the certificate that signed the client's
    # own must itself be listed (README). Fail closed: 403, and no inquiry.
    setup: Setup = await start(issuers=["identityplus-root.pem"])
    victim = program_victim(setup)
    status, problem = await setup.get("/admin/reports", victim)
    assert status == 403, problem
    assert setup.fake.requests == []


async def test_without_issuers_the_risk_is_named_at_start(start: Any) -> None:
    with capture_logs() as logs:
        setup: Setup = await start()
    [warning] = [e for e in logs if e["event"] == "identityplus_issuers_missing"]
    assert warning["log_level"] == "warning"
    assert "identity.identityplus.issuers" in warning["risk"]
    assert "serial" in warning["risk"]
    # ... and it is real: without the key, a foreign certificate with the victim's serial is
    # identified as the victim. This is what the warning is about.
    program_victim(setup)
    attacker = setup.config_dir.certs.pki.client("Mallory Forger", serial=VICTIM_SERIAL)
    assert (await setup.get("/admin/reports", attacker))[0] == 200
    assert forwarded_sub(setup.upstream) == "victim"


async def test_a_reload_warns_when_another_issuer_is_added(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    ip_pki: IdentityPlusPKI,
) -> None:
    write_files(config_dir, ip_pki)
    data = config_dir.base(upstream.port)
    data["tls"]["client_ca"] = ["identityplus-ca.pem"]
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus_section(fake_identityplus),
    }
    with capture_logs() as logs:
        running = await start_sidecar(data)
    assert [e for e in logs if e["event"] == "identityplus_issuers_missing"] == []
    data["tls"]["client_ca"] = ["identityplus-ca.pem", "client-ca.pem"]
    config_dir.write(data)
    with capture_logs() as logs:
        assert await running.sidecar.reload("test")
    assert [e["event"] for e in logs if e["event"] == "identityplus_issuers_missing"] == [
        "identityplus_issuers_missing"
    ]


# ---- check-config -----------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("client_ca", "pinned", "issuers", "warned"),
    [
        (["client-ca.pem", "identityplus-ca.pem"], [], None, True),
        (["identityplus-ca.pem"], ["alice.pem"], None, True),
        (["client-ca.pem", "identityplus-ca.pem"], [], ["identityplus-ca.pem"], False),
        # one hierarchy (a root and its intermediate) is one issuer
        (["identityplus-ca.pem"], [], None, False),
        (["identityplus-root.pem", "identityplus-intermediate.pem"], [], None, False),
    ],
)
def test_check_config_warns_when_more_than_one_issuer_is_trusted(
    config_dir: ConfigDir,
    fake_identityplus: FakeIdentityPlus,
    ip_pki: IdentityPlusPKI,
    client_ca: list[str],
    pinned: list[str],
    issuers: list[str] | None,
    warned: bool,
) -> None:
    write_files(config_dir, ip_pki)
    data = config_dir.base()
    data["tls"]["client_ca"] = client_ca
    data["tls"]["pinned_certificates"] = pinned
    extra = {"issuers": issuers} if issuers is not None else {}
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus_section(fake_identityplus, **extra),
    }
    result = check_config(config_dir.write(data))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    if warned:
        assert "warning: identity.identityplus.issuers is not set" in result.stderr
        assert "2 certificate issuers" in result.stderr
        assert "serial" in result.stderr
    else:
        assert "warning" not in result.stderr


def test_check_config_names_the_issuers(
    config_dir: ConfigDir, fake_identityplus: FakeIdentityPlus, ip_pki: IdentityPlusPKI
) -> None:
    write_files(config_dir, ip_pki)
    data = config_dir.base()
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus_section(fake_identityplus, issuers="identityplus-ca.pem"),
    }
    result = check_config(config_dir.write(data))
    assert result.returncode == 0, result.stderr
    assert "issuers     CN=Identity Plus Root CA, CN=Identity Plus Client CA" in result.stdout


# ---- configuration ----------------------------------------------------------------------------


def test_issuers_must_be_ca_certificates(
    config_dir: ConfigDir, fake_identityplus: FakeIdentityPlus, ip_pki: IdentityPlusPKI
) -> None:
    write_files(config_dir, ip_pki)
    data = config_dir.base()
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": identityplus_section(
            fake_identityplus, issuers=["alice.pem", "missing.pem", "identityplus-ca.pem"]
        ),
    }
    with pytest.raises(ConfigError) as caught:
        config_mod.load(config_dir.write(data))
    problems = caught.value.problems
    assert any(
        p.startswith("identity.identityplus.issuers[0]:") and "not a CA certificate" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("identity.identityplus.issuers[1]: file not found") for p in problems
    ), problems
    assert len(problems) == 2, problems


def test_issuer_content_is_part_of_the_configuration(
    config_dir: ConfigDir, fake_identityplus: FakeIdentityPlus, ip_pki: IdentityPlusPKI
) -> None:
    # A reload keeps the running backend when its configuration is equal: a rewritten issuers
    # file (same path) must make it unequal, so that the new issuers are used.
    write_files(config_dir, ip_pki)
    section = identityplus_section(fake_identityplus, issuers=["issuers.pem"])
    (config_dir.path / "issuers.pem").write_bytes(ip_pki.root.pem)
    first = IdentityPlusConfig.model_validate(section, context={"base_dir": config_dir.path})
    (config_dir.path / "issuers.pem").write_bytes(ip_pki.intermediate.pem)
    second = IdentityPlusConfig.model_validate(section, context={"base_dir": config_dir.path})
    assert first != second
    assert [c.subject.rfc4514_string() for c in second.issuer_certificates()] == [
        "CN=Identity Plus Client CA"
    ]


# ---- the check itself -------------------------------------------------------------------------


async def test_the_backend_asks_nothing_about_a_foreign_certificate(
    fake_identityplus: FakeIdentityPlus, ip_pki: IdentityPlusPKI, tmp_path: Path
) -> None:
    (tmp_path / "ip.pem").write_bytes(ip_pki.intermediate.pem)
    config = fake_identityplus.config(issuers=[str(tmp_path / "ip.pem")])
    backend = IdentityPlusBackend(config)
    foreign = ClientCert.from_x509(make_leaf(make_ca("Elsewhere"), "x", serial=VICTIM_SERIAL).cert)
    try:
        verdict = await backend.lookup(foreign, LookupContext())
        assert (verdict.kind, verdict.code) == ("deny", "foreign_issuer")
        fake_identityplus.set_profile(VICTIM_SERIAL, "OK 0001")
        own = ClientCert.from_x509(ip_pki.client("y", serial=VICTIM_SERIAL).cert)
        assert (await backend.lookup(own, LookupContext())).kind == "allow"
    finally:
        await backend.close()
    assert fake_identityplus.calls[VICTIM_SERIAL] == 1


_CAS = [make_ca(f"CA {i}") for i in range(3)]
_SUBS = [make_ca(f"Sub {i}", issuer=_CAS[i]) for i in range(3)]
_ALL = [*_CAS, *_SUBS]


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    listed=st.sets(st.integers(0, len(_ALL) - 1)),
    signer=st.integers(0, len(_ALL) - 1),
    serial=st.integers(1, (1 << 159) - 1),
    same_name_as=st.none() | st.integers(0, len(_ALL) - 1),
)
def test_a_certificate_passes_exactly_when_a_listed_certificate_signed_it(
    listed: set[int], signer: int, serial: int, same_name_as: int | None
) -> None:
    issuers = Issuers([_ALL[i].cert for i in sorted(listed)])
    if same_name_as is None:
        leaf = make_leaf(_ALL[signer], "leaf", serial=serial)
    else:
        # a leaf that claims a listed issuer's name, signed by another key
        forger = make_ca(_ALL[same_name_as].cert.subject.rfc4514_string()[3:])
        leaf = make_leaf(forger, "leaf", serial=serial)
        signer = -1
    cert = ClientCert.from_x509(leaf.cert)
    assert issuers.issued(cert) is (signer in listed)
    assert issuers.issued(cert) is (signer in listed)  # and the remembered answer is the same


def test_trusted_issuers_counts_hierarchies() -> None:
    root_a, root_b = make_ca("A"), make_ca("B")
    sub_a = make_ca("A sub", issuer=root_a)
    pinned = make_leaf(None, "self-signed client")
    leaf_of_a = make_leaf(sub_a, "client of A")

    def count(*issued: Issued) -> int:
        certs: list[x509.Certificate] = [i.cert for i in issued]
        return len(trusted_issuers(certs))

    assert count(root_a) == 1
    assert count(root_a, sub_a) == 1
    assert count(sub_a) == 1  # an intermediate alone (partial chain) is one issuer
    assert count(root_a, sub_a, root_b) == 2
    assert count(root_a, pinned) == 2
    assert count(root_a, sub_a, leaf_of_a) == 1  # a pinned certificate of a trusted CA


def test_issuer_risk_text(config_dir: ConfigDir, ip_pki: IdentityPlusPKI) -> None:
    write_files(config_dir, ip_pki)
    data = config_dir.base()
    data["tls"]["client_ca"] = ["client-ca.pem", "identityplus-ca.pem"]
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "certificate": "alice.pem",
            "key": "alice.key",
        },
    }
    config = config_mod.load(config_dir.write(data))
    risk = issuer_risk(config.tls, config.identity)
    assert risk is not None
    assert risk.startswith("identity.identityplus.issuers is not set")
    data["identity"]["backend"] = "static"
    config = config_mod.load(config_dir.write(data))
    assert issuer_risk(config.tls, config.identity) is None
