"""The identityplus backend against the fake API, over real mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from structlog.testing import capture_logs

from sidecar.certs import ClientCert
from sidecar.errors import IdentityUnavailable
from sidecar.identity import LookupContext, User
from sidecar.identity.identityplus import NO_CERTIFICATE_CODES, IdentityPlusBackend
from tests.fake_identityplus import FakeIdentityPlus, fake_identityplus, simple
from tests.pki import make_ca, make_leaf, new_key

__all__ = ["fake_identityplus"]  # the fixture, imported for pytest

CTX = LookupContext(client_ip="198.51.100.7")
_CA = make_ca("Visitors CA")


def visitor(cn: str = "bob", serial: int | None = None) -> ClientCert:
    return ClientCert.from_x509(make_leaf(_CA, cn, serial=serial).cert)


def visitor_without_cn() -> ClientCert:
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "No CN Ltd")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(_CA.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(_CA.key, hashes.SHA256())
    )
    return ClientCert.from_x509(cert)


@pytest.fixture
async def backend(fake_identityplus: FakeIdentityPlus) -> AsyncIterator[IdentityPlusBackend]:
    b = IdentityPlusBackend(fake_identityplus.config())
    yield b
    await b.close()


# ---- the outcome table ---------------------------------------------------------------------

ROWS = [
    ("OK 0001", "allow", "identified"),
    ("OK 0002", "allow", "identified"),
    ("PB 0000", "unknown", "does not know this certificate"),
    ("PB 0001", "unknown", "does not know this certificate"),
    ("PB 0002", "validate", "expired"),
    ("PB 0003", "validate", "validated"),
    ("PB 0004", "deny", "revoked"),
    ("PB 0005", "deny", "intruder"),
    ("PB 0006", "deny", "not recognised"),
    ("PB 0007", "deny", "tampered"),
    ("PB 0008", "deny", "authorization has expired"),
]


@pytest.mark.parametrize("envelope", ["Identity-Profile", "Simple-Response"])
@pytest.mark.parametrize(("outcome", "kind", "reason"), ROWS)
async def test_every_outcome_in_either_envelope(
    fake_identityplus: FakeIdentityPlus,
    backend: IdentityPlusBackend,
    envelope: str,
    outcome: str,
    kind: str,
    reason: str,
) -> None:
    cert = visitor()
    if envelope == "Identity-Profile":
        fake_identityplus.set_profile(cert.serial, outcome)
    else:
        fake_identityplus.set_simple(cert.serial, outcome)
    verdict = await backend.lookup(cert, CTX)
    assert verdict.kind == kind
    assert verdict.code == outcome
    assert reason in verdict.reason
    assert (verdict.user is not None) == (kind == "allow")
    assert (verdict.code in NO_CERTIFICATE_CODES) == (outcome in ("PB 0000", "PB 0001"))
    assert fake_identityplus.calls[cert.serial] == 1


async def test_classifies_on_the_first_seven_characters_only(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor()
    fake_identityplus.set_reply(
        cert.serial, {"Simple-Response": {"outcome": "PB 0004 Certificate valid (really!)"}}
    )
    assert (await backend.lookup(cert, CTX)).kind == "deny"


async def test_an_unknown_problem_code_is_refused_and_an_unknown_ok_fails_closed(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    problem, ok = visitor(), visitor()
    fake_identityplus.set_simple(problem.serial, "PB 0042")
    fake_identityplus.set_simple(ok.serial, "OK 0042")
    assert (await backend.lookup(problem, CTX)).kind == "deny"
    with pytest.raises(IdentityUnavailable):
        await backend.lookup(ok, CTX)


async def test_a_request_error_is_unavailable_and_logged(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor()
    fake_identityplus.set_simple(cert.serial, "ER 0001")
    with capture_logs() as logs, pytest.raises(IdentityUnavailable) as caught:
        await backend.lookup(cert, CTX)
    assert caught.value.code == "ER 0001"
    assert backend.credential_problem is None
    assert [e["event"] for e in logs] == ["identityplus.request_refused"]
    assert logs[0]["log_level"] == "error"


async def test_a_refused_api_certificate_sets_credential_problem_until_the_next_ok(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor()
    fake_identityplus.set_profile(cert.serial, "OK 0001")
    fake_identityplus.refuse_agent(outcome="ER 1103")
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(IdentityUnavailable) as caught:
                await backend.lookup(cert, CTX)
            assert caught.value.code == "ER 1103"
    assert backend.credential_problem is not None
    assert backend.credential_problem.startswith("ER 1103")
    # loud, but once a minute, not once a request
    problems = [e for e in logs if e["event"] == "identityplus.credential_problem"]
    assert len(problems) == 1
    assert problems[0]["log_level"] == "error"
    assert problems[0]["code"] == "ER 1103"
    assert "certificate" in problems[0]["hint"]
    assert problems[0]["agent_sha256"] == fake_identityplus.agent.sha256
    fake_identityplus.refuse_agent(outcome=None)
    assert (await backend.lookup(cert, CTX)).kind == "allow"
    assert backend.credential_problem is None


# ---- the inquiry -----------------------------------------------------------------------------


@pytest.mark.parametrize(("serial_format", "spelling"), [("decimal", "{:d}"), ("hex", "0x{:X}")])
async def test_both_serial_spellings_reach_the_same_certificate(
    fake_identityplus: FakeIdentityPlus, serial_format: str, spelling: str
) -> None:
    cert = visitor(serial=0xAB_CDEF_0123_4567_89AB)
    fake_identityplus.set_profile(cert.serial, "OK 0001", local_user_name="bob")
    backend = IdentityPlusBackend(fake_identityplus.config(serial_format=serial_format))
    try:
        assert (await backend.lookup(cert, CTX)).kind == "allow"
    finally:
        await backend.close()
    call = fake_identityplus.requests[-1]
    assert call.method == "GET"
    assert call.serial_text == spelling.format(cert.serial)
    assert call.body == {"Identity-Inquiry": {"serial-number": spelling.format(cert.serial)}}


async def test_service_and_ip_address_are_sent_when_configured(
    fake_identityplus: FakeIdentityPlus,
) -> None:
    cert = visitor()
    backend = IdentityPlusBackend(
        fake_identityplus.config(service="app.example.com", send_ip_address=True)
    )
    try:
        await backend.lookup(cert, CTX)
        await backend.lookup(cert, LookupContext())
    finally:
        await backend.close()
    with_ip, without_ip = (r.body["Identity-Inquiry"] for r in fake_identityplus.requests)
    assert with_ip == {
        "serial-number": str(cert.serial),
        "service": "app.example.com",
        "ip-address": "198.51.100.7",
    }
    assert "ip-address" not in without_ip


async def test_the_visitor_address_is_not_sent_by_default(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    await backend.lookup(visitor(), CTX)
    assert fake_identityplus.requests[-1].body == {
        "Identity-Inquiry": {"serial-number": str(fake_identityplus.requests[-1].serial)}
    }


async def test_extra_profile_keys_and_a_fractional_trust_score_are_accepted(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor()
    fake_identityplus.set_profile(
        cert.serial,
        "OK 0001",
        organizational_reference="emp-7",
        trust_score=3.75,
        local_trust=0.5,
        local_intrusions=0,
        sites_frequented=12,
        trust_sponsors=["a.example", "b.example"],
        authorizing_certificate={"serial": "0x01"},
        extra={"x-org-department": {"name": "R&D"}, "unheard-of": None},
    )
    verdict = await backend.lookup(cert, CTX)
    assert verdict.user == User(sub="emp-7", username="emp-7")


# ---- the user --------------------------------------------------------------------------------


async def test_a_full_profile_maps_to_the_user(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor()
    fake_identityplus.set_profile(
        cert.serial,
        "OK 0002",
        organizational_reference="emp-42",
        local_user_name="alice",
        local_user_id="1001",
        organizational_name="Alice Pleasance Liddell",
        organizational_email="alice@example.com",
        service_roles=["administrator", "org. administrator"],
    )
    verdict = await backend.lookup(cert, CTX)
    assert verdict.user == User(
        sub="emp-42",
        username="alice",
        given_name="Alice",
        family_name="Pleasance Liddell",
        email="alice@example.com",
        roles=("administrator", "org. administrator"),
    )


@pytest.mark.parametrize(
    ("fields", "sub", "username"),
    [
        ({"local-user-name": "alice"}, "alice", "alice"),
        ({"organizational-reference": "emp-42"}, "emp-42", "emp-42"),
        ({}, "{serial}", "bob"),
        ({"organizational-reference": "  ", "local-user-name": ""}, "{serial}", "bob"),
    ],
)
async def test_user_fallbacks(
    fake_identityplus: FakeIdentityPlus,
    backend: IdentityPlusBackend,
    fields: dict[str, str],
    sub: str,
    username: str,
) -> None:
    cert = visitor("bob")
    fake_identityplus.set_profile(cert.serial, "OK 0001", extra=fields)
    user = (await backend.lookup(cert, CTX)).user
    assert user is not None
    assert user.sub == sub.format(serial=cert.serial)
    assert user.username == username
    assert user.roles == ()


async def test_a_certificate_without_cn_falls_back_to_the_serial(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor_without_cn()
    assert cert.common_name is None
    fake_identityplus.set_simple(cert.serial, "OK 0001")
    user = (await backend.lookup(cert, CTX)).user
    assert user == User(sub=str(cert.serial), username=str(cert.serial))


async def test_a_one_word_name_is_a_given_name(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    cert = visitor()
    fake_identityplus.set_profile(cert.serial, organizational_name="Plato", service_roles="member")
    user = (await backend.lookup(cert, CTX)).user
    assert user is not None
    assert (user.given_name, user.family_name, user.roles) == ("Plato", None, ("member",))


# ---- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("slow", "timeout"),
        ("500", "http-status"),
        ("invalid-json", "malformed"),
        ("reset", "reset"),
        ("unknown-envelope", "malformed"),
        ("no-outcome", "malformed"),
    ],
)
async def test_each_fault_is_unavailable_within_the_timeout(
    fake_identityplus: FakeIdentityPlus, fault: str, code: str
) -> None:
    cert = visitor()
    fake_identityplus.set_profile(cert.serial, "OK 0001")
    fake_identityplus.set_fault(cert.serial, fault)  # type: ignore[arg-type]
    backend = IdentityPlusBackend(fake_identityplus.config(timeout=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(IdentityUnavailable) as caught:
            await backend.lookup(cert, CTX)
        assert time.monotonic() - started < 3  # bounded by the timeout, not the fault
        assert caught.value.code == code
        # and the backend is fine afterwards
        fake_identityplus.set_fault(cert.serial, None)
        assert (await backend.lookup(cert, CTX)).kind == "allow"
    finally:
        await backend.close()


async def test_a_service_that_is_not_listening_is_unavailable(
    fake_identityplus: FakeIdentityPlus,
) -> None:
    port = fake_identityplus.port
    await fake_identityplus.close()
    backend = IdentityPlusBackend(fake_identityplus.config(endpoint=f"https://127.0.0.1:{port}/v1"))
    try:
        with pytest.raises(IdentityUnavailable) as caught:
            await backend.lookup(visitor(), CTX)
        assert caught.value.code == "connect"
    finally:
        await backend.close()


async def test_the_fake_refuses_a_caller_without_the_agent_certificate(
    fake_identityplus: FakeIdentityPlus, tmp_path: Path
) -> None:
    context = ssl.create_default_context(cafile=str(fake_identityplus.ca_file))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(
                fake_identityplus.url,
                ssl=context,
                json={"Identity-Inquiry": {"serial-number": "1"}},
            ) as response:
                await response.read()
    # and a caller with a certificate from another CA
    stranger = make_leaf(make_ca("Not Identity Plus"), "stranger")
    cert_path, key_path = stranger.write(tmp_path, "stranger")
    backend = IdentityPlusBackend(
        fake_identityplus.config(certificate=str(cert_path), key=str(key_path))
    )
    try:
        with pytest.raises(IdentityUnavailable):
            await backend.lookup(visitor(), CTX)
    finally:
        await backend.close()
    assert fake_identityplus.requests == []


# ---- intents ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("purpose", "intent_type"), [("validate", "validate"), ("enrol", "request")]
)
async def test_sign_on_registers_an_intent(
    fake_identityplus: FakeIdentityPlus,
    backend: IdentityPlusBackend,
    purpose: str,
    intent_type: str,
) -> None:
    url = await backend.sign_on(purpose, "https://app.example/admin/?q=1")  # type: ignore[arg-type]
    assert url == "https://signon.example/intent-1"
    (intent,) = fake_identityplus.intents
    assert intent.type == intent_type
    assert intent.return_url == "https://app.example/admin/?q=1"
    assert intent.strict_massl is True
    assert fake_identityplus.requests[-1].method == "PUT"


async def test_an_intent_reference_is_quoted_into_the_url(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    fake_identityplus.set_intent_reply(
        {"Intent-Reference": {"value": "a/b?c", "outcome": "OK 0000 fine"}}
    )
    assert await backend.sign_on("validate", "https://x/") == "https://signon.example/a%2Fb%3Fc"


@pytest.mark.parametrize(
    "reply",
    [
        simple("ER 0001"),
        simple("OK 0000"),
        {"Intent-Reference": {"outcome": "OK 0000"}},
        {"Intent-Reference": {"value": "", "outcome": "OK 0000"}},
        {"Intent-Reference": {"value": "r1", "outcome": "ER 0001 no"}},
        {"Intent-Reference": "r1"},
        ["r1"],
    ],
)
async def test_a_refused_or_malformed_intent_is_unavailable(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend, reply: object
) -> None:
    fake_identityplus.set_intent_reply(reply)  # type: ignore[arg-type]
    with pytest.raises(IdentityUnavailable):
        await backend.sign_on("validate", "https://x/")


async def test_an_intent_refused_for_our_credentials_sets_credential_problem(
    fake_identityplus: FakeIdentityPlus, backend: IdentityPlusBackend
) -> None:
    fake_identityplus.refuse_agent(outcome="ER 1102")
    with pytest.raises(IdentityUnavailable) as caught:
        await backend.sign_on("enrol", "https://x/")
    assert caught.value.code == "ER 1102"
    assert backend.credential_problem is not None
    fake_identityplus.refuse_agent(outcome=None)
    await backend.sign_on("enrol", "https://x/")
    assert backend.credential_problem is None


# ---- server pins -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["certificate", "public key"])
async def test_a_pinned_server_is_accepted(fake_identityplus: FakeIdentityPlus, which: str) -> None:
    pin = (
        fake_identityplus.server_cert_sha256
        if which == "certificate"
        else fake_identityplus.server_spki_sha256
    )
    other = "ab" * 32
    backend = IdentityPlusBackend(fake_identityplus.config(server_pins=[other, pin.upper()]))
    try:
        assert (await backend.lookup(visitor(), CTX)).kind == "unknown"
    finally:
        await backend.close()


async def test_a_trusted_server_matching_no_pin_is_refused(
    fake_identityplus: FakeIdentityPlus,
) -> None:
    backend = IdentityPlusBackend(fake_identityplus.config(server_pins=["ab" * 32]))
    try:
        with pytest.raises(IdentityUnavailable, match="server_pins") as caught:
            await backend.lookup(visitor(), CTX)
        assert caught.value.code == "tls"
        with pytest.raises(IdentityUnavailable, match="server_pins"):
            await backend.sign_on("validate", "https://x/")
    finally:
        await backend.close()
    assert fake_identityplus.requests == []


# ---- agent credentials -----------------------------------------------------------------------


class Secret:
    """A Kubernetes-style secret volume: files are symlinks into ``..data``, swapped at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.version = 0
        folder.mkdir()
        self.certificate = folder / "tls.crt"
        self.key = folder / "tls.key"

    def publish(self, certificate: Path, key: Path) -> None:
        self.version += 1
        data = self.folder / f"..v{self.version}"
        data.mkdir()
        shutil.copy(certificate, data / "tls.crt")
        shutil.copy(key, data / "tls.key")
        link = self.folder / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, self.folder / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.folder / name).is_symlink():
                (self.folder / name).symlink_to(f"..data/{name}")


async def test_a_renewed_agent_certificate_is_used_without_failing_a_call(
    fake_identityplus: FakeIdentityPlus, tmp_path: Path
) -> None:
    fake = fake_identityplus
    secret = Secret(tmp_path / "secret")
    secret.publish(fake.agent.certificate, fake.agent.key)
    backend = IdentityPlusBackend(
        fake.config(certificate=str(secret.certificate), key=str(secret.key)), reload_interval=0
    )
    cert = visitor()
    fake.set_profile(cert.serial, "OK 0001")
    try:
        assert (await backend.lookup(cert, CTX)).kind == "allow"
        fake.latency = 0.2
        before = [asyncio.create_task(backend.lookup(cert, CTX)) for _ in range(5)]
        while len(fake.requests) < 6:  # all five are being answered on the old session
            await asyncio.sleep(0.01)
        renewed = fake.issue_agent("renewed")
        with capture_logs() as logs:
            secret.publish(renewed.certificate, renewed.key)
            after = [asyncio.create_task(backend.lookup(cert, CTX)) for _ in range(5)]
            verdicts = await asyncio.gather(*before, *after)
        assert all(v.kind == "allow" for v in verdicts)
        assert fake.agents_seen() == [fake.agent.sha256] * 6 + [renewed.sha256] * 5
        assert backend.agent_sha256 == renewed.sha256
        assert [e["event"] for e in logs] == ["identityplus.agent_reloaded"]
        await asyncio.sleep(0)
        assert not backend._retired  # the old session was closed once its calls were done
    finally:
        await backend.close()


async def test_a_broken_renewal_keeps_the_old_certificate(
    fake_identityplus: FakeIdentityPlus, tmp_path: Path
) -> None:
    fake = fake_identityplus
    secret = Secret(tmp_path / "secret")
    secret.publish(fake.agent.certificate, fake.agent.key)
    backend = IdentityPlusBackend(
        fake.config(certificate=str(secret.certificate), key=str(secret.key)), reload_interval=0
    )
    cert = visitor()
    try:
        await backend.lookup(cert, CTX)
        first, second = fake.issue_agent("first"), fake.issue_agent("second")
        with capture_logs() as logs:
            secret.publish(first.certificate, second.key)  # a key that does not match
            assert (await backend.lookup(cert, CTX)).kind == "unknown"
            await backend.lookup(cert, CTX)  # logged once, not on every call
        assert [e["event"] for e in logs] == ["identityplus.agent_reload_failed"]
        assert logs[0]["log_level"] == "error"
        assert "BEGIN" not in str(logs)  # never the certificate or the key
        assert fake.agents_seen()[-1] == fake.agent.sha256
        secret.publish(second.certificate, second.key)
        await backend.lookup(cert, CTX)
        assert fake.agents_seen()[-1] == second.sha256
    finally:
        await backend.close()


async def test_a_reload_is_checked_at_most_every_interval(
    fake_identityplus: FakeIdentityPlus, tmp_path: Path
) -> None:
    fake = fake_identityplus
    now = [0.0]
    secret = Secret(tmp_path / "secret")
    secret.publish(fake.agent.certificate, fake.agent.key)
    backend = IdentityPlusBackend(
        fake.config(certificate=str(secret.certificate), key=str(secret.key)),
        reload_interval=5,
        clock=lambda: now[0],
    )
    try:
        renewed = fake.issue_agent("renewed")
        secret.publish(renewed.certificate, renewed.key)
        now[0] = 4.9
        await backend.lookup(visitor(), CTX)
        now[0] = 5.0
        await backend.lookup(visitor(), CTX)
        assert fake.agents_seen() == [fake.agent.sha256, renewed.sha256]
    finally:
        await backend.close()


async def test_a_pkcs12_agent_certificate(
    fake_identityplus: FakeIdentityPlus, tmp_path: Path
) -> None:
    fake = fake_identityplus
    p12 = tmp_path / "agent.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"agent",
            fake.agent.issued.key,
            fake.agent.issued.cert,
            None,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    config = fake.config(certificate=None, key=None, p12=str(p12), p12_password_file=str(password))
    backend = IdentityPlusBackend(config)
    try:
        await backend.lookup(visitor(), CTX)
    finally:
        await backend.close()
    assert fake.agents_seen() == [fake.agent.sha256]
    password.write_text("wrong\n")
    with pytest.raises(ValidationError, match="p12"):
        fake.config(certificate=None, key=None, p12=str(p12), p12_password_file=str(password))


def test_the_configuration_needs_exactly_one_kind_of_credentials(tmp_path: Path) -> None:
    fake = FakeIdentityPlus(tmp_path)
    with pytest.raises(ValidationError, match="certificate"):
        fake.config(certificate=None, key=None)
    with pytest.raises(ValidationError, match="key"):
        fake.config(key=None)
    with pytest.raises(ValidationError, match="does not match"):
        fake.config(key=str(fake.issue_agent().key))
    with pytest.raises(ValidationError, match="not both"):
        fake.config(p12=str(fake.agent_certificate))


async def test_enrolment_follows_the_configuration(fake_identityplus: FakeIdentityPlus) -> None:
    for enrol in (False, True):
        backend = IdentityPlusBackend(fake_identityplus.config(enrol_missing=enrol))
        assert backend.can_enrol is enrol
        assert backend.name == "identityplus"
        await backend.close()


async def test_a_closed_backend_makes_no_new_session(fake_identityplus: FakeIdentityPlus) -> None:
    backend = IdentityPlusBackend(fake_identityplus.config())
    await backend.lookup(visitor(), CTX)
    await backend.close()
    with pytest.raises(IdentityUnavailable, match="closed"):
        await backend.lookup(visitor(), CTX)
    await backend.close()  # twice is fine


async def test_der_agent_certificate_key_and_ca_files_work(
    fake_identityplus: FakeIdentityPlus, tmp_path: Path
) -> None:
    """Every certificate file may be PEM or DER (contract §2), the agent's and the API CA's too."""
    cert = x509.load_pem_x509_certificate(fake_identityplus.agent_certificate.read_bytes())
    key = serialization.load_pem_private_key(fake_identityplus.agent_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificates(fake_identityplus.ca_file.read_bytes())[0]
    (tmp_path / "agent.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (tmp_path / "agent.key.der").write_bytes(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    backend = IdentityPlusBackend(
        fake_identityplus.config(
            certificate=str(tmp_path / "agent.der"),
            key=str(tmp_path / "agent.key.der"),
            ca=str(tmp_path / "ca.der"),
        )
    )
    try:
        probe = visitor()
        fake_identityplus.set_profile(probe.serial, "OK 0001")
        assert (await backend.lookup(probe, CTX)).kind == "allow"
        assert fake_identityplus.requests[-1].agent_sha256 == backend.agent_sha256
    finally:
        await backend.close()
