"""The shared cache's side in Redis: a second cache level, one backend call per certificate
across the fleet, and purges that reach every replica.

For a certificate the local cache does not hold, ``SharedCache.fetch`` makes one Redis call
(a Lua script): the stored verdict with its remaining TTL, or the certificate's lock (``SET NX
PX`` with a random token), or "another replica is asking". The holder of the lock asks the
backend and settles (a second script: the value is written only while the lock is still its
own, the lock is deleted, and those waiting are told on the fleet's channel, with the
verdict). The others wait for that, at most the backend's own timeout, then ask the backend
themselves rather than fail. Calls that others wait for (a settle, a waiter's look) have
connection slots of their own: a burst of first lookups cannot queue them.

Keys, all under ``key_prefix`` (``P``), each certificate's in one Redis Cluster slot::

    P epoch                                  the shared level's epoch (a purge of all bumps it)
    P events                                 the channel: purges, "a verdict is ready",
                                             run-time deny entries added and taken off
    P deny                                   the run-time deny entries (a set of SHA-256
                                             fingerprints, no expiry)
    P <namespace>:<epoch>:v:{<sha256>}      the verdict (record.encode_verdict), PX its ttl
    P <namespace>:<epoch>:l:{<sha256>}      the lock: a random token, PX backend timeout + 1 s
    P <namespace>:<epoch>:w:{<sha256>}      someone waits: the holder tells the channel

The namespace is the backend's name and a digest of its configuration: replicas that would
not give the same verdicts never share them. Redis failing never fails the gate and never
lets anything through: every call is bounded by ``timeout``, and while Redis is unusable
(down, slow three times in a row, answering errors) lookups go to the backend directly, with
the local cache only; a task reconnects with backoff. On every (re)connection the local cache
is emptied, since purges sent meanwhile were missed. State changes are logged once.

Run-time deny entries (``POST``/``DELETE /deny``) go the same way: added to or taken off the
``deny`` set, then announced on the channel; every replica applies what it hears (without
announcing it again), and on every (re)connection loads the set: entries it missed are
denied, entries it had from the fleet that are gone from the set are allowed again. An entry
a replica added while Redis could not take it (unusable, or one call failing) is added to the
set and announced once Redis answers, unless it was taken off here meanwhile; until then, and
whatever the set or the channel says, it stays denied here (a denial made while cut off is not
lost while the process runs). An entry taken off while Redis was unusable is not taken off the
set later (another replica may have denied it again since): it fails closed, the set wins at
the reconnection, and the replica logs ``deny_removal_not_shared``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.exceptions import RedisError, ResponseError

from ...config import SharedCacheConfig
from ...log import get_logger
from .. import Verdict
from .client import MAX_CONNECTIONS, build_client, close_client
from .record import (
    Message,
    decode_message,
    decode_verdict,
    encode_message,
    encode_verdict,
    storable,
)

# KEYS: value, lock, waiting; ARGV: token, lock ms.
# {1, value, pttl}: stored; {2}: the lock is ours; {3}: another holds it (we are waiting).
_LOOKUP = """
local v = redis.call('GET', KEYS[1])
if v then return {1, v, redis.call('PTTL', KEYS[1])} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
return {3}
"""
# KEYS: value, lock. {1, value, pttl}: stored; {3}: still locked; {0}: neither.
_PEEK = """
local v = redis.call('GET', KEYS[1])
if v then return {1, v, redis.call('PTTL', KEYS[1])} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {3} end
return {0}
"""
# KEYS: value, lock, waiting; ARGV: token, value ('' for none), ttl ms, channel, the "ready"
# message carrying the value, the one without. The value is written only while the lock is
# still ours (not expired, not purged); those waiting get it in the message.
_SETTLE = """
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
local stored = false
if mine then
  if ARGV[2] ~= '' then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    stored = true
  end
  redis.call('DEL', KEYS[2])
end
if redis.call('DEL', KEYS[3]) == 1 then
  if stored then
    redis.call('PUBLISH', ARGV[4], ARGV[5])
  else
    redis.call('PUBLISH', ARGV[4], ARGV[6])
  end
end
if mine then return 1 end
return 0
"""
# KEYS: value, lock; ARGV: value, ttl ms. Stored when nobody holds the lock or a value.
_OFFER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 1 end
return 0
"""
# KEYS: epoch; ARGV: ours, increment. The epoch becomes max(Redis', ours) + increment: a
# Redis restored from an older snapshot cannot bring back what a purge emptied; a value that is
# not a number is replaced.
_EPOCH = """
local e = tonumber(ARGV[1])
local raw = redis.call('GET', KEYS[1])
if raw and string.len(raw) <= 15 and string.match(raw, '^%d+$') and tonumber(raw) > e then
  e = tonumber(raw)
end
e = e + tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%d', e))
return e
"""

_FOUND, _OWNER, _LOCKED, _FREE = 1, 2, 3, 0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: calls that time out in a row before Redis counts as unusable
_TIMEOUTS_DOWN = 3
#: reconnection backoff (jittered), seconds
_BACKOFF_START, _BACKOFF_MAX = 0.2, 5.0
#: the subscriber pings this often, and gives the connection up after this long unheard
_PING_EVERY, _SILENCE = 1.0, 3.5
#: of the MAX_CONNECTIONS calls in flight, those kept for calls that others wait for
_URGENT_SLOTS = 4
#: a waiter looks again this often even without being told
_RECHECK = 0.25
#: warnings about invalid entries or messages at most this often
_WARN_EVERY = 60.0


class LocalCache(Protocol):
    """What the shared cache does to the local one: purges (from other replicas, and all
    entries on every reconnection)."""

    def purge(self, *, sha256: str | None = None, serial: int | None = None) -> int: ...


class DenySink(Protocol):
    """Where deny entries from the fleet go (``revocation.gate.Revocation``)."""

    def deny(self, sha256: str, *, announce: bool = True) -> bool: ...

    def allow(self, sha256: str) -> str: ...


class _Unavailable(Exception):
    """Redis could not be used for this call (down, too slow, an error)."""


class _Invalid(Exception):
    """What Redis holds for this certificate is not ours to read (a wrong type, garbage)."""


#: what a waiting lookup is told: the holder's verdict and its ttl (ms), or None (it gave up,
#: or Redis went away)
Told = tuple[Verdict, int] | None


class _Waiter:
    """A lookup waiting for another replica's verdict, in the epoch its keys are in."""

    __slots__ = ("epoch", "future")

    def __init__(self, future: asyncio.Future[Told], epoch: int) -> None:
        self.future = future
        self.epoch = epoch


class SharedStats:
    """Counters for the metrics module; they only ever grow (``up`` and the open fallback
    interval aside)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.up = False
        #: verdicts found in Redis; lookups that found none (this replica asked, or waited)
        self.hits = 0
        self.misses = 0
        #: lookups made without Redis: it was unusable
        self.skipped = 0
        #: timeout, unavailable (connection or server error), invalid_entry, invalid_message
        self.errors: dict[str, int] = dict.fromkeys(
            ("timeout", "unavailable", "invalid_entry", "invalid_message"), 0
        )
        #: waits for another replica's lookup, by how they ended
        self.lock_waits: dict[str, int] = dict.fromkeys(
            ("value", "released", "timeout", "unavailable"), 0
        )
        self.lock_wait_seconds = 0.0
        self.purges: dict[str, int] = {"sent": 0, "received": 0}
        #: the local cache emptied on a (re)connection
        self.resyncs = 0
        self._fallback = 0.0
        self._down_since: float | None = clock()

    @property
    def fallback_seconds(self) -> float:
        """Time spent without Redis (local caching only), the current interval included."""
        open_interval = 0.0 if self._down_since is None else self._clock() - self._down_since
        return self._fallback + open_interval

    def went_up(self) -> None:
        if self._down_since is not None:
            self._fallback += self._clock() - self._down_since
            self._down_since = None
        self.up = True

    def went_down(self) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
        self.up = False


class SharedCache:
    """The second cache level in Redis, shared by every replica (see the module docstring)."""

    def __init__(
        self,
        config: SharedCacheConfig,
        *,
        namespace: str,
        owner_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.target = config.target()
        self.namespace = namespace
        #: how long to wait for another replica's backend call: the backend's own timeout
        self.owner_wait = owner_wait
        self._lock_ms = int((owner_wait + 1.0) * 1000)
        self._timeout = config.timeout
        #: how long this process' own business may stretch a call (see _call)
        self._patience = max(1.0, 20 * config.timeout)
        self._last_answer = float("-inf")
        self._connect_timeout = max(2.0, config.timeout)
        prefix = config.key_prefix
        self._prefix = prefix
        #: which fleet this is (the deny set's Redis and key), for a supervisor's list: an
        #: entry sent to another fleet (before a reload changed the shared cache) is not
        #: this one's
        self.fleet_id = hashlib.sha256(f"{config.url}\n{prefix}".encode()).hexdigest()[:16]
        self.channel = f"{prefix}events"
        self._epoch_key = f"{prefix}epoch"
        self._deny_key = f"{prefix}deny"
        #: the entries of the deny set this process knows of (loaded, heard, or sent)
        self._fleet_denied: set[str] = set()
        #: the deny set was loaded once: ``_fleet_denied`` holds what it held then, and since
        self._loaded = False
        #: told of each denial sent late (``_send_late``), with ``fleet_id``: a supervisor's
        #: list learns it
        self.on_shared_late: Callable[[str, str], None] | None = None
        #: run-time deny entries added here while Redis could not take them: sent at the next
        #: (re)connection (those taken off here meanwhile, not)
        self._unsent_denials: set[str] = set()
        #: ... and entries taken off here meanwhile: the fleet's set wins (logged)
        self._unsent_removals: set[str] = set()
        #: the task sending them (``_send_late``)
        self._late: asyncio.Future[Any] | None = None
        self._deny_sink: DenySink | None = None
        self._epoch = 0
        #: tells messages of this process from the others'
        self.instance = secrets.token_hex(8)
        self.stats = SharedStats(clock)
        self._clock = clock
        self._log = get_logger("sidecar.shared_cache")
        self._client: Any = None
        self._scripts: _Scripts | None = None
        self._up = False
        self._logged_down = False
        self._timeouts_in_a_row = 0
        # First lookups (a burst of them) take at most these; a holder's settle, a waiter's
        # look and purges have slots of their own, so that a verdict many replicas wait for
        # is not queued behind a burst of new certificates.
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS - _URGENT_SLOTS)
        self._urgent = asyncio.Semaphore(_URGENT_SLOTS)
        self._waiters: dict[str, _Waiter] = {}
        self._local: LocalCache | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._broken: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._warned_at = float("-inf")

    def attach(self, local: LocalCache) -> None:
        self._local = local

    def attach_deny(self, sink: DenySink) -> None:
        self._deny_sink = sink

    def up(self) -> bool:
        """Whether lookups use Redis now (read through here after an await: compiled code
        trusts a narrowing of the attribute across it)."""
        return self._up

    def closing(self) -> bool:
        """Closing, or this task was asked to stop: some client calls take a cancellation
        for their own timeout and return, and the loops must end all the same."""
        task = asyncio.current_task()
        return self._closing or (task is not None and task.cancelling() > 0)

    def current_scripts(self) -> _Scripts | None:
        return self._scripts

    def epoch(self) -> int:
        return self._epoch

    def keys(self, sha256: str) -> tuple[str, str, str]:
        """The value, lock and waiting keys of a certificate in the current epoch."""
        base = f"{self._prefix}{self.namespace}:{self._epoch}:"
        tag = "{" + sha256 + "}"
        return f"{base}v:{tag}", f"{base}l:{tag}", f"{base}w:{tag}"

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background. The first attempt is awaited (bounded): a sidecar that
        starts next to a working Redis shares from its first request; one that cannot reach
        Redis starts anyway, caching locally, and keeps trying."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._task = loop.create_task(self._maintain(), name="shared-cache")
        await asyncio.wait({self._first}, timeout=self._connect_timeout * 2)

    async def close(self) -> None:
        self._closing = True
        broken = self._broken
        if broken is not None:
            broken.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a client library that took the cancellation for its own timeout
            # must not hold up the stop (the loop also ends on _closing).
            await asyncio.wait({task}, timeout=self._connect_timeout)
        for side in list(self._background):
            side.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._up = False
        self._wake_all()
        await self._drop_client()

    async def _maintain(self) -> None:
        delay = _BACKOFF_START
        while not self.closing():
            # No await inside except or finally blocks here: mypyc's compiled form of that
            # (awaiting, then re-raising) corrupted memory (a segfault, seen while building
            # this). Cleanup happens after the try, on every path but cancellation, where
            # close() drops the client and with it the subscriber's connection.
            client = build_client(self.config, io_timeout=self._connect_timeout)
            self._client = client
            pubsub = client.pubsub()
            problem: str | None = None
            try:
                await self._connect(client, pubsub)
                delay = _BACKOFF_START
                self._started()
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever the client raised: try again later
                problem = _describe(exc)
            if problem is not None:
                self._went_down(problem)
            await _quietly(pubsub.aclose(), self._connect_timeout)
            self._started()
            await self._drop_client()
            if self.closing():
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, _BACKOFF_MAX)

    def _started(self) -> None:
        first = self._first
        if first is not None and not first.done():
            first.set_result(None)

    async def _connect(self, client: Any, pubsub: Any) -> None:
        """Subscribe, read the epoch, open the connections; then the local cache is emptied
        and lookups use Redis."""
        scripts = _Scripts(client)
        async with asyncio.timeout(self._connect_timeout):
            await pubsub.subscribe(self.channel)
            while True:
                message = await pubsub.get_message(timeout=self._connect_timeout)
                if isinstance(message, dict) and message.get("type") == "subscribe":
                    break
            epoch = await scripts.epoch(keys=[self._epoch_key], args=[self._epoch, 0])
            denied = await self._read_denied(client)
            # Open the connections now, not in the middle of the next burst of misses.
            if self.target.mode != "cluster":
                await asyncio.gather(*(client.ping() for _ in range(MAX_CONNECTIONS)))
        if not isinstance(epoch, int) or epoch < 0:
            raise _Unavailable(f"the epoch script answered {epoch!r}")
        self._epoch = epoch
        self._scripts = scripts
        self.heard_from_redis()
        self._resync()
        self._load_denied(denied)
        self._removals_gave_way(denied)
        self._went_up()
        self._schedule_late()

    def _schedule_late(self) -> None:
        """Send the denials Redis could not take (``_send_late``), unless that is under way."""
        late = self._late
        if self._unsent_denials and (late is None or late.done()):
            self._late = self._spawn(self._send_late())

    async def _send_late(self) -> None:
        """While up: add to the deny set, and announce, the entries denied here while Redis
        could not take them, retried with backoff while calls fail; once down, the next
        connection starts again."""
        delay = _BACKOFF_START
        while self._unsent_denials and self.up() and not self.closing():
            for sha256 in sorted(self._unsent_denials):
                if sha256 not in self._unsent_denials:
                    continue  # taken off here meanwhile (publish_deny)
                if await self.publish_deny(sha256, add=True):
                    sink = self._deny_sink
                    if sink is not None:  # still denied here, whatever was heard meanwhile
                        sink.deny(sha256, announce=False)
                    self._log.warning(
                        "deny_shared_late",
                        cert_sha256=sha256,
                        reason="denied here while the shared cache could not take it",
                    )
                    told = self.on_shared_late
                    if told is not None:
                        told(sha256, self.fleet_id)
            if self._unsent_denials:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, _BACKOFF_MAX)

    def _removals_gave_way(self, denied: set[str] | None) -> None:
        """After the deny set was loaded at a (re)connection: an entry taken off here while
        Redis could not take the change, that the set still holds, is denied here again."""
        for sha256 in sorted(self._unsent_removals):
            if denied is not None and sha256 in denied:
                self._log.warning(
                    "deny_removal_not_shared",
                    cert_sha256=sha256,
                    reason="taken off here while the shared cache was unavailable; the "
                    "fleet's deny set still holds it",
                    hint="denied here again: DELETE it again to take it off every replica",
                )
        self._unsent_removals.clear()

    async def _read_denied(self, client: Any) -> set[str] | None:
        """The deny set's valid members; None when the key is not a set (counted, logged)."""
        try:
            members = await client.smembers(self._deny_key)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            self._invalid("the deny set", self._deny_key)
            return None
        denied = set()
        for member in members:
            text = member.decode("ascii", "replace") if isinstance(member, bytes) else member
            if isinstance(text, str) and _SHA256.match(text):
                denied.add(text)
            else:
                self._invalid("a deny set member", member)
        return denied

    def _load_denied(self, denied: set[str] | None) -> None:
        """Apply the deny set after a (re)connection: what was missed meanwhile."""
        sink = self._deny_sink
        if denied is None or sink is None:
            return
        for sha256 in sorted(self._fleet_denied - denied - self._unsent_denials):
            # taken off elsewhere while this process was not listening (one it denied again
            # meanwhile stays denied, and goes back to the set: _send_late)
            sink.allow(sha256)
        for sha256 in sorted(denied):
            sink.deny(sha256, announce=False)
        self._fleet_denied = denied
        self._loaded = True

    def restore_denied(self, sha256: str, *, sent: bool) -> None:
        """A run-time entry a restarted worker finds in its supervisor's list
        (``revocation.admin.read_runtime``). One that went to the fleet (``sent``) is the
        fleet's: denied here until the deny set says otherwise (taken off elsewhere since:
        not denied, or no longer once the set is loaded). One that did not is denied here
        and sent when Redis answers, as by the worker that made it."""
        sink = self._deny_sink
        if sink is None:
            return
        if sent:
            if self._loaded and sha256 not in self._fleet_denied:
                return  # the set, loaded already, no longer holds it
            self._fleet_denied.add(sha256)
            sink.deny(sha256, announce=False)
            return
        sink.deny(sha256, announce=False)
        self._unsent_denials.add(sha256)
        if self.up():
            self._schedule_late()

    def forget_restored(self, sha256: str) -> bool:
        """An entry ``restore_denied`` took was taken off the supervisor's list since: not
        sent from here. True when the fleet, as last heard here, does not hold it (take it
        off here); False when it does (the list's removal may be older than a denial heard
        since on the channel: the fleet's word stands until the set or the channel says
        otherwise)."""
        self._unsent_denials.discard(sha256)
        return sha256 not in self._fleet_denied

    async def _listen(self, pubsub: Any) -> None:
        """Handle the channel's messages until the connection is judged broken: an error, no
        answer to pings for ``_SILENCE``, or a failed call elsewhere (``_went_down``)."""
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        broken = self._broken
        while broken is not None and not broken.is_set() and not self.closing():
            async with asyncio.timeout(_PING_EVERY + self._connect_timeout):
                message = await pubsub.get_message(timeout=_PING_EVERY)
            now = loop.time()
            if isinstance(message, dict):
                heard = now
                if message.get("type") == "message":
                    self._on_message(message.get("data"))
            if now - heard > _SILENCE:
                raise _Unavailable(f"the subscription was silent for {_SILENCE} s")
            if now - pinged >= _PING_EVERY:
                pinged = now
                async with asyncio.timeout(self._connect_timeout):
                    await pubsub.ping()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._scripts = None
        if client is not None:
            await _quietly(close_client(client), self._connect_timeout)

    def _resync(self) -> None:
        """Purges may have been sent while this process was not listening: start over."""
        local = self._local
        if local is not None:
            local.purge()
        self.stats.resyncs += 1

    def _went_up(self) -> None:
        self._up = True
        self._timeouts_in_a_row = 0
        self._broken = asyncio.Event()
        self.stats.went_up()
        self._logged_down = False
        self._log.info(
            "shared_cache_connected",
            url=self.target.describe(),
            namespace=self.namespace,
            epoch=self._epoch,
        )

    def _went_down(self, reason: str) -> None:
        was_up, self._up = self._up, False
        self.stats.went_down()
        broken = self._broken
        if broken is not None:
            broken.set()
        self._wake_all()
        if was_up or not self._logged_down:
            self._logged_down = True
            self._log.warning(
                "shared_cache_unavailable",
                url=self.target.describe(),
                reason=reason,
                fallback="each worker caches alone until Redis answers again",
            )

    # ---- one bounded call -----------------------------------------------------------------

    async def _call(self, op: Callable[[_Scripts], Awaitable[Any]], *, urgent: bool = True) -> Any:
        """``op``'s answer within ``timeout``, or ``_Unavailable`` (``_Invalid`` for a key
        holding what we cannot read).

        The deadline measures Redis, not this process. It starts when the call gets one of the
        ``MAX_CONNECTIONS`` slots (a burst of misses queues for them), and when it passes
        while Redis has answered another call within ``timeout``, or while this event loop
        was too busy to read the answer (a burst of TLS handshakes), the call is given more
        time, up to ``_patience`` in all: the slow one is this process. A Redis that answers
        nothing for ``timeout`` is given up at once.
        """
        scripts = self.current_scripts()
        if not self.up() or scripts is None:
            raise _Unavailable("not connected")
        loop = asyncio.get_running_loop()
        queued = loop.time()
        async with self._urgent if urgent else self._slots:
            if not self.up() or self.current_scripts() is not scripts:
                raise _Unavailable("not connected")  # went down while this call queued
            task = asyncio.current_task()
            assert task is not None
            guard = _Guard(self, loop, task, queued)
            try:
                result = await op(scripts)
            except asyncio.CancelledError:
                if guard.fired and task.uncancel() == 0:
                    self._timed_out(scripts)
                    raise _Unavailable("timeout") from None
                raise
            except ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    self.heard_from_redis()
                    raise _Invalid(str(exc)) from None
                self._failed(exc, scripts)
                raise _Unavailable(str(exc)) from None
            except (RedisError, OSError) as exc:
                self._failed(exc, scripts)
                raise _Unavailable(str(exc)) from None
            finally:
                guard.disarm()
        self.heard_from_redis()
        self._timeouts_in_a_row = 0
        return result

    def heard_from_redis(self) -> None:
        self._last_answer = asyncio.get_running_loop().time()

    def last_answer(self) -> float:
        return self._last_answer

    def timeout(self) -> float:
        return self._timeout

    def patience(self) -> float:
        return self._patience

    def _timed_out(self, scripts: _Scripts) -> None:
        self.stats.errors["timeout"] += 1
        if scripts is not self.current_scripts():
            return  # a call on a connection given up already: it says nothing of the new one
        self._timeouts_in_a_row += 1
        if self._timeouts_in_a_row >= _TIMEOUTS_DOWN:
            self._went_down(f"no answer within {self._timeout * 1000:g} ms, {_TIMEOUTS_DOWN} times")

    def _failed(self, exc: BaseException, scripts: _Scripts) -> None:
        self.stats.errors["unavailable"] += 1
        if scripts is self.current_scripts():
            self._went_down(_describe(exc))

    # ---- lookups --------------------------------------------------------------------------

    async def fetch(
        self,
        sha256: str,
        ask: Callable[[], Awaitable[Verdict]],
        ttl_for: Callable[[Verdict], float],
        still_wanted: Callable[[], bool],
    ) -> tuple[Verdict, float | None]:
        """The verdict for a certificate, and the seconds it still holds when Redis had it.

        ``ask`` asks the backend (and raises as it does); it is called at most once here, by
        whichever replica holds the lock, or by any replica when Redis cannot be used or the
        wait for the holder ends without a verdict. ``ttl_for`` is how long a verdict may be
        kept; ``still_wanted`` turns false when a purge made the answer unwanted (it is then
        not stored). Fails closed: nothing from Redis is used unless it parses exactly.
        """
        if not self.up():
            self.stats.skipped += 1
            return await ask(), None
        epoch = self._epoch
        keys = self.keys(sha256)
        token = secrets.token_hex(16)
        # Expect the "ready" message before asking: it may be read before the answer is.
        waiter = self._expect(sha256, epoch)
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        lock_ms = self._lock_ms
        reply: object = None
        unreadable = unavailable = False
        try:
            reply = await self._call(
                lambda s: s.lookup(keys=list(keys), args=[token, lock_ms]), urgent=False
            )
        except _Invalid as exc:
            self._invalid("the stored verdict", exc)
            unreadable = True
        except _Unavailable:
            unavailable = True
        # (Awaited outside the except blocks: see _maintain.)
        if unreadable:
            self._forget_waiter(sha256, waiter)
            return await self._heal(keys, ask, ttl_for, still_wanted)
        if unavailable:
            self._forget_waiter(sha256, waiter)
            self.stats.skipped += 1
            return await ask(), None
        state, found = self._read(reply, asked_at)
        if state == _FOUND and found is not None:
            self._forget_waiter(sha256, waiter)
            self.stats.hits += 1
            return found
        if state == _OWNER:
            self._forget_waiter(sha256, waiter)
            self.stats.misses += 1
            return await self._own(sha256, epoch, keys, token, ask, ttl_for, still_wanted)
        if state == _LOCKED:
            self.stats.misses += 1
            return await self._wait(sha256, keys, waiter, asked_at, ask, ttl_for, still_wanted)
        self._forget_waiter(sha256, waiter)
        return await self._heal(keys, ask, ttl_for, still_wanted)

    def _read(self, reply: object, asked_at: float) -> tuple[int, tuple[Verdict, float] | None]:
        """A script's answer: its state, and for a stored verdict the verdict and the seconds
        left (counted from when it was asked for: never longer than Redis says). A state of
        -1 is an answer that is not one of ours (counted, and logged now and then)."""
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
            return self._invalid("a script's answer", reply)
        state = reply[0]
        if state != _FOUND:
            return (
                (state, None)
                if state in (_OWNER, _LOCKED, _FREE)
                else self._invalid("a script's answer", reply)
            )
        if len(reply) != 3 or not isinstance(reply[2], int):
            return self._invalid("a stored verdict", reply)
        verdict = decode_verdict(reply[1])
        # PTTL -1: no expiry. A verdict that would never expire is not one of ours.
        if verdict is None or reply[2] <= 0:
            return self._invalid("a stored verdict", reply[1])
        elapsed = asyncio.get_running_loop().time() - asked_at
        return _FOUND, (verdict, reply[2] / 1000.0 - elapsed)

    def _invalid(self, what: str, value: object) -> tuple[int, None]:
        self.stats.errors["invalid_entry"] += 1
        self._warn("shared_cache_invalid_entry", what=what, value=repr(value)[:200])
        return -1, None

    async def _own(
        self,
        sha256: str,
        epoch: int,
        keys: tuple[str, str, str],
        token: str,
        ask: Callable[[], Awaitable[Verdict]],
        ttl_for: Callable[[Verdict], float],
        still_wanted: Callable[[], bool],
    ) -> tuple[Verdict, float | None]:
        """This replica holds the lock: ask the backend, store what may be shared, release,
        and tell those waiting (with the verdict, when it was stored)."""
        gave_up = encode_message(
            Message("ready", self.instance, sha256=sha256, namespace=self.namespace, epoch=epoch)
        )
        failure: Exception | None = None
        try:
            verdict = await ask()
        except asyncio.CancelledError:  # release without waiting for it
            self._spawn(self._settle(keys, token, b"", 0, gave_up, gave_up))
            raise
        except Exception as exc:
            failure = exc
        if failure is not None:
            # Release, so that those waiting ask for themselves at once. (Awaited outside
            # the except block: see _maintain.)
            await self._settle(keys, token, b"", 0, gave_up, gave_up)
            raise failure
        ttl = ttl_for(verdict)
        ttl_ms = max(1, int(ttl * 1000))
        payload = b""
        told = gave_up
        if storable(verdict) and ttl > 0 and still_wanted():
            payload = encode_verdict(verdict)
            told = encode_message(
                Message(
                    "ready",
                    self.instance,
                    sha256=sha256,
                    namespace=self.namespace,
                    epoch=epoch,
                    verdict=payload.decode("utf-8"),
                    ttl_ms=ttl_ms,
                )
            )
        await self._settle(keys, token, payload, ttl_ms, told, gave_up)
        return verdict, None

    async def _settle(
        self,
        keys: tuple[str, str, str],
        token: str,
        payload: bytes,
        ttl_ms: int,
        told: bytes,
        gave_up: bytes,
    ) -> None:
        channel = self.channel
        args = [token, payload, ttl_ms, channel, told, gave_up]
        with contextlib.suppress(_Unavailable, _Invalid):
            await self._call(lambda s: s.settle(keys=list(keys), args=args))

    async def _wait(
        self,
        sha256: str,
        keys: tuple[str, str, str],
        waiter: _Waiter,
        asked_at: float,
        ask: Callable[[], Awaitable[Verdict]],
        ttl_for: Callable[[Verdict], float],
        still_wanted: Callable[[], bool],
    ) -> tuple[Verdict, float | None]:
        """Another replica asks the backend: wait for its verdict (it comes in the "ready"
        message), at most ``owner_wait``; then, or when it gave up without one, ask the
        backend here. Without a message, Redis is asked again every ``_RECHECK``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.owner_wait
        outcome = "timeout"
        try:
            while (left := deadline - loop.time()) > 0:
                await asyncio.wait({waiter.future}, timeout=min(left, _RECHECK))
                if not self.up():
                    outcome = "unavailable"
                    break
                if waiter.future.done():
                    told = waiter.future.result()
                    if told is None:
                        outcome = "released"
                        break
                    verdict, ttl_ms = told
                    self._waited("value", started)
                    # Counted from when this replica asked: never longer than Redis keeps it.
                    return verdict, ttl_ms / 1000.0 - (loop.time() - asked_at)
                waiter = self._expect(sha256, waiter.epoch)
                peeked_at = loop.time()
                try:
                    reply = await self._call(lambda s: s.peek(keys=list(keys[:2])))
                except (_Unavailable, _Invalid):
                    outcome = "unavailable"
                    break
                state, found = self._read(reply, peeked_at)
                if state == _FOUND and found is not None:
                    self._waited("value", started)
                    return found
                if state != _LOCKED:
                    outcome = "released"
                    break
        finally:
            self._forget_waiter(sha256, waiter)
        self._waited(outcome, started)
        verdict = await ask()
        if outcome != "unavailable":
            await self._offer(keys, verdict, ttl_for, still_wanted)
        return verdict, None

    def _waited(self, outcome: str, started: float) -> None:
        self.stats.lock_waits[outcome] += 1
        self.stats.lock_wait_seconds += asyncio.get_running_loop().time() - started

    async def _offer(
        self,
        keys: tuple[str, str, str],
        verdict: Verdict,
        ttl_for: Callable[[Verdict], float],
        still_wanted: Callable[[], bool],
    ) -> None:
        """Store a verdict asked for without the lock, unless someone holds it or a value."""
        ttl = ttl_for(verdict)
        if not storable(verdict) or ttl <= 0 or not still_wanted():
            return
        payload = encode_verdict(verdict)
        ttl_ms = max(1, int(ttl * 1000))
        with contextlib.suppress(_Unavailable, _Invalid):
            await self._call(lambda s: s.offer(keys=list(keys[:2]), args=[payload, ttl_ms]))

    async def _heal(
        self,
        keys: tuple[str, str, str],
        ask: Callable[[], Awaitable[Verdict]],
        ttl_for: Callable[[Verdict], float],
        still_wanted: Callable[[], bool],
    ) -> tuple[Verdict, float | None]:
        """What Redis holds for this certificate cannot be read: ask the backend, and
        replace it with the verdict."""
        verdict = await ask()
        ttl = ttl_for(verdict)
        if storable(verdict) and ttl > 0 and still_wanted():
            payload = encode_verdict(verdict)
            ttl_ms = max(1, int(ttl * 1000))
            value_key = keys[0]
            with contextlib.suppress(_Unavailable, _Invalid):
                await self._call(lambda s: s.client.set(value_key, payload, px=ttl_ms))
        return verdict, None

    def _expect(self, sha256: str, epoch: int) -> _Waiter:
        waiter = self._waiters.get(sha256)
        if waiter is None or waiter.future.done() or waiter.epoch != epoch:
            future: asyncio.Future[Told] = asyncio.get_running_loop().create_future()
            waiter = self._waiters[sha256] = _Waiter(future, epoch)
        return waiter

    def _forget_waiter(self, sha256: str, waiter: _Waiter) -> None:
        if self._waiters.get(sha256) is waiter:
            del self._waiters[sha256]

    def _wake_all(self) -> None:
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_result(None)

    # ---- purges ---------------------------------------------------------------------------

    async def publish_purge(self, *, sha256: str | None = None, serial: int | None = None) -> bool:
        """Tell every replica to drop what the local purge dropped here; True once Redis took
        it. One certificate: its keys are deleted. All, or a serial (Redis cannot find
        certificates by serial): the shared level starts over in a new epoch."""
        if not self.up():
            return False
        try:
            if sha256 is None:
                mine = self._epoch
                epoch = await self._call(lambda s: s.epoch(keys=[self._epoch_key], args=[mine, 1]))
                if not isinstance(epoch, int):
                    return False
                self._set_epoch(epoch)
                message = Message("purge", self.instance, serial=serial, epoch=epoch)
            else:
                keys = self.keys(sha256)
                await self._call(lambda s: s.client.delete(*keys))
                message = Message(
                    "purge", self.instance, sha256=sha256, serial=serial, namespace=self.namespace
                )
            data = encode_message(message)
            channel = self.channel
            await self._call(lambda s: s.client.publish(channel, data))
        except (_Unavailable, _Invalid):
            return False
        self.stats.purges["sent"] += 1
        return True

    async def publish_deny(self, sha256: str, *, add: bool) -> bool:
        """Add a run-time deny entry to (``add``) or take it off the fleet's set, and tell
        every replica; True once Redis took both."""
        if not self.up() or not await self._publish_deny(sha256, add):
            # a denial is sent once Redis answers (now if it is up: a call failed), a removal
            # is not
            if add:
                self._unsent_denials.add(sha256)
                self._unsent_removals.discard(sha256)
                if self.up():
                    self._schedule_late()
            else:
                self._unsent_denials.discard(sha256)
                self._unsent_removals.add(sha256)
            return False
        self._unsent_denials.discard(sha256)
        self._unsent_removals.discard(sha256)
        if add:
            self._fleet_denied.add(sha256)
        else:
            self._fleet_denied.discard(sha256)
        return True

    async def _publish_deny(self, sha256: str, add: bool) -> bool:
        key = self._deny_key
        data = encode_message(Message("deny" if add else "allow", self.instance, sha256=sha256))
        channel = self.channel
        try:
            if add:
                await self._call(lambda s: s.client.sadd(key, sha256))
            else:
                await self._call(lambda s: s.client.srem(key, sha256))
            await self._call(lambda s: s.client.publish(channel, data))
        except (_Unavailable, _Invalid):
            return False
        return True

    def _set_epoch(self, epoch: int) -> None:
        if epoch > self._epoch:
            self._epoch = epoch

    def _on_message(self, data: object) -> None:
        message = decode_message(data)
        if message is None:
            self.stats.errors["invalid_message"] += 1
            self._warn("shared_cache_invalid_message", value=repr(data)[:200])
            return
        if message.sender == self.instance:
            return
        if message.op == "ready":
            self._told(message)
            return
        if message.op == "deny" or message.op == "allow":
            self._denied(message)
            return
        self.stats.purges["received"] += 1
        if message.epoch is not None:
            self._set_epoch(message.epoch)
        local = self._local
        if local is not None:
            local.purge(sha256=message.sha256, serial=message.serial)
        if message.sha256 is not None and message.namespace != self.namespace:
            # Replicas of another configuration (a rollout) keep their own keys: drop ours.
            keys = self.keys(message.sha256)
            self._spawn(self._quiet_call(lambda s: s.client.delete(*keys)))

    def _denied(self, message: Message) -> None:
        """Another replica added or took off a run-time deny entry: the same here, without
        announcing it again (no echo)."""
        sha256 = message.sha256
        if sha256 is None:
            return
        sink = self._deny_sink
        if message.op == "deny":
            self._fleet_denied.add(sha256)
            if sink is not None:
                sink.deny(sha256, announce=False)
        else:
            self._fleet_denied.discard(sha256)
            if sink is not None and sha256 not in self._unsent_denials:
                # (denied here while Redis was unusable: it stays denied and goes back to the
                # set, _send_late; it fails closed)
                sink.allow(sha256)

    def _told(self, message: Message) -> None:
        """A holder is done: wake the lookup waiting for it here, with its verdict if it sent
        one (parsed as strictly as one read from a key)."""
        if message.namespace != self.namespace or message.sha256 is None:
            return
        waiter = self._waiters.get(message.sha256)
        if waiter is None or waiter.future.done() or waiter.epoch != message.epoch:
            return
        told: Told = None
        if message.verdict is not None and message.ttl_ms is not None:
            verdict = decode_verdict(message.verdict)
            if verdict is not None:
                told = (verdict, message.ttl_ms)
        waiter.future.set_result(told)

    async def _quiet_call(self, op: Callable[[_Scripts], Awaitable[Any]]) -> None:
        with contextlib.suppress(_Unavailable, _Invalid):
            await self._call(op)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _warn(self, event: str, **fields: object) -> None:
        now = self._clock()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            self._log.warning(event, **fields)


class _Guard:
    """The deadline of one Redis call (see ``SharedCache._call``): cancels the call's task
    when Redis has not answered it within ``timeout``, unless Redis is answering others or
    the event loop was too busy to tell, up to ``_patience``."""

    __slots__ = ("_cache", "_handle", "_latest", "_loop", "_task", "_timeout", "fired")

    def __init__(
        self,
        cache: SharedCache,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
        queued: float,
    ) -> None:
        self._cache = cache
        self._loop = loop
        self._task = task
        self._timeout = cache.timeout()
        self._latest = queued + cache.patience()
        self.fired = False
        deadline = min(loop.time() + self._timeout, self._latest)
        self._handle: asyncio.Handle | None = loop.call_at(deadline, self._due, deadline)

    def _due(self, deadline: float) -> None:
        # An answer read in this turn of the loop resumes the call from the ready queue
        # (uvloop even runs timers before it reads sockets): decide only after two more
        # turns of that queue, when such a call has finished and disarmed this.
        self._handle = self._loop.call_soon(self._again, deadline)

    def _again(self, deadline: float) -> None:
        self._handle = self._loop.call_soon(self._decide, deadline)

    def _decide(self, deadline: float) -> None:
        self._handle = None
        now = self._loop.time()
        # Two turns of an idle loop take microseconds; when they took a tenth of the timeout,
        # this process is too busy for the deadline to say anything about Redis.
        busy = now - deadline > self._timeout / 10
        answering = now - self._cache.last_answer() < self._timeout
        if (busy or answering) and now < self._latest:
            later = min(now + self._timeout, self._latest)
            self._handle = self._loop.call_at(later, self._due, later)
            return
        self.fired = True
        self._task.cancel()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _Scripts:
    """The client and its registered scripts (``EVALSHA``, loaded again on ``NOSCRIPT``)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lookup = client.register_script(_LOOKUP)
        self.peek = client.register_script(_PEEK)
        self.settle = client.register_script(_SETTLE)
        self.offer = client.register_script(_OFFER)
        self.epoch = client.register_script(_EPOCH)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]


async def _quietly(aw: Awaitable[Any], bound: float) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(bound):
            await aw
