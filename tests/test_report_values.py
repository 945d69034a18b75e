"""What a trust report says (``identity.report_values``) and what it must pass before it is
queued (``identity.report_gate``): pure functions, examples and generated inputs."""

from __future__ import annotations

import unicodedata
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.identity.intents import Rate
from sidecar.identity.report_gate import ReportGate, per_minute
from sidecar.identity.report_values import (
    MAX_TOKENS,
    SEVERITIES,
    TRUST_TYPES,
    InvalidReport,
    ReportRequest,
    from_admin,
    from_header,
    from_headers,
)

# ---- the header grammar ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("bind", b"  ada.local ", ReportRequest("bind", local_user_name="ada.local")),
        ("unbind", "Zoë Ådahl".encode(), ReportRequest("unbind", local_user_name="Zoë Ådahl")),
        ("trust", b"social", ReportRequest("trust", trust_type="social")),
        ("trust", b"TRUE-identity_by proxy", ReportRequest("trust", trust_type="true identity by proxy")),
        ("trust", b"mfa;tokens=2500", ReportRequest("trust", trust_type="mfa", tokens=MAX_TOKENS)),
        ("trust", b"mfa ;  TOKENS = 7 ", ReportRequest("trust", trust_type="mfa", tokens=7)),
        ("intrusion", b"fraud", ReportRequest("intrusion", severity="fraud")),
        (
            "intrusion",
            b'inappropriate_content; message="said \\"hi\\"; twice"',
            ReportRequest("intrusion", severity="inappropriate content", message='said "hi"; twice'),
        ),
        ("intrusion", b"mistake; message=oops", ReportRequest("intrusion", severity="mistake", message="oops")),
    ],
)  # fmt: skip
def test_header_values_that_are_understood(kind: str, raw: bytes, expected: ReportRequest) -> None:
    assert from_header(kind, raw) == expected  # type: ignore[arg-type]


def test_the_vocabularies_are_the_identity_plus_clients() -> None:
    """Java client enums, as it sends them (name, underscores as spaces)."""
    assert {t.replace(" ", "_") for t in TRUST_TYPES} == {
        "random", "social", "transaction", "billing", "editorial", "email_validation",
        "phone_validation", "true_identity", "true_identity_by_proxy", "mfa", "community_effort",
    }  # fmt: skip
    assert {s.replace(" ", "_") for s in SEVERITIES} == {
        "mistake", "policy_violation", "intrusive", "fraud", "material_damage",
        "inappropriate_content", "false_information", "harassment",
    }  # fmt: skip


_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_HEADER_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=_SURROGATES), max_size=80
)


@given(st.sampled_from(["bind", "unbind", "trust", "intrusion"]), st.binary(max_size=120))
def test_any_bytes_are_understood_or_refused_with_a_reason(kind: str, raw: bytes) -> None:
    """Never another exception, never half a report."""
    try:
        report = from_header(kind, raw)  # type: ignore[arg-type]
    except InvalidReport as exc:
        reason = str(exc)
    else:
        assert report.kind == kind
        _check(report)
        return
    assert reason


@given(st.sampled_from(["bind", "unbind", "trust", "intrusion"]), _HEADER_TEXT)
def test_any_text_is_understood_or_refused_with_a_reason(kind: str, text: str) -> None:
    try:
        report = from_header(kind, text.encode())  # type: ignore[arg-type]
    except InvalidReport:
        return
    _check(report)


def _check(report: ReportRequest) -> None:
    """What any accepted report satisfies, whatever it was made from."""
    for value in (report.local_user_name, report.message):
        if value is not None:
            assert value == value.strip() and value
            assert all(unicodedata.category(c)[0] != "C" for c in value)
            assert "\n" not in value and "\r" not in value
    if report.kind in ("bind", "unbind"):
        name = report.local_user_name
        assert name is not None and len(name) <= 200
        assert not set(name) & set(';,"\\')
        assert all(c == " " or unicodedata.category(c) != "Zs" for c in name)
    if report.kind == "trust":
        assert report.trust_type in TRUST_TYPES
        assert report.tokens is None or 1 <= report.tokens <= MAX_TOKENS
    if report.kind == "intrusion":
        assert report.severity in SEVERITIES
        assert report.message is None or len(report.message) <= 500


@given(
    st.text(
        alphabet=st.characters(
            codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
        ),
        min_size=1,
        max_size=200,
    ).filter(
        lambda t: (
            t.strip() == t
            and not set(t) & set(';,"\\')
            and all(c == " " or unicodedata.category(c) != "Zs" for c in t)
        )
    )
)
def test_every_acceptable_user_name_comes_through_unchanged(name: str) -> None:
    assert from_header("bind", name.encode()).local_user_name == name


@given(st.sampled_from(sorted(SEVERITIES)), st.text(min_size=1, max_size=100))
def test_a_quoted_message_round_trips(severity: str, message: str) -> None:
    quoted = '"' + message.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raw = f"{severity.replace(' ', '-')}; message={quoted}".encode()
    try:
        report = from_header("intrusion", raw)
    except InvalidReport:
        assert not message.strip() or any(
            unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")
            for c in message
        )
        return
    assert report.severity == severity and report.message == message.strip()


def test_repeated_headers_are_one_report_when_equal_and_none_when_not() -> None:
    reports, refused = from_headers([(0, b"ada"), (2, b"mfa"), (0, b"ada")])
    assert reports == [
        ReportRequest("bind", local_user_name="ada"),
        ReportRequest("trust", trust_type="mfa"),
    ]
    assert refused == []
    reports, refused = from_headers([(0, b"ada"), (0, b"bob"), (3, b"fraud")])
    assert reports == [ReportRequest("intrusion", severity="fraud")]
    assert refused == [("bind", "2 different values for one report header")]


def test_admin_bodies_use_the_same_rules() -> None:
    assert from_admin("trust", {"trust_type": "Email Validation", "tokens": 3}) == ReportRequest(
        "trust", trust_type="email validation", tokens=3
    )
    for kind, body in (
        ("bind", {"local_user_name": 12}),
        ("trust", {"trust_type": "mfa", "tokens": "3"}),  # a string in JSON: not a number
        ("trust", {"trust_type": "mfa", "tokens": 2501}),
        ("intrusion", {"severity": "fraud", "message": "x" * 501}),
        ("intrusion", {"severity": "fraud", "message": "a\u2028b"}),
    ):
        with pytest.raises(InvalidReport):
            from_admin(kind, body)  # type: ignore[arg-type]


# ---- the gate ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(clock: Clock, per_certificate: int = 2, overall: int = 3) -> ReportGate:
    return ReportGate(
        per_certificate=per_minute(per_certificate),
        overall=per_minute(overall),
        dedupe_window=600.0,
        clock=clock,
    )


def test_a_certificates_rate_refills_over_a_minute() -> None:
    clock = Clock()
    g = gate(clock, per_certificate=2, overall=100)
    assert g.take("a") is None and g.take("a") is None
    assert g.take("a") == 30  # one token every 30 s
    assert g.take("b") is None  # another certificate, its own bucket
    clock.now += 30
    assert g.take("a") is None
    assert g.take("a") == 30


def test_the_overall_rate_bounds_every_certificate_together() -> None:
    clock = Clock()
    g = gate(clock, per_certificate=10, overall=3)
    assert [g.take(c) for c in "abc"] == [None, None, None]
    assert g.take("d") == 20
    assert g.remembered[0] == 4


def test_duplicates_while_pending_and_within_the_window() -> None:
    clock = Clock()
    g = gate(clock)
    key = ("trust", "serial:1", "mfa/None")
    assert g.duplicate(key) is None
    g.pending(key)
    assert "pending" in (g.duplicate(key) or "")
    g.ended(key, done=False)  # failed: may be made again at once
    assert g.duplicate(key) is None
    g.pending(key)
    g.ended(key, done=True)
    assert "dedupe_window" in (g.duplicate(key) or "")
    clock.now += 601
    assert g.duplicate(key) is None


def test_a_bind_and_an_unbind_undo_each_other() -> None:
    g = gate(Clock())
    bind, unbind = ("bind", "serial:1", "ada"), ("unbind", "serial:1", "ada")
    g.ended(bind, done=True)
    assert g.duplicate(bind)
    g.ended(unbind, done=True)
    assert g.duplicate(bind) is None and g.duplicate(unbind)


def test_the_gates_tables_are_bounded() -> None:
    clock = Clock()
    g = ReportGate(
        per_certificate=Rate(5, 1.0),
        overall=Rate(10**9, 10**9),
        dedupe_window=600.0,
        clock=clock,
        max_buckets=10,
        max_recent=10,
    )
    for i in range(100):
        g.take(f"c{i}")
        g.ended(("trust", f"c{i}", "x"), done=True)
    assert g.remembered == (10, 10)
