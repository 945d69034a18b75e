"""The sealed identity cookie: what opens, what does not, and why (with a fake clock).

A cookie opens only for the host it was sealed for, within both its own expiry and the
configured lifetime, under a key still listed; everything else is "no cookie" with an
outcome to count: every flipped bit, a cookie of another host, an expired one, an unknown
key, an oversized or garbled value, the cookie sent twice. Rotation: a cookie sealed with the
previous key opens while that key is listed second. Keys are read from files, raw or base64.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import sessions
from sidecar.sessions import COOKIE_NAME, Opened, SessionSealer, read_key

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
HOST = "app.example.com"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sealer(clock: Clock, *keys: bytes, lifetime: float = 300) -> SessionSealer:
    return SessionSealer(list(keys) or [KEY_A], lifetime=lifetime, clock=clock)


def encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_round_trip(clock: Clock) -> None:
    s = sealer(clock)
    value = s.seal({"serial": "0x1F", "sub": "alice", "roles": ["a"]}, host=HOST)
    opened = s.open(value, host=HOST)
    assert opened.outcome == "valid"
    assert opened.claims == {"serial": "0x1F", "sub": "alice", "roles": ["a"]}
    assert (opened.issued_at, opened.expires_at) == (int(clock.now), int(clock.now) + 300)
    # a fresh nonce each time: two seals of the same claims differ
    assert s.seal({"sub": "alice"}, host=HOST) != s.seal({"sub": "alice"}, host=HOST)
    # host names compare as names do: case and a final dot aside
    assert s.open(value, host="App.Example.COM.").outcome == "valid"


def test_bound_to_the_host(clock: Clock) -> None:
    s = sealer(clock)
    value = s.seal({"sub": "alice"}, host=HOST)
    assert s.open(value, host="other.example.com").outcome == "invalid"
    assert s.open(value, host="app.example.com.evil").outcome == "invalid"


def test_expiry_with_a_fake_clock(clock: Clock) -> None:
    s = sealer(clock, lifetime=300)
    value = s.seal({"sub": "alice"}, host=HOST)
    clock.now += 299.5
    assert s.open(value, host=HOST).outcome == "valid"
    clock.now += 0.5
    assert s.open(value, host=HOST).outcome == "expired"
    # a shorter lifetime asked for is kept; a longer one is cut to the sealer's
    clock.now = 1_800_000_000.0
    short = s.seal({}, host=HOST, lifetime=10)
    long = s.seal({}, host=HOST, lifetime=10_000)
    assert s.open(short, host=HOST).expires_at == int(clock.now) + 10
    assert s.open(long, host=HOST).expires_at == int(clock.now) + 300


def test_a_lowered_lifetime_applies_to_cookies_already_out(clock: Clock) -> None:
    """identity.cache.ttl bounds a session: lowering it (a reload) shortens every cookie
    already given out, whatever expiry each one carries."""
    value = sealer(clock, lifetime=3600).seal({"sub": "alice"}, host=HOST)
    clock.now += 120
    assert sealer(clock, lifetime=3600).open(value, host=HOST).outcome == "valid"
    assert sealer(clock, lifetime=60).open(value, host=HOST).outcome == "expired"


def test_issued_in_the_future(clock: Clock) -> None:
    value = sealer(clock).seal({}, host=HOST)
    clock.now -= sessions.CLOCK_SKEW - 1  # another replica's clock, a little behind
    assert sealer(clock).open(value, host=HOST).outcome == "valid"
    clock.now -= 10
    assert sealer(clock).open(value, host=HOST).outcome == "expired"


def test_rotation(clock: Clock) -> None:
    old = sealer(clock, KEY_A).seal({"sub": "alice"}, host=HOST)
    rolling = sealer(clock, KEY_B, KEY_A)  # the new key seals, the old one still opens
    assert rolling.open(old, host=HOST).outcome == "valid"
    new = rolling.seal({"sub": "alice"}, host=HOST)
    assert sealer(clock, KEY_A, KEY_B).open(new, host=HOST).outcome == "valid"
    assert sealer(clock, KEY_B).open(old, host=HOST).outcome == "invalid"  # old key dropped


@settings(max_examples=400, derandomize=True, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_every_flipped_bit_is_refused(position: int, bit: int) -> None:
    clock = Clock()
    s = sealer(clock)
    value = s.seal({"sub": "alice", "roles": ["administrator"]}, host=HOST)
    raw = bytearray(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    raw[position % len(raw)] ^= 1 << bit
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert s.open(tampered, host=HOST).outcome in ("invalid", "malformed")


def test_refusals_are_one_outcome_each(clock: Clock) -> None:
    s = sealer(clock)
    value = s.seal({"sub": "alice"}, host=HOST)
    assert s.open(None, host=HOST) == Opened("absent")
    assert s.open("", host=HOST) == Opened("absent")
    assert s.open("x" * (sessions.MAX_VALUE + 1), host=HOST).outcome == "malformed"
    assert s.open(value + "!", host=HOST).outcome == "malformed"
    assert s.open(value[:20], host=HOST).outcome == "malformed"
    assert s.open(value[:-2], host=HOST).outcome == "invalid"  # the tag cut
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    assert s.open(encode(b"\x02" + raw[1:]), host=HOST).outcome == "malformed"  # version 2
    # the key id of a key not listed: refused like a forged tag
    assert s.open(encode(raw[:1] + bytes(4) + raw[5:]), host=HOST).outcome == "invalid"


def test_a_refused_cookie_costs_one_decryption_whatever_is_wrong(clock: Clock) -> None:
    """Timing tells nothing: every well-formed cookie, whatever was changed in it (the key
    id, the nonce, the ciphertext, the tag, the host), goes through exactly one AES-GCM
    decryption and is refused the same way."""
    counted: list[str] = []

    class CountingAESGCM:
        """AES-GCM that records its decryptions (implements ``sessions.Cipher``)."""

        def __init__(self, key: bytes) -> None:
            self._aead = AESGCM(key)

        def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            return self._aead.encrypt(nonce, data, associated_data)

        def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            counted.append("decrypt")
            return self._aead.decrypt(nonce, data, associated_data)

    s = SessionSealer([KEY_A, KEY_B], lifetime=300, clock=clock, cipher=CountingAESGCM)
    value = s.seal({"sub": "alice"}, host=HOST)
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    variants = []
    for offset in (1, 6, 20, len(raw) - 1):  # key id, nonce, ciphertext, tag
        changed = bytearray(raw)
        changed[offset] ^= 0x40
        variants.append((base64.urlsafe_b64encode(bytes(changed)).rstrip(b"=").decode(), HOST))
    variants.append((value, "other.example.com"))
    for cookie, host in variants:
        counted.clear()
        assert s.open(cookie, host=host) == Opened("invalid")
        assert counted == ["decrypt"]


def test_cookie_header_and_attributes(clock: Clock) -> None:
    s = sealer(clock)
    set_cookie = s.set_cookie({"sub": "alice"}, host=HOST)
    name_value, *attributes = set_cookie.split("; ")
    assert name_value.startswith(f"{COOKIE_NAME}=")
    # the __Host- prefix's rules (Secure, Path=/, no Domain), HttpOnly, SameSite=Lax
    assert attributes == ["Max-Age=300", "Path=/", "Secure", "HttpOnly", "SameSite=Lax"]
    assert not any(a.lower().startswith("domain") for a in attributes)
    value = name_value.split("=", 1)[1]
    sent = [f"theme=dark; {COOKIE_NAME}={value}", "other=1"]
    assert s.open_request(sent, host=HOST).outcome == "valid"
    assert s.open_request(["theme=dark"], host=HOST).outcome == "absent"
    twice = [f"{COOKIE_NAME}={value}; {COOKIE_NAME}={value}"]
    assert s.open_request(twice, host=HOST).outcome == "malformed"
    # names are case-sensitive: another cookie is not ours
    assert s.open_request([f"__host-sidecar-identity={value}"], host=HOST).outcome == "absent"
    assert sessions.clear_cookie().startswith(f"{COOKIE_NAME}=; Max-Age=0; Path=/; Secure")


def test_size_bound_when_sealing(clock: Clock) -> None:
    s = sealer(clock)
    with pytest.raises(ValueError, match="JSON"):
        s.seal({"when": object()}, host=HOST)
    with pytest.raises(ValueError, match="JSON compliant"):
        s.seal({"x": float("nan")}, host=HOST)
    with pytest.raises(ValueError, match="more than"):
        s.seal({"blob": "x" * sessions.MAX_VALUE}, host=HOST)
    assert len(s.seal({"blob": "x" * 2000}, host=HOST)) <= sessions.MAX_VALUE


def test_sealer_refuses_bad_keys_and_hides_them() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SessionSealer([], lifetime=1)
    with pytest.raises(ValueError, match="32 bytes"):
        SessionSealer([b"short"], lifetime=1)
    with pytest.raises(ValueError, match="twice"):
        SessionSealer([KEY_A, KEY_A], lifetime=1)
    with pytest.raises(ValueError, match="above 0"):
        SessionSealer([KEY_A], lifetime=0)
    text = repr(SessionSealer([KEY_A, KEY_B], lifetime=60))
    assert "2 keys" in text and KEY_A.hex() not in text and repr(KEY_A) not in text


def test_read_key(tmp_path: Path) -> None:
    secret = os.urandom(32)
    raw = tmp_path / "raw.key"
    raw.write_bytes(secret)
    assert read_key(raw) == secret
    text = tmp_path / "b64.key"
    text.write_text(base64.b64encode(secret).decode() + "\n")  # openssl rand -base64 32
    assert read_key(text) == secret
    url = tmp_path / "url.key"
    url.write_text(base64.urlsafe_b64encode(secret).decode())
    assert read_key(url) == secret
    hexed = tmp_path / "hex.key"
    hexed.write_text(secret.hex().upper() + "\n")  # openssl rand -hex 32
    assert read_key(hexed) == secret
    password = b"correct horse battery staple 123"  # 32 characters, not 32 random bytes
    assert len(password) == 32
    for bad in (
        b"",
        b"too short",
        password,
        base64.b64encode(os.urandom(16)),
        base64.b64encode(os.urandom(32)).rstrip(b"="),
        b"\xff" * 44,
    ):
        path = tmp_path / "bad.key"
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=r"bad\.key: not a session key"):
            read_key(path)
    with pytest.raises(ValueError, match="file not found"):
        read_key(tmp_path / "missing.key")
