"""What the shared cache writes to Redis, and how strictly it reads it back.

A verdict is stored as a small JSON document holding what is needed to answer the request and
rebuild ``X-USERINFO``: its kind, the backend's code, the reason shown on a refusal and the
user. Never the certificate, a key or anything secret. How long it holds is Redis' own TTL on
the key. ``validate`` verdicts and failures are never stored.

Reading is strict: a document that is not exactly what ``encode_verdict`` writes (unknown or
missing keys, wrong types, a duplicate key, over ``MAX_RECORD`` bytes, a ``validate``, an
``allow`` without its user) is ``None``, a miss, never a guess. Fleet messages (purges,
"a verdict is ready") are read the same way. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from .. import User, Verdict

#: a stored verdict is a few hundred bytes; anything much larger is not one of ours
MAX_RECORD = 16 * 1024
#: bounds on what a backend may say (the http backend shows at most 200 characters of reason)
_MAX_CODE = 64
_MAX_REASON = 1000
_MAX_FIELD = 1024
_MAX_ROLES = 256
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SERIAL = re.compile(r"^[0-9]{1,60}$")
#: the instance id of a message's sender: random hex
_SENDER = re.compile(r"^[0-9a-f]{8,64}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")

_VERDICT_KEYS = frozenset({"v", "kind", "code", "reason", "user"})
_USER_KEYS = frozenset({"sub", "username", "given_name", "family_name", "email", "roles"})
_STORED_KINDS = frozenset({"allow", "deny", "unknown"})


class _Invalid(Exception):
    pass


def storable(verdict: Verdict) -> bool:
    """Whether ``verdict`` may be shared: allow, deny and unknown as the backend gave them
    (never a validate, never a stale one served past its ttl)."""
    return verdict.kind in _STORED_KINDS and not verdict.stale


def encode_verdict(verdict: Verdict) -> bytes:
    """The stored form of ``verdict`` (which must be ``storable``)."""
    if not storable(verdict):
        raise ValueError(f"a {verdict.kind} verdict is never shared")
    doc: dict[str, object] = {
        "v": 1,
        "kind": verdict.kind,
        "code": verdict.code,
        "reason": verdict.reason,
    }
    user = verdict.user
    if verdict.kind == "allow":
        if user is None:
            raise ValueError("an allowing verdict without its user")
        u: dict[str, object] = {"sub": user.sub, "username": user.username}
        for key, value in (
            ("given_name", user.given_name),
            ("family_name", user.family_name),
            ("email", user.email),
        ):
            if value is not None:
                u[key] = value
        u["roles"] = list(user.roles)
        doc["user"] = u
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_verdict(raw: object) -> Verdict | None:
    """The verdict ``encode_verdict`` wrote, or None for anything else."""
    try:
        doc = _object(raw)
        if set(doc) - _VERDICT_KEYS or not _version_1(doc):
            return None
        kind = doc.get("kind")
        if kind not in _STORED_KINDS:
            return None
        code = _text(doc.get("code"), _MAX_CODE, empty=False)
        reason = _text(doc.get("reason"), _MAX_REASON, empty=True)
        if kind == "allow":
            user = _user(doc.get("user"))
            return Verdict("allow", reason, code, user=user)
        if "user" in doc:
            return None
        return Verdict("deny" if kind == "deny" else "unknown", reason, code)
    except _Invalid:
        return None


def _user(value: object) -> User:
    if not isinstance(value, dict) or set(value) - _USER_KEYS:
        raise _Invalid
    roles = value.get("roles")
    if not isinstance(roles, list) or len(roles) > _MAX_ROLES:
        raise _Invalid
    optional: dict[str, str | None] = {}
    for key in ("given_name", "family_name", "email"):
        optional[key] = _text(value[key], _MAX_FIELD, empty=True) if key in value else None
    return User(
        sub=_text(value.get("sub"), _MAX_FIELD, empty=False),
        username=_text(value.get("username"), _MAX_FIELD, empty=False),
        given_name=optional["given_name"],
        family_name=optional["family_name"],
        email=optional["email"],
        roles=tuple(_text(r, _MAX_FIELD, empty=False) for r in roles),
    )


# ---- fleet messages -------------------------------------------------------------------------

Op = Literal["purge", "ready", "deny", "allow"]


@dataclass(frozen=True, slots=True)
class Message:
    """One message on the fleet's channel.

    ``purge``: drop every entry (neither ``sha256`` nor ``serial``), one certificate, or
    every certificate with a serial; ``epoch`` is the shared level's new epoch when the purge
    emptied it; ``namespace`` the sender's, when it deleted one certificate's keys there.
    ``ready``: the replica that held the lock for ``sha256`` in ``namespace`` and ``epoch``
    is done. With ``verdict`` (what ``encode_verdict`` wrote, as text) and ``ttl_ms``, it
    stored that, so those waiting need not ask Redis; without, it gave up (a failure, a
    verdict that is not shared) and they ask the backend themselves.
    ``deny`` / ``allow``: a run-time deny entry for ``sha256`` was added / taken off.
    """

    op: Op
    sender: str
    sha256: str | None = None
    serial: int | None = None
    epoch: int | None = None
    namespace: str | None = None
    verdict: str | None = None
    ttl_ms: int | None = None


def encode_message(message: Message) -> bytes:
    doc: dict[str, object] = {"v": 1, "op": message.op, "from": message.sender}
    if message.sha256 is not None:
        doc["sha256"] = message.sha256
    if message.serial is not None:
        doc["serial"] = str(message.serial)
    if message.epoch is not None:
        doc["epoch"] = message.epoch
    if message.namespace is not None:
        doc["ns"] = message.namespace
    if message.verdict is not None:
        doc["verdict"] = message.verdict
    if message.ttl_ms is not None:
        doc["ttl_ms"] = message.ttl_ms
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


_MESSAGE_KEYS = {
    "purge": frozenset({"v", "op", "from", "sha256", "serial", "epoch", "ns"}),
    "ready": frozenset({"v", "op", "from", "sha256", "ns", "epoch", "verdict", "ttl_ms"}),
    "deny": frozenset({"v", "op", "from", "sha256"}),
    "allow": frozenset({"v", "op", "from", "sha256"}),
}


def decode_message(raw: object) -> Message | None:
    """The message ``encode_message`` wrote, or None for anything else."""
    try:
        doc = _object(raw)
        op = doc.get("op")
        if op not in _MESSAGE_KEYS:
            return None
        if set(doc) - _MESSAGE_KEYS[op] or not _version_1(doc):
            return None
        sender = doc.get("from")
        if not isinstance(sender, str) or not _SENDER.match(sender):
            return None
        sha256 = doc.get("sha256")
        if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256)):
            return None
        serial_text = doc.get("serial")
        if serial_text is not None and (
            not isinstance(serial_text, str) or not _SERIAL.match(serial_text)
        ):
            return None
        epoch = doc.get("epoch")
        if epoch is not None and (
            not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 1 << 53
        ):
            return None
        namespace = doc.get("ns")
        if namespace is not None and (
            not isinstance(namespace, str) or not _NAMESPACE.match(namespace)
        ):
            return None
        if op == "deny" or op == "allow":
            if sha256 is None:
                return None
            return Message("deny" if op == "deny" else "allow", sender, sha256=sha256)
        if op == "ready":
            verdict = doc.get("verdict")
            ttl_ms = doc.get("ttl_ms")
            if sha256 is None or namespace is None or epoch is None:
                return None
            if (verdict is None) != (ttl_ms is None):
                return None
            if verdict is not None and (
                not isinstance(verdict, str) or decode_verdict(verdict) is None
            ):
                return None
            if ttl_ms is not None and (type(ttl_ms) is not int or not 0 < ttl_ms < 1 << 53):
                return None
            return Message(
                "ready",
                sender,
                sha256=sha256,
                namespace=namespace,
                epoch=epoch,
                verdict=verdict,
                ttl_ms=ttl_ms,
            )
        return Message(
            "purge",
            sender,
            sha256=sha256,
            serial=int(serial_text) if serial_text is not None else None,
            epoch=epoch,
            namespace=namespace,
        )
    except _Invalid:
        return None


# ---- strict JSON ----------------------------------------------------------------------------


def _object(raw: object) -> dict[str, object]:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_RECORD:
        raise _Invalid
    try:
        doc = json.loads(
            bytes(raw).decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constant
        )
    except (ValueError, RecursionError):
        raise _Invalid from None
    if not isinstance(doc, dict):
        raise _Invalid
    return doc


def _version_1(doc: dict[str, object]) -> bool:
    version = doc.get("v")
    return type(version) is int and version == 1  # not True, which equals 1


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError("duplicate key")
        doc[key] = value
    return doc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _text(value: object, limit: int, *, empty: bool) -> str:
    if not isinstance(value, str) or len(value) > limit or (not empty and not value):
        raise _Invalid
    return value
