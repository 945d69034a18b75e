"""The structured-field subset RFC 9440 needs, checked against http_sfv (Mark Nottingham's
RFC 8941/9651 implementation) on generated field values: where http_sfv reads a List or an
Item of byte sequences, ours reads the same bytes; where it refuses, ours refuses too (but
for the one leniency RFC 8941 asks for: missing base64 padding)."""

from __future__ import annotations

import base64

import pytest
from http_sfv.item import Item as SfItem
from http_sfv.list import List as SfList
from http_sfv.types import Token as SfToken
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar import sfv

_ALPHABET = st.sampled_from(list(':;,= \t()"?*ab0189+/-.@%_Z\\'))
_FIELD = st.text(_ALPHABET, max_size=40)


def _theirs_list(text: str) -> list[bytes] | None:
    parsed = SfList()
    try:
        parsed.parse(text.encode("ascii"))
    except ValueError:
        return None
    values = []
    for member in parsed:
        if not isinstance(member, SfItem) or not isinstance(member.value, bytes):
            return None
        values.append(member.value)
    return values


def _theirs_item(text: str) -> bytes | None:
    parsed = SfItem()
    try:
        parsed.parse(text.encode("ascii"))
    except ValueError:
        return None
    return parsed.value if isinstance(parsed.value, bytes) else None


def _ours(read: object, text: str) -> object:
    try:
        return read(text)  # type: ignore[operator]
    except ValueError:
        return None


def _misplaced_padding(text: str) -> bool:
    """Whether a byte sequence has "=" before its end, which strict base64 (ours) refuses
    and http_sfv's decoder reads past: RFC 8941 leaves it to the base64 decoder."""
    return any("=" in part.rstrip("=") for part in text.split(":")[1::2])


def _agree(ours: object, theirs: object, text: str) -> None:
    if theirs is None and ours is not None:
        assert _padding_only(text), (text, ours)
    elif ours is None and theirs is not None:
        assert _misplaced_padding(text), (text, theirs)
    else:
        assert ours == theirs, text


def _padding_only(text: str) -> bool:
    """Whether http_sfv refuses only for base64 padding (RFC 8941 4.2.7 lets us accept)."""
    return any(len(part) % 4 for part in text.split(":")[1::2])


@settings(max_examples=2000, derandomize=True, deadline=None)
@given(_FIELD)
@example(':aGk=:;a=1;b=?0;c="x";d=tok;e=1.5;f=:aGk=:, :aA==:')
@example(":aGk=:;A=1")
@example(":aGk=:;a=1.2345")
@example(":aGk=: ,")
@example("(:aGk=:)")
def test_lists_agree_with_http_sfv(text: str) -> None:
    ours, theirs = _ours(sfv.byte_list, text), _theirs_list(text)
    if not text.strip(" "):
        # RFC 8941 section 3.1: an empty List is a field not sent (http_sfv refuses the text)
        assert ours == []
    else:
        _agree(ours, theirs, text)


@settings(max_examples=2000, derandomize=True, deadline=None)
@given(_FIELD)
@example(":aGk=:;a")
@example(" :aGk=:")
@example(":aGk=: x")
def test_items_agree_with_http_sfv(text: str) -> None:
    _agree(_ours(sfv.byte_item, text), _theirs_item(text), text)


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=5))
def test_what_we_write_http_sfv_reads(values: list[bytes]) -> None:
    text = ", ".join(sfv.serialize_bytes(v) for v in values)
    assert _theirs_list(text) == values
    assert sfv.byte_list(text) == values
    assert _theirs_item(sfv.serialize_bytes(values[0])) == values[0]


def test_missing_padding_is_synthesized() -> None:
    assert sfv.byte_item(":aGk:") == b"hi"
    assert sfv.byte_item(":" + base64.b64encode(b"x").decode().rstrip("=") + ":") == b"x"
    with pytest.raises(ValueError, match="base64"):
        sfv.byte_item(":a:")


_PARAM_VALUES = st.one_of(
    st.integers(-(10**15) + 1, 10**15 - 1),
    st.booleans(),
    st.binary(max_size=6),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6),
    st.from_regex(r"[a-z*][a-z0-9:/*]{0,5}", fullmatch=True).map(SfToken),
)


@st.composite
def serialized_lists(draw: st.DrawFn) -> tuple[str, list[bytes] | None]:
    """A List of byte sequences with parameters of every type, serialized by http_sfv, then
    maybe cut or spliced so that it is often no longer valid."""
    members = SfList()
    values = draw(st.lists(st.binary(max_size=24), min_size=1, max_size=4))
    for value in values:
        item = SfItem(value)
        for key in draw(
            st.lists(st.from_regex(r"[a-z*][a-z0-9_.*-]{0,4}", fullmatch=True), max_size=3)
        ):
            item.params[key] = draw(_PARAM_VALUES)
        members.append(item)
    text = str(members)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.text(_ALPHABET, max_size=3)) + text[cut:], None
    return text, values


@settings(max_examples=1500, derandomize=True, deadline=None)
@given(serialized_lists())
def test_parameters_of_every_type_are_read_past(case: tuple[str, list[bytes] | None]) -> None:
    text, values = case
    ours = _ours(sfv.byte_list, text)
    _agree(ours, _theirs_list(text), text)
    if values is not None:  # as http_sfv wrote it
        assert ours == values
