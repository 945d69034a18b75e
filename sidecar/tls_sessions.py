"""TLS sessions shared by the workers of one sidecar, in memory only they can see.

With several workers the kernel hands a client's next connection to any of them, so a session
kept in one worker's cache resumes one time in N. Stateless tickets resume anywhere, but
OpenSSL 3.0 pays for them twice per connection: making a ticket encodes the session, decodes
it again (``d2i_SSL_SESSION``, to copy it) and encodes it once more, and resuming decodes it;
each decoding parses the client's certificate inside (about 130 us per connection, measured
in S2-new: 846-870 us per full handshake with tickets, 715-761 with a session cache, one
worker, interleaved).

So the workers of a supervisor keep a session cache each (``tls_tickets.use_session_cache``:
the client is given the session's name, not the session) and also write every new session,
encoded, to a table in shared memory that the supervisor makes once (``memfd_create``) and
hands to each worker it starts (``OPTION``; a restarted worker finds the sessions again).
OpenSSL asks the table (``SSL_CTX_sess_set_get_cb``) only for a name its own cache does not
hold: a session made by another worker, decoded once here and then in this worker's cache.

The table: ``slots`` slots of ``SLOT`` bytes, in pairs. A session's pair is chosen by a key, a keyed
digest of the context's trust label (``tls.Fingerprint.trust``, with ``servers[]`` the server's
names too) and the session's name, so a session is found only by a context that decides trust
as the one it was made under, and a reload that changes trust finds none of the earlier ones. A slot holds the key, the session's
expiry, its DER and a digest of all three: two workers writing one slot at once leave a slot
whose digest does not match, read as empty (a full handshake), never as a mixture. A new
session takes the slot of its pair written longest ago, to the nanosecond (with one slot per
key, a busy table overwrote live sessions: 1 % of S2-resume's resumptions failed; choosing
by expiry, whole seconds, 0.6 %; now 0.06 %): a bounded cache that forgets, as OpenSSL's
does. Sessions larger than a slot are kept by their worker only.

A session goes into the table without the client's certificate in OpenSSL's ``peer``: the
certificate's DER goes into the session's application data instead, after the line's start
(``for_the_table``). Decoding a session with a peer parses the certificate, about 100 us with
OpenSSL 3.0 (its public key goes through the provider decoders), against 3 us without; two
workers resume on the other worker half the time. A connection resumed from such a session,
or from the sessions TLS 1.3 makes from it, has no peer in OpenSSL; ``tls.PeerCertificates``
then takes the certificate from the session the connection resumed (``resumed_peer``), and
parses it once per worker, as every client certificate.

The table holds resumption secrets, like the ticket keys: it is anonymous memory, mapped by
the supervisor and its workers only, never a file, and it lives as long as the supervisor.
The supervisor keeps its descriptor (for the workers it restarts) and makes itself
non-dumpable, so other processes of its user cannot open it through ``/proc``; workers close
theirs once it is mapped. It is sealed against resizing (a shrunk table would kill every
worker with SIGBUS). Where libssl's functions cannot be reached (``tls_groups``), the
workers use tickets.

With the compiled build, OpenSSL calls the three callbacks in C (``_sessions_c.c``, the same
steps byte for byte, with no GIL): through ``ctypes`` each new session cost 13 us quiet and
about 30 us under load, most of what a second worker added to a full handshake. The
interpreted build, or a build without the extension, calls the Python ones here.

Every context with a session cache, one worker's too, also caps the age of a line of
sessions (``MAX_AGE``, see ``_cap_age``): TLS 1.3 makes a new session at every resumption, so
a client resuming often would otherwise never make a full handshake, and its chain would
never be verified again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import mmap
import os
import ssl
import struct
import time
import weakref
from functools import cache
from typing import Any

from . import tls_tickets
from .tls_groups import _ssl_ctx, function, ssl_library

#: the hidden ``sidecar run`` option a supervisor passes a worker the table's descriptor with
OPTION = "--session-store-fd"
#: bytes per slot: a session with a client certificate of a 4096-bit RSA key is about 2 KiB
SLOT = 4096
#: v2: sessions without their peer (``for_the_table``); a worker of another version refuses
#: the table and uses tickets, rather than resume its sessions as no one
_MAGIC = b"sidecar-sessions-v2\0"
_HEADER = struct.Struct("<20sI")  # magic, slots; the first slot begins at _FIRST
_FIRST = 64
#: digest, key, expires and written (unix time; written in nanoseconds), DER length
_SLOT_HEAD = struct.Struct("<16s16sqqI4x")
_KEYED = struct.Struct("<16sqI")  # what the digest covers besides the DER
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
#: the longest session DER a slot holds
MAX_SESSION = SLOT - _SLOT_HEAD.size
#: the most slots a table may have (1 GiB)
MAX_SLOTS = 262_144

_NEW_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_GET_CB = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_int),
)
_REMOVE_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_Bytes = ctypes.POINTER(ctypes.c_ubyte)
#: seconds a line of sessions resumes after its full handshake (the ticket keys' rotation)
MAX_AGE = tls_tickets.ROTATE_EVERY


class _Functions:
    """libssl's session functions, resolved where Python's ``_ssl`` finds them."""

    def __init__(self) -> None:
        library = ssl_library()
        pointer = ctypes.c_void_p
        self.set_new_cb = function(library, "SSL_CTX_sess_set_new_cb", None, pointer, _NEW_CB)
        self.set_get_cb = function(library, "SSL_CTX_sess_set_get_cb", None, pointer, _GET_CB)
        self.set_remove_cb = function(
            library, "SSL_CTX_sess_set_remove_cb", None, pointer, _REMOVE_CB
        )
        self.i2d = function(
            library, "i2d_SSL_SESSION", ctypes.c_int, pointer, ctypes.POINTER(_Bytes)
        )
        self.d2i = function(
            library, "d2i_SSL_SESSION", pointer, pointer, ctypes.POINTER(_Bytes), ctypes.c_long
        )
        self.get_id = function(
            library, "SSL_SESSION_get_id", _Bytes, pointer, ctypes.POINTER(ctypes.c_uint)
        )
        self.get_time = function(library, "SSL_SESSION_get_time", ctypes.c_long, pointer)
        self.get_timeout = function(library, "SSL_SESSION_get_timeout", ctypes.c_long, pointer)
        self.set_timeout = function(
            library, "SSL_SESSION_set_timeout", ctypes.c_long, pointer, ctypes.c_long
        )
        self.get0_appdata = function(
            library,
            "SSL_SESSION_get0_ticket_appdata",
            ctypes.c_int,
            pointer,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t),
        )
        self.set1_appdata = function(
            library,
            "SSL_SESSION_set1_ticket_appdata",
            ctypes.c_int,
            pointer,
            ctypes.c_char_p,
            ctypes.c_size_t,
        )
        self.free = function(library, "SSL_SESSION_free", None, pointer)
        self.get_ssl_ctx = function(library, "SSL_get_SSL_CTX", pointer, pointer)
        self.get_session = function(library, "SSL_get_session", pointer, pointer)


@cache
def _functions() -> _Functions | str:
    try:
        return _Functions()
    except (ImportError, AttributeError, OSError) as exc:
        return f"libssl's session functions cannot be reached from Python's _ssl ({exc})"


def create(slots: int) -> int:
    """A new, empty table of ``slots`` slots: its file descriptor (close-on-exec; a worker is
    given it with ``pass_fds``). Pages are taken as slots are first written."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"a session table has 1 to {MAX_SLOTS} slots, not {slots}")
    fd = os.memfd_create("sidecar-sessions", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, _FIRST + slots * SLOT)
        os.pwrite(fd, _HEADER.pack(_MAGIC, slots), 0)
        # no one who gets hold of it can shrink it under the workers' mappings (SIGBUS)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_dumpable() -> str | None:
    """Make this process non-dumpable (``PR_SET_DUMPABLE`` 0): the supervisor holds the
    table's descriptor for its whole life, and other processes of its user could otherwise
    open it through ``/proc/<pid>/fd``, which needs less than reading its memory. None when
    done, else why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            return f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return f"prctl cannot be called ({exc})"
    return None


_PR_SET_DUMPABLE = 4


class SessionStore:
    """A table made by ``create``, mapped into this process."""

    def __init__(self, fd: int) -> None:
        """Map the table ``fd`` is open on (``fd`` stays open: the caller's to close).
        Raises ``ValueError`` when it is not one."""
        try:
            size = os.fstat(fd).st_size
            if size < _FIRST:
                raise ValueError("the session table is shorter than its header")
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                raise ValueError("the session table is not sealed against resizing")
            self._map = mmap.mmap(fd, size)
        except OSError as exc:
            raise ValueError(f"the session table cannot be mapped: {exc}") from None
        magic, slots = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or not 1 <= slots <= MAX_SLOTS or size != _FIRST + slots * SLOT:
            self._map.close()
            raise ValueError("the session table's header is not a sidecar's")
        self.slots: int = slots

    @classmethod
    def inherited(cls, fd: int) -> SessionStore:
        """The table a supervisor passed as ``fd``; the descriptor is closed."""
        try:
            return cls(fd)
        finally:
            with contextlib.suppress(OSError):  # not open: cls said so already
                os.close(fd)

    # ---- the table -----------------------------------------------------------------------

    def _slots(self, key: bytes) -> tuple[int, int]:
        """The two slots a key may be in (one, twice, in a table of one slot)."""
        first = int.from_bytes(key[:8], "little") % self.slots
        second = first ^ 1 if first ^ 1 < self.slots else first
        return _FIRST + first * SLOT, _FIRST + second * SLOT

    def put(self, key: bytes, expires: int, der: bytes, now: float | None = None) -> bool:
        """Keep ``der`` under ``key`` until ``expires``, in the key's slot that holds it
        already, else in the one written longest ago (an empty or expired one first of
        all); False when it is too large."""
        if len(der) > MAX_SESSION:
            return False
        when = time.time() if now is None else now
        digest = hashlib.blake2b(_KEYED.pack(key, expires, len(der)) + der, digest_size=16)
        one, other = self._slots(key)
        _, key_one, expires_one, written_one, _ = _SLOT_HEAD.unpack_from(self._map, one)
        _, key_other, expires_other, written_other, _ = _SLOT_HEAD.unpack_from(self._map, other)
        if expires_one <= when:
            written_one = -1
        if expires_other <= when:
            written_other = -1
        if key_other == key or (key_one != key and written_other < written_one):
            one = other
        written = int(when * 1e9)
        record = _SLOT_HEAD.pack(digest.digest(), key, expires, written, len(der)) + der
        self._map[one : one + len(record)] = record
        return True

    def get(self, key: bytes, now: float | None = None) -> bytes | None:
        """The DER kept under ``key``, unless it expired, was replaced or is being written."""
        when = time.time() if now is None else now
        for offset in self._slots(key):
            digest, stored, expires, _, length = _SLOT_HEAD.unpack_from(self._map, offset)
            if stored != key or length > MAX_SESSION or expires <= when:
                continue
            start = offset + _SLOT_HEAD.size
            der = self._map[start : start + length]
            check = hashlib.blake2b(_KEYED.pack(key, expires, length) + der, digest_size=16)
            if check.digest() == digest:
                return der
        return None

    def close(self) -> None:
        native = _native()
        if native is not None:
            native.module.detach(self._map)  # no C callback writes to it any more
        self._map.close()

    def remove(self, key: bytes) -> None:
        """Forget the session kept under ``key`` (OpenSSL dropped it from a worker's cache:
        invalidated by a fatal alert, expired, or pushed out)."""
        for offset in self._slots(key):
            if _SLOT_HEAD.unpack_from(self._map, offset)[1] == key:
                self._map[offset + 16 : offset + 32] = bytes(16)


# ---- OpenSSL --------------------------------------------------------------------------------


def bind(context: ssl.SSLContext, label: bytes, store: SessionStore | None) -> str | None:
    """Watch ``context``'s new sessions: none resumes beyond ``MAX_AGE`` after the full
    handshake it comes from, and with a ``store`` each is written there, dropped from there
    when OpenSSL drops it, and looked for there when the worker's own cache does not hold
    it. None when done, else why not. ``label`` is what decides trust for the context."""
    functions = _functions()
    if isinstance(functions, str):
        return functions
    found = tls_tickets._found(context)
    if isinstance(found, str):
        return found
    pointer = found[1]
    namespace = hashlib.blake2b(label, digest_size=32, person=b"sidecar-sessions").digest()
    callbacks = _callbacks()
    native = _native()
    if native is not None:
        table = store._map if store is not None else None
        try:
            native.module.bind(pointer, namespace, table, peerless() is None, MAX_AGE)
        except (ValueError, TypeError, BufferError, MemoryError) as exc:
            _forget(pointer)  # nothing of an earlier binding stays
            return f"the session table cannot be bound ({exc})"
        callbacks = (native.on_new, native.on_remove, native.on_get)
    _BOUND[pointer] = _Bound(functions, store, namespace)
    if _KEPT not in context.__dict__:
        # forgotten when the context goes, before OpenSSL frees it (and calls the remove
        # callback for each session it still holds: for a context no longer here, nothing)
        context.__dict__[_KEPT] = weakref.finalize(context, _forget, pointer)
    functions.set_new_cb(pointer, callbacks[0])
    functions.set_remove_cb(pointer, callbacks[1] if store is not None else _REMOVE_CB())
    functions.set_get_cb(pointer, callbacks[2] if store is not None else _GET_CB())
    return None


def _forget(pointer: int) -> None:
    _BOUND.pop(pointer, None)
    native = _native()
    if native is not None:
        native.module.forget(pointer)


def unbind(context: ssl.SSLContext) -> None:
    """``context``'s sessions are no longer watched (they are tickets now)."""
    functions = _functions()
    found = tls_tickets._found(context)
    if isinstance(functions, str) or isinstance(found, str):
        return
    if _BOUND.pop(found[1], None) is None:
        return
    native = _native()
    if native is not None:
        native.module.forget(found[1])
    functions.set_new_cb(found[1], _NEW_CB())
    functions.set_remove_cb(found[1], _REMOVE_CB())
    functions.set_get_cb(found[1], _GET_CB())


#: what each bound context (by its SSL_CTX's address) does with its sessions
_BOUND: dict[int, _Bound] = {}
#: the context's attribute that forgets it in _BOUND when it goes
_KEPT = "_sidecar_sessions_bound"


@cache
def _callbacks() -> tuple[Any, Any, Any]:
    """The three callbacks, made once and never freed: OpenSSL may call the remove callback
    while it frees a context, after Python has let go of everything the context held. Each
    finds its context's ``_Bound`` by address; none lets an exception reach OpenSSL's stack
    (ctypes would hand OpenSSL an undefined value): anything unexpected is a miss."""

    def on_new(ssl_object: int | None, session: int | None) -> int:
        # OpenSSL keeps its reference (0: none taken here)
        try:
            bound = _of(ssl_object)
            if bound is not None and session:
                bound.made(session)
        except BaseException:  # noqa: S110 - the session stays its worker's
            pass
        return 0

    def on_remove(context: int | None, session: int | None) -> None:
        try:
            bound = _BOUND.get(context or 0)
            if bound is not None and session:
                bound.dropped(session)
        except BaseException:  # noqa: S110 - the slot ages out instead
            pass

    def on_get(ssl_object: int | None, name: Any, length: int, copy: Any) -> int | None:
        try:
            bound = _of(ssl_object)
            if bound is None or not 0 < length <= 64:
                return None
            return bound.lookup(ctypes.string_at(name, length), copy)
        except BaseException:  # a miss: a full handshake
            return None

    return _NEW_CB(on_new), _REMOVE_CB(on_remove), _GET_CB(on_get)


class _Native:
    """The C callbacks (``_sessions_c``), given libssl's functions."""

    def __init__(self, module: Any, functions: _Functions) -> None:
        self.module = module
        addresses = tuple(
            ctypes.cast(f, ctypes.c_void_p).value
            for f in (
                functions.get_ssl_ctx,
                functions.get_id,
                functions.i2d,
                functions.get_time,
                functions.get_timeout,
                functions.set_timeout,
                functions.get0_appdata,
                functions.set1_appdata,
                functions.d2i,
            )
        )
        module.setup(addresses)
        on_new, on_remove, on_get = module.callbacks()
        self.on_new = _NEW_CB(on_new)
        self.on_remove = _REMOVE_CB(on_remove)
        self.on_get = _GET_CB(on_get)


@cache
def _native() -> _Native | None:
    """The C callbacks, with the compiled build (``SIDECAR_PURE`` and the interpreted build
    use the Python ones); None where they are not built or libssl's functions are not here."""
    from . import BUILD

    functions = _functions()
    if not BUILD.compiled or isinstance(functions, str):
        return None
    try:
        from . import _sessions_c  # type: ignore[attr-defined]
    except ImportError:
        return None
    if _sessions_c.LAYOUT != _LAYOUT:  # built from another version of the table
        return None
    return _Native(_sessions_c, functions)


def _of(ssl_object: int | None) -> _Bound | None:
    functions = _functions()
    if not ssl_object or isinstance(functions, str):
        return None
    return _BOUND.get(functions.get_ssl_ctx(ssl_object) or 0)


class _Bound:
    """What one context does with its sessions."""

    def __init__(self, functions: _Functions, store: SessionStore | None, namespace: bytes) -> None:
        self._functions = functions
        self._store = store
        self._namespace = namespace

    def _key(self, name: bytes) -> bytes:
        return hashlib.blake2b(name, digest_size=16, key=self._namespace).digest()

    def _name(self, session: int) -> bytes | None:
        length = ctypes.c_uint()
        name_at = self._functions.get_id(session, ctypes.byref(length))
        if not name_at or not 0 < length.value <= 64:
            return None
        return ctypes.string_at(name_at, length.value)

    def made(self, session: int) -> None:
        functions, store = self._functions, self._store
        _cap_age(functions, session)
        name = self._name(session) if store is not None else None
        if name is None or store is None:
            return
        size = functions.i2d(session, None)
        if not 0 < size <= MAX_SESSION:
            return
        buffer = (ctypes.c_ubyte * size)()
        cursor = ctypes.cast(buffer, _Bytes)
        if functions.i2d(session, ctypes.byref(cursor)) != size:
            return
        kept = for_the_table(bytes(buffer)) if peerless() is None else bytes(buffer)
        if kept is None:
            return  # not as OpenSSL 3 encodes a session: its worker's only
        expires = functions.get_time(session) + functions.get_timeout(session)
        store.put(self._key(name), expires, kept)

    def dropped(self, session: int) -> None:
        name = self._name(session)
        if name is not None and self._store is not None:
            self._store.remove(self._key(name))

    def lookup(self, name: bytes, copy: Any) -> int | None:
        store = self._store
        der = store.get(self._key(name)) if store is not None else None
        if der is None:
            return None
        buffer = (ctypes.c_ubyte * len(der)).from_buffer_copy(der)
        cursor = ctypes.cast(buffer, _Bytes)
        session: int | None = self._functions.d2i(None, ctypes.byref(cursor), len(der))
        if not session:
            return None
        try:
            copy[0] = 0  # OpenSSL takes the one reference d2i made
            return int(session)
        except BaseException:
            self._functions.free(session)
            raise


def _cap_age(functions: _Functions, session: int) -> None:
    """No session resumes beyond ``MAX_AGE`` after the full handshake its line of sessions
    began with. A TLS 1.3 resumption makes a new session (OpenSSL copies the one resumed,
    with a new time), so without this a client resuming often enough would never be verified
    again. The first session of a line records its time in the session's application data
    (kept by the copy and by the encoding); each later one gets what is left as its timeout
    (0 when nothing is: not resumed). A session from the table has the client's certificate
    after that time (``for_the_table``)."""
    made = functions.get_time(session)
    found = _appdata(functions, session)
    if found is not None and found[1] >= _BEGAN:
        began = int.from_bytes(ctypes.string_at(found[0], _BEGAN), "big")
    else:
        began = made
        stamp = began.to_bytes(8, "big")
        if functions.set1_appdata(session, stamp, 8) != 1:
            functions.set_timeout(session, 0)
            return
    left = max(0, began + MAX_AGE - made)
    if left < functions.get_timeout(session):
        functions.set_timeout(session, left)


# ---- the client's certificate, outside OpenSSL's session -----------------------------------

#: bytes of the application data that hold a line's start (``_cap_age``); the client's
#: certificate, in a session from the table, follows them
_BEGAN = 8
_SEQUENCE = 0x30
#: ``SSL_SESSION_ASN1``'s fields, EXPLICIT: ``peer [3] X509`` and ``ticket_appdata [18]
#: OCTET STRING``
_PEER = 0xA3
_APPDATA = 0xB2
_OCTETS = 0x04


def for_the_table(der: bytes) -> bytes | None:
    """A session's encoding as the table keeps it: the client's certificate is taken out of
    OpenSSL's ``peer`` field and put after the line's start in the application data, where
    ``d2i_SSL_SESSION`` copies it as bytes. Decoding the certificate (about 110 us with
    OpenSSL 3.0, most of a resumption on another worker) is then left to
    ``PeerCertificates``, which parses one certificate once. A session without a client
    certificate is kept as it is. None when ``der`` is not a session as this module's
    sessions are encoded (one SEQUENCE whose fields have one-byte tags, application data
    holding at least a line's start); the session is then not written."""
    outer = _element(der, 0)
    if outer is None or outer[0] != _SEQUENCE or outer[2] != len(der):
        return None
    fields: list[bytes] = []
    peer: bytes | None = None
    appdata: int | None = None  # its index in fields
    began = b""
    at = outer[1]
    while at < len(der):
        found = _element(der, at)
        if found is None:
            return None
        tag, start, end = found
        if tag == _PEER:
            peer = der[start:end]
        else:
            if tag == _APPDATA:
                inner = _element(der, start)
                if inner is None or inner[0] != _OCTETS or inner[2] != end:
                    return None
                if end - inner[1] < _BEGAN:
                    return None
                began = der[inner[1] : inner[1] + _BEGAN]
                appdata = len(fields)
            fields.append(der[at:end])
        at = end
    if appdata is None:
        return None
    if peer is None:
        return der
    certificate = _element(peer, 0)
    if certificate is None or certificate[0] != _SEQUENCE or certificate[2] != len(peer):
        return None
    fields[appdata] = _tlv(_APPDATA, _tlv(_OCTETS, began + peer))
    return _tlv(_SEQUENCE, b"".join(fields))


def _element(der: bytes, at: int) -> tuple[int, int, int] | None:
    """The DER element at ``at``: its tag (one byte), where its content begins and ends;
    None when it is not one (a multi-byte tag, an indefinite or overlong length, or one
    that runs past ``der``)."""
    if at + 2 > len(der):
        return None
    tag, first = der[at], der[at + 1]
    if tag & 0x1F == 0x1F:
        return None
    if first < 0x80:
        start, length = at + 2, first
    else:
        count = first & 0x7F
        start = at + 2 + count
        if not 1 <= count <= 4 or start > len(der):
            return None
        length = int.from_bytes(der[at + 2 : start], "big")
        if length < 0x80 or der[at + 2] == 0:  # DER: the shortest form
            return None
    end = start + length
    return (tag, start, end) if end <= len(der) else None


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big") + content


def resumed_peer(ssl_object: ssl.SSLObject) -> bytes | None:
    """The DER of the client certificate a resumed connection's session carries in its
    application data: a session from the table (``for_the_table``), and the sessions made
    from it, carry it there and not in OpenSSL's ``peer``. None when the session carries
    none (a client without a certificate) or it cannot be read here.

    The certificate is read from the session the connection resumed (or TLS 1.3's new one,
    copied from it), never from what a lookup during the handshake found: a client may
    name several sessions, and OpenSSL may look one up and resume another."""
    functions = _functions()
    if isinstance(functions, str):
        return None
    pointer = _ssl_of(ssl_object, functions)
    if pointer is None:
        return None
    session = functions.get_session(pointer)
    if not session:
        return None
    found = _appdata(functions, session)
    if found is None or found[1] <= _BEGAN:
        return None
    return ctypes.string_at(found[0] + _BEGAN, found[1] - _BEGAN)


def _appdata(functions: _Functions, session: int) -> tuple[int, int] | None:
    """Where a session's application data is, and its length
    (``SSL_SESSION_get0_ticket_appdata``: OpenSSL's, valid while the session is); None when
    it has none."""
    data = ctypes.c_void_p()
    length = ctypes.c_size_t()
    if functions.get0_appdata(session, ctypes.byref(data), ctypes.byref(length)) != 1:
        return None
    if not length.value or not data.value:
        return None
    return data.value, length.value


@cache
def peerless() -> str | None:
    """None when this process finds a connection's ``SSL`` (``_ssl_of``), so the table may
    keep sessions without their peer; else why not: the table keeps them as OpenSSL encodes
    them, and a worker resuming one decodes its certificate (as before ``for_the_table``)."""
    functions = _functions()
    if isinstance(functions, str):
        return functions
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    if _ssl_of(probe, functions) is None:
        return "the SSLObject's layout is not CPython's: its SSL was not found"
    return None


def _ssl_of(ssl_object: ssl.SSLObject, functions: _Functions) -> int | None:
    """The address of ``ssl_object``'s ``SSL``, read where CPython keeps it (``PySSLSocket``:
    the object's header, then the socket's weak reference, NULL for one over memory, the
    ``SSL``, then the context); None unless the fields around it are what they must be and
    the ``SSL`` belongs to the object's context's ``SSL_CTX``."""
    inner = getattr(ssl_object, "_sslobj", None)
    if type(inner).__name__ != "_SSLSocket" or type(inner).__basicsize__ < _SSL_AT + 16:
        return None
    base = id(inner)
    socket_ref = ctypes.c_void_p.from_address(base + _SSL_AT - 8).value
    pointer = ctypes.c_void_p.from_address(base + _SSL_AT).value
    context = ctypes.c_void_p.from_address(base + _SSL_AT + 8).value
    if socket_ref or not pointer or context != id(ssl_object.context):
        return None
    if functions.get_ssl_ctx(pointer) != _ssl_ctx(ssl_object.context):
        return None
    return int(pointer)


_SSL_AT = object.__basicsize__ + 8


#: what ``_sessions_c.c`` must assume of the table to be used (its ``LAYOUT``)
_LAYOUT = (_FIRST, SLOT, _SLOT_HEAD.size, _BEGAN, _MAGIC.rstrip(b"\0"))
