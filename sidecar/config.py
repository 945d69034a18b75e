"""The configuration: YAML in, frozen typed sections out, every problem reported at once.

``load(path)`` reads the file, replaces ``${ENV}`` references, resolves relative paths against
the file's folder, checks shapes, files and certificates, and raises ``ConfigError`` listing
each problem as ``dotted.key.path: message``. Modules take their own section, never the whole
``Config``. Shapes live in the models below; checks that need files live in validators so that
pydantic collects them together with the shape errors.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import ssl
from decimal import Decimal
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import BasicConstraints, ExtensionNotFound
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import certformats, hosts, sessions
from .certs import (
    key_matches_certificate,
    normalize_fingerprint,
    parse_serial,
    read_certificates,
    read_private_key,
    sha256_fingerprint,
    spki_sha256,
)
from .errors import CertificateError, ConfigError
from .header_names import FRAMING, SIDECAR_HEADERS
from .identifiers import email_address, spiffe_id
from .redis_url import RedisTarget, parse_redis_url
from .revocation import crl as crls
from .revocation.deny import issuer_key

__all__ = ["Config", "ConfigError", "load", "parse", "parse_duration"]

# ---- value types --------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds as a number, or ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 30s, 5m, 500ms")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(
            f"not a duration: {value!r} (a number of seconds or a string like 30s, 5m, 500ms)"
        )
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _resolve_path(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, str | Path) or str(value) == "":
        raise ValueError("expected a file path")
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {path}")
    return path


def _certificate_file(path: Path) -> Path:
    try:
        read_certificates(path)
    except CertificateError as exc:
        raise ValueError(str(exc)) from None
    return path


def _key_file(path: Path) -> Path:
    try:
        read_private_key(path)
    except CertificateError as exc:
        raise ValueError(str(exc)) from None
    return path


def _ca_certificate_file(path: Path) -> Path:
    try:
        certificates = read_certificates(path)
    except CertificateError as exc:
        raise ValueError(str(exc)) from None
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(BasicConstraints).value
            is_ca = constraints.ca
        except (ExtensionNotFound, ValueError):
            is_ca = False
        if not is_ca:
            raise ValueError(
                f"{path}: {certificate.subject.rfc4514_string()} is not a CA certificate "
                "(basicConstraints CA:TRUE): list the CA certificates that sign client "
                "certificates"
            )
    return path


def _file_or_folder(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"not found: {path}")
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"not a file or folder: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"not readable: {path}")
    return path


FilePath = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_existing_file)]
#: where the CRLs the crl field read wait for the model to keep them (in the validation context)
_CRLS_READ = "tls.crl: read"
CertFile = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_certificate_file)]
KeyFile = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_key_file)]
CACertFile = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_ca_certificate_file)]


def _numbers_only(annotation: Any) -> bool:
    """The type takes numbers (``int``, ``float``, ``Decimal``; maybe a ``Literal`` or None
    too) and no ``bool``, which pydantic's lax mode would take for 0 or 1."""
    if annotation in (int, float, Decimal):
        return True
    if get_origin(annotation) in (Union, UnionType):
        kinds = [
            a for a in get_args(annotation) if a is not type(None) and get_origin(a) is not Literal
        ]
        return bool(kinds) and all(_numbers_only(a) for a in kinds)
    return False


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        # ``workers: true`` or ``max_connections: false`` is a mistake, not 1 or 0. A type
        # that parses its own input (``Duration``) says so in its own words.
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if (
                field is not None
                and _numbers_only(field.annotation)
                and not any(isinstance(m, BeforeValidator) for m in field.metadata)
            ):
                raise ValueError("a number, not true or false")
        return value


# ---- sections -----------------------------------------------------------------------------


def _server_name(value: str) -> str:
    return hosts.server_name(value)


class ListenConfig(Section):
    host: str = "0.0.0.0"
    port: int = Field(8443, ge=0, le=65535)  # 0: any free port (tests)
    #: processes sharing the port with SO_REUSEPORT; "auto" is one per CPU
    workers: int | Literal["auto"] = 1
    #: the names requests may address (Host, SNI); others get 421. None: the server
    #: certificate's DNS and IP names (following it on reload)
    server_names: tuple[Annotated[str, AfterValidator(_server_name)], ...] | None = None
    #: false: plain HTTP, for a front proxy that terminated TLS itself (``front_proxy``)
    tls: bool = True
    #: every connection starts with a PROXY protocol header (version 1 or 2) from a trusted
    #: load balancer (``front_proxy.trusted`` networks; any other connection is closed)
    proxy_protocol: bool = False

    @field_validator("server_names")
    @classmethod
    def _some_names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and not v:
            raise ValueError(
                "at least one name (or leave the key out to serve the server certificate's names)"
            )
        return None if v is None else tuple(dict.fromkeys(v))

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("workers must be at least 1 (or auto)")
        return v

    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)


class LimitsConfig(Section):
    """Bounds against hostile or broken clients; defaults follow nginx's."""

    #: request line (method, target, version); longer → 414
    max_request_line: int = Field(8190, ge=256, le=1 << 20)
    #: one header line; longer → 431
    max_header_line: int = Field(8190, ge=256, le=1 << 20)
    #: number of header lines; more → 431
    max_headers: int = Field(100, ge=8, le=10_000)
    #: the whole header block (all header lines together); larger → 431
    max_header_block: int = Field(32768, ge=1024, le=1 << 24)
    #: time a client has to send a complete request head (slowloris)
    header_timeout: Duration = 60.0
    #: an idle keep-alive connection is closed after this
    keepalive_timeout: Duration = 75.0
    #: a client that takes none of a response for this long is disconnected (nginx's send_timeout)
    send_timeout: Duration = Field(60.0, gt=0)
    #: the longest pause between two reads of a request body; then 408 (nginx's
    #: client_body_timeout)
    body_timeout: Duration = Field(60.0, gt=0)
    #: a WebSocket on which no frame passed either way for this long is closed (1001)
    websocket_idle_timeout: Duration = Field(300.0, gt=0)
    #: the largest WebSocket message (bytes), either way; a larger one closes with 1009
    websocket_max_message: int = Field(1 << 20, ge=1, le=1 << 30)
    #: time a client has to complete the TLS handshake
    handshake_timeout: Duration = Field(60.0, gt=0)
    #: TLS handshake work (CPU time) a worker does in one turn of its event loop before it
    #: serves the connections already open again; further handshake steps wait their turn
    #: (first come first served). 0: no budget, every step runs as soon as its bytes arrive
    handshake_budget: Duration = Field(0.002, ge=0, le=1.0)
    #: open client connections per worker; further ones are closed at once
    max_connections: int = Field(4096, ge=1)
    #: request bodies larger than this are refused with 413; null: no limit
    max_body_size: int | None = Field(None, ge=0)
    #: a request body up to this size is read whole before an upstream connection is taken
    #: (nginx's client_body_buffer_size); a longer one is streamed
    body_buffer: int = Field(16384, ge=0, le=1 << 24)
    #: once body_timeout has passed, a request body must arrive at this many bytes per
    #: second on average (Apache mod_reqtimeout's MinRate), else 408; 0: no minimum
    body_min_rate: int = Field(1024, ge=0)
    #: request bodies one client address (an IPv6 /64) streams upstream at once; more: 429
    max_body_streams_per_address: int = Field(32, ge=1)
    #: open client connections from one address (an IPv6 /64) per worker; more are closed
    #: at once. Trusted proxies are not bound by it
    max_connections_per_address: int = Field(1024, ge=1)
    #: time a connection has to send its TLS ClientHello (then handshake_timeout applies)
    client_hello_timeout: Duration = Field(10.0, gt=0)
    #: open WebSockets per worker; more: 503
    max_websockets: int = Field(1024, ge=1)
    #: open WebSockets from one client address (an IPv6 /64) per worker; more: 429
    max_websockets_per_address: int = Field(64, ge=1)


class CRLFetchConfig(Section):
    """CRLs fetched from the distribution points (http) that client certificates name."""

    enabled: bool = False
    #: bound on one fetch, connection included
    timeout: Duration = Field(5.0, gt=0)
    #: bytes one CRL may have; a larger one is not read further
    max_size: int = Field(10 << 20, ge=1024, le=1 << 30)
    #: CRLs kept (one per distribution point URL), least recently used dropped beyond
    max_entries: int = Field(100, ge=1)
    #: bytes (DER) of all CRLs kept together
    max_bytes: int = Field(64 << 20, ge=1024)

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data

    @model_validator(mode="after")
    def _sizes(self) -> CRLFetchConfig:
        if self.max_size > self.max_bytes:
            raise ValueError("@max_size: larger than max_bytes, so no such CRL could be kept")
        return self


class DenyEntry(Section):
    """A certificate refused at once: its ``sha256`` fingerprint, or ``issuer`` + ``serial``."""

    sha256: str | None = None
    issuer: str | None = None
    serial: str | int | None = None
    #: derived: the fingerprint (lowercase hex), or the issuer name as compared and the serial
    fingerprint: str = ""
    issuer_key: str = ""
    serial_number: int = 0

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if any(k in data for k in ("fingerprint", "issuer_key", "serial_number")):
            raise ValueError("give sha256, or issuer and serial")
        data = dict(data)
        if "sha256" in data:
            if "issuer" in data or "serial" in data:
                raise ValueError("give sha256, or issuer and serial, not both")
            try:
                data["fingerprint"] = normalize_fingerprint(str(data["sha256"]))
            except ValueError as exc:
                raise ValueError(f"@sha256: {exc}") from None
            return data
        if "issuer" not in data or "serial" not in data:
            raise ValueError("give sha256, or issuer and serial (both)")
        try:
            data["issuer_key"] = issuer_key(str(data["issuer"]))
        except ValueError as exc:
            raise ValueError(f"@issuer: {exc}") from None
        serial = data["serial"]
        try:
            number = serial if isinstance(serial, int) and not isinstance(serial, bool) else None
            data["serial_number"] = number if number is not None else parse_serial(str(serial))
        except ValueError as exc:
            raise ValueError(f"@serial: {exc}") from None
        return data


def _crl_mode(value: Any) -> tuple[str, str]:
    words = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
        raise ValueError("crl_mode is words: leaf or chain, and require or if_present")
    scope = [w for w in words if w in ("leaf", "chain")]
    missing = [w for w in words if w in ("require", "if_present")]
    unknown = [w for w in words if w not in ("leaf", "chain", "require", "if_present")]
    if unknown:
        raise ValueError(
            f"unknown crl_mode word(s) {', '.join(map(repr, unknown))}: give leaf or chain, "
            "and require or if_present"
        )
    if len(scope) > 1 or len(missing) > 1:
        raise ValueError("crl_mode takes one of leaf or chain, and one of require or if_present")
    return (scope[0] if scope else "leaf", missing[0] if missing else "require")


class TLSConfig(Section):
    #: the listener's certificate chain and key: required with ``listen.tls: true`` (the
    #: default), not needed without TLS (behind a load balancer that terminates it)
    certificate: CertFile | None = None
    key: KeyFile | None = None
    client_ca: tuple[CertFile, ...] = ()
    pinned_certificates: tuple[CertFile, ...] = ()
    #: required | optional | none (no certificate asked for: every route public); with
    #: ``servers``, the mode of a server that names none
    client_certificate: Literal["optional", "required", "none"] = "optional"
    min_version: Literal["1.2", "1.3"] = "1.2"
    #: sessions each worker keeps to resume, and the slots of the table several workers
    #: share (0: none kept, stateless tickets); README: TLS
    session_cache: int = Field(2048, ge=0, le=1 << 20)
    #: revocation (README: Revocation): CRL files or folders, PEM or DER
    crl: tuple[Annotated[Path, BeforeValidator(_resolve_path)], ...] = ()
    #: which certificates are checked (leaf, chain) and what a CA without a CRL means
    #: (require: its certificates are refused; if_present: not checked)
    crl_mode: Annotated[tuple[str, str], BeforeValidator(_crl_mode)] = ("leaf", "require")
    #: how long past its nextUpdate a CRL is still used
    crl_grace: Duration = 0.0
    crl_fetch: CRLFetchConfig = CRLFetchConfig()
    ocsp: Literal["off", "soft", "hard"] = "off"
    #: the OCSP responder asked for every certificate, instead of the one it names (AIA)
    ocsp_responder: str | None = None
    ocsp_timeout: Duration = Field(5.0, gt=0)
    #: an OCSP answer is kept until its nextUpdate, at most this long
    ocsp_max_age: Duration = Field(3600.0, gt=0)
    deny: tuple[DenyEntry, ...] = ()
    # The CRLs read and verified against the trust anchors when this section was loaded; part
    # of equality, so that a rewritten CRL file is a changed configuration.
    _crls: tuple[crls.CRL, ...] = PrivateAttr(default=())

    @field_validator("client_ca", "pinned_certificates", "crl", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("ocsp", mode="before")
    @classmethod
    def _ocsp_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare off as false
        return "off" if v is False else v

    @field_validator("ocsp_responder")
    @classmethod
    def _responder(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^/?#\s]+(/[\x21-\x7e]*)?", v):
            raise ValueError(f"not an http:// or https:// URL: {v!r}")
        return v

    @field_validator("crl")
    @classmethod
    def _read_crls(cls, paths: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        """Every CRL read and verified against the trust anchors; every problem reported."""
        anchors: list[x509.Certificate] | None = None
        if "client_ca" in info.data and "pinned_certificates" in info.data:
            anchors = [
                cert
                for path in (*info.data["client_ca"], *info.data["pinned_certificates"])
                for cert in read_certificates(path)
            ]
        problems: list[str] = []
        found: list[crls.CRL] = []
        for i, path in enumerate(paths):
            try:
                sources = crls.read_sources(_file_or_folder(path))
            except (ValueError, crls.CRLError) as exc:
                problems.append(f"@[{i}]: {exc}")
                continue
            for source, der in sources:
                try:
                    if anchors is not None:
                        found.append(crls.verify(der, anchors, source))
                except crls.CRLError as exc:
                    problems.append(f"@[{i}]: {exc}")
        if problems:
            raise ValueError("\n".join(problems))
        if isinstance(info.context, dict):
            info.context[_CRLS_READ] = tuple(found)
        return paths

    @model_validator(mode="after")
    def _keep_crls(self, info: ValidationInfo) -> TLSConfig:
        context = info.context if isinstance(info.context, dict) else {}
        found = context.pop(_CRLS_READ, None)
        if found is None and self.crl:  # validated without a context: read them again
            anchors = [
                cert
                for path in (*self.client_ca, *self.pinned_certificates)
                for cert in read_certificates(path)
            ]
            found = tuple(
                crls.verify(der, anchors, source)
                for path in self.crl
                for source, der in crls.read_sources(path)
            )
        self._crls = found or ()
        return self

    def crls(self) -> tuple[crls.CRL, ...]:
        """The CRLs of ``crl``, as read and verified when this configuration was loaded."""
        return self._crls

    @model_validator(mode="after")
    def _check_pair(self) -> TLSConfig:
        # one of the two alone: Config names the missing one (it knows whether TLS is on)
        if self.certificate is not None and self.key is not None:
            self._check_key()
        anchors = self.client_ca or self.pinned_certificates
        if not anchors and self.client_certificate != "none":
            raise ValueError(
                "@client_ca: no trust anchors: set client_ca and/or pinned_certificates"
            )
        return self

    def _check_key(self) -> None:
        assert self.certificate is not None and self.key is not None
        certs = read_certificates(self.certificate)
        key = read_private_key(self.key)
        if not key_matches_certificate(key, certs[0]):
            raise ValueError(
                f"@key: the private key {self.key} does not match the certificate "
                f"{self.certificate} (the first certificate in the file must be the server's)"
            )


class UpstreamTimeouts(Section):
    connect: Duration = 5.0
    read: Duration = 60.0


class UpstreamConfig(Section):
    url: str = "http://127.0.0.1:8080"
    timeout: UpstreamTimeouts = UpstreamTimeouts()
    #: pooled keep-alive connections to the upstream (per worker)
    max_connections: int = Field(256, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        m = re.match(r"^(http|https)://([^/?#]+)(/[^?#]*)?$", v)
        if not m:
            raise ValueError(f"not an http:// or https:// URL without query: {v!r}")
        if "@" in m.group(2):
            raise ValueError(
                "credentials in upstream.url are not supported (they would be sent to nobody): "
                "the sidecar forwards the client's own Authorization header"
            )
        return v.rstrip("/") if m.group(3) in (None, "/") else v


#: RFC 9110 §5.6.2: a field name is a token
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_name(name: str) -> str:
    # As headers.normal_name: what PHP, lighttpd and CGI read ("X.USER", "X_USER", "X-User").
    return re.sub(r"[^a-z0-9]", "-", name.lower())


#: response fields a report header name may not take: they frame, address or describe the
#: response, and report headers are removed from every response (RFC 9110 and 6265)
_RESPONSE_FIELDS = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-language",
        "content-location",
        "content-range",
        "content-disposition",
        "set-cookie",
        "location",
        "date",
        "server",
        "www-authenticate",
        "cache-control",
        "etag",
        "last-modified",
        "vary",
        "expires",
        "retry-after",
        "accept-ranges",
        "age",
        "allow",
    }
)


class ReportHeadersConfig(Section):
    """Response headers by which the application reports to Identity Plus (README "Trust
    reports"). They are removed from every upstream response, whether reports are on or off,
    so that a browser never sees them."""

    bind: str = "X-Identity-Bind"
    unbind: str = "X-Identity-Unbind"
    trust: str = "X-Identity-Trust"
    intrusion: str = "X-Identity-Intrusion"

    @field_validator("bind", "unbind", "trust", "intrusion")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError(f"not a valid header name: {v!r}")
        name = _header_name(v)
        if name in SIDECAR_HEADERS or name in _RESPONSE_FIELDS:
            raise ValueError(
                f"{v!r} frames, addresses or describes responses: it would be removed from "
                "every response; choose another name"
            )
        return v

    @model_validator(mode="after")
    def _distinct(self) -> ReportHeadersConfig:
        seen: dict[str, str] = {}
        for key in ("bind", "unbind", "trust", "intrusion"):
            name = _header_name(getattr(self, key))
            if name in seen:
                raise ValueError(
                    f"@{key}: the same header as headers.reports.{seen[name]} "
                    "(in any case, and with every character that is not a letter or digit "
                    "read as a dash)"
                )
            seen[name] = key
        return self

    def names(self) -> tuple[str, str, str, str]:
        """The four names, in the order of ``REPORT_KINDS`` (bind, unbind, trust, intrusion)."""
        return (self.bind, self.unbind, self.trust, self.intrusion)


class HeadersConfig(Section):
    """Names of the identity headers sent upstream (the contract's by default).

    Names are compared as the sidecar compares a client's header names: in any case, and with
    every character that is not a letter or digit read as a dash, since CGI-style servers
    (PHP, lighttpd, WSGI, Rack) read ``X_USER``, ``X.USER`` and ``X-User`` as the same
    ``HTTP_X_USER``. A configured ``X_USER`` is sent as written and strips every such
    spelling from clients."""

    certificate: str = "X-APP-CERTIFICATE"
    userinfo: str = "X-USERINFO"
    #: more request headers to remove whoever sent them (trusted proxies included)
    strip: tuple[str, ...] = ()
    #: response headers the application reports to Identity Plus with (always removed)
    reports: ReportHeadersConfig = ReportHeadersConfig()
    #: the certificate headers sent upstream, built from the validated chain;
    #: app-certificate is ``certificate`` above
    certificate_formats: tuple[certformats.OutboundFormat, ...] = ("app-certificate",)

    @field_validator("certificate_formats")
    @classmethod
    def _once_each(
        cls, v: tuple[certformats.OutboundFormat, ...]
    ) -> tuple[certformats.OutboundFormat, ...]:
        problems = [f"@[{i}]: {fmt} is listed twice" for i, fmt in enumerate(v) if fmt in v[:i]]
        if problems:
            raise ValueError("\n".join(problems))
        return v

    @model_validator(mode="after")
    def _not_a_format_header(self) -> HeadersConfig:
        problems = []
        for key in ("certificate", "userinfo"):
            name: str = getattr(self, key)
            if _header_name(name) in certformats.HEADER_NAMES:
                problems.append(
                    f"@{key}: {name!r} is a certificate header of another format (stripped "
                    "from every request): choose another name"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("strip")
    @classmethod
    def _strippable(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        problems = []
        for i, name in enumerate(names):
            if not _TOKEN.match(name):
                problems.append(f"@[{i}]: not a valid header name: {name!r}")
            elif _header_name(name) in FRAMING:
                problems.append(
                    f"@[{i}]: {name!r} cannot be stripped: requests are forwarded by it"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return names

    @model_validator(mode="after")
    def _distinct(self) -> HeadersConfig:
        if _header_name(self.certificate) == _header_name(self.userinfo):
            raise ValueError(
                "@userinfo: must differ from headers.certificate (in any case, and with "
                "every character that is not a letter or digit read as a dash)"
            )
        identity = {_header_name(self.certificate), _header_name(self.userinfo)}
        for key, name in zip(
            ("bind", "unbind", "trust", "intrusion"), self.reports.names(), strict=True
        ):
            if _header_name(name) in identity:
                raise ValueError(
                    f"@reports.{key}: must differ from headers.certificate and headers.userinfo"
                )
        return self

    @field_validator("certificate", "userinfo")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError(f"not a valid header name: {v!r}")
        if _header_name(v) in SIDECAR_HEADERS:
            raise ValueError(
                f"{v!r} is a header the sidecar frames requests by, sets or strips itself: "
                "choose another name"
            )
        return v


#: key_prefix: no hash-tag braces (the cache puts each certificate's keys in one cluster slot
#: with its own), no spaces or controls
_KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


class SharedCacheConfig(Section):
    """``identity.cache.shared``: a second cache level in Redis or Valkey, shared by every
    replica and worker (``identity.shared``). The password is read from a file; TLS
    (``rediss``) always verifies the server."""

    url: str
    #: an ACL user (Redis 6+); the password is never in the YAML
    username: str | None = None
    password_file: FilePath | None = None
    #: rediss: CA bundle for the server's certificate (the system store when null), and a
    #: client certificate + key for mutual TLS
    ca: CertFile | None = None
    certificate: CertFile | None = None
    key: KeyFile | None = None
    #: every key and the channel start with this
    key_prefix: str = "sidecar:"
    #: a Redis call that takes longer is given up, and the lookup goes on without Redis
    timeout: Duration = Field(0.05, gt=0, le=5)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_redis_url(v)
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _KEY_PREFIX.match(v):
            raise ValueError(
                f"not a key prefix: {v!r} (1 to 64 of A-Z a-z 0-9 _ . : / -; no braces: "
                "Redis Cluster reads them as hash tags)"
            )
        return v

    @field_validator("password_file")
    @classmethod
    def _password(cls, v: Path | None) -> Path | None:
        if v is not None and not read_password(v):
            raise ValueError(f"{v} is empty")
        return v

    @model_validator(mode="after")
    def _tls(self) -> SharedCacheConfig:
        if not parse_redis_url(self.url).tls:
            for name in ("ca", "certificate", "key"):
                if getattr(self, name) is not None:
                    raise ValueError(f"@{name}: only with TLS: use a rediss:// URL")
        if (self.certificate is None) != (self.key is None):
            raise ValueError("@certificate: certificate and key go together (mTLS to Redis)")
        if self.certificate is not None and self.key is not None:
            try:  # the Redis client loads them itself, from the files: PEM only
                ssl.create_default_context().load_cert_chain(self.certificate, self.key)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"@certificate: {self.certificate} and {self.key} must be a PEM certificate "
                    f"(chain) and its unencrypted PEM key: {exc}"
                ) from None
        return self

    def target(self) -> RedisTarget:
        return parse_redis_url(self.url)


def read_password(path: Path) -> str:
    """The password in ``path`` (one line; a trailing newline is ignored)."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


class CacheConfig(Section):
    ttl: Duration = 300.0
    negative_ttl: Duration = 30.0
    max_entries: int = Field(default=100_000, ge=1)
    stale_if_error: Duration = 0.0
    #: null: every worker caches alone
    shared: SharedCacheConfig | None = None


class CertificateBinding(Section):
    """One certificate bound to a user: ``sha256`` fingerprint or a ``file``; ``fingerprint`` derived."""

    sha256: str | None = None
    file: CertFile | None = None
    fingerprint: str = ""

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        if ("sha256" in data) == ("file" in data):
            raise ValueError("give exactly one of sha256 or file")
        if "fingerprint" in data:
            raise ValueError("fingerprint is derived; give sha256 or file")
        data = dict(data)
        if "sha256" in data:
            try:
                data["fingerprint"] = normalize_fingerprint(str(data["sha256"]))
            except ValueError as exc:
                raise ValueError(f"@sha256: {exc}") from None
        else:
            try:
                path = _resolve_path(data["file"], info)
                certs = read_certificates(path)
            except (ValueError, CertificateError) as exc:
                raise ValueError(f"@file: {exc}") from None
            if len(certs) != 1:
                raise ValueError(
                    f"@file: expected exactly one certificate in {path}, found {len(certs)}"
                )
            data["fingerprint"] = sha256_fingerprint(certs[0].public_bytes(Encoding.DER))
        return data


class StaticUser(Section):
    sub: str = Field(min_length=1)
    username: str = Field(min_length=1)
    given_name: str | None = None
    family_name: str | None = None
    email: str | None = None
    roles: tuple[str, ...] = ()
    certificates: tuple[CertificateBinding, ...] = Field(min_length=1)


class StaticConfig(Section):
    users: tuple[StaticUser, ...] = ()
    max_certificates_per_user: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _check_users(self) -> StaticConfig:
        problems: list[str] = []
        seen_fp: dict[str, int] = {}
        seen_sub: dict[str, int] = {}
        seen_name: dict[str, int] = {}
        for i, user in enumerate(self.users):
            if len(user.certificates) > self.max_certificates_per_user:
                problems.append(
                    f"@users[{i}].certificates: {len(user.certificates)} certificates bound, "
                    f"at most {self.max_certificates_per_user} allowed "
                    "(identity.static.max_certificates_per_user)"
                )
            for j, binding in enumerate(user.certificates):
                other = seen_fp.setdefault(binding.fingerprint, i)
                if other != i:
                    problems.append(
                        f"@users[{i}].certificates[{j}]: certificate already bound to users[{other}]"
                    )
            if seen_sub.setdefault(user.sub, i) != i:
                problems.append(f"@users[{i}].sub: duplicate of users[{seen_sub[user.sub]}]")
            if seen_name.setdefault(user.username, i) != i:
                problems.append(
                    f"@users[{i}].username: duplicate of users[{seen_name[user.username]}]"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _uri(value: str) -> str:
    # Sign-on URLs become Location headers: a CR or LF would add lines to the visitor's answer.
    if not re.fullmatch(r"[\x21-\x7e]+", value):
        raise ValueError(
            f"a URL is visible ASCII characters only (percent-encode the rest): {value!r}"
        )
    return value


class ReportsConfig(Section):
    """Trust reports: the application's response headers (``headers.reports``) and the admin
    listener's ``POST /identityplus/...`` become Identity Plus calls, made in the background
    (``identity.reports``). ``reports: true`` is short for ``reports: {enabled: true}``."""

    enabled: bool = False
    #: Identity Plus calls in flight at once (per worker)
    concurrency: int = Field(4, ge=1, le=64)
    #: reports queued or being retried at once (per worker); more are dropped
    max_pending: int = Field(1000, ge=1, le=100_000)
    #: a call that fails (or answers ER 1106) is made again at most this many times
    retries: int = Field(3, ge=0, le=20)
    #: the wait before the first retry, doubled for each next one (with jitter) ...
    backoff: Duration = Field(1.0, gt=0)
    #: ... up to this
    max_backoff: Duration = Field(60.0, gt=0)
    #: reports per minute about one certificate (as many at once), per worker
    per_certificate: int = Field(10, ge=1, le=100_000)
    #: reports per minute in all (as many at once), per worker
    overall: int = Field(600, ge=1, le=1_000_000)
    #: the same report again within this long is not sent again
    dedupe_window: Duration = 600.0
    #: how long POST /identityplus/... waits for the outcome before answering 202
    admin_wait: Duration = Field(10.0, ge=0, le=300)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data

    @model_validator(mode="after")
    def _backoffs(self) -> ReportsConfig:
        if self.max_backoff < self.backoff:
            raise ValueError("@max_backoff: must be at least backoff")
        return self


def _session_key_file(path: Path) -> Path:
    sessions.read_key(path)  # its ValueError names the file and the problem
    return path


SessionKeyFile = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_session_key_file)]


class IdentityPlusConfig(Section):
    endpoint: str = "https://api.identity.plus/v1"
    #: this service's own API ("agent") certificate and key, PEM or DER ...
    certificate: CertFile | None = None
    key: KeyFile | None = None
    #: ... or both in one PKCS#12 file, its password in a file (trailing newline ignored)
    p12: FilePath | None = None
    p12_password_file: FilePath | None = None
    ca: CertFile | None = None
    server_pins: tuple[str, ...] = ()
    signon_url: str = "https://signon.identity.plus"
    timeout: Duration = 5.0
    enrol_missing: bool = False
    #: how the serial is written in inquiries: decimal or 0x + uppercase hex
    serial_format: Literal["decimal", "hex"] = "decimal"
    #: optional: ask on behalf of this service domain
    service: str | None = None
    #: send the visitor's address as ip-address
    send_ip_address: bool = False
    #: the Identity Plus CA certificates that sign client certificates: only certificates
    #: they signed are asked about (serials are unique per issuer only); empty: any
    issuers: tuple[CACertFile, ...] = ()
    #: role translation: an Identity Plus role (any case) -> the local name(s) it stands for
    roles: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    #: read "org. administrator" as "administrator" (before translation)
    remove_org_prefix: bool = False
    #: trust reports from the application and the admin listener (README "Trust reports")
    reports: ReportsConfig = ReportsConfig()
    #: HTTP legacy: no certificate at all (a load balancer terminated TLS): browsers sign on
    #: at Identity Plus, and the identity it resolves is kept in a sealed cookie
    legacy: bool = False
    #: files of 32 random bytes (raw, hex or base64); the first seals session cookies, all
    #: open them (rotation: add the new key second, then move it first, then drop the old one)
    session_keys: tuple[SessionKeyFile, ...] = ()
    # The keys, read once: part of equality, so a rewritten key file is a changed
    # configuration.
    _session_keys: tuple[bytes, ...] = PrivateAttr(default=())
    # The issuers' DER, read once: part of equality, so that a rewritten file under the same
    # name is a changed configuration (a reload then builds a new backend).
    _issuer_der: tuple[bytes, ...] = PrivateAttr(default=())

    @field_validator("issuers", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _read_issuers(self) -> IdentityPlusConfig:
        self._issuer_der = tuple(
            c.public_bytes(Encoding.DER) for path in self.issuers for c in read_certificates(path)
        )
        return self

    @field_validator("session_keys", mode="before")
    @classmethod
    def _one_or_many_keys(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _legacy_keys(self) -> IdentityPlusConfig:
        if self.legacy and not self.session_keys:
            raise ValueError(
                "@session_keys: required with legacy: a file of 32 random bytes that seals "
                "the session cookie (openssl rand -base64 32 > session.key)"
            )
        if self.session_keys and not self.legacy:
            raise ValueError("@session_keys: only used with legacy: true")
        keys = tuple(sessions.read_key(path) for path in self.session_keys)
        problems = [
            f"@session_keys[{i}]: the same key as session_keys[{keys.index(key)}]"
            for i, key in enumerate(keys)
            if key in keys[:i]
        ]
        if problems:
            raise ValueError("\n".join(problems))
        self._session_keys = keys
        return self

    def session_key_bytes(self) -> tuple[bytes, ...]:
        """The session keys as read when the configuration was loaded (first seals)."""
        return self._session_keys

    def issuer_certificates(self) -> list[x509.Certificate]:
        """The certificates in ``issuers``, as read when the configuration was loaded."""
        return [x509.load_der_x509_certificate(der) for der in self._issuer_der]

    @field_validator("server_pins")
    @classmethod
    def _pins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_fingerprint(p) for p in v)

    @field_validator("roles", mode="before")
    @classmethod
    def _role_names(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {k: [n] if isinstance(n, str) else n for k, n in v.items()}

    @field_validator("roles")
    @classmethod
    def _translation(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        problems = []
        seen: dict[str, str] = {}
        for canonical, local in v.items():
            folded = canonical.strip().lower()
            if not folded:
                problems.append("an Identity Plus role name is empty")
                continue
            if folded in seen:
                problems.append(
                    f"@{canonical}: the same role as {seen[folded]!r} (roles compare in any case)"
                )
            seen.setdefault(folded, canonical)
            if not local or any(not name.strip() for name in local):
                problems.append(
                    f"@{canonical}: give the local role name(s) it stands for, none empty"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return {k.strip(): tuple(n.strip() for n in names) for k, names in v.items()}

    @field_validator("endpoint", "signon_url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"must be an https:// URL: {v!r}")
        return _uri(v).rstrip("/")

    @model_validator(mode="after")
    def _credentials(self) -> IdentityPlusConfig:
        if self.p12 is not None:
            if self.certificate is not None or self.key is not None:
                raise ValueError("@p12: give either certificate + key or p12, not both")
            self._check_p12(self.p12, self.p12_password_file)
            return self
        if self.p12_password_file is not None:
            raise ValueError("@p12_password_file: only used with p12")
        if self.certificate is None:
            raise ValueError(
                "@certificate: required: the API certificate and key (or p12 + p12_password_file)"
            )
        if self.key is None:
            raise ValueError("@key: required with certificate")
        if not key_matches_certificate(
            read_private_key(self.key), read_certificates(self.certificate)[0]
        ):
            raise ValueError(
                f"@key: the private key {self.key} does not match the certificate "
                f"{self.certificate} (the first certificate in the file must be the agent's)"
            )
        return self

    @staticmethod
    def _check_p12(path: Path, password_file: Path | None) -> None:
        from cryptography.hazmat.primitives.serialization import pkcs12

        password = password_file.read_bytes().rstrip(b"\r\n") if password_file else b""
        try:
            key, cert, _ = pkcs12.load_key_and_certificates(path.read_bytes(), password or None)
        except ValueError:
            raise ValueError(
                f"@p12: cannot open {path}: not PKCS#12, or the wrong password (p12_password_file)"
            ) from None
        if key is None or cert is None:
            raise ValueError(f"@p12: {path} must hold the certificate and its private key")


class HttpBackendConfig(Section):
    url: str
    timeout: Duration = 5.0
    certificate: CertFile | None = None
    key: KeyFile | None = None
    ca: CertFile | None = None
    #: where browsers go to validate or get a certificate (``?purpose=..&return_url=..``
    #: appended); without it only verdicts that carry their own ``redirect`` can redirect
    signon_url: str | None = None
    #: true: no certificate on a non-public route → redirect to ``signon_url`` to get one
    enrol_missing: bool = False

    @field_validator("url", "signon_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/?#]+", v):
            raise ValueError(f"not an http:// or https:// URL: {v!r}")
        return v if v is None else _uri(v)

    @model_validator(mode="after")
    def _pair(self) -> HttpBackendConfig:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("@certificate: certificate and key go together (mTLS to the backend)")
        if self.enrol_missing and self.signon_url is None:
            raise ValueError("@enrol_missing: needs signon_url")
        return self


class IdentityConfig(Section):
    backend: Literal["static", "identityplus", "http"] = "static"
    cache: CacheConfig = CacheConfig()
    static: StaticConfig = StaticConfig()
    identityplus: IdentityPlusConfig | None = None
    http: HttpBackendConfig | None = None

    @model_validator(mode="after")
    def _backend_section(self) -> IdentityConfig:
        if self.backend == "identityplus" and self.identityplus is None:
            raise ValueError("@identityplus: required when identity.backend is identityplus")
        if self.backend == "http" and self.http is None:
            raise ValueError("@http: required when identity.backend is http")
        return self

    @model_validator(mode="after")
    def _legacy_backend(self) -> IdentityConfig:
        if self.identityplus is None or not self.identityplus.legacy:
            return self
        if self.backend != "identityplus":
            raise ValueError(
                "@identityplus.legacy: needs identity.backend: identityplus (Identity Plus "
                "resolves the sign-on)"
            )
        if not self.cache.ttl > 0:
            raise ValueError(
                "@cache.ttl: must be above 0 with identityplus.legacy: it is the session "
                "cookie's lifetime"
            )
        return self


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _listed(value: Any) -> Any:
    """One value where a list is expected: a list of one."""
    return (
        [value] if isinstance(value, str | int | float) and not isinstance(value, bool) else value
    )


def _not_empty(values: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    if values is not None and not values:
        raise ValueError(
            "an empty list matches nothing: give at least one value, or leave the key out"
        )
    return values


def _each(values: tuple[str, ...], check: Any) -> tuple[str, ...]:
    """``check`` applied to every value; every problem reported with its index."""
    out, problems = [], []
    for i, value in enumerate(values):
        try:
            out.append(check(value))
        except ValueError as exc:
            problems.append(f"@[{i}]: {exc}")
    if problems:
        raise ValueError("\n".join(problems))
    return tuple(dict.fromkeys(out))


def _networks(values: Any) -> Any:
    if not isinstance(values, list | tuple):
        return values
    out, problems = [], []
    for i, item in enumerate(values):
        try:
            network = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            problems.append(f"@[{i}]: not an IP address or CIDR: {item!r}")
            continue
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(
            ipaddress.IPv6Network("::ffff:0:0/96")
        ):
            problems.append(
                f"@[{i}]: write IPv4 networks as IPv4 ({item!r}): clients on IPv4-mapped "
                "addresses are compared as IPv4"
            )
            continue
        out.append(network)
    if problems:
        raise ValueError("\n".join(problems))
    return out


Values = Annotated[tuple[str, ...] | None, BeforeValidator(_listed), AfterValidator(_not_empty)]
Networks = Annotated[
    tuple[IPNetwork, ...] | None, BeforeValidator(_networks), BeforeValidator(_listed)
]


def _san_dns(value: str) -> str:
    name = hosts.server_name(value)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise ValueError(f"an IP address is matched by san_ip, not san_dns: {value!r}")


def _san_uri(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+", text):
        raise ValueError(f"not a URI (scheme:..., visible ASCII only): {value!r}")
    # exact: a SPIFFE ID; prefix: a SPIFFE ID and "/" (a trust domain, or a path under it)
    if text.lower().startswith("spiffe:") and not spiffe_id(
        text[:-1] if text.endswith("/") else text
    ):
        raise ValueError(
            f"not a SPIFFE ID (spiffe://trust-domain/path: a lower-case trust domain, "
            f"path segments of letters, digits, '.', '-', '_'), nor one followed by '/' "
            f"to match every ID below it: {value!r}"
        )
    return text


def _san_email(value: str) -> str:
    email = email_address(value.strip())
    if email is None:
        raise ValueError(f"not an email address (local@domain): {value!r}")
    return email


def _fingerprint(value: str) -> str:
    return normalize_fingerprint(value)


class SubjectMatch(Section):
    """``allow.subject``: each attribute given must match (AND), any of its values (OR)."""

    common_name: Values = Field(None, alias="CN")
    organizational_unit: Values = Field(None, alias="OU")
    organization: Values = Field(None, alias="O")

    @model_validator(mode="after")
    def _some(self) -> SubjectMatch:
        if (
            self.common_name is None
            and self.organizational_unit is None
            and self.organization is None
        ):
            raise ValueError("give at least one of CN, OU, O (an empty subject matches nothing)")
        return self

    def attributes(self) -> list[tuple[str, tuple[str, ...]]]:
        """(attribute, values) for each attribute given, in the order CN, OU, O."""
        given = (
            ("CN", self.common_name),
            ("OU", self.organizational_unit),
            ("O", self.organization),
        )
        return [(name, values) for name, values in given if values is not None]


class AllowConfig(Section):
    """``routes[].allow``: certificate matchers. Every key given must pass (AND); within a
    key, any value (OR)."""

    san_dns: Values = None
    san_uri: Values = None
    san_email: Values = None
    san_ip: Networks = None
    subject: SubjectMatch | None = None
    #: CA certificate files (PEM or DER), or the SHA-256 of a CA's public key
    issuer: Values = None
    fingerprint: Values = None

    @field_validator("san_dns")
    @classmethod
    def _dns(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _each(v, _san_dns)

    @field_validator("san_uri")
    @classmethod
    def _uri(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _each(v, _san_uri)

    @field_validator("san_email")
    @classmethod
    def _email(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _each(v, _san_email)

    @field_validator("fingerprint")
    @classmethod
    def _fingerprints(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _each(v, _fingerprint)

    @field_validator("san_ip")
    @classmethod
    def _ips(cls, v: tuple[IPNetwork, ...] | None) -> tuple[IPNetwork, ...] | None:
        return _not_empty(v)

    @field_validator("issuer")
    @classmethod
    def _issuers(cls, v: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if v is None:
            return None

        def one(entry: str) -> str:
            with contextlib.suppress(ValueError):
                return f"sha256:{normalize_fingerprint(entry)}"
            return str(_ca_certificate_file(_existing_file(_resolve_path(entry, info))))

        return _each(v, one)

    @model_validator(mode="after")
    def _some(self) -> AllowConfig:
        if all(getattr(self, key) is None for key in type(self).model_fields):
            raise ValueError(
                "give at least one of san_dns, san_uri, san_email, san_ip, subject, issuer, "
                "fingerprint (an empty allow matches nothing)"
            )
        return self

    def issuer_keys(self) -> dict[str, frozenset[str]]:
        """Each ``issuer`` entry and the public-key SHA-256 it stands for (a file: of every
        certificate in it). Raises ``CertificateError`` for a file gone since loading."""
        keys: dict[str, frozenset[str]] = {}
        for entry in self.issuer or ():
            if entry.startswith("sha256:"):
                keys[entry] = frozenset({entry[len("sha256:") :]})
            else:
                keys[entry] = frozenset(spki_sha256(c) for c in read_certificates(Path(entry)))
        return keys

    def issuer_files(self) -> list[Path]:
        return [Path(e) for e in self.issuer or () if not e.startswith("sha256:")]


class AddressesConfig(Section):
    """``routes[].addresses``: ``allow``, the networks that may reach the route at all;
    ``exempt``, those that need no certificate there (anonymous unless identified)."""

    allow: Networks = None
    exempt: Networks = None

    @field_validator("allow", "exempt")
    @classmethod
    def _listed_networks(cls, v: tuple[IPNetwork, ...] | None) -> tuple[IPNetwork, ...] | None:
        return _not_empty(v)

    @model_validator(mode="after")
    def _coherent(self) -> AddressesConfig:
        if self.allow is None and self.exempt is None:
            raise ValueError("give allow and/or exempt (empty addresses say nothing)")
        if self.allow is not None and self.exempt is not None:
            problems = []
            for i, network in enumerate(self.exempt):
                if not any(
                    network.version == a.version and network.subnet_of(a)  # type: ignore[arg-type]
                    for a in self.allow
                ):
                    problems.append(
                        f"@exempt[{i}]: {network} is not within addresses.allow: it could never "
                        "be exempt (it cannot reach the route)"
                    )
            if problems:
                raise ValueError("\n".join(problems))
        return self


class RouteTrustConfig(Section):
    """``routes[].identityplus``: what the Identity Plus profile must say of the device."""

    #: the profile's trust-score, a decimal from 0 to 5, at least this
    min_trust_score: Decimal | None = Field(None, ge=0, le=5)
    #: the profile's local-intrusions (reported on this service), at most this
    max_local_intrusions: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _some(self) -> RouteTrustConfig:
        if self.min_trust_score is None and self.max_local_intrusions is None:
            raise ValueError("give min_trust_score and/or max_local_intrusions")
        return self


def _methods(values: tuple[str, ...]) -> tuple[str, ...]:
    problems, seen = [], set()
    for i, method in enumerate(values):
        if not _TOKEN.match(method):
            problems.append(f"@[{i}]: not a method name: {method!r}")
        elif method != method.upper():
            problems.append(
                f"@[{i}]: methods are case-sensitive (RFC 9110 §9.1): write {method.upper()!r}"
            )
        elif method in seen:
            problems.append(f"@[{i}]: {method} is listed twice")
        seen.add(method)
    if problems:
        raise ValueError("\n".join(problems))
    return values


def covered_methods(methods: tuple[str, ...] | None) -> frozenset[str] | None:
    """The methods a route covers: as listed, and HEAD with GET (as nginx's limit_except)."""
    if methods is None:
        return None
    covered = set(methods)
    if "GET" in covered:
        covered.add("HEAD")
    return frozenset(covered)


class RouteConfig(Section):
    path: str
    #: public | authenticated (the identity backend decides) | certificate (the certificate
    #: alone decides, through allow)
    access: Literal["public", "authenticated", "certificate"] = "authenticated"
    roles: tuple[str, ...] = ()
    #: the methods the route covers; others fall through to the next route that matches
    methods: Annotated[tuple[str, ...] | None, BeforeValidator(_listed)] = None
    allow: AllowConfig | None = None
    addresses: AddressesConfig | None = None
    identityplus: RouteTrustConfig | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"a route path starts with /: {v!r}")
        if any(c in v for c in "?#\\") or any(seg in (".", "..") for seg in v.split("/")):
            raise ValueError(
                f"a route path is a plain path prefix (no ?, #, \\ or dot segments): {v!r}"
            )
        return v

    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("an empty list covers no method: list methods, or leave the key out")
        return _methods(v)

    @model_validator(mode="after")
    def _coherent(self) -> RouteConfig:
        problems = []
        if self.access == "public":
            if self.roles:
                problems.append("@roles: a public route cannot require roles")
            if self.allow is not None:
                problems.append("@allow: a public route asks for no certificate to match")
            if self.identityplus is not None:
                problems.append("@identityplus: a public route asks for no identity to judge")
            if self.addresses is not None and self.addresses.exempt is not None:
                problems.append("@addresses.exempt: a public route needs no certificate anyway")
        elif self.access == "certificate":
            if self.allow is None:
                problems.append(
                    "@allow: required with access: certificate (the certificate alone decides: "
                    "say what it must hold, e.g. san_uri for SPIFFE IDs)"
                )
            if self.roles:
                problems.append(
                    "@roles: with access: certificate the identity backend is not asked, so "
                    "there are no roles (use access: authenticated)"
                )
            if self.identityplus is not None:
                problems.append(
                    "@identityplus: with access: certificate the identity backend is not asked "
                    "(use access: authenticated)"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def route_problems(routes: tuple[RouteConfig, ...]) -> list[str]:
    """Routes that can never apply, as ``@[i].key: message`` lines: the same path twice
    (unless each covers other methods), or paths that differ only in letter case (as
    Unicode folds it: see ``readings``)."""
    problems: list[str] = []
    by_path: dict[str, list[tuple[int, frozenset[str] | None]]] = {}
    folded: dict[str, tuple[int, str]] = {}
    for i, route in enumerate(routes):
        covered = covered_methods(route.methods)
        earlier = by_path.setdefault(route.path, [])
        for j, other in earlier:
            if other is None:
                problems.append(f"@[{i}].path: duplicate of routes[{j}]: {route.path}")
                break
            overlap = other & covered if covered is not None else frozenset()
            if overlap:
                problems.append(
                    f"@[{i}].methods: {', '.join(sorted(overlap))} already covered by "
                    f"routes[{j}], which has the same path: it could never apply to them"
                )
                break
        earlier.append((i, covered))
        # As case-insensitive servers compare: "ß" is "ss", the dotless i is "i"
        fold = route.path.casefold().upper().lower()
        first = folded.setdefault(fold, (i, route.path))
        if first[1] != route.path:
            # Applications that ignore case (Express, ASP.NET, IIS) serve both the same:
            # every request under them would be refused as ambiguous.
            problems.append(
                f"@[{i}].path: differs from routes[{first[0]}] only in letter case: {route.path}"
            )
    return problems


class ServerConfig(Section):
    """One site on the listener's port, chosen by the server name a client asks for (SNI)."""

    #: the names it serves (SNI and Host): host names, *.wildcards (one label), addresses
    names: tuple[Annotated[str, AfterValidator(_server_name)], ...]
    certificate: CertFile
    key: KeyFile
    #: required | optional | none; default: tls.client_certificate
    client_certificate: Literal["required", "optional", "none"] | None = None
    routes: tuple[RouteConfig, ...]

    @field_validator("names")
    @classmethod
    def _some_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("an empty list names nothing: list the names this server serves")
        return tuple(dict.fromkeys(v))

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, routes: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        if not routes:
            raise ValueError("an empty list allows nothing: list this server's routes")
        problems = route_problems(routes)
        if problems:
            raise ValueError("\n".join(problems))
        return routes

    @model_validator(mode="after")
    def _check_pair(self) -> ServerConfig:
        if not key_matches_certificate(
            read_private_key(self.key), read_certificates(self.certificate)[0]
        ):
            raise ValueError(
                f"@key: the private key {self.key} does not match the certificate "
                f"{self.certificate} (the first certificate in the file must be the server's)"
            )
        return self


def _policy_problems(config: Config) -> list[str]:
    """What only the whole configuration shows, as ``@dotted.path: message`` lines: keys that
    the servers list replaces, a name served twice, and rules that can never apply."""
    problems: list[str] = []
    servers = config.servers
    if servers is not None:
        if "routes" in config.model_fields_set:
            problems.append(
                "@routes: with servers, each server lists its routes (servers[].routes)"
            )
        if config.listen.server_names is not None:
            problems.append(
                "@listen.server_names: with servers, each server lists its names (servers[].names)"
            )
        if config.tls.certificate != servers[0].certificate or config.tls.key != servers[0].key:
            problems.append(
                "@tls.certificate: with servers, each server has its certificate and key "
                "(servers[].certificate, servers[].key): leave tls.certificate and tls.key out"
            )
        owner: dict[str, int] = {}
        for i, server in enumerate(servers):
            for k, name in enumerate(server.names):
                first = owner.setdefault(name, i)
                if first != i:
                    problems.append(
                        f"@servers[{i}].names[{k}]: {name} is served by servers[{first}] already"
                    )
    try:
        anchors = {
            spki
            for path in (*config.tls.client_ca, *config.tls.pinned_certificates)
            for spki in _spki_keys(path)
        }
    except CertificateError:
        anchors = set()  # reported by tls already
    for where, mode, routes in _route_sets(config):
        if mode != "none" and not anchors and not config.tls.client_ca:
            problems.append(
                f"@{where}client_certificate: {mode} needs trust anchors "
                "(tls.client_ca and/or tls.pinned_certificates)"
            )
        # Identity Plus HTTP legacy: with no certificate asked for, a session cookie identifies
        legacy = config.identity.identityplus is not None and config.identity.identityplus.legacy
        for i, route in enumerate(routes):
            at = f"{where}routes[{i}]"
            if (
                mode == "none"
                and route.access != "public"
                and not (legacy and route.access == "authenticated")
            ):
                problems.append(
                    f"@{at}.access: the server asks for no client certificate "
                    "(client_certificate: none): its routes are public"
                )
            if route.identityplus is not None and config.identity.backend != "identityplus":
                problems.append(
                    f"@{at}.identityplus: only the identityplus backend reports trust scores "
                    f"and intrusions (identity.backend is {config.identity.backend}): no "
                    "request could pass"
                )
            if route.allow is not None and route.allow.issuer is not None:
                try:
                    keys = route.allow.issuer_keys()
                except CertificateError as exc:
                    problems.append(f"@{at}.allow.issuer: {exc}")
                    continue
                for k, (entry, entry_keys) in enumerate(keys.items()):
                    if entry_keys.isdisjoint(anchors):
                        problems.append(
                            f"@{at}.allow.issuer[{k}]: {entry.removeprefix('sha256:')} is not "
                            "one of the CAs the listener trusts (tls.client_ca, "
                            "tls.pinned_certificates): no client certificate could match"
                        )
    return problems


def _route_sets(config: Config) -> list[tuple[str, str, tuple[RouteConfig, ...]]]:
    """(where, client_certificate mode, routes) per server: one for the short form."""
    if config.servers is None:
        return [("", config.tls.client_certificate, config.routes)]
    return [
        (f"servers[{i}].", s.client_certificate or config.tls.client_certificate, s.routes)
        for i, s in enumerate(config.servers)
    ]


def _spki_keys(path: Path) -> list[str]:
    return [spki_sha256(c) for c in read_certificates(path)]


_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)


def _admin_name(value: str) -> str:
    name = value.lower().rstrip(".")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name.strip("[]")))
    if not _HOST_NAME.match(name):
        raise ValueError(
            f"not a host name: {value!r} (a DNS name, without scheme, port or wildcard)"
        )
    return name


class AdminConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    #: names the admin listener answers to besides IP addresses, localhost and ``host`` (e.g.
    #: a Service's DNS name); a request with any other Host is refused (DNS rebinding)
    server_names: tuple[Annotated[str, AfterValidator(_admin_name)], ...] = ()
    #: networks besides loopback from which GET /explain is answered (it shows the rules)
    explain_from: Annotated[
        tuple[IPNetwork, ...], BeforeValidator(_networks), BeforeValidator(_listed)
    ] = ()
    #: besides loopback, the peers (CIDRs) that may send trust reports (POST /identityplus/...)
    reports_from: Annotated[
        tuple[IPNetwork, ...], BeforeValidator(_networks), BeforeValidator(_listed)
    ] = ()


class ShutdownConfig(Section):
    """SIGTERM/SIGINT: readiness fails at once, accepting stops after ``drain_delay`` (so load
    balancers notice), in-flight requests and WebSockets get ``grace_period``, then exit 0."""

    drain_delay: Duration = 5.0
    grace_period: Duration = 30.0


class ReloadConfig(Section):
    """Reload on SIGHUP, and when a watched file changes (polled; follows symlinks)."""

    watch: bool = True
    interval: Duration = 2.0

    @field_validator("interval")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v < 0.1:
            raise ValueError("reload.interval must be at least 100ms")
        return v


class LogConfig(Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


def _trusted_peers(v: Any) -> Any:
    """CIDRs (normalised) and SHA-256 fingerprints (lowercase hex), each item checked."""
    if not isinstance(v, list | tuple):
        return v
    out: list[str] = []
    problems = []
    for i, item in enumerate(v):
        text = str(item).strip() if isinstance(item, str | int) else ""
        network = None
        with contextlib.suppress(ValueError):
            network = ipaddress.ip_network(text, strict=False)
        if network is not None:
            if network.prefixlen == 0:
                problems.append(
                    f"@[{i}]: {text} trusts every address: list the proxies' own addresses"
                )
                continue
            out.append(str(network))
            continue
        try:
            out.append("sha256:" + normalize_fingerprint(text))
        except ValueError:
            problems.append(f"@[{i}]: not a CIDR or a SHA-256 certificate fingerprint: {item!r}")
    if problems:
        raise ValueError("\n".join(problems))
    return list(dict.fromkeys(out))


class FrontProxyConfig(Section):
    """Proxies in front of the sidecar: who they are, and where they put the certificate."""

    #: the proxies whose certificate header, X-Forwarded-* and PROXY protocol header are
    #: believed: CIDRs (their connection's address) and/or SHA-256 fingerprints of the client
    #: certificate a proxy presents when it connects with mTLS
    trusted: Annotated[tuple[str, ...], BeforeValidator(_trusted_peers)] = ()
    #: where a trusted proxy puts the client certificate; none: it passes none
    certificate_header: certformats.InboundFormat | None = None

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(t) for t in self.trusted if not t.startswith("sha256:"))

    def fingerprints(self) -> frozenset[str]:
        """Lowercase hex SHA-256 of the proxies' certificates' DER."""
        return frozenset(t[7:] for t in self.trusted if t.startswith("sha256:"))


def _default_routes() -> tuple[RouteConfig, ...]:
    return (RouteConfig(path="/"),)


class Config(Section):
    listen: ListenConfig = ListenConfig()
    tls: TLSConfig
    upstream: UpstreamConfig = UpstreamConfig()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: proxies in front that terminated TLS: their certificate header, X-Forwarded-For
    front_proxy: FrontProxyConfig = FrontProxyConfig()
    headers: HeadersConfig = HeadersConfig()
    limits: LimitsConfig = LimitsConfig()
    identity: IdentityConfig = IdentityConfig()
    routes: tuple[RouteConfig, ...] = Field(default_factory=_default_routes)
    #: several sites on one port, chosen by SNI; None: one, the short form (tls, routes)
    servers: tuple[ServerConfig, ...] | None = None
    admin: AdminConfig = AdminConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    reload: ReloadConfig = ReloadConfig()
    log: LogConfig = LogConfig()

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple):
            return v
        out = []
        for i, item in enumerate(v):
            try:
                out.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ValueError(f"@[{i}]: not an IP address or CIDR: {item!r}") from None
        return out

    @model_validator(mode="before")
    @classmethod
    def _first_server(cls, data: Any) -> Any:
        # With servers, the first one is the default (clients without SNI): its certificate
        # stands for tls.certificate wherever one certificate is meant (expiry metric,
        # summary, the names of the short form), so tls needs no certificate of its own.
        if not isinstance(data, dict):
            return data
        servers, tls = data.get("servers"), data.get("tls")
        if not (isinstance(servers, list) and servers and isinstance(servers[0], dict)):
            return data
        if isinstance(tls, dict) and "certificate" not in tls and "key" not in tls:
            first = servers[0]
            tls = {**tls, "certificate": first.get("certificate"), "key": first.get("key")}
            data = {**data, "tls": tls}
        # tls.client_certificate is the mode of servers that name none: when every server
        # names "none", nothing asks for a certificate and no trust anchor is needed.
        if (
            isinstance(tls, dict)
            and "client_certificate" not in tls
            and all(isinstance(s, dict) and s.get("client_certificate") == "none" for s in servers)
        ):
            data = {**data, "tls": {**tls, "client_certificate": "none"}}
        return data

    @field_validator("servers")
    @classmethod
    def _some_servers(cls, v: tuple[ServerConfig, ...] | None) -> tuple[ServerConfig, ...] | None:
        if v is not None and not v:
            raise ValueError("an empty list serves nothing: list servers, or leave the key out")
        return v

    @model_validator(mode="after")
    def _policy(self) -> Config:
        problems = _policy_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _listener_rules(self) -> Config:
        """What the listener needs: a server certificate with TLS, front proxies to trust
        for what only they may send; every problem at once."""
        problems = [*self._server_certificate_problems(), *self._front_proxy_problems()]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _server_certificate_problems(self) -> list[str]:
        tls, problems = self.tls, []
        if self.listen.tls and self.servers is None:
            if tls.certificate is None:
                problems.append(
                    "@tls.certificate: required with listen.tls: true (the certificate chain "
                    "the listener presents); only listen.tls: false needs none"
                )
            if tls.key is None:
                problems.append(
                    "@tls.key: required with listen.tls: true (the private key of tls.certificate)"
                )
        elif (tls.certificate is None) != (tls.key is None):
            which = "tls.key" if tls.key is None else "tls.certificate"
            problems.append(f"@{which}: required with the other (a certificate and its key)")
        return problems

    def _front_proxy_problems(self) -> list[str]:
        listen, front = self.listen, self.front_proxy
        problems = []
        if not front.trusted and (not listen.tls or front.certificate_header is not None):
            why = (
                "listen.tls is false" if not listen.tls else "front_proxy.certificate_header is set"
            )
            problems.append(
                f"@front_proxy.trusted: empty, but {why}: list the front proxies (CIDRs, or "
                "their client certificates' SHA-256 fingerprints); from any other peer "
                "certificate headers are stripped and X-Forwarded-* ignored"
            )
        if listen.proxy_protocol and not front.networks():
            problems.append(
                "@listen.proxy_protocol: needs the load balancers' addresses (CIDRs) in "
                "front_proxy.trusted: the PROXY header comes before TLS, so only the "
                "connection's address can vouch for it"
            )
        if not listen.tls:
            for i, peer in enumerate(front.trusted):
                if peer.startswith("sha256:"):
                    problems.append(
                        f"@front_proxy.trusted[{i}]: a certificate fingerprint needs "
                        "listen.tls: true (over plain HTTP no proxy presents a certificate)"
                    )
            if listen.server_names is None:
                problems.append(
                    "@listen.server_names: required with listen.tls: false (no server "
                    "certificate is served to take the names from): list the names clients use"
                )
            if self.servers is not None:
                problems.append(
                    "@servers: several sites are chosen by SNI, which needs listen.tls: true"
                )
        return problems

    @model_validator(mode="after")
    def _names_served(self) -> Config:
        certificate = self.tls.certificate
        if self.listen.server_names is None and self.servers is None and certificate is not None:
            leaf = read_certificates(certificate)[0]
            if not hosts.certificate_names(leaf):
                raise ValueError(
                    f"@listen.server_names: the server certificate {certificate} "
                    "names no host (no DNS or IP subjectAltName, no host name as its common "
                    "name): list the names clients use"
                )
        return self

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, routes: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        # A field validator, so it runs (and reports) even when other sections have errors.
        problems = route_problems(routes)
        if problems:
            raise ValueError("\n".join(problems))
        return routes


# ---- behind a front proxy (issue #15) -----------------------------------------------------
# Every key of issue #15 is accepted by ``Config`` now (``front_proxy``, ``listen.tls``,
# ``listen.proxy_protocol``, ``headers.certificate_formats``, ``identity.identityplus.legacy``);
# the names below stay for the tests and callers that checked files against the extension.


#: ``listen.proxy_protocol`` is accepted by ``ListenConfig`` itself now
ProxiedListenConfig = ListenConfig


#: ``headers.certificate_formats`` is accepted by ``HeadersConfig`` itself now
HeadersWithFormats = HeadersConfig


class ConfigWithFrontProxy(Config):
    """``Config`` with the keys above and the rules that tie them together."""

    listen: ProxiedListenConfig = ProxiedListenConfig()
    headers: HeadersWithFormats = HeadersWithFormats()


# ---- loading ------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (YAML silently keeps the last)."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, env: dict[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; an unset VAR is a problem."""
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _ENV_REF.sub(sub, node)
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in ("list[...]",):
            continue
        else:
            out = _join(out, part)
    return out


def _problems_from(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc = _format_loc(tuple(err["loc"]))
        message = str(err["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        for line in message.split("\n"):
            if line.startswith("@"):
                sub, _, text = line[1:].partition(": ")
                where = f"{loc}{sub}" if sub.startswith("[") else _join(loc, sub)
                problems.append(f"{where}: {text}")
            else:
                problems.append(f"{loc or '<root>'}: {line}")
    return problems


def parse(
    data: Any,
    *,
    base_dir: Path,
    env: dict[str, str] | None = None,
    model: type[Config] = Config,
) -> Config:
    """Validate an already-parsed YAML document (against ``model``, a ``Config`` or one of its
    extensions); raises ``ConfigError`` with every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["<root>: the configuration must be a YAML mapping"])
    data = _interpolate(data, "", dict(os.environ) if env is None else env, problems)
    try:
        config = model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems.extend(_problems_from(exc))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def load(path: str | Path, *, env: dict[str, str] | None = None) -> Config:
    """Read and validate a configuration file; raises ``ConfigError`` with every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: configuration file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read configuration: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{file}: not valid YAML{where}: {problem}"]) from None
    return parse(data, base_dir=file.resolve().parent, env=env)
