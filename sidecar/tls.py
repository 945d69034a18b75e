"""TLS for the listener: the server context built from configuration, and the peer certificate.

Chain, validity and extended key usage of a client certificate are verified by OpenSSL during
the handshake (a server verifies with the ``sslclient`` purpose, which refuses a leaf whose EKU
lacks clientAuth); ``PeerCertificates`` then parses what passed, once per connection.
``TLSState`` holds the context new connections are accepted with (``tls_transport``: one context
for a connection's whole life). With several servers (``servers[]``) it holds one context per
server, each with its certificate and its ``client_certificate`` mode (OpenSSL decides from the
context a connection was made with whether the handshake asks for a certificate: switching
contexts in the servername callback switches the certificate only), and ``tls_transport``
reads the server name from the ClientHello (``sni``) before choosing one; the servername
callback checks OpenSSL read the same. A reload swaps in new contexts only when what they are
made of changed, and ``swap`` says whether what decides trust changed. Sessions are kept in
the process's cache, and with several workers also in a table they share, keyed by what
decides trust (``tls_sessions``); where that cannot be, in tickets whose keys are derived from
the process's secret (shared by the workers of one sidecar), what decides trust and the hour
(``tls_tickets``): a session resumes in any worker, but not across a trust change; a new
context has its own session cache (session ids), so no session id from before is resumed on it.
It also records the server name each connection asked for (``requested_server_name``).
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import hashlib
import secrets
import ssl
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import tls_sessions, tls_tickets
from .certs import ClientCert, read_certificates, read_private_key, to_pem
from .config import ServerConfig, TLSConfig
from .errors import CertificateError
from .hosts import ServerChoice, ServerNames
from .log import get_logger
from .tls_groups import GROUPS, restrict_groups

log = get_logger("sidecar.tls")

# Mozilla "intermediate" TLS 1.2 suites without DHE: forward secret AEAD only. TLS 1.3 suites
# are OpenSSL's defaults, which are all modern.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


class Fingerprint(NamedTuple):
    """What a server context is made of, as two digests."""

    #: the certificate chain the listener presents (its key goes with it)
    server: bytes
    #: everything that decides which clients are let in: the trust anchors (with what they
    #: are: client_ca or pinned), client_certificate and min_version
    trust: bytes


def server_context(config: TLSConfig) -> tuple[ssl.SSLContext, Fingerprint]:
    """A new server context for ``config``, and what it is made of; raises ``CertificateError``
    naming the file at fault."""
    return _context(config, config.certificate, config.key, config.client_certificate)


def listener_contexts(
    config: TLSConfig, servers: Sequence[ServerConfig] | None
) -> tuple[ssl.SSLContext | ServerContexts, Fingerprint]:
    """The listener's context (the short form, or one server), or one per server, chosen by
    SNI; and what they are made of. Raises ``CertificateError`` naming the file at fault."""
    if servers is None:
        return server_context(config)
    built = [
        _context(config, s.certificate, s.key, s.client_certificate or config.client_certificate)
        for s in servers
    ]
    if len(built) == 1:
        return built[0]
    server, trust = hashlib.sha256(), hashlib.sha256()
    for entry, (_, fingerprint) in zip(servers, built, strict=True):
        names = " ".join(entry.names).encode()
        server.update(names + b"\0" + fingerprint.server)
        # Which names reach which server's mode is part of trust: a name moved to another
        # server must not keep connections that server would have refused.
        trust.update(names + b"\0" + fingerprint.trust)
    contexts = ServerContexts(
        [context for context, _ in built],
        [ServerNames(s.names) for s in servers],
        # A ticket resumes only on the server (and trust) it was made for.
        [
            b" ".join(n.encode() for n in s.names) + b"\0" + f.trust
            for s, (_, f) in zip(servers, built, strict=True)
        ],
    )
    return contexts, Fingerprint(server.digest(), trust.digest())


def _context(
    config: TLSConfig, certificate: Path | None, key: Path | None, mode: str
) -> tuple[ssl.SSLContext, Fingerprint]:
    # Without a certificate (listen.tls: false: no handshake is ever made with this context)
    # the context still carries what decides trust: its fingerprint ends keep-alive
    # connections when trust changes, as with TLS.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    # One TLS 1.3 ticket per handshake, not OpenSSL's two: each costs a copy of the session
    # decoded again (the client's certificate with it), and a ticket here can be used again
    # (stateless, until the hour's key rotates), so a client opening parallel connections
    # needs no second one.
    ctx.num_tickets = 1
    _restrict_groups(ctx)
    chain = [] if certificate is None or key is None else _load_chain(ctx, certificate, key)
    trust = hashlib.sha256(f"{mode} {config.min_version}".encode())
    anchors = []
    for kind, paths in (("ca", config.client_ca), ("pinned", config.pinned_certificates)):
        for path in paths:
            for cert in read_certificates(path):
                anchors.append(cert)
                trust.update(kind.encode() + cert.public_bytes(serialization.Encoding.DER))
    if mode == "none":
        # A public site: the handshake asks for no certificate, so a browser shows no prompt.
        ctx.verify_mode = ssl.CERT_NONE
    else:
        if not anchors:
            raise CertificateError(
                "no client trust anchors (tls.client_ca, tls.pinned_certificates)"
            )
        try:
            ctx.load_verify_locations(cadata=to_pem(anchors))
        except ssl.SSLError as exc:
            raise CertificateError(
                f"trust anchors rejected by OpenSSL: {exc.reason or exc}"
            ) from None
        if config.pinned_certificates:
            # PKI-less mode: a pinned certificate is a trust anchor of its own, no chain needed.
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == "required" else ssl.CERT_OPTIONAL
    server = hashlib.sha256(b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain))
    return ctx, Fingerprint(server.digest(), trust.digest())


_groups_reported = False


def _restrict_groups(ctx: ssl.SSLContext) -> None:
    global _groups_reported
    problem = restrict_groups(ctx)
    if problem is not None and not _groups_reported:
        _groups_reported = True
        log.warning("tls_groups_not_restricted", groups=GROUPS, reason=problem)


def _load_chain(ctx: ssl.SSLContext, certificate: Path, key: Path) -> list[x509.Certificate]:
    chain = read_certificates(certificate)
    try:
        load_chain(ctx, chain, read_private_key(key))
    except ssl.SSLError as exc:
        raise CertificateError(
            f"{certificate}: certificate and key rejected: {exc.reason or exc}"
        ) from None
    return chain


def load_chain_files(ctx: ssl.SSLContext, certificate: Path, key: Path) -> x509.Certificate:
    """Load a chain file and a key file, each PEM or DER; returns the leaf.

    Raises ``CertificateError`` for unreadable files, ``ssl.SSLError`` when OpenSSL refuses them.
    """
    chain = read_certificates(certificate)
    load_chain(ctx, chain, read_private_key(key))
    return chain[0]


def load_chain(
    ctx: ssl.SSLContext, chain: Sequence[x509.Certificate], key: PrivateKeyTypes
) -> None:
    """Load a certificate chain and its key into ``ctx``.

    The ssl module loads keys from files only: the key goes through a private temporary file,
    encrypted with a one-time password, removed as soon as it is loaded.
    """
    once = secrets.token_bytes(32)
    pem = to_pem(list(chain)).encode("ascii") + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(once),
    )
    with tempfile.NamedTemporaryFile(prefix="sidecar-", suffix=".pem") as handle:
        handle.write(pem)
        handle.flush()
        ctx.load_cert_chain(handle.name, password=once)


# The server name (SNI) of each connection, by its SSLObject: the one the servername callback
# gets is the one the transport gives as its "ssl_object". Weak, so it goes with the connection.
_SERVER_NAMES: weakref.WeakKeyDictionary[object, str | None] = weakref.WeakKeyDictionary()


def verified_chain(ssl_obj: object | None) -> tuple[bytes, ...]:
    """The certificates OpenSSL verified a client's with, after the leaf and without the trust
    anchor, as DER (the chain headers upstream); () when unknown. Python 3.13 has it as
    ``SSLObject.get_verified_chain``; 3.10 to 3.12 have it on the inner ``_ssl`` object."""
    if ssl_obj is None:
        return ()
    try:
        public = getattr(ssl_obj, "get_verified_chain", None)
        if public is not None:
            ders = [bytes(der) for der in public()]
        else:
            inner = getattr(getattr(ssl_obj, "_sslobj", None), "get_verified_chain", None)
            if inner is None:
                return ()
            ders = [cert.public_bytes(_ssl.ENCODING_DER) for cert in inner()]
    except (ssl.SSLError, ValueError, TypeError, AttributeError):
        return ()
    return tuple(ders[1:-1])


def requested_server_name(ssl_obj: object | None) -> str | None:
    """The server name a connection's client sent in its TLS handshake (SNI), or None when it
    sent none (or the handshake was not made by a ``TLSState`` context)."""
    if ssl_obj is None:
        return None
    try:
        return _SERVER_NAMES.get(ssl_obj)
    except TypeError:  # not weakly referenceable: nothing was recorded for it
        return None


def _record(ssl_obj: ssl.SSLObject, server_name: str | None) -> None:
    # Not weakly referenceable: not recorded, and the request is judged on its Host alone.
    with contextlib.suppress(TypeError):
        _SERVER_NAMES[ssl_obj] = server_name


class ServerContexts:
    """One context per server (``servers[]``), chosen by the server name a client asks for:
    its exact name, else a ``*.`` wildcard covering it, else the first server."""

    def __init__(
        self,
        contexts: Sequence[ssl.SSLContext],
        names: Sequence[ServerNames],
        labels: Sequence[bytes] | None = None,
    ) -> None:
        self.contexts = tuple(contexts)
        #: what each context's ticket keys are derived from (``tls_tickets``)
        self.labels = (
            tuple(labels) if labels is not None else tuple(b"%d" % i for i in range(len(contexts)))
        )
        self._choice = ServerChoice(names)
        for context in self.contexts:
            context.sni_callback = self._check

    @property
    def default(self) -> ssl.SSLContext:
        return self.contexts[0]

    def for_name(self, server_name: str | None) -> ssl.SSLContext:
        return self.contexts[self._choice.index(server_name)]

    def _check(
        self, ssl_obj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        """Fails closed: the handshake goes on only when the server name OpenSSL read chooses
        the context the connection was made with (``sni`` read the same ClientHello)."""
        _record(ssl_obj, server_name)
        if ssl_obj.context is not self.for_name(server_name):
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None


class TLSState:
    """The context new connections are accepted with (one per server with ``servers[]``),
    and what it is made of.

    A connection keeps the context it was accepted with: its certificate, trust store,
    verification mode, session cache and ticket keys. OpenSSL calls the servername callback
    for every handshake (with or without SNI) with the connection's ``SSLObject``; it records
    the name the client asked for (``requested_server_name``).
    """

    def __init__(
        self,
        context: ssl.SSLContext | ServerContexts,
        fingerprint: Fingerprint,
        *,
        ticket_secret: bytes | None = None,
        session_cache: int = tls_tickets.SESSION_CACHE_SIZE,
        shared_sessions: tls_sessions.SessionStore | None = None,
    ) -> None:
        self.current: ssl.SSLContext
        #: one context per server, or None when there is one context (``current``)
        self.servers: ServerContexts | None = None
        #: the sidecar's only process (no supervisor's secret): it resumes sessions from its
        #: own cache, unless ``tls.session_cache`` is 0
        self._alone = ticket_secret is None
        #: what the ticket keys are derived from: the supervisor's, shared by its workers
        self._secret = tls_tickets.new_secret() if ticket_secret is None else ticket_secret
        #: that cache's size (``tls.session_cache``)
        self._cache_size = session_cache
        #: a supervisor's workers: the table they share their sessions in (``tls_sessions``);
        #: without one they use tickets
        self._shared = shared_sessions if not self._alone else None
        self._epoch = tls_tickets.epoch()
        self._resumption_reported = False
        #: some context resumes from stateless tickets (their keys rotate hourly)
        self._tickets = False
        self._rotation: asyncio.TimerHandle | None = None
        self.fingerprint = fingerprint
        self._install(context)

    def _install(self, context: ssl.SSLContext | ServerContexts) -> None:
        if isinstance(context, ServerContexts):
            self.current, self.servers = context.default, context
        else:
            context.sni_callback = self._select
            self.current, self.servers = context, None
        self._set_resumption()

    def _keyed(self) -> list[tuple[ssl.SSLContext, bytes]]:
        servers = self.servers
        if servers is None:
            return [(self.current, self.fingerprint.trust)]
        return list(zip(servers.contexts, servers.labels, strict=True))

    def _caching(self) -> bool:
        return (self._alone or self._shared is not None) and self._cache_size > 0

    def _set_resumption(self) -> None:
        if not self._tickets:  # keys made now are this hour's, as every worker's (else the
            self._epoch = tls_tickets.epoch()  # rotation keeps them current)
        caching = self._caching()
        shared = self._shared
        self._tickets = False
        for context, label in self._keyed():
            if caching:
                problem = tls_tickets.use_session_cache(context, self._cache_size)
                event = "tls_session_cache_not_sized"
                if problem is None:
                    problem = tls_sessions.bind(context, label, shared)
                    event = "tls_sessions_not_shared" if shared else "tls_session_age_not_capped"
                    if problem is None and shared is not None:
                        self._report("tls_sessions_keep_certificates", tls_sessions.peerless())
                self._report(event, problem)
                if shared is None or problem is None:
                    continue
                # several workers, and a worker's cache alone would resume one time in N:
                # tickets instead
            tls_sessions.unbind(context)
            context.options &= ~ssl.OP_NO_TICKET
            self._tickets = True
            problem = tls_tickets.install(
                context, tls_tickets.derive(self._secret, label, self._epoch)
            )
            self._report("tls_ticket_keys_not_shared", problem)

    def _report(self, event: str, problem: str | None) -> None:
        if problem is not None and not self._resumption_reported:
            self._resumption_reported = True
            log.warning(event, reason=problem)

    def start_rotation(self) -> None:
        """Rotate the ticket keys at every epoch boundary (on the running loop) until
        ``stop_rotation``; every worker rotates at the same wall-clock time. Nothing to
        rotate when sessions are resumed from the process's cache."""
        self.stop_rotation()
        if not self._tickets:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, tls_tickets.next_rotation() - time.time())
        self._rotation = loop.call_later(delay + 0.01, self._rotate)

    def _rotate(self) -> None:
        self._rotation = None
        self.rotate_tickets()
        self.start_rotation()

    def rotate_tickets(self, now: float | None = None) -> None:
        """Set the keys of the epoch ``now`` is in (no change within one epoch)."""
        current = tls_tickets.epoch(now)
        if current != self._epoch and self._tickets:
            self._epoch = current
            self._set_resumption()

    def stop_rotation(self) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
            self._rotation = None

    def _select(self, ssl_obj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        _record(ssl_obj, server_name)

    def size_session_cache(self, size: int) -> None:
        """``tls.session_cache`` after a reload, applied to the contexts in use: a new size
        (the cache keeps what fits), or the cache turned on or off for the next handshakes."""
        if size != self._cache_size:
            self._cache_size = size
            self._set_resumption()
            if not self._tickets:
                self.stop_rotation()
            elif self._rotation is None:
                self.start_rotation()

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a connection whose ClientHello asked for ``server_name``."""
        servers = self.servers
        return self.current if servers is None else servers.for_name(server_name)

    def swap(self, context: ssl.SSLContext | ServerContexts, fingerprint: Fingerprint) -> bool:
        """New connections use ``context``, unless it is made of what the current one is made
        of (then sessions keep being resumed). True when what decides trust changed: then
        connections made before must not be trusted with another request."""
        if fingerprint == self.fingerprint:
            return False
        trust_changed = fingerprint.trust != self.fingerprint.trust
        self.fingerprint = fingerprint
        self._install(context)
        return trust_changed


class PeerCertificates:
    """Parses peer certificates, remembering recent ones so a reconnecting client costs a lookup."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._parsed: OrderedDict[bytes, ClientCert] = OrderedDict()
        self._max = max_entries
        #: per context (a reload that changes trust makes new ones), the chain OpenSSL
        #: verified each recent certificate with (``chain_of``)
        self._chains: weakref.WeakKeyDictionary[
            ssl.SSLContext, OrderedDict[bytes, tuple[bytes, ...]]
        ] = weakref.WeakKeyDictionary()
        #: the chain above a certificate, rebuilt from the trust anchors (the app sets it:
        #: ``Revocation.chain_above``); None: not rebuilt
        self.chains_from: Callable[[ClientCert], tuple[bytes, ...] | None] | None = None

    def chain_of(self, ssl_obj: ssl.SSLObject | None, cert: ClientCert) -> tuple[bytes, ...]:
        """The certificates above ``cert`` that it was verified with (``verified_chain``), for
        the chain headers. A connection that resumed a session verified nothing, and OpenSSL
        keeps no chain in a session: the chain this worker last verified ``cert`` with in
        this context, else the one rebuilt from the trust anchors (a session another worker
        made), else none (not known for certain: an intermediate only the client sent, or
        two anchors that could issue one certificate)."""
        if ssl_obj is None:
            return ()
        context = ssl_obj.context
        known = self._chains.get(context)
        if not ssl_obj.session_reused:
            chain = verified_chain(ssl_obj)
            if known is None:
                known = self._chains[context] = OrderedDict()
            known[cert.der] = chain
            known.move_to_end(cert.der)
            if len(known) > self._max:
                known.popitem(last=False)
            return chain
        remembered = known.get(cert.der) if known is not None else None
        if remembered is not None:
            return remembered
        try:
            rebuilt = self.chains_from(cert) if self.chains_from is not None else None
        except Exception:  # headers without a chain rather than a connection dropped
            rebuilt = None
        return rebuilt if rebuilt is not None else ()

    def from_ssl_object(self, ssl_obj: ssl.SSLObject | None) -> ClientCert | None:
        """The verified peer certificate of a connection, or None when it presented none."""
        if ssl_obj is None:
            return None
        der = ssl_obj.getpeercert(binary_form=True)
        if not der:
            if not ssl_obj.session_reused:
                return None
            # a session from the workers' table carries the certificate as bytes
            der = tls_sessions.resumed_peer(ssl_obj)
            if not der:
                return None
        parsed = self._parsed.get(der)
        if parsed is not None:
            self._parsed.move_to_end(der)
            return parsed
        parsed = ClientCert.from_der(der)
        self._parsed[der] = parsed
        if len(self._parsed) > self._max:
            self._parsed.popitem(last=False)
        return parsed

    def by_sha256(self, sha256: str) -> ClientCert | None:
        """A client certificate seen recently, by its fingerprint (for ``explain``, and the
        admin listener's trust reports, which name certificates so), or None."""
        for cert in list(self._parsed.values()):
            if cert.sha256 == sha256:
                return cert
        return None

    def expiring_within(self, seconds: float, now: float | None = None) -> int:
        """How many recently seen client certificates expire within ``seconds`` (for a gauge)."""
        limit = (time.time() if now is None else now) + seconds
        return sum(1 for cert in list(self._parsed.values()) if cert.not_after_ts <= limit)
