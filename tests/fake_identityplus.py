"""A fake Identity Plus API: a real HTTPS server on 127.0.0.1 demanding an agent certificate.

It plays every variant of ``spec/identityplus.md`` the client must accept (both envelopes, any
outcome, extra profile keys, fractional trust scores, both serial spellings) and the faults
it must survive (slow, HTTP 500, invalid JSON, reset, unknown envelope). Program it per
serial, then read what it saw::

    fake.set_profile(serial, "OK 0002", local_user_name="alice", service_roles=["member"])
    fake.set_simple(serial, "PB 0003")
    fake.set_fault(serial, "reset")            # or set_fault(None, ...) for every call
    fake.set_fault(None, "redirect")           # 302 to fake.redirect_to
    fake.set_fault(None, "huge")               # a 64 MiB reply, streamed (fake.huge_sent)
    fake.latency = 0.02                        # added to every call
    fake.calls[serial]                         # inquiries about that serial (int)
    fake.requests[-1].agent_sha256             # the agent certificate a call presented
    fake.intents                               # Intent(type, return_url, strict_massl, reference)

It plays the trust-community calls too (bind, unbind, trust, intrusion report) as the service
would: a bind makes later inquiries about that serial answer ``OK 0002`` with the
``local-user-name``, an unbind undoes it, an intrusion report answers a ``Reference-Number``
(``ER 0007`` the second time) and makes inquiries answer ``PB 0005``. Each is recorded::

    fake.reports                               # Call per community call, in order
    fake.script_reports("Trust", "ER 1106", "500", "OK 0000")  # the next answers, in order
    fake.report_latency = 0.5                  # added to every community call

Use it with the ``fake_identityplus`` fixture (import it into a test module) or
``running_fake(folder)``; ``fake.config(...)`` gives an ``IdentityPlusConfig`` aimed at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from sidecar.config import IdentityPlusConfig
from tests.pki import Issued, make_ca, make_leaf
from tests.servers import serve_app

Fault = Literal[
    "slow", "500", "invalid-json", "reset", "unknown-envelope", "no-outcome", "redirect", "huge"
]

#: what the service says after the code; the client must classify on the code alone
_WORDS = {
    "OK 0000": "Ok",
    "OK 0001": "Certificate valid",
    "OK 0002": "Certificate valid, bound to a local user",
    "OK 0100": "Subject user successfully associated to Identity Plus identity",
    "OK 0101": "Subject user disassociated",
    "PB 0000": "No certificate found",
    "PB 0001": "No certificate found",
    "PB 0002": "Certificate expired",
    "PB 0003": "Certificate needs validation",
    "PB 0004": "Certificate revoked",
    "PB 0005": "Certificate reported as intruder",
    "PB 0006": "Certificate unknown",
    "PB 0007": "Certificate tampered",
    "PB 0008": "Authorization expired",
    "ER 0001": "Malformed request",
    "ER 0002": "Invalid serial number",
    "ER 0003": "Subject user name is already associated",
    "ER 0004": "Subject user name is already associated to a different identity",
    "ER 0005": "Subject user name was never associated",
    "ER 0007": "An intrusion was already reported on this certificate",
    "ER 1100": "No API certificate",
    "ER 1101": "Unknown API certificate",
    "ER 1102": "API certificate expired",
    "ER 1103": "API certificate revoked",
    "ER 1104": "Service suspended",
    "ER 1105": "Over plan",
    "ER 1106": "General Identity Plus API Problem",
}

#: the trust-community operations, and the field that names the certificate in each
COMMUNITY = {
    "Local-User-Information": "serial-number",
    "Local-User-Reference": None,
    "Trust": "serial-number",
    "Intrusion-Report": "intruding-certificate-uid",
    "Intrusion-Reference": None,
}


def _spelled(outcome: str) -> str:
    """``OK 0001`` → ``OK 0001 Certificate valid``: the words clients must not rely on."""
    return f"{outcome} {_WORDS.get(outcome, 'Unspecified')}" if len(outcome) == 7 else outcome


def simple(outcome: str, message: str | None = None) -> dict[str, Any]:
    text = _spelled(outcome)
    return {"Simple-Response": {"outcome": text, "message": message or text[8:]}}


@dataclass(frozen=True)
class Agent:
    """An agent (API) certificate issued by the fake's agent CA, written to files."""

    certificate: Path
    key: Path
    sha256: str
    issued: Issued


@dataclass(frozen=True)
class Call:
    method: str
    #: the request's top-level key (``Identity-Inquiry``, ``Intent``, ...); "" for a ping
    operation: str
    body: Any
    agent_sha256: str
    serial: int | None = None
    #: the serial as the client spelled it
    serial_text: str | None = None


@dataclass(frozen=True)
class Intent:
    type: str
    return_url: str
    strict_massl: bool
    reference: str
    agent_sha256: str


def parse_serial(text: object) -> int | None:
    """``"123"`` and ``"0x7B"`` are the same serial; anything else is None."""
    if not isinstance(text, str):
        return None
    try:
        return int(text[2:], 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


class FakeIdentityPlus:
    """The fake service; ``start()`` it (or use the fixture) before calling it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._server_ca = make_ca("Fake Identity Plus Server CA")
        self._server = make_leaf(self._server_ca, "localhost", server=True)
        self._agent_ca = make_ca("Fake Identity Plus Agent CA")
        self.ca_file = folder / "server-ca.pem"
        self.ca_file.write_bytes(self._server_ca.pem)
        self._server_files = self._server.write(folder, "server")
        self.agent_ca_file = folder / "agent-ca.pem"
        self.agent_ca_file.write_bytes(self._agent_ca.pem)
        self._agent_count = 0
        self.agent = self.issue_agent()
        #: the default agent's files, for configurations
        self.agent_certificate = self.agent.certificate
        self.agent_key = self.agent.key

        #: seconds added to every call
        self.latency = 0.0
        #: how long the ``slow`` fault stalls (cut short when the fake closes)
        self.slow_delay = 30.0
        #: where the ``redirect`` fault sends the caller
        self.redirect_to = "http://127.0.0.1:9/v1"
        #: bytes of its reply the ``huge`` fault handed to its socket before the caller left
        self.huge_sent = 0
        #: answered for serials nobody programmed
        self.default_reply: dict[str, Any] = simple("PB 0001")
        self.calls: Counter[int] = Counter()
        self.requests: list[Call] = []
        self.intents: list[Intent] = []
        #: trust-community calls, in order
        self.reports: list[Call] = []
        #: seconds added to every community call (on top of ``latency``)
        self.report_latency = 0.0
        #: when set, community calls wait for it (after being recorded)
        self.hold_reports: asyncio.Event | None = None
        #: community calls being answered now, and the most there ever were at once
        self.reports_in_flight = 0
        self.max_reports_in_flight = 0
        #: serial -> the local user bound to it; serial -> the intrusion reference
        self.bound: dict[int, str] = {}
        self.intrusions: dict[int, str] = {}
        self._scripted: dict[str | None, list[str]] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        #: HTTP legacy: intent reference -> the serial of the certificate a person signed on
        #: with, and whether the profile names it (``authorizing-certificate``)
        self._signed_on: dict[str, tuple[int, bool]] = {}
        #: inquiries about each intent reference
        self.resolutions: Counter[str] = Counter()
        self._faults: dict[int | None, Fault] = {}
        self._refused_agents: dict[str, str] = {}
        self._intent_reply: dict[str, Any] | None = None
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- programming ----------------------------------------------------------------------

    def set_profile(
        self,
        serial: int,
        outcome: str = "OK 0001",
        *,
        extra: Mapping[str, object] | None = None,
        **fields: object,
    ) -> None:
        """Answer ``Identity-Profile``; ``local_user_name=`` is sent as ``local-user-name``."""
        profile: dict[str, object] = {"outcome": _spelled(outcome)}
        profile.update({k.replace("_", "-"): v for k, v in fields.items()})
        profile.update(extra or {})
        self._replies[serial] = {"Identity-Profile": profile}

    def set_simple(self, serial: int, outcome: str, message: str | None = None) -> None:
        """Answer ``Simple-Response`` with ``outcome`` (any code, ``OK 0001`` included)."""
        self._replies[serial] = simple(outcome, message)

    def set_reply(self, serial: int, document: dict[str, Any]) -> None:
        """Answer exactly this JSON document."""
        self._replies[serial] = document

    def sign_on(self, reference: str, serial: int, *, authorizing: bool = True) -> None:
        """Play a person signing on at Identity Plus with the certificate ``serial`` for the
        intent ``reference`` (HTTP legacy): an inquiry with the reference as
        ``serial-number`` then answers what that serial's would, naming the certificate as
        ``authorizing-certificate`` (unless not ``authorizing``)."""
        self._signed_on[reference] = (serial, authorizing)

    def set_fault(self, serial: int | None, fault: Fault | None) -> None:
        """Misbehave for one serial's inquiries, or for every call when ``serial`` is None."""
        if fault is None:
            self._faults.pop(serial, None)
        else:
            self._faults[serial] = fault

    def refuse_agent(self, sha256: str | None = None, outcome: str | None = "ER 1103") -> None:
        """Answer every call presenting this agent certificate (default: ``agent``) with
        ``outcome``, as the real service does when it refuses the caller; None undoes it."""
        key = sha256 or self.agent.sha256
        if outcome is None:
            self._refused_agents.pop(key, None)
        else:
            self._refused_agents[key] = outcome

    def script_reports(self, operation: str | None, *answers: str) -> None:
        """The next answers to ``operation`` (any community call when None), in order: an
        outcome code (``"ER 1106"``, answered as a Simple-Response) or a fault (``"500"``,
        ``"reset"``, ``"slow"``...). Once they are used up the fake answers as the service."""
        self._scripted.setdefault(operation, []).extend(answers)

    def set_intent_reply(self, document: dict[str, Any] | None) -> None:
        """Answer intents with this document instead of a fresh ``Intent-Reference``."""
        self._intent_reply = document

    def issue_agent(self, name: str | None = None) -> Agent:
        """A new agent certificate from the fake's agent CA, written as ``<name>.pem/.key``."""
        self._agent_count += 1
        name = name or f"agent-{self._agent_count}"
        issued = make_leaf(self._agent_ca, f"{name}.services.example")
        certificate, key = issued.write(self.folder, name)
        return Agent(certificate, key, hashlib.sha256(issued.der).hexdigest(), issued)

    # ---- facts for tests ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1"

    @property
    def server_cert_sha256(self) -> str:
        return hashlib.sha256(self._server.der).hexdigest()

    @property
    def server_spki_sha256(self) -> str:
        spki = self._server.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).hexdigest()

    def config(self, **overrides: object) -> IdentityPlusConfig:
        """An ``IdentityPlusConfig`` for this fake (1 s timeout); keys as in the YAML."""
        data: dict[str, object] = {
            "endpoint": self.url,
            "certificate": str(self.agent_certificate),
            "key": str(self.agent_key),
            "ca": str(self.ca_file),
            "signon_url": "https://signon.example",
            "timeout": 1.0,
        }
        data.update(overrides)
        return IdentityPlusConfig.model_validate({k: v for k, v in data.items() if v is not None})

    def agents_seen(self) -> list[str]:
        return [call.agent_sha256 for call in self.requests]

    # ---- serving --------------------------------------------------------------------------

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*(str(p) for p in self._server_files))
        context.load_verify_locations(cafile=str(self.agent_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED  # the agent certificate is the only credential
        app = web.Application()
        app.router.add_route("*", "/v1", self._handle)
        self._runner, self.port = await serve_app(
            app, ssl_context=context, handler_cancellation=True, shutdown_timeout=1.0
        )

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        agent = _peer_sha256(request)
        raw = await request.read()
        await self._pause(self.latency)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            return web.json_response(simple("ER 0001", "the body is not JSON"))
        if body is None:  # an empty PUT is a ping
            self.requests.append(Call(request.method, "", None, agent))
            if agent in self._refused_agents:
                return web.json_response(simple(self._refused_agents[agent]))
            return web.json_response(simple("OK 0000"))
        if not isinstance(body, dict) or len(body) != 1:
            self.requests.append(Call(request.method, "?", body, agent))
            return web.json_response(simple("ER 0001", "one top-level key expected"))
        operation, fields = next(iter(body.items()))
        fields = fields if isinstance(fields, dict) else {}
        if operation in COMMUNITY:
            return await self._community(request, agent, operation, fields, body)
        serial_text = fields.get("serial-number") if operation == "Identity-Inquiry" else None
        serial = parse_serial(serial_text)
        self.requests.append(Call(request.method, operation, body, agent, serial, serial_text))
        if serial is not None:
            self.calls[serial] += 1

        fault = self._faults.get(serial) if serial is not None else None
        fault = fault or self._faults.get(None)
        if fault is not None:
            answer = await self._fault(request, fault)
            if answer is not None:
                return answer
        if agent in self._refused_agents:
            return web.json_response(simple(self._refused_agents[agent]))

        if operation == "Identity-Inquiry" and isinstance(serial_text, str) and serial is None:
            self.resolutions[serial_text] += 1
            signed = self._signed_on.get(serial_text)
            if signed is None:
                return web.json_response(simple("PB 0001"))
            reply = json.loads(json.dumps(self._replies.get(signed[0], self.default_reply)))
            if signed[1] and "Identity-Profile" in reply:
                reply["Identity-Profile"]["authorizing-certificate"] = str(signed[0])
            return web.json_response(reply)
        if operation == "Identity-Inquiry":
            if serial is None:
                return web.json_response(simple("ER 0002"))
            return web.json_response(self._replies.get(serial, self.default_reply))
        if operation == "Intent" and request.method == "PUT":
            reference = f"intent-{len(self.intents) + 1}"
            self.intents.append(
                Intent(
                    str(fields.get("type")),
                    str(fields.get("return-url")),
                    fields.get("strict-massl") is True,
                    reference,
                    agent,
                )
            )
            if self._intent_reply is not None:
                return web.json_response(self._intent_reply)
            return web.json_response(
                {"Intent-Reference": {"value": reference, "outcome": _spelled("OK 0000")}}
            )
        return web.json_response(simple("ER 0001", f"unknown operation {operation}"))

    async def _community(
        self,
        request: web.Request,
        agent: str,
        operation: str,
        fields: dict[str, Any],
        body: Any,
    ) -> web.StreamResponse:
        """A trust-community call: recorded, then answered as scripted or as the service."""
        serial_field = COMMUNITY[operation]
        serial_text = fields.get(serial_field) if serial_field else None
        serial = parse_serial(serial_text)
        self.reports.append(Call(request.method, operation, body, agent, serial, serial_text))
        self.reports_in_flight += 1
        self.max_reports_in_flight = max(self.max_reports_in_flight, self.reports_in_flight)
        try:
            await self._pause(self.report_latency)
            if self.hold_reports is not None:
                await self.hold_reports.wait()
            return await self._answer_community(request, agent, operation, fields, serial)
        finally:
            self.reports_in_flight -= 1

    async def _answer_community(
        self,
        request: web.Request,
        agent: str,
        operation: str,
        fields: dict[str, Any],
        serial: int | None,
    ) -> web.StreamResponse:
        fault = self._faults.get(None)
        if fault is not None:
            failed = await self._fault(request, fault)
            if failed is not None:
                return failed
        script = self._scripted.get(operation) or self._scripted.get(None)
        if script:
            scripted = script.pop(0)
            if scripted[:2] in ("OK", "PB", "ER"):
                return web.json_response(simple(scripted))
            faulty = await self._fault(request, scripted)  # type: ignore[arg-type]
            if faulty is not None:
                return faulty
        if agent in self._refused_agents:
            return web.json_response(simple(self._refused_agents[agent]))
        expected = {"Local-User-Reference": "DELETE", "Intrusion-Reference": "DELETE"}
        if request.method != expected.get(operation, "PUT"):
            return web.json_response(simple("ER 0002", f"no {request.method} for {operation}"))
        if operation == "Local-User-Information":
            name = fields.get("local-user-name")
            if serial is None or not isinstance(name, str) or not name:
                return web.json_response(simple("ER 0010"))
            if self.bound.get(serial) == name:
                return web.json_response(simple("ER 0003"))
            if name in self.bound.values():
                return web.json_response(simple("ER 0004"))
            self.bound[serial] = name
            self._profile_of(serial)["local-user-name"] = name
            self._profile_of(serial)["outcome"] = _spelled("OK 0002")
            return web.json_response(simple("OK 0100"))
        if operation == "Local-User-Reference":
            name = fields.get("local-user-name")
            owner = next((k for k, v in self.bound.items() if v == name), None)
            if owner is None:
                return web.json_response(simple("ER 0005"))
            del self.bound[owner]
            profile = self._profile_of(owner)
            profile.pop("local-user-name", None)
            profile["outcome"] = _spelled("OK 0001")
            return web.json_response(simple("OK 0101"))
        if operation == "Trust":
            if serial is None or not isinstance(fields.get("trust-type"), str):
                return web.json_response(simple("ER 0010"))
            return web.json_response(simple("OK 0000"))
        if operation == "Intrusion-Report":
            if serial is None or not isinstance(fields.get("severity"), str):
                return web.json_response(simple("ER 0010"))
            if serial in self.intrusions:
                return web.json_response(simple("ER 0007"))
            reference = f"intrusion-{len(self.intrusions) + 1}"
            self.intrusions[serial] = reference
            self._replies[serial] = simple("PB 0005")
            return web.json_response(
                {"Reference-Number": {"outcome": _spelled("OK 0000"), "value": reference}}
            )
        # Intrusion-Reference: withdraw a report
        value = fields.get("value")
        owner = next((k for k, v in self.intrusions.items() if v == value), None)
        if owner is None:
            return web.json_response(simple("ER 0010"))
        del self.intrusions[owner]
        self._replies.pop(owner, None)
        return web.json_response(simple("OK 0000"))

    def _profile_of(self, serial: int) -> dict[str, Any]:
        """The Identity-Profile inquiries about ``serial`` answer (made an OK 0001 one when
        it was anything else)."""
        reply = self._replies.get(serial)
        if reply is None or "Identity-Profile" not in reply:
            reply = self._replies[serial] = {"Identity-Profile": {"outcome": _spelled("OK 0001")}}
        profile: dict[str, Any] = reply["Identity-Profile"]
        return profile

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        if fault == "slow":
            await self._pause(self.slow_delay)
            return None
        if fault == "500":
            return web.Response(status=500, text="Internal Server Error")
        if fault == "invalid-json":
            return web.Response(
                text='{"Identity-Profile": {"outcome": "OK 00', content_type="application/json"
            )
        if fault == "unknown-envelope":
            return web.json_response({"Identity-Summary": {"outcome": _spelled("OK 0001")}})
        if fault == "no-outcome":
            return web.json_response({"Identity-Profile": {"local-user-name": "mallory"}})
        if fault == "redirect":
            return web.Response(status=302, headers={"Location": self.redirect_to})
        if fault == "huge":
            return await self._huge(request)
        # reset: drop the connection without an answer
        assert request.transport is not None
        request.transport.abort()
        raise web.HTTPInternalServerError  # never sent: the connection is gone

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A well-formed allowing profile padded to 64 MiB, streamed without a length."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        head = b'{"Identity-Profile": {"outcome": "OK 0001 Certificate valid", "padding": "'
        block = b"x" * (64 * 1024)
        self.huge_sent = 0
        for piece in (head, *[block] * 1024, b'"}}'):
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the caller went away
            try:
                await response.write(piece)
            except (ConnectionError, RuntimeError):
                break
            self.huge_sent += len(piece)
            await asyncio.sleep(0)  # let a reset by the caller be noticed before the next write
        return response


def _peer_sha256(request: web.Request) -> str:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return hashlib.sha256(der).hexdigest() if der else ""


@contextlib.asynccontextmanager
async def running_fake(folder: Path) -> AsyncIterator[FakeIdentityPlus]:
    fake = FakeIdentityPlus(folder)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def fake_identityplus(tmp_path: Path) -> AsyncIterator[FakeIdentityPlus]:
    """The running fake; ``.agent_certificate``, ``.agent_key``, ``.ca_file`` are its files."""
    async with running_fake(tmp_path / "identityplus") as fake:
        yield fake
