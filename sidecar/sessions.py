"""The sealed identity cookie of the Identity Plus "HTTP legacy" flow.

When no client certificate can be seen (a load balancer terminated TLS and will not ask for
one), the identity that Identity Plus resolved for a sign-on is kept in a cookie that only
this service can read or make: ``SessionSealer.seal`` encrypts and authenticates a small JSON
document with AES-256-GCM, and ``open`` gives it back, or says why not (``Opened.outcome``:
absent, malformed, invalid, expired). A cookie that is not exactly one this service made for
this host, within its lifetime, is no cookie: the caller treats the request as having none,
and counts the outcome.

Why AES-GCM rather than Fernet: the server name goes in as associated data, so a cookie
minted for one host is refused by another without carrying the name; the issue and expiry
times are inside the ciphertext (Fernet shows its timestamp in the clear); and the cookie is
shorter (a 33-byte overhead, not Fernet's 57 before base64). Random 96-bit nonces are safe
far beyond the number of sign-ons one key will see.

Keys are 32 random bytes in a file, raw, hex or base64 (``read_key``); the first key seals, every key listed
opens, so a new key is rolled out first as a second key, then moved to the front, then the
old one is dropped. Cookie attributes follow the ``__Host-`` prefix rules (RFC 6265bis): Secure,
Path=/, no Domain (host-only), plus HttpOnly and SameSite=Lax. Pure: the clock is passed in.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: the cookie's name. The ``__Host-`` prefix makes browsers refuse it unless it is Secure,
#: has Path=/ and no Domain: a sibling subdomain cannot plant one.
COOKIE_NAME = "__Host-sidecar-identity"
#: bytes in a key file (AES-256), raw or as base64 text (``openssl rand -base64 32``)
KEY_BYTES = 32
#: the longest cookie value made or read. Browsers keep at least 4096 bytes per cookie, name
#: and attributes included (RFC 6265 section 6.1); a longer value is refused unread.
MAX_VALUE = 3800
#: how far in the future a cookie's issue time may be (replicas' clocks differ a little)
CLOCK_SKEW = 60.0

_VERSION = 1
_KEY_ID = 4
_NONCE = 12
_TAG = 16
_HEADER = 1 + _KEY_ID
_MIN_RAW = _HEADER + _NONCE + _TAG
_AAD_LABEL = b"sidecar identity session v1\x00"
_VALUE_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_PRINTABLE = re.compile(rb"[\x20-\x7e\t\r\n]*")

#: absent: no cookie; valid: one this service sealed for this host, within its lifetime;
#: malformed: not a cookie this service could have made (size, encoding, version, sent twice);
#: invalid: fails authentication (tampered, another host's, a key no longer listed);
#: expired: authentic but past its expiry or the configured lifetime, or issued in the future
Outcome = Literal["absent", "valid", "malformed", "invalid", "expired"]


@dataclass(frozen=True, slots=True)
class Opened:
    """What a request's cookie held: the claims when ``outcome`` is valid, else nothing."""

    outcome: Outcome
    claims: Mapping[str, Any] | None = None
    issued_at: int = 0
    expires_at: int = 0


ABSENT = Opened("absent")


def read_key(path: Path) -> bytes:
    """A session key from a file: 32 random bytes, raw, or as hex (``openssl rand -hex 32``) or
    base64 (``openssl rand -base64 32``, standard or URL-safe, padded); surrounding
    whitespace is ignored. Raises ``ValueError`` naming the file and the problem."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    text = data.strip()
    key = b""
    if len(data) == KEY_BYTES and not _PRINTABLE.fullmatch(data):
        key = data
    elif re.fullmatch(rb"[0-9A-Fa-f]{64}", text):
        key = bytes.fromhex(text.decode("ascii"))
    elif re.fullmatch(rb"[A-Za-z0-9+/]{43}=", text):
        key = base64.b64decode(text, validate=True)
    elif re.fullmatch(rb"[A-Za-z0-9_-]{43}=", text):
        key = base64.urlsafe_b64decode(text)
    if len(key) != KEY_BYTES:
        # 32 printable characters are a password, not 32 random bytes: refused too.
        raise ValueError(
            f"{path}: not a session key ({KEY_BYTES} random bytes, raw, hex or base64: "
            f"openssl rand -base64 {KEY_BYTES} > {path.name})"
        )
    return key


class Cipher(Protocol):
    """An AEAD with ``cryptography``'s AESGCM interface (tests count its calls)."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: bytes
    aead: Cipher = field(repr=False)


def _derive(secret: bytes, cipher: Callable[[bytes], Cipher]) -> _Key:
    # The file's key is not used directly: the AES key and the key id are derived from it for
    # this one purpose, so the same file could never decrypt anything else of ours.
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=32 + _KEY_ID,
        salt=None,
        info=b"sidecar identity session v1: aes-256-gcm key, key id",
    ).derive(secret)
    return _Key(material[32:], cipher(material[:32]))


class SessionSealer:
    """Seals and opens identity cookies with ``keys`` (the first seals, all open).

    ``lifetime`` (seconds, ``identity.cache.ttl``) bounds every cookie: one is sealed for at
    most that long, and one issued longer ago than that is expired even if it says otherwise
    (the bound may have been lowered since). ``clock`` is wall-clock seconds (cookies outlive
    processes).
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        lifetime: float,
        clock: Callable[[], float] = time.time,
        cipher: Callable[[bytes], Cipher] = AESGCM,
    ) -> None:
        if not keys:
            raise ValueError("at least one session key is needed")
        if any(len(key) != KEY_BYTES for key in keys):
            raise ValueError(f"a session key is {KEY_BYTES} bytes")
        if len(set(keys)) != len(keys):
            raise ValueError("the same session key is listed twice")
        if not lifetime > 0:
            raise ValueError("a session lifetime must be above 0 seconds")
        derived = [_derive(key, cipher) for key in keys]
        by_id = {key.key_id: key for key in derived}
        if len(by_id) != len(derived):
            raise ValueError("two session keys share a key id: generate a new key")
        self._current = derived[0]
        self._by_id = by_id
        self.lifetime = float(lifetime)
        self._clock = clock

    def __repr__(self) -> str:
        return f"SessionSealer(<{len(self._by_id)} keys>, lifetime={self.lifetime:g})"

    def seal(self, claims: Mapping[str, Any], *, host: str, lifetime: float | None = None) -> str:
        """A cookie value holding ``claims`` (JSON values) for ``host`` (the server name the
        request was served as), valid for ``lifetime`` seconds, at most the sealer's.

        Raises ``ValueError`` when the claims are not JSON or the cookie would be too long."""
        now = self._clock()
        span = self.lifetime if lifetime is None else min(lifetime, self.lifetime)
        if not span > 0:
            raise ValueError("a session lifetime must be above 0 seconds")
        issued = math.floor(now)
        document = {"iat": issued, "exp": math.floor(now + span), "c": dict(claims)}
        try:
            text = json.dumps(document, separators=(",", ":"), sort_keys=True, allow_nan=False)
        except TypeError as exc:
            raise ValueError(f"session claims must be JSON values: {exc}") from None
        plaintext = text.encode()
        header = bytes([_VERSION]) + self._current.key_id
        nonce = os.urandom(_NONCE)
        sealed = self._current.aead.encrypt(nonce, plaintext, _aad(header, host))
        value = base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode("ascii")
        if len(value) > MAX_VALUE:
            raise ValueError(
                f"the sealed session would be {len(value)} characters, more than {MAX_VALUE}"
            )
        return value

    def open(self, value: str | None, *, host: str) -> Opened:
        """The claims in a cookie value, if this service sealed it for ``host`` and it has not
        expired; otherwise an ``Opened`` without claims whose outcome says why.

        Fails closed, and in about the same time for every well-formed value: one that names
        a key no longer listed is still decrypted (with the current key, and refused), so
        neither which key nor which byte was wrong shows in the time taken."""
        if not value:
            return ABSENT
        if len(value) > MAX_VALUE or not _VALUE_CHARS.fullmatch(value):
            return Opened("malformed")
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return Opened("malformed")
        if len(raw) < _MIN_RAW or raw[0] != _VERSION:
            return Opened("malformed")
        header, nonce, sealed = (
            raw[:_HEADER],
            raw[_HEADER : _HEADER + _NONCE],
            raw[_HEADER + _NONCE :],
        )
        key = self._by_id.get(header[1:])
        try:
            plaintext = (key or self._current).aead.decrypt(nonce, sealed, _aad(header, host))
        except InvalidTag:
            return Opened("invalid")
        if key is None:
            return Opened("invalid")
        try:
            document = json.loads(plaintext)
            issued, expires, claims = document["iat"], document["exp"], document["c"]
        except (ValueError, TypeError, KeyError):
            return Opened("invalid")
        if not (isinstance(issued, int) and isinstance(expires, int) and isinstance(claims, dict)):
            return Opened("invalid")
        now = self._clock()
        if issued > now + CLOCK_SKEW or now >= expires or now >= issued + self.lifetime:
            return Opened("expired")
        return Opened("valid", claims, issued, expires)

    def open_request(
        self, cookie_headers: Iterable[str], *, host: str, name: str = COOKIE_NAME
    ) -> Opened:
        """``open`` for the cookie ``name`` among a request's ``Cookie`` header values. A
        request carrying it twice is malformed: which one the browser meant is unknowable."""
        values = cookie_values(cookie_headers, name)
        if len(values) > 1:
            return Opened("malformed")
        return self.open(values[0] if values else None, host=host)

    def set_cookie(
        self,
        claims: Mapping[str, Any],
        *,
        host: str,
        name: str = COOKIE_NAME,
        lifetime: float | None = None,
    ) -> str:
        """A ``Set-Cookie`` header value for cookie ``name`` that keeps ``claims`` for
        ``lifetime`` seconds, at most the sealer's lifetime."""
        span = self.lifetime if lifetime is None else min(lifetime, self.lifetime)
        value = self.seal(claims, host=host, lifetime=span)
        return _cookie(value, math.floor(span), name)


def clear_cookie(name: str = COOKIE_NAME) -> str:
    """A ``Set-Cookie`` header value that makes the browser drop the cookie ``name``."""
    return _cookie("", 0, name)


def _cookie(value: str, max_age: int, name: str = COOKIE_NAME) -> str:
    return f"{name}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Lax"


def _aad(header: bytes, host: str) -> bytes:
    # The server name is authenticated, not sent: a cookie sealed for one host fails the tag
    # check on any other.
    return (
        _AAD_LABEL + host.lower().rstrip(".").encode("utf-8", "surrogateescape") + b"\x00" + header
    )


def cookie_values(cookie_headers: Iterable[str], name: str) -> list[str]:
    """Every value of cookie ``name`` in ``Cookie`` header values (RFC 6265 section 4.2: pairs
    separated by ``;``; names compared exactly)."""
    out = []
    for header in cookie_headers:
        for pair in header.split(";"):
            key, sep, value = pair.strip(" \t").partition("=")
            if sep and key.rstrip(" \t") == name:
                out.append(value.strip(" \t"))
    return out
