"""Assembly and lifecycle of one worker: build from a ``Config``, start, reload, drain, stop.

``Sidecar.start`` builds everything that needs the event loop (the forwarder, the identity
backend behind its verdict cache, the gateway, the TLS listener, the admin listener). ``reload`` builds a
whole new ``Plan`` and TLS context from the file and swaps them in; a reload that fails keeps
the running state and says why. ``shutdown`` drains: readiness fails at once, the listener
closes after the drain delay, in-flight requests get the grace period. The trust reporter
and the status page's collectors live as long as the process (a reload reconfigures them).
Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from . import BUILD, __version__, log, status
from .admin import ADMIN_HEADER, Purge, Readiness, admin_app
from .admin_reports import report_view
from .certs import ClientCert, file_signature, normalize_fingerprint, read_certificates
from .config import Config, ConfigError, IdentityConfig, ReportsConfig, load
from .errors import CertificateError, IdentityUnavailable
from .explain import Assumption, Question, explain
from .fallback.forward import FallbackForwarder
from .frontproxy import FrontProxy
from .gateway import Gateway
from .headers import HeaderRules, ResponseRules
from .identity import Backend, Verdict
from .identity.cache import VerdictCache
from .identity.issuers import issuer_risk
from .identity.legacy import Legacy
from .identity.reports import Community, Reporter, Target
from .identity.static import StaticBackend
from .listener import Listener
from .metrics import Metrics
from .observe import Observations
from .plan import Identity, Plan
from .revocation import report as revocation_report
from .revocation.admin import deny_routes, read_runtime
from .revocation.client import HttpTransport
from .revocation.gate import Revocation, prepare
from .revocation.watch import WatchedBackend
from .servers import Servers, build_servers
from .tls import PeerCertificates, TLSState, listener_contexts
from .tls_sessions import SessionStore

#: while the identity backend reports its own credentials broken, readiness asks it this often
_PING_EVERY = 2.0


def build_policy(config: Config) -> Servers:
    """The servers and their routes (``servers``); the short form is one server whose names
    are ``listen.server_names`` or the server certificate's (read again on reload)."""
    return build_servers(config)


def build_backend(config: IdentityConfig) -> Backend:
    """The configured identity backend (not yet started)."""
    if config.backend == "identityplus":
        from .identity.identityplus import IdentityPlusBackend

        assert config.identityplus is not None
        return IdentityPlusBackend(config.identityplus)
    if config.backend == "http":
        from .identity.http import HttpBackend

        assert config.http is not None
        return HttpBackend(config.http)
    return StaticBackend(config.static)


def build_cache(
    config: IdentityConfig, *, wrap: Callable[[Backend], Backend] | None = None
) -> VerdictCache:
    """The verdict cache in front of the configured backend (``wrap``ped, when given), with
    its shared level in Redis when ``identity.cache.shared`` is set (not yet started)."""
    backend = build_backend(config)
    if wrap is not None:
        backend = wrap(backend)
    shared = None
    if config.cache.shared is not None:
        from .identity.shared.store import SharedCache

        shared = SharedCache(
            config.cache.shared,
            namespace=shared_namespace(config),
            owner_wait=backend_timeout(config),
        )
    return VerdictCache(backend, config.cache, shared=shared)


def own_backend(backend: object) -> object:
    """The identity backend itself, out of revocation's ``WatchedBackend`` when it watches
    it: what asks of a backend by its class (static, Identity Plus) must look here."""
    return backend.backend if isinstance(backend, WatchedBackend) else backend


def build_legacy(config: IdentityConfig, cache: VerdictCache) -> Legacy | None:
    """Identity Plus HTTP legacy for ``cache``'s backend, when ``identityplus.legacy`` is on."""
    section = config.identityplus
    if section is None or not section.legacy:
        return None
    from .identity.identityplus import IdentityPlusBackend

    backend = own_backend(cache.backend)
    assert isinstance(backend, IdentityPlusBackend)  # config: legacy needs identityplus
    return Legacy(backend, section.session_key_bytes(), lifetime=config.cache.ttl)


def shared_namespace(config: IdentityConfig) -> str:
    """Where this configuration's verdicts live in the shared cache: the backend's name and a
    digest of its section, so that replicas that would not give the same verdicts (another
    backend, other static users, a rollout in progress) never read each other's."""
    section = {
        "static": config.static,
        "identityplus": config.identityplus,
        "http": config.http,
    }[config.backend]
    text = section.model_dump_json() if section is not None else ""
    return f"{config.backend}.{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def backend_timeout(config: IdentityConfig) -> float:
    """How long one backend call may take: what a replica waits for another's."""
    if config.backend == "http" and config.http is not None:
        return config.http.timeout
    if config.backend == "identityplus" and config.identityplus is not None:
        return config.identityplus.timeout
    return 1.0  # static: no I/O


def build_rules(config: Config) -> HeaderRules:
    return HeaderRules(
        certificate_header=config.headers.certificate,
        userinfo_header=config.headers.userinfo,
        # a front proxy's X-Forwarded-* are believed as a trusted proxy's are
        trusted_proxies=tuple(
            dict.fromkeys((*config.trusted_proxies, *config.front_proxy.networks()))
        ),
        strip=config.headers.strip,
        certificate_formats=config.headers.certificate_formats,
    )


#: what each message a worker could not give its supervisor leaves undone
_NOT_RELAYED = {
    "verdict_drop_not_relayed": "other workers keep this certificate's verdict until its ttl",
    "deny_sent_not_relayed": (
        "a worker the supervisor restarts sends this entry to the fleet again, even if "
        "another replica took it off meanwhile"
    ),
}


def _proxy_from(config: Config) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """The networks PROXY protocol headers are read from (None: listen.proxy_protocol off)."""
    return config.front_proxy.networks() if config.listen.proxy_protocol else None


# Keys a running process cannot change: the sockets are bound. (All of tls, and
# limits.handshake_timeout, apply to new connections: each is accepted with the context and
# the limits current then. listen.server_names is not one either: it is part of the plan.)
_RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("listen", lambda c: c.listen.model_copy(update={"server_names": None})),
    ("admin", lambda c: c.admin),
    ("log", lambda c: c.log),
)


class Sidecar:
    """The TLS listener, the gateway (``handler``), the admin listener and everything they call,
    for one process."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        admin_socket: Path | None = None,
        supervisor_socket: Path | None = None,
        ticket_secret: bytes | None = None,
        shared_sessions: SessionStore | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.log = log.get_logger("sidecar")
        self.reuse_port = reuse_port
        #: a worker under a supervisor serves its admin listener on this Unix socket instead
        self.admin_socket = admin_socket
        #: ... and tells its supervisor there which verdicts every worker must drop
        self.supervisor_socket = supervisor_socket
        self.started = time.time()
        #: the last reload: when, why, and how it went (the status page)
        self.last_reload: dict[str, object] | None = None
        self.observations = Observations()
        self.reporter = Reporter(
            _reports_config(config),
            backend=self._community,
            forget=lambda target: self._forget_everywhere(
                target.sha256, target.serial, here=True, why="a trust report"
            ),
            metrics=self.metrics,
        )
        self._certificates: dict[str, Any] = {}
        self.readiness = Readiness()
        #: resumption: the process's own session cache (tls.session_cache), with several
        #: workers also the supervisor's table of sessions, or else tickets from its secret
        self.tls = TLSState(
            *listener_contexts(config.tls, config.servers),
            ticket_secret=ticket_secret,
            session_cache=config.tls.session_cache,
            shared_sessions=shared_sessions,
        )
        self.peer_certs = PeerCertificates()
        #: long-lived: a reload applies a new configuration to it, run-time state stays
        self.revocation = Revocation(
            prepare(config.tls),
            transports=HttpTransport,
            lifetime=self.metrics.client_cert_lifetime.observe,
        )
        #: a resumed connection's chain headers: rebuilt from the anchors revocation reads
        self.peer_certs.chains_from = self.revocation.chain_above
        self.revocation.forget = self._drop_here
        self.revocation.on_revoked.append(self._revoked_elsewhere)
        self._client_cert_expiry = float("nan")
        #: purges on their way to the other replicas (``_forget_everywhere``)
        self._fleet: set[asyncio.Task[None]] = set()
        #: the gateway every request goes through
        self.handler: Gateway | None = None
        self._server: asyncio.Server | None = None
        self._listener: Listener | None = None
        self._admin: web.AppRunner | None = None
        self._admin_site: web.BaseSite | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._retired: dict[asyncio.Task[None], tuple[Plan, Plan]] = {}
        self._ping: asyncio.Task[None] | None = None
        self._last_ping = float("-inf")
        self._watched = file_signature(watched_files(config, config_path))

    # ---- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on failure (a port in use) close what was started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0, quiet=True)
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        plan = await self._build_plan(self.config)
        self.handler = Gateway(
            plan,
            metrics=self.metrics,
            logger=self.log,
            access_log=self.config.log.level in ("debug", "info"),
            reports=self.reporter,
            observations=self.observations,
        )
        self.metrics.bind_cache(self._cache_stats)
        self.metrics.bind_shared_cache(self._shared_stats)
        self.metrics.trust_reports_pending.set_function(lambda: self.reporter.pending)
        self.metrics.client_certs_expiring.set_function(
            lambda: self.peer_certs.expiring_within(7 * 86400)
        )
        self.metrics.agent_cert_expiry.set_function(self._agent_expiry)
        self.metrics.bind_revocation(self.revocation)
        self._observe_certificates(self.config)
        # a worker the supervisor (re)started: the run-time deny entries it keeps
        restored = self._restore_denied({})
        self.revocation.start()
        await self._start_admin()
        # Read again now that the supervisor's relays reach this worker: what it changed
        # meanwhile (it writes the file before it relays) holds here too.
        self._restore_denied(restored)
        self._listener = Listener(
            self.handler,
            tls=self.tls,
            limits=self.config.limits,
            peer_certs=self.peer_certs,
            metrics=self.metrics,
            plain=not self.config.listen.tls,
            proxy_from=_proxy_from(self.config),
        )
        listen = self.config.listen
        kwargs: dict[str, Any] = {"reuse_port": True} if self.reuse_port else {}
        # Plain TCP: the TLS layer is our own (tls_transport), one protocol per accepted socket.
        self._server = await loop.create_server(
            self._listener,
            host=listen.host,
            port=listen.port,
            backlog=1024,
            family=socket.AF_UNSPEC,
            **kwargs,
        )
        self.readiness.started = True
        self.tls.start_rotation()
        if self.config_path is not None:  # it obeys reload.watch as reloads change it
            self._watcher = asyncio.create_task(self._watch())
        self.log.info(
            "listening",
            address=f"{'https' if listen.tls else 'http'}://{listen.host}:{self.port}",
            admin=str(self.admin_socket)
            if self.admin_socket
            else f"http://{self.config.admin.host}:{self.admin_port}",
            upstream=self.config.upstream.url,
            backend=self.config.identity.backend,
            pid=os.getpid(),
            build=BUILD.describe(),
        )
        if BUILD.note is not None:
            self.log.warning("compiled_build_not_used", reason=BUILD.note)
        self._warn(self.config)

    async def _build_plan(
        self, config: Config, previous: tuple[Plan, Config] | None = None
    ) -> Plan:
        """A plan for ``config``; the running upstream client and verdict cache are kept when
        their configuration did not change (a reload must not empty a warm cache for nothing).
        If any step fails (or is cancelled), what this call started is closed again."""
        built: list[Callable[[], Awaitable[None]]] = []
        try:
            if previous is not None and _same_upstream(config, previous[1]):
                upstream = previous[0].upstream
            else:
                upstream = FallbackForwarder(
                    config.upstream,
                    limits=config.limits,
                    responses=ResponseRules(config.headers.reports.names()),
                )
                built.append(upstream.close)
                await upstream.start()
            if previous is not None and config.identity == previous[1].identity:
                identity: Identity = previous[0].identity
                # the same flow: references used before the reload stay used
                legacy = previous[0].legacy
            else:
                cache = build_cache(
                    config.identity, wrap=lambda b: WatchedBackend(b, self.revocation)
                )
                built.append(cache.close)
                if cache.shared is not None:
                    # before it connects: the connection loads the fleet's deny entries
                    cache.shared.attach_deny(self.revocation)
                    if self.supervisor_socket is not None:
                        cache.shared.on_shared_late = self._denial_sent_late
                await cache.start()
                identity = cache
                legacy = build_legacy(config.identity, cache)
            return Plan(
                policy=build_policy(config),
                identity=identity,
                upstream=upstream,
                rules=build_rules(config),
                max_header_block=config.limits.max_header_block,
                revocation=self.revocation,
                legacy=legacy,
                front=FrontProxy(config.front_proxy, config.tls)
                if config.front_proxy.trusted
                else None,
            )
        except BaseException:
            for close in reversed(built):
                await close()
            raise

    async def _start_admin(self) -> None:
        app = admin_app(
            metrics=self.metrics,
            readiness=self.readiness,
            purge=self._purge_fn,
            config=self.config.admin,
            explain=self._explain,
            status=self.status_document,
            reports=report_view(
                self.reporter,
                seen=self.peer_certs.by_sha256,
                # a worker's socket is reached only by its supervisor, which checks the peer
                allowed=None if self.admin_socket is not None else self._reports_from,
            ),
        )
        self.readiness.checks.append(self._identity_problem)
        self.readiness.checks.append(self.revocation.problem)
        deny_routes(app, self.revocation, self._deny_fleet)
        self._admin = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin.setup()
        if self.admin_socket is not None:
            self._admin_site = web.UnixSite(self._admin, str(self.admin_socket))
        else:
            self._admin_site = web.TCPSite(
                self._admin, self.config.admin.host, self.config.admin.port
            )
        await self._admin_site.start()

    def _cache(self) -> VerdictCache | None:
        if self.handler is None:
            return None
        identity = self.handler.plan.identity
        return identity if isinstance(identity, VerdictCache) else None

    def _cache_stats(self) -> object | None:
        cache = self._cache()
        return cache.stats if cache is not None else None

    def _purge_fn(self) -> Purge | None:
        cache = self._cache()
        return cache.purge_everywhere if cache is not None else None

    def _shared_stats(self) -> object | None:
        cache = self._cache()
        shared = cache.shared if cache is not None else None
        return getattr(shared, "stats", None)

    def _explain(
        self, question: Question, sha256: str | None, assumption: Assumption
    ) -> tuple[int, dict[str, object]]:
        """``GET /explain``: the running policy's answer, for a certificate that connected to
        this worker recently (by fingerprint), with the verdict the backend gives it now
        (static) or has cached for it."""
        if self.handler is None:
            return 503, {"error": "starting"}
        plan = self.handler.plan
        if sha256 is not None:
            cert = self.peer_certs.by_sha256(sha256)
            if cert is None:
                return 404, {
                    "error": "no client certificate with this SHA-256 connected to this worker "
                    "recently: ask sidecar explain --cert FILE"
                }
            question.cert = cert
        identity = plan.identity
        backend = own_backend(getattr(identity, "backend", None))

        def verdict_of(cert: ClientCert) -> tuple[Verdict | None, str]:
            if isinstance(backend, StaticBackend):
                return backend.lookup_now(cert), "the static backend"
            cached = identity.peek(cert)
            if cached is not None:
                return cached, "the verdict cached for it"
            return None, "no verdict is cached for it now (the identity backend would be asked)"

        answer = explain(
            plan.policy,
            question,
            verdict_of=verdict_of,
            enrol=identity.can_enrol,
            now=time.time(),
            assumption=assumption,
            revocation=self.revocation.status,
        )
        return 200, answer.as_dict()

    def _reports_from(self) -> tuple[Any, ...]:
        return self.config.admin.reports_from

    def _community(self) -> Community | None:
        """The Identity Plus backend trust reports are sent through, if that is the backend."""
        from .identity.identityplus import IdentityPlusBackend

        cache = self._cache()
        backend = own_backend(cache.backend) if cache is not None else None
        return backend if isinstance(backend, IdentityPlusBackend) else None

    async def _forget_everywhere(
        self, sha256: str | None, serial: int | None, *, here: bool, why: str
    ) -> None:
        """The one way a certificate's verdict is dropped beyond a single cache: after a trust
        report changed its profile (``here``), and after revocation found it revoked (not
        ``here``: revocation dropped it here already through ``_drop_here``, or the cache is
        storing the backend's refusal itself, which must stay). Here, if asked; in Redis and
        every replica through the shared cache, if there is one; here once more; and, for a
        report under a supervisor, in this host's other workers when the shared cache did not
        take it (none, or Redis unreachable), so that its next request asks again."""
        cache = self._cache()
        fleet: bool | None = None
        # by fingerprint when there is one (one entry), else every entry of the serial
        by_serial = None if sha256 is not None else serial
        if cache is not None:
            if here:
                cache.purge(sha256=sha256, serial=by_serial)
            shared = cache.shared
            if shared is not None:
                # Named by serial alone (a certificate this worker has not seen): Redis cannot
                # find it by serial, so the shared level starts over (as POST /cache/purge).
                key = normalize_fingerprint(sha256) if sha256 is not None else None
                fleet = await shared.publish_purge(sha256=key, serial=by_serial)
            # Once more here: a lookup that began after the first drop may have read the old
            # verdict from Redis before the shared purge deleted it (this replica does not
            # hear its own purge message).
            current = self._cache()
            if here and current is not None:
                current.purge(sha256=sha256, serial=by_serial)
            if fleet is False:
                self.log.warning(
                    "verdict_drop_not_shared",
                    cert_sha256=sha256,
                    cert_serial=f"{serial:X}" if serial is not None else None,
                    why=why,
                    reason="the shared cache is unavailable",
                    hint="other replicas, and Redis, keep this certificate's verdict until its ttl",
                )
        if here and serial is not None and self.supervisor_socket is not None and not fleet:
            # With the shared cache's purge the other workers heard it already (each is a
            # replica of its own there). Awaited: the report ends once every worker dropped it.
            # Not for revocation: the supervisor relays deny entries itself, every worker
            # checks CRLs and OCSP before any cached verdict, and a relay would also drop the
            # refusal this worker's cache is storing (PB 0004/0005).
            await self._tell_supervisor(Target(serial=serial, sha256=sha256))

    async def _tell_supervisor(self, target: Target) -> None:
        doc = {"sha256": target.sha256, "serial": str(target.serial)}
        await self._post_supervisor("/workers/forget", doc, "verdict_drop_not_relayed")

    async def _post_supervisor(self, path: str, doc: Mapping[str, str | None], event: str) -> None:
        """POST ``doc`` to the supervisor's socket; ``event`` is logged when it did not take it."""
        assert self.supervisor_socket is not None
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(self.supervisor_socket)),
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as session,
                session.post(
                    f"http://localhost{path}", json=doc, headers={ADMIN_HEADER: "1"}
                ) as resp,
            ):
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=await resp.text()
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            hint = _NOT_RELAYED[event]
            self.log.warning(event, cert_sha256=doc.get("sha256"), reason=repr(exc), hint=hint)

    def status_document(self) -> status.Document:
        """This process's status page (``status.document``)."""
        cache = self._cache()
        backend = cache.backend if cache is not None else None
        expiry = getattr(backend, "agent_expiry", None)
        handler = self.handler
        return status.document(
            version=__version__,
            build=BUILD.describe(),
            started=self.started,
            config_file=str(self.config_path) if self.config_path is not None else None,
            reload=self.last_reload,
            certs=self._certificates,
            # the default server's (the first of servers[]): its certificate is the listener's
            server_names=handler.plan.policy.servers[0].names.names if handler is not None else (),
            backend=self.config.identity.backend,
            credential_problem=getattr(backend, "credential_problem", None),
            agent_expiry=float(expiry) if isinstance(expiry, float) else None,
            observations=self.observations,
            reports=self.reporter.snapshot(),
            registry=self.metrics.registry,
            shared_cache=cache is not None and cache.shared is not None,
        )

    def _agent_expiry(self) -> float:
        cache = self._cache()
        expiry = getattr(cache.backend, "agent_expiry", None) if cache is not None else None
        # the Identity Plus agent's (reloaded as its files change), else the http backend's
        # client certificate (identity.http.certificate)
        return float(expiry) if isinstance(expiry, float) else self._client_cert_expiry

    def _drop_here(self, sha256: str | None, serial: int | None) -> None:
        """Drop, in this process, the cached verdicts of a certificate revocation found
        revoked (synchronously: before the next request is looked at)."""
        cache = self._cache()
        if cache is None or (sha256 is None and serial is None):
            return
        cache.purge(sha256=sha256, serial=serial)

    async def _deny_fleet(self, sha256: str, add: bool) -> str | bool | None:
        """A run-time deny entry added (``add``) or taken off here: the same on every replica
        through the shared cache, if there is one (None without): the name of the fleet it
        went to (of this cache, whatever a reload meanwhile made current), False when it could
        not (logged)."""
        cache = self._cache()
        shared = cache.shared if cache is not None else None
        if shared is None:
            return None
        told = await shared.publish_deny(sha256, add=add)
        if not told:
            self.log.warning(
                "deny_not_shared",
                cert_sha256=sha256,
                change="added" if add else "removed",
                reason="the shared cache is unavailable",
                hint=(
                    "sent to every replica when Redis answers"
                    if add
                    else "the other replicas keep it, and this one takes the fleet's list "
                    "again when Redis answers: repeat the call then"
                ),
            )
        return shared.fleet_id if told else False

    def _revoked_elsewhere(self, sha256: str, why: str) -> None:
        """Revocation found ``sha256`` revoked (a deny entry, an OCSP answer, an Identity Plus
        ``PB 0004``/``PB 0005``): every other replica drops its cached verdict too, through
        ``_forget_everywhere``. Without a shared cache, others notice at their next lookup."""
        cache = self._cache()
        if cache is None or cache.shared is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._forget_everywhere(sha256, None, here=False, why=why)
        )
        self._fleet.add(task)
        task.add_done_callback(self._fleet.discard)

    def _restore_denied(self, before: Mapping[str, bool]) -> dict[str, bool]:
        """Deny what the supervisor's list holds (``revocation.admin.read_runtime``) and
        ``before`` did not, and take off what ``before`` held and the list no longer does; the
        list's entries, each with whether it was sent to this worker's fleet. With a shared
        cache an entry sent there counts as the fleet's (``SharedCache.restore_denied``); one
        ``before`` had as sent that the list now has as unsent was denied again since (a new
        POST): denied here and sent. Nothing without a supervisor."""
        if self.admin_socket is None:
            return dict(before)
        runtime = read_runtime(self.admin_socket.parent)
        cache = self._cache()
        shared = cache.shared if cache is not None else None
        listed = {
            sha256: shared is not None and runtime.sent.get(sha256) == shared.fleet_id
            for sha256 in runtime.denied
        }
        for sha256 in sorted(set(before) - set(listed)):
            if shared is None or shared.forget_restored(sha256):
                self.revocation.allow(sha256)
        for sha256, sent in listed.items():
            was = before.get(sha256)
            if was is not None and (sent or not was):
                continue  # as read before (or now sent: it goes to the fleet either way)
            if shared is None:
                self.revocation.deny(sha256, announce=False)
            else:
                shared.restore_denied(sha256, sent=sent)
        return listed

    def _denial_sent_late(self, sha256: str, fleet_id: str) -> None:
        """A deny entry made while the shared cache was unavailable reached the fleet: the
        supervisor's list says so, so that a worker it restarts counts the entry as the
        fleet's (one another replica takes off later then goes, instead of coming back)."""
        doc = {"sha256": sha256, "fleet": fleet_id}
        task = asyncio.get_running_loop().create_task(
            self._post_supervisor("/workers/deny-sent", doc, "deny_sent_not_relayed")
        )
        self._fleet.add(task)
        task.add_done_callback(self._fleet.discard)

    def _identity_problem(self) -> str | None:
        cache = self._cache()
        backend = cache.backend if cache is not None else None
        problem = getattr(backend, "credential_problem", None)
        if not problem:
            return None
        # Nothing else would notice a fixed credential: an unready process gets no visitors.
        ping = getattr(backend, "ping", None)
        now = asyncio.get_running_loop().time()
        if ping is not None and self._ping is None and now - self._last_ping >= _PING_EVERY:
            self._last_ping = now
            self._ping = asyncio.create_task(self._run_ping(ping))
        return f"identity backend credentials: {problem}"

    async def _run_ping(self, ping: Callable[[], Awaitable[None]]) -> None:
        try:
            await ping()
        except IdentityUnavailable as exc:
            self.log.warning("identity_ping_failed", reason=exc.reason, code=exc.code)
        finally:
            self._ping = None

    @property
    def port(self) -> int:
        """The bound TLS port (useful when configured as 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def admin_port(self) -> int:
        assert self._admin_site is not None
        sockets = getattr(self._admin_site._server, "sockets", None)  # asyncio's or uvloop's Server
        assert sockets
        return int(sockets[0].getsockname()[1])

    # ---- reload ---------------------------------------------------------------------------

    async def reload(self, cause: str = "SIGHUP") -> bool:
        """Load the configuration file again and swap in the new state; False keeps the old."""
        if self.config_path is None:
            self.log.warning("reload_skipped", cause=cause, reason="no configuration file")
            return False
        async with self._reload_lock:
            if self.readiness.draining:
                self.log.warning("reload_skipped", cause=cause, reason="shutting down")
                return False
            return await self._reload(cause)

    async def _reload(self, cause: str) -> bool:
        assert self.handler is not None and self.config_path is not None
        old = self.config
        previous = self.handler.plan
        try:
            new = await asyncio.to_thread(load, self.config_path)
            context, fingerprint = await asyncio.to_thread(listener_contexts, new.tls, new.servers)
            revocation = await asyncio.to_thread(prepare, new.tls)
            plan = await self._build_plan(_as_running(new, old), (previous, old))
        except ConfigError as exc:
            return self._reload_failed(cause, exc.problems)
        except (CertificateError, ssl.SSLError, OSError) as exc:
            return self._reload_failed(cause, [str(exc)])
        except Exception as exc:  # a bug rather than the file: keep the running state all the same
            return self._reload_failed(cause, [f"unexpected error: {exc!r}"], exc=exc)
        if self.readiness.draining:
            # stop() began while this was building: it closes only the plan it knows of.
            await _close_plan(plan, keep=previous)
            self.log.warning("reload_skipped", cause=cause, reason="shutting down")
            return False
        for key, get in _RESTART_ONLY:
            if get(new) != get(old):
                self.log.warning("reload_needs_restart", key=key, reason="kept the running value")
        new = _as_running(new, old)
        self.tls.size_session_cache(new.tls.session_cache)
        trust_changed = self.tls.swap(context, fingerprint)
        if trust_changed and self._listener is not None:
            self._listener.retire()  # sessions from before the trust change serve no request
        self.revocation.apply(revocation)
        self.handler.plan = plan
        if self._listener is not None:
            self._listener.apply_limits(new.limits)
            self._listener.proxy_from = _proxy_from(new)  # for new connections
        self.config = new
        self.reporter.apply(_reports_config(new))
        self._observe_certificates(new)
        self._retire(previous, plan, delay=new.shutdown.grace_period)
        self._watched = file_signature(watched_files(new, self.config_path))
        self.metrics.reloads.labels("success").inc()
        self.last_reload = {"time": time.time(), "cause": cause, "result": "success"}
        self.log.info(
            "reloaded",
            cause=cause,
            users=len(new.identity.static.users),
            routes=len(new.routes),
            tls_trust_changed=trust_changed,
        )
        self._warn(new)
        return True

    def _reload_failed(
        self, cause: str, problems: list[str], *, exc: BaseException | None = None
    ) -> bool:
        for problem in problems:
            self.log.error("reload_failed", cause=cause, problem=problem, exc_info=exc)
        self.metrics.reloads.labels("failure").inc()
        self.last_reload = {
            "time": time.time(),
            "cause": cause,
            "result": "failure",
            "problems": problems[:20],
        }
        return False

    def _warn(self, config: Config) -> None:
        """Say the risks a valid configuration leaves open (as check-config does)."""
        try:
            risk = issuer_risk(config.tls, config.identity)
        except CertificateError:  # a file gone since it was loaded: the next reload says so
            return
        if risk is not None:
            self.log.warning("identityplus_issuers_missing", risk=risk)
        try:
            for problem in revocation_report.warnings(config.tls):
                self.log.warning("revocation_configuration", problem=problem)
        except CertificateError:
            return

    def _retire(self, old: Plan, new: Plan, *, delay: float) -> None:
        """Close what ``new`` does not reuse, once requests that started with ``old`` had time to end."""

        async def later() -> None:
            await asyncio.sleep(delay)
            await _close_plan(old, keep=new)

        task = asyncio.create_task(later())
        self._retired[task] = (old, new)
        task.add_done_callback(lambda t: self._retired.pop(t, None))

    async def _watch(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(self.config.reload.interval)
            if not self.config.reload.watch:
                continue
            if file_signature(watched_files(self.config, self.config_path)) == self._watched:
                continue
            # Decided again under the lock: a reload that ran meanwhile (a SIGHUP, or one that
            # turned reload.watch off) has read the files and set what is watched.
            async with self._reload_lock:
                if self.readiness.draining or not self.config.reload.watch:
                    continue
                current = file_signature(watched_files(self.config, self.config_path))
                if current != self._watched:
                    self._watched = current
                    await self._reload("file changed")

    def _observe_certificates(self, config: Config) -> None:
        """The expiry gauges: the server certificate, every trust anchor, and the identity
        backend's client certificate (the Identity Plus agent's is read from the backend)."""
        try:
            if config.tls.certificate is not None:
                leaf = read_certificates(config.tls.certificate)[0]
                self.metrics.server_cert_expiry.set(leaf.not_valid_after_utc.timestamp())
        except CertificateError:
            pass
        # status: the certificates in force, as they were loaded
        self._certificates = status.certificates(
            config.tls.certificate,
            config.tls.client_ca,
            config.tls.pinned_certificates,
            [
                (
                    f"servers[{i}]",
                    server.names,
                    server.certificate,
                    server.client_certificate or config.tls.client_certificate,
                )
                for i, server in enumerate(config.servers or ())
            ],
        )
        anchors = self.metrics.trust_anchor_expiry
        anchors.clear()
        for subject, sha256, expiry in revocation_report.anchor_expiries(config.tls):
            anchors.labels(subject, sha256).set(expiry)
        self._client_cert_expiry = float("nan")
        http = config.identity.http
        if config.identity.backend == "http" and http is not None and http.certificate:
            try:
                own = read_certificates(http.certificate)[0]
                self._client_cert_expiry = own.not_valid_after_utc.timestamp()
            except CertificateError:
                pass

    # ---- stop -----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Drain: unready at once, stop accepting after the drain delay, then finish in-flight work."""
        self.readiness.draining = True
        self.log.info("draining", drain_delay=self.config.shutdown.drain_delay)
        await asyncio.sleep(self.config.shutdown.drain_delay)
        await self.stop(grace=self.config.shutdown.grace_period)

    async def stop(self, grace: float = 10.0, *, quiet: bool = False) -> None:
        """Stop accepting, let in-flight requests finish within ``grace``, then close everything."""
        self.readiness.draining = True
        self.tls.stop_rotation()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            await self._listener.shutdown(grace)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._ping is not None:
            self._ping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ping
        # Reports being sent get a moment; the rest are logged as failed (their backend closes).
        await self.reporter.close(min(grace, 5.0))
        if self._fleet:  # each is bounded by the shared cache's timeout
            await asyncio.gather(*self._fleet, return_exceptions=True)
        for task, (old, new) in list(self._retired.items()):
            task.cancel()
            await _close_plan(old, keep=new)
        if self.handler is not None:
            await _close_plan(self.handler.plan)
        await self.revocation.close()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        if not quiet:
            self.log.info("stopped")


def _reports_config(config: Config) -> ReportsConfig:
    identityplus = config.identity.identityplus
    return identityplus.reports if identityplus is not None else ReportsConfig()


def _as_running(new: Config, old: Config) -> Config:
    """``new`` with the restart-only keys as ``old`` runs them: what a reload really puts in
    force (so that self.config says what runs, and a key kept is not a change next time)."""
    return new.model_copy(
        update={
            "listen": old.listen.model_copy(update={"server_names": new.listen.server_names}),
            "admin": old.admin,
            "log": old.log,
        }
    )


def _same_upstream(a: Config, b: Config) -> bool:
    # All of limits, not only the keys the forwarder takes today: a limit it is given later
    # must not be kept silently by a reload (a new client costs a few new connections). Not
    # handshake_timeout and handshake_budget: the TLS layer's alone (a certificate renewal must
    # not renew the pool). The report header names are removed from its responses: a new name
    # needs a new one.
    same_limits = a.limits.model_copy(
        update={
            "handshake_timeout": b.limits.handshake_timeout,
            "handshake_budget": b.limits.handshake_budget,
        }
    )
    return (
        a.upstream == b.upstream
        and same_limits == b.limits
        and a.headers.reports == b.headers.reports
    )


async def _close_plan(plan: Plan, *, keep: Plan | None = None) -> None:
    """Close a plan's clients, except those ``keep`` still uses."""
    if keep is None or plan.upstream is not keep.upstream:
        await plan.upstream.close()
    close = getattr(plan.identity, "close", None)
    if close is not None and (keep is None or plan.identity is not keep.identity):
        await close()


def watched_files(config: Config, config_path: Path | None) -> list[Path]:
    """The files whose change triggers a reload."""
    files: list[Path] = [config_path] if config_path is not None else []
    files += [
        *(p for p in (config.tls.certificate, config.tls.key) if p is not None),
        *config.tls.client_ca,
        *config.tls.pinned_certificates,
    ]
    for path in config.tls.crl:
        files.append(path)  # a folder's own change: a file added, removed, or ..data swapped
        with contextlib.suppress(OSError):  # gone: the missing folder is the change seen
            if path.is_dir():
                files += sorted(p for p in path.iterdir() if not p.name.startswith("."))
    for user in config.identity.static.users:
        files += [b.file for b in user.certificates if b.file is not None]
    if config.identity.identityplus is not None:
        files += config.identity.identityplus.issuers
    for server in config.servers or ():
        files += [server.certificate, server.key]
    for route in (*config.routes, *(r for s in config.servers or () for r in s.routes)):
        if route.allow is not None:
            files += route.allow.issuer_files()
    return files


__all__ = ["Sidecar", "build_backend", "build_cache", "build_policy", "watched_files"]
