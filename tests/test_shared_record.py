"""What the shared cache writes to Redis, and that it reads back nothing else.

Examples for each rule, and generated inputs for the two invariants: every storable verdict
survives the round trip exactly, and whatever bytes Redis holds, the decoder returns either
None or exactly a verdict the encoder writes (so a garbage value is a miss, never a guess).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.identity import User, Verdict
from sidecar.identity.shared.record import (
    MAX_RECORD,
    Message,
    decode_message,
    decode_verdict,
    encode_message,
    encode_verdict,
    storable,
)

ALICE = User(
    sub="2d73cf2a",
    username="alice",
    given_name="Alice",
    family_name="Liddell",
    email="alice@example.com",
    roles=("administrator", "member"),
)


def test_allow_round_trip_keeps_what_x_userinfo_is_built_from() -> None:
    verdict = Verdict.allow(ALICE, code="OK 0001")
    back = decode_verdict(encode_verdict(verdict))
    assert back == verdict
    assert back is not None and back.user is not None
    # the header value is rebuilt here, not read from Redis
    assert back.user.header_value == ALICE.header_value


def test_refusals_round_trip_without_a_user() -> None:
    for verdict in (
        Verdict.deny("revoked", code="PB 0004"),
        Verdict("unknown", "not known", "PB 0000"),
    ):
        assert decode_verdict(encode_verdict(verdict)) == verdict


def test_what_is_stored_is_the_verdict_and_the_user_only() -> None:
    doc = json.loads(encode_verdict(Verdict.allow(ALICE, code="OK 0001", ttl=60)))
    assert set(doc) == {"v", "kind", "code", "reason", "user"}
    assert set(doc["user"]) == {"sub", "username", "given_name", "family_name", "email", "roles"}


@pytest.mark.parametrize(
    "verdict",
    [
        Verdict("validate", "validate first", "PB 0003", redirect="https://signon/x"),
        Verdict("allow", "identified", "allow", user=ALICE, stale=True),
    ],
    ids=["validate", "stale"],
)
def test_validate_and_stale_verdicts_are_never_shared(verdict: Verdict) -> None:
    assert not storable(verdict)
    with pytest.raises(ValueError, match="never shared"):
        encode_verdict(verdict)


GOOD = json.loads(encode_verdict(Verdict.allow(ALICE, code="OK 0001")))


def _with(**changes: object) -> bytes:
    doc = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


_DROP = object()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"allow"',
        b"null",
        _with(kind="validate"),
        _with(kind="ALLOW"),
        _with(kind=None),
        _with(v=2),
        _with(v=True),
        _with(v=1.0),
        _with(v=_DROP),
        _with(extra=1),
        _with(user=_DROP),
        _with(user=None),
        _with(user={**GOOD["user"], "sub": ""}),
        _with(user={**GOOD["user"], "username": 7}),
        _with(user={**GOOD["user"], "roles": "admin"}),
        _with(user={**GOOD["user"], "roles": [1]}),
        _with(user={**GOOD["user"], "roles": [""]}),
        _with(user={**GOOD["user"], "admin": True}),
        _with(user={k: v for k, v in GOOD["user"].items() if k != "roles"}),
        _with(code=""),
        _with(code="x" * 65),
        _with(reason=None),
        _with(reason="x" * 1001),
        json.dumps(
            {"v": 1, "kind": "deny", "code": "deny", "reason": "x", "user": GOOD["user"]}
        ).encode(),
        b'{"v":1,"v":1,"kind":"deny","code":"deny","reason":"x"}',
        b'{"v":1,"kind":"deny","code":"deny","reason":"x","n":NaN}',
        b'{"v":1,"kind":"deny","code":"deny","reason":"' + b"x" * MAX_RECORD + b'"}',
        12,
        None,
    ],
)
def test_anything_else_is_a_miss(raw: object) -> None:
    assert decode_verdict(raw) is None


_text = st.text(max_size=40)
_names = st.text(min_size=1, max_size=40)
users = st.builds(
    User,
    sub=_names,
    username=_names,
    given_name=st.none() | _text,
    family_name=st.none() | _text,
    email=st.none() | _text,
    roles=st.lists(_names, max_size=5).map(tuple),
)
verdicts = st.one_of(
    st.builds(lambda u, c, r: Verdict("allow", r, c, user=u), users, _names, _text),
    st.builds(lambda c, r: Verdict("deny", r, c), _names, _text),
    st.builds(lambda c, r: Verdict("unknown", r, c), _names, _text),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(verdicts)
def test_every_storable_verdict_round_trips(verdict: Verdict) -> None:
    assert decode_verdict(encode_verdict(verdict)) == verdict


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)
_near = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", True]),
        "kind": st.sampled_from(["allow", "deny", "unknown", "validate", "x"]),
        "code": st.one_of(_names, st.integers()),
        "reason": st.one_of(_text, st.none()),
        "user": st.one_of(
            _json,
            st.fixed_dictionaries({"sub": _text, "username": _text}, optional={"roles": _json}),
        ),
        "extra": _json,
    },
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.binary(max_size=200),
        _json.map(lambda d: json.dumps(d).encode()),
        _near.map(lambda d: json.dumps(d).encode()),
    )
)
def test_whatever_redis_holds_decodes_to_nothing_or_to_a_verdict_we_write(raw: bytes) -> None:
    verdict = decode_verdict(raw)
    if verdict is not None:
        assert storable(verdict)
        assert decode_verdict(encode_verdict(verdict)) == verdict
        assert json.loads(raw) == json.loads(encode_verdict(verdict))
        if verdict.kind == "allow":
            assert verdict.user is not None and verdict.user.sub and verdict.user.username


# ---- messages ----------------------------------------------------------------------------

SHA = "ab" * 32


@pytest.mark.parametrize(
    "message",
    [
        Message("purge", "0123456789abcdef"),
        Message("purge", "0123456789abcdef", epoch=7),
        Message("purge", "0123456789abcdef", serial=77, epoch=8),
        Message("purge", "0123456789abcdef", sha256=SHA, namespace="http.0011223344556677"),
        Message(
            "ready", "0123456789abcdef", sha256=SHA, namespace="http.0011223344556677", epoch=3
        ),
        Message(
            "ready",
            "0123456789abcdef",
            sha256=SHA,
            namespace="http.0011223344556677",
            epoch=0,
            verdict=encode_verdict(Verdict.allow(ALICE)).decode(),
            ttl_ms=300_000,
        ),
    ],
)
def test_messages_round_trip(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


def _ready(**fields: object) -> bytes:
    doc = {"v": 1, "op": "ready", "from": "0123456789abcdef", "ns": "a.b", "sha256": SHA}
    doc.update(fields)
    return json.dumps(doc).encode()


DENY = encode_verdict(Verdict.deny("no", code="deny")).decode()
VALIDATE = json.dumps({"v": 1, "kind": "validate", "code": "x", "reason": ""})


@pytest.mark.parametrize(
    "raw",
    [
        _ready(),  # no epoch
        _ready(epoch=0, verdict=VALIDATE, ttl_ms=5),  # not a stored verdict
        _ready(epoch=0, verdict=DENY),  # a verdict without its ttl
        _ready(epoch=0, ttl_ms=5),  # a ttl without a verdict
        _ready(epoch=0, verdict=DENY, ttl_ms=0),
        _ready(epoch=0, verdict=DENY, ttl_ms=True),
        _ready(epoch=0, verdict=json.loads(DENY), ttl_ms=5),  # an object, not the stored text
    ],
)
def test_a_ready_message_carries_a_stored_verdict_or_none(raw: bytes) -> None:
    assert decode_message(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"purge",
        b'{"v":1,"op":"flush","from":"0123456789abcdef"}',
        b'{"v":1,"op":"purge"}',
        b'{"v":1,"op":"purge","from":"NOT HEX"}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","sha256":"AB"}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","serial":"-1"}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","serial":5}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","epoch":-1}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","epoch":true}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","epoch":1.5}',
        b'{"v":1,"op":"purge","from":"0123456789abcdef","all":true}',
        b'{"v":1,"op":"ready","from":"0123456789abcdef","sha256":"' + SHA.encode() + b'"}',
        b'{"v":1,"op":"ready","from":"0123456789abcdef","ns":"x y","sha256":"'
        + SHA.encode()
        + b'"}',
    ],
)
def test_anything_else_on_the_channel_is_ignored(raw: bytes) -> None:
    assert decode_message(raw) is None
