"""Revocation's parts on their own: CRL and OCSP parsing and verification, the deny-list's
names, the remembered answers of ``Revocation.check`` under a fake clock, and the fetched
CRLs' bounds. Property tests (hypothesis) where inputs are open-ended: mutated CRLs and OCSP
responses are refused or read exactly as the original, issuer names match in every spelling,
and a remembered answer is never served across a change or past the moment it could change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sidecar.certs import ClientCert
from sidecar.config import CRLFetchConfig, TLSConfig
from sidecar.revocation import crl as crls
from sidecar.revocation.chain import Anchors, crl_urls
from sidecar.revocation.client import HttpTransport
from sidecar.revocation.deny import issuer_key
from sidecar.revocation.fetch import CRLFetcher, FetchError
from sidecar.revocation.gate import PENDING, Revocation, prepare
from sidecar.revocation.ocsp import OCSPError, read_answer

from .pki import Issued, make_ca, make_leaf
from .revocation_parts import DistributionPoint, client_with, der, distribution_point, make_crl

__all__ = ["distribution_point"]

# One PKI for the module: hypothesis examples must not wait for key generation.
ROOT = make_ca("Unit Root")
CA = make_ca("Unit Issuing CA", issuer=ROOT)
LEAVES = [make_leaf(CA, f"Unit Leaf {i}") for i in range(6)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def client(who: Issued) -> ClientCert:
    return ClientCert.from_der(who.der)


class Offline:
    """A transport with no network behind it: every exchange fails (as a cut cable would)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        limit: int,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str,
    ) -> bytes:
        raise FetchError("connect", "offline")

    async def close(self) -> None:
        pass


def tls_config(folder: Path, **keys: Any) -> TLSConfig:
    """A TLSConfig over this module's PKI (files written to ``folder``)."""
    server = make_leaf(make_ca("Unit Server CA"), "localhost", server=True)
    server.write(folder, "server")
    (folder / "ca.pem").write_bytes(ROOT.pem + CA.pem)
    data = {"certificate": "server.pem", "key": "server.key", "client_ca": ["ca.pem"], **keys}
    return TLSConfig.model_validate(data, context={"base_dir": folder})


# ---- CRLs ----------------------------------------------------------------------------------


def test_a_crl_is_read_with_what_it_covers() -> None:
    crl = crls.verify(der(make_crl(CA, [5, 7], number=9)), [ROOT.cert, CA.cert], "mem")
    assert (crl.issuer, crl.number, crl.revoked, crl.users, crl.cas, crl.partition) == (
        "CN=Unit Issuing CA",
        9,
        frozenset({5, 7}),
        True,
        True,
        None,
    )
    assert crl.ca == crls.ca_key(CA.cert)
    assert crl.covers(crls.ca_key(CA.cert), False, []) and not crl.covers("other", False, [])


@pytest.mark.parametrize(
    ("idp", "problem"),
    [
        (
            x509.IssuingDistributionPoint(None, None, False, False, None, True, False),
            "an indirect CRL",
        ),
        (
            x509.IssuingDistributionPoint(
                None, None, False, False, frozenset({x509.ReasonFlags.key_compromise}), False, False
            ),
            "covers some revocation reasons only",
        ),
        (
            x509.IssuingDistributionPoint(None, None, False, False, None, False, True),
            "covers attribute certificates only",
        ),
    ],
)
def test_crls_that_cannot_be_applied_whole_are_refused(
    idp: x509.IssuingDistributionPoint, problem: str
) -> None:
    with pytest.raises(crls.CRLError, match=problem):
        crls.verify(der(make_crl(CA, [1], extensions=[(idp, True)])), [CA.cert], "mem")


def test_a_ca_that_may_not_sign_crls_is_not_believed() -> None:
    key_usage = x509.KeyUsage(True, False, False, False, False, True, False, False, False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(CA.cert.subject)
        .issuer_name(CA.cert.subject)
        .public_key(CA.key.public_key())
        .serial_number(1)
        .not_valid_before(_now() - dt.timedelta(days=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
    )
    no_crl_sign = builder.sign(CA.key, hashes.SHA256())
    with pytest.raises(crls.CRLError, match="lacks cRLSign"):
        crls.verify(der(make_crl(CA, [1])), [no_crl_sign], "mem")


def test_a_partitioned_crl_speaks_only_for_its_partition() -> None:
    part = "http://crl.example/part-1.crl"
    idp = x509.IssuingDistributionPoint(
        [x509.UniformResourceIdentifier(part)], None, True, False, None, False, False
    )
    crl = crls.verify(der(make_crl(CA, [1], extensions=[(idp, True)])), [CA.cert], "mem")
    key = crls.ca_key(CA.cert)
    assert crl.partition == frozenset({part}) and crl.users and not crl.cas
    assert crl.covers(key, False, [part])
    assert not crl.covers(key, False, ["http://crl.example/part-2.crl"])
    assert not crl.covers(key, False, [])  # a certificate naming no point is not in it
    assert not crl.covers(key, True, [part])  # user certificates only


def test_distribution_points_that_are_not_the_whole_crl_are_not_followed() -> None:
    points = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                [x509.UniformResourceIdentifier("http://a/1.crl")], None, None, None
            ),
            x509.DistributionPoint(
                [x509.UniformResourceIdentifier("http://a/2.crl")],
                None,
                frozenset({x509.ReasonFlags.key_compromise}),
                None,
            ),
            x509.DistributionPoint(
                [x509.UniformResourceIdentifier("ldap://a/3")], None, None, None
            ),
            x509.DistributionPoint(
                [x509.UniformResourceIdentifier("https://a/4.crl")], None, None, None
            ),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(CA.cert.subject)
        .public_key(CA.key.public_key())
        .serial_number(2)
        .not_valid_before(_now())
        .not_valid_after(_now() + dt.timedelta(days=1))
        .add_extension(points, critical=False)
        .sign(CA.key, hashes.SHA256())
    )
    assert crl_urls(cert) == ("http://a/1.crl",)


def test_the_newest_crl_of_a_group_wins() -> None:
    anchors = [CA.cert]
    old = crls.verify(der(make_crl(CA, [1], number=3)), anchors, "old")
    new = crls.verify(der(make_crl(CA, [2], number=4)), anchors, "new")
    assert list(crls.newest([new, old]).values()) == [new]


REFERENCE_CRL = der(make_crl(CA, [11, 12, 13], number=2))


# a name mutated into a country code of the wrong length: cryptography warns as it parses
@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(REFERENCE_CRL) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=3,
    )
)
def test_a_mutated_crl_is_refused_or_read_as_the_original(flips: list[tuple[int, int]]) -> None:
    """Whatever bytes an attacker changes in a CRL (on the wire from a distribution point, or
    in a file), it never verifies with a different meaning."""
    data = bytearray(REFERENCE_CRL)
    for where, mask in flips:
        data[where] ^= mask
    original = crls.verify(REFERENCE_CRL, [CA.cert], "x")
    try:
        read = crls.verify(bytes(data), [CA.cert], "x")
    except crls.CRLError:
        return
    assert (read.revoked, read.next_update, read.this_update, read.ca) == (
        original.revoked,
        original.next_update,
        original.this_update,
        original.ca,
    )


# ---- the deny-list's names -----------------------------------------------------------------

_VALUE = (
    st.text(
        alphabet=st.characters(
            whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters=" -._"
        ),
        min_size=1,
        max_size=20,
    )
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["CN", "O", "OU", "C", "L", "ST"]), _VALUE),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_an_issuer_matches_in_every_spelling(
    attributes: list[tuple[str, str]], data: st.DataObject
) -> None:
    oids = {
        "CN": NameOID.COMMON_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
        "L": NameOID.LOCALITY_NAME,
        "ST": NameOID.STATE_OR_PROVINCE_NAME,
    }
    name = x509.Name([x509.NameAttribute(oids[k], v if k != "C" else "DE") for k, v in attributes])
    text = name.rfc4514_string()
    # what an operator may type: other letter case, spaces around the separators
    spelled = text
    if data.draw(st.booleans()) and text.swapcase().casefold() == text.casefold():
        # (letter case as Unicode folds it: a dotless i, U+0131, is not an I)
        spelled = spelled.swapcase()
    if data.draw(st.booleans()):
        spelled = spelled.replace(",", ", ").replace("=", " = ")
    assert issuer_key(spelled) == issuer_key(text) == " ".join(text.casefold().split())


# ---- remembered answers: generations and time ------------------------------------------------


class DenyMachine(RuleBasedStateMachine):
    """Run-time deny entries added and removed in any order, checks in between: every check
    answers as the model says (a remembered answer never outlives a change)."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="deny-machine-"))
        self.revocation = Revocation(
            prepare(tls_config(self.folder, deny=[{"sha256": "ab" * 32}])), transports=Offline
        )
        self.denied: set[int] = set()
        self.certs = [client(who) for who in LEAVES]

    @rule(i=st.integers(0, len(LEAVES) - 1))
    def deny(self, i: int) -> None:
        assert self.revocation.deny(self.certs[i].sha256) == (i not in self.denied)
        self.denied.add(i)

    @rule(i=st.integers(0, len(LEAVES) - 1))
    def allow(self, i: int) -> None:
        expected = "removed" if i in self.denied else "absent"
        assert self.revocation.allow(self.certs[i].sha256) == expected
        self.denied.discard(i)

    @rule(i=st.integers(0, len(LEAVES) - 1))
    def check(self, i: int) -> None:
        refused = self.revocation.check(self.certs[i], 1000.0)
        assert (refused is not None and refused.status == 403) == (i in self.denied)

    @invariant()
    def listed(self) -> None:
        assert self.revocation.denied()["runtime"] == sorted(
            self.certs[i].sha256 for i in self.denied
        )


TestDenyMachine = DenyMachine.TestCase
TestDenyMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    grace=st.integers(0, 100),
    probes=st.lists(st.floats(-50.0, 250.0, allow_nan=False), min_size=1, max_size=12),
)
def test_a_remembered_answer_ends_when_the_crl_passes_its_grace(
    tmp_path: Path, grace: int, probes: list[float]
) -> None:
    """Checks at increasing moments: the answer is good until nextUpdate + grace, 503 after,
    however the earlier answers were remembered."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "ca.crl").write_bytes(der(make_crl(CA, [99])))
    config = tls_config(folder, crl=["ca.crl"], crl_grace=grace)
    next_update = config.crls()[0].next_update
    revocation = Revocation(prepare(config), transports=Offline)
    cert = client(LEAVES[0])
    for offset in sorted(probes):
        now = next_update + offset
        refused = revocation.check(cert, now)
        if now > next_update + grace:
            assert refused is not None and refused.status == 503, offset
        else:
            assert refused is None, offset


def test_a_certificate_listed_in_any_crl_is_revoked_even_an_expired_one(tmp_path: Path) -> None:
    (tmp_path / "ca.crl").write_bytes(
        der(make_crl(CA, [LEAVES[1].cert.serial_number], next_update=dt.timedelta(seconds=-1)))
    )
    revocation = Revocation(prepare(tls_config(tmp_path, crl=["ca.crl"])), transports=Offline)
    refused = revocation.check(client(LEAVES[1]), dt.datetime.now(dt.UTC).timestamp())
    assert refused is not None and (refused.status, refused.code) == (403, "revoked")


def test_pinned_and_self_signed_certificates_are_trusted_as_themselves(tmp_path: Path) -> None:
    device = make_leaf(None, "Pinned Device")
    device.write(tmp_path, "device")
    (tmp_path / "ca.crl").write_bytes(der(make_crl(CA, [])))
    config = tls_config(tmp_path, crl=["ca.crl"], pinned_certificates=["device.pem"])
    revocation = Revocation(prepare(config), transports=Offline)
    assert revocation.check(client(device), 0.0) is None  # no CA can revoke it
    facts = Anchors([CA.cert], [device.cert]).facts(client(device))
    assert facts.self_trusted and facts.links == ()


def test_the_chain_is_rebuilt_from_the_anchors() -> None:
    anchors = Anchors([ROOT.cert, CA.cert])
    facts = anchors.facts(client(LEAVES[0]))
    assert facts.complete and [link.issuer_name for link in facts.links] == [
        "CN=Unit Issuing CA",
        "CN=Unit Root",
    ]
    assert [link.is_ca for link in facts.links] == [False, True]
    assert Anchors([ROOT.cert]).facts(client(LEAVES[0])).complete is False


def test_the_path_above_a_certificate_is_what_a_verified_chain_lists_after_it() -> None:
    """For a resumed connection's chain headers (OpenSSL keeps no chain in a session): the
    intermediates up to the top anchor, that anchor left out, as ``verified_chain`` gives
    them; () for an anchor itself; None when the issuer is not among the anchors."""
    leaf = client(LEAVES[0])
    assert Anchors([ROOT.cert, CA.cert]).path_above(leaf) == (CA.der,)
    assert Anchors([CA.cert]).path_above(leaf) == ()  # the issuer is the top anchor
    assert Anchors([ROOT.cert]).path_above(leaf) is None  # the intermediate only the client has
    device = make_leaf(None, "device")
    assert Anchors([CA.cert], [device.cert]).path_above(client(device)) == ()
    anchors = Anchors([ROOT.cert, CA.cert])
    assert anchors.path_above(leaf) is anchors.path_above(leaf)  # computed once
    # with pinned certificates OpenSSL stops at the first trusted certificate (partial chains)
    assert Anchors([ROOT.cert, CA.cert], [device.cert]).path_above(leaf) == ()


def test_a_path_with_two_possible_issuers_is_not_guessed() -> None:
    """CA cross-signed by another root (the same name and key, two certificates): OpenSSL
    picks one by its own rules, so the path is not known for certain (None: no chain)."""
    other_root = make_ca("Unit Other Root")
    cross = (
        x509.CertificateBuilder()
        .subject_name(CA.cert.subject)
        .issuer_name(other_root.cert.subject)
        .public_key(CA.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(CA.cert.not_valid_before_utc)
        .not_valid_after(CA.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(other_root.key, hashes.SHA256())
    )
    leaf = client(LEAVES[1])
    assert Anchors([ROOT.cert, CA.cert, other_root.cert]).path_above(leaf) == (CA.der,)
    assert Anchors([ROOT.cert, CA.cert, other_root.cert, cross]).path_above(leaf) is None


# ---- OCSP responses ---------------------------------------------------------------------------


def response(
    cert: Issued,
    *,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    signer: Issued = CA,
    issuer: Issued = CA,
    serial_of: Issued | None = None,
    nonce: bytes | None = b"n" * 16,
    this_update: dt.timedelta = dt.timedelta(minutes=-1),
    next_update: dt.timedelta | None = dt.timedelta(hours=1),
    include: list[x509.Certificate] | None = None,
) -> bytes:
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=(serial_of or cert).cert,
        issuer=issuer.cert,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=_now() + this_update,
        next_update=_now() + next_update if next_update is not None else None,
        revocation_time=_now() - dt.timedelta(hours=1)
        if status == ocsp.OCSPCertStatus.REVOKED
        else None,
        revocation_reason=x509.ReasonFlags.key_compromise
        if status == ocsp.OCSPCertStatus.REVOKED
        else None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    for extra in include or []:
        builder = builder.certificates([extra])
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    built = builder.sign(signer.key, hashes.SHA256())
    return built.public_bytes(serialization.Encoding.DER)


def read(data: bytes, who: Issued = LEAVES[0], nonce: bytes | None = b"n" * 16) -> str:
    now = _now().timestamp()
    return read_answer(data, who.cert, CA.cert, nonce, now=now, max_age=3600).status


def test_ocsp_answers_signed_by_the_ca_or_its_delegated_responder_are_read() -> None:
    who = LEAVES[0]
    assert read(response(who)) == "good"
    assert read(response(who, status=ocsp.OCSPCertStatus.REVOKED)) == "revoked"
    assert read(response(who, status=ocsp.OCSPCertStatus.UNKNOWN)) == "unknown"
    delegate = client_with(CA, "Delegate", eku=[x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING])
    assert read(response(who, signer=delegate, include=[delegate.cert])) == "good"
    assert read(response(who, nonce=None)) == "good"  # a responder that echoes no nonce


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda who: response(who, signer=make_ca("Unit Issuing CA")), "bad-signature"),
        (
            lambda who: response(who, signer=(d := client_with(CA, "No EKU")), include=[d.cert]),
            "bad-signature",
        ),
        (
            lambda who: response(
                who,
                signer=(
                    d := client_with(
                        ROOT, "Root's", eku=[x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
                    )
                ),
                include=[d.cert],
            ),
            "bad-signature",
        ),
        (lambda who: response(who, serial_of=LEAVES[2]), "no-answer"),
        (lambda who: response(who, nonce=b"x" * 16), "replayed"),
        (lambda who: response(who, next_update=dt.timedelta(minutes=-10)), "stale"),
        (lambda who: response(who, this_update=dt.timedelta(minutes=10)), "stale"),
        (
            lambda who: ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.TRY_LATER
            ).public_bytes(serialization.Encoding.DER),
            "error-status",
        ),
        (lambda who: b"\x30\x00", "malformed"),
    ],
)
def test_ocsp_answers_that_cannot_be_believed_are_refused(make: Any, kind: str) -> None:
    with pytest.raises(OCSPError) as caught:
        read(make(LEAVES[0]))
    assert caught.value.kind == kind


REFERENCE_OCSP = response(LEAVES[0], status=ocsp.OCSPCertStatus.REVOKED)


# a name mutated into a country code of the wrong length: cryptography warns as it parses
@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(REFERENCE_OCSP) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=3,
    )
)
def test_a_mutated_ocsp_response_is_refused_or_read_as_the_original(
    flips: list[tuple[int, int]],
) -> None:
    """A responder's answer changed on the wire never turns ``revoked`` into anything else."""
    data = bytearray(REFERENCE_OCSP)
    for where, mask in flips:
        data[where] ^= mask
    try:
        status = read(bytes(data))
    except OCSPError:
        return
    assert status == "revoked"


# ---- fetched CRLs: bounds -------------------------------------------------------------------


async def test_fetched_crls_are_bounded_in_entries_and_bytes(
    distribution_point: DistributionPoint,
) -> None:
    anchors = [ROOT.cert, CA.cert]
    for i in range(4):
        distribution_point.files[f"/{i}.crl"] = der(make_crl(CA, range(1, 200 * (i + 1)), number=i))
    kept: list[str] = []
    fetcher = CRLFetcher(
        CRLFetchConfig(enabled=True, max_entries=2, max_bytes=200_000, max_size=100_000),
        lambda data, url: crls.verify(data, anchors, url),
        lambda new, old: kept.append(new.source),
        HttpTransport,
    )
    try:
        for i in range(4):
            urls = [distribution_point.url(f"/{i}.crl")]
            assert fetcher.pending(urls, 0.0) is True
            await asyncio.gather(*fetcher.inflight(urls))
            assert fetcher.entries <= 2 and fetcher.size <= 200_000
        assert len(kept) == 4
        assert fetcher.crls([distribution_point.url("/3.crl")], 0.0)  # the newest is held
        assert not fetcher.crls([distribution_point.url("/0.crl")], 0.0)  # the oldest is not
    finally:
        await fetcher.close()


# ---- the keys as YAML gives them ----------------------------------------------------------------


def test_revocation_keys_as_operators_write_them(tmp_path: Path) -> None:
    from sidecar.config import load

    config = tls_config(tmp_path)
    assert (config.crl_mode, config.ocsp, config.crl_fetch.enabled, config.deny) == (
        ("leaf", "require"),
        "off",
        False,
        (),
    )
    server = make_leaf(make_ca("Unit Server CA"), "localhost", server=True)
    server.write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(ROOT.pem + CA.pem)
    (tmp_path / "sidecar.yaml").write_text(
        "tls:\n"
        "  certificate: server.pem\n  key: server.key\n  client_ca: ca.pem\n"
        "  ocsp: off\n"  # YAML 1.1 reads a bare off as false
        "  crl_fetch: true\n"
        "  crl_mode: [chain]\n"
        "  deny: [{issuer: 'CN = Unit Issuing CA', serial: 42}]\n"
        "listen: {server_names: [localhost]}\n"
    )
    loaded = load(tmp_path / "sidecar.yaml", env={}).tls
    assert (loaded.ocsp, loaded.crl_fetch.enabled, loaded.crl_mode) == (
        "off",
        True,
        ("chain", "require"),
    )
    [entry] = loaded.deny
    assert (entry.issuer_key, entry.serial_number) == ("cn=unit issuing ca", 42)
    refused = Revocation(prepare(loaded), transports=Offline).check(
        client(make_leaf(CA, "x", serial=42)), 0.0
    )
    assert refused is not None and (refused.status, refused.detail) == (403, "on tls.deny")


# ---- OCSP through the gate, with a scripted responder -------------------------------------------


class Scripted:
    """A transport whose OCSP responder is a function (status → response DER), counting calls;
    it is its own factory (``transports=``)."""

    def __init__(self, status: ocsp.OCSPCertStatus | None) -> None:
        self.status = status
        self.calls = 0

    def __call__(self, timeout: float) -> Scripted:
        return self

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        limit: int,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str,
    ) -> bytes:
        self.calls += 1
        assert (method, content_type, accept) == (
            "POST",
            "application/ocsp-request",
            "application/ocsp-response",
        )
        asked = ocsp.load_der_ocsp_request(body or b"")
        assert asked.serial_number == LEAVES[0].cert.serial_number
        await asyncio.sleep(0.01)  # an answer takes a moment: concurrent checks wait for one
        if self.status is None:
            raise FetchError("timeout", "no answer within 1 s")
        return response(LEAVES[0], status=self.status, nonce=None)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("answer", "mode", "status"),
    [
        (ocsp.OCSPCertStatus.GOOD, "hard", None),
        (ocsp.OCSPCertStatus.REVOKED, "soft", 403),
        (ocsp.OCSPCertStatus.UNKNOWN, "soft", None),
        (ocsp.OCSPCertStatus.UNKNOWN, "hard", 503),
        (None, "soft", None),
        (None, "hard", 503),
    ],
)
async def test_ocsp_is_asked_once_waited_for_and_remembered(
    tmp_path: Path, answer: ocsp.OCSPCertStatus | None, mode: str, status: int | None
) -> None:
    responder = Scripted(answer)
    config = tls_config(tmp_path, ocsp=mode, ocsp_responder="http://ocsp.invalid/")
    revocation = Revocation(prepare(config), transports=responder)
    cert = client(LEAVES[0])
    now = dt.datetime.now(dt.UTC).timestamp()
    try:
        assert revocation.check(cert, now) is PENDING
        assert revocation.check(cert, now) is PENDING  # the same question, not a second
        settled = await asyncio.gather(revocation.settle(cert), revocation.settle(cert))
        for refused in settled:
            assert (refused.status if refused is not None else None) == status
        assert responder.calls == 1
        # remembered: the answer, or the failure for FAILURE_HOLD
        again = revocation.check(cert, now)
        assert (again.status if again is not None else None) == status
        assert responder.calls == 1
        counts = revocation.outcome_counts()
        assert sum(counts.values()) == 3  # two settled requests and one more check
    finally:
        await revocation.close()


def test_only_entries_made_here_are_announced(tmp_path: Path) -> None:
    """on_revoked is the hook a fleet-wide channel publishes from: an entry that came from
    that channel (announce=False) must not be published back."""
    revocation = Revocation(prepare(tls_config(tmp_path)), transports=Offline)
    told: list[tuple[str, str]] = []
    revocation.on_revoked.append(lambda sha256, why: told.append((sha256, why)))
    assert revocation.deny("aa" * 32)
    assert revocation.deny("bb" * 32, announce=False)
    assert told == [("aa" * 32, "the deny-list (run time)")]
    assert revocation.denied()["runtime"] == ["aa" * 32, "bb" * 32]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_check_config_warns_when_ocsp_can_ask_about_no_certificate(
    tmp_path: Path, mode: str
) -> None:
    """An OCSP question names the issuer's key, and a pinned certificate is trusted as itself:
    with no CA in tls.client_ca, tls.ocsp checks nothing. check-config says so, with the key
    path, rather than let an operator believe certificates are checked."""
    from sidecar.revocation.report import warnings

    pinned = make_leaf(CA, "pinned")
    (tmp_path / "pinned.pem").write_bytes(pinned.pem)
    config = tls_config(tmp_path, client_ca=[], pinned_certificates=["pinned.pem"], ocsp=mode)
    assert warnings(config) == [
        f"tls.ocsp: {mode}, and tls.client_ca holds no CA: no certificate is checked (pinned "
        "certificates are trusted as themselves, and a question names the issuer's key); "
        "tls.deny can refuse them"
    ]
    assert warnings(tls_config(tmp_path, ocsp=mode)) == []  # with CAs: nothing to say
