"""The fleet channel's ``deny`` / ``allow`` messages (issue #17 item 3): read as strictly as
purges; anything else is ignored (and counted by the shared cache)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.identity.shared.record import Message, decode_message, encode_message

SHA = "cd" * 32
SENDER = "0123456789abcdef"


@pytest.mark.parametrize("op", ["deny", "allow"])
def test_deny_messages_round_trip(op: str) -> None:
    message = Message(op, SENDER, sha256=SHA)  # type: ignore[arg-type]
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 1, "op": "deny", "from": SENDER},  # which certificate?
        {"v": 1, "op": "deny", "from": SENDER, "sha256": SHA.upper()},
        {"v": 1, "op": "deny", "from": SENDER, "sha256": SHA[:-2]},
        {"v": 1, "op": "deny", "from": SENDER, "sha256": SHA, "serial": "5"},
        {"v": 1, "op": "allow", "from": SENDER, "sha256": SHA, "epoch": 1},
        {"v": 2, "op": "deny", "from": SENDER, "sha256": SHA},
        {"v": True, "op": "allow", "from": SENDER, "sha256": SHA},
        {"v": 1, "op": "deny", "from": "not hex", "sha256": SHA},
        {"v": 1, "op": "undeny", "from": SENDER, "sha256": SHA},
    ],
)
def test_malformed_deny_messages_are_ignored(doc: dict[str, object]) -> None:
    assert decode_message(json.dumps(doc).encode()) is None


_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=70), st.just(SHA), st.just(SENDER)
)


@given(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["deny", "allow"])},
        optional={
            "v": st.sampled_from([1, 2, "1", True]),
            "from": _values,
            "sha256": _values,
            "serial": _values,
            "ns": _values,
        },
    )
)
def test_a_deny_message_names_one_fingerprint_or_is_nothing(doc: dict[str, object]) -> None:
    message = decode_message(json.dumps(doc).encode())
    if message is None:
        return
    # what was sent, and only a well-formed fingerprint and sender (the generated text may
    # happen to be one: hypothesis found "cd" * 32 that way)
    assert message.op == doc["op"]
    assert message.sha256 == doc["sha256"] and re.fullmatch("[0-9a-f]{64}", message.sha256 or "")
    assert message.sender == doc["from"] and re.fullmatch("[0-9a-f]+", message.sender)
    assert (message.serial, message.epoch, message.namespace, message.verdict) == (None,) * 4
    assert set(doc) == {"v", "op", "from", "sha256"} and doc["v"] == 1
