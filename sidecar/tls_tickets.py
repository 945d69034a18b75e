"""Session resumption: an in-memory session cache for a sidecar of one process; ticket keys
shared by the workers of one with several, rotated, and tied to trust.

**One process** (``listen.workers: 1``): ``use_session_cache`` turns tickets into references
(``SSL_OP_NO_TICKET``: the TLS 1.3 ticket a client gets names a session kept in the context's
own cache). A stateless ticket carries the session, the client's certificate in it, and OpenSSL
3.0 decodes that certificate again on every resumption: ``d2i_SSL_SESSION`` was 38 % of the
process's CPU in S2-resume (the same share as in nginx, which uses tickets too), about 250 us
per connection. A cached session is found by its name, with the certificate already decoded.
The cache is bounded (``tls.session_cache``; OpenSSL drops the oldest) and a session lives
``ROTATE_EVERY`` seconds. A trust change builds a new context, and with it an empty cache.

**Several workers**: the kernel hands a client's next connection to any worker, and a cache is
one worker's (a client would resume one time in N). Each worker keeps a cache all the same
and writes its sessions to a table they share (``tls_sessions``); where that table cannot be
had, they use stateless tickets whose keys they share. OpenSSL gives each new ``SSL_CTX`` random ticket keys: a ticket from one worker
was useless on the other (about half the resumptions failed with two workers).
Python's ``ssl`` cannot set the keys; ``install`` makes the one call it lacks,
``SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, keys)``, through ctypes on the
context's own ``SSL_CTX`` (found and checked as ``tls_groups`` does), and reads the keys back
to be sure they are the context's. Where that cannot be done, the context keeps OpenSSL's
random per-worker keys and the reason is returned, for the caller to log.

The 80 bytes (key name, HMAC key, AES key) are derived with HMAC-SHA256 from

- a **secret** of 32 random bytes the process makes at start; a supervisor makes it once and
  hands it to every worker it starts through an inherited pipe (``PIPE_OPTION``, read once
  and closed). Never argv or a file others can read, and not the environment either: that stays
  readable in ``/proc/<pid>/environ`` for the worker's life and is inherited by anything it
  starts. It is never logged;
- a **label**: what decides trust for that context (``tls.Fingerprint.trust``, and the server
  names with ``servers[]``). A reload that changes trust changes the label, so tickets issued
  before it have an unknown key name in every worker and the handshake is a full one (with the
  new verification); a reload that changes nothing of trust keeps the keys;
- an **epoch**: the wall-clock hour (``ROTATE_EVERY``), the same in every worker of the host.

OpenSSL's built-in ticket handling holds one key, not a current and a previous one: at each
rotation, tickets made under the previous epoch stop resuming and their holders make one full
handshake. The trade-off is deliberate: one full handshake per client per hour, against a
callback into Python on every handshake (``SSL_CTX_set_tlsext_ticket_key_evp_cb``) to keep the
previous key. The session lifetime is set to the rotation period, so a client is not told a
ticket lives longer than its key (OpenSSL's default is two hours).

With ``servers[]``, sessions stay with their server either way: OpenSSL looks a session up
(or decrypts a ticket) with the context a connection was made with, and the listener picks
the server's context from the ClientHello before OpenSSL sees it (``sni``), so each server
has its own cache, or its own keys.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import secrets
import ssl
import time

from .tls_groups import _LibSSL, _libssl, _ssl_ctx

#: seconds between two ticket key rotations (and the longest a session resumes)
ROTATE_EVERY = 3600
#: sessions one process's cache keeps by default (``tls.session_cache``; OpenSSL's default is
#: 20,480): each holds the client's decoded certificate, about 7 KiB of memory
SESSION_CACHE_SIZE = 2048
#: the hidden ``sidecar run`` option a supervisor passes a worker the secret's pipe with
PIPE_OPTION = "--ticket-secret-fd"
SECRET_BYTES = 32

# from openssl/ssl.h (the same numbers since OpenSSL 1.1.0)
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_SERVER = 0x0002
_KEYS_LENGTH = 80  # 16 bytes of key name, 32 of HMAC key, 32 of AES key
_CONTEXT = b"sidecar session ticket keys v1\0"


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def read_secret(fd: int) -> bytes:
    """The secret a supervisor wrote into the pipe whose read end this process inherited as
    ``fd``; closes it. Raises ``ValueError`` when it is not a whole secret."""
    try:
        data = b""
        while len(data) < SECRET_BYTES:
            chunk = os.read(fd, SECRET_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) != SECRET_BYTES:
        raise ValueError(f"the ticket secret pipe gave {len(data)} bytes, not {SECRET_BYTES}")
    return data


def epoch(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // ROTATE_EVERY)


def next_rotation(now: float | None = None) -> float:
    """The wall-clock time the next epoch begins."""
    return float((epoch(now) + 1) * ROTATE_EVERY)


def derive(secret: bytes, label: bytes, at_epoch: int) -> bytes:
    """The 80 bytes of ticket keys for one trust label and one epoch."""
    info = _CONTEXT + hashlib.sha256(label).digest() + at_epoch.to_bytes(8, "big")
    out = b"".join(
        hmac.new(secret, info + bytes([block]), hashlib.sha256).digest() for block in range(3)
    )
    return out[:_KEYS_LENGTH]


def _found(context: ssl.SSLContext) -> tuple[_LibSSL, int] | str:
    """libssl and ``context``'s ``SSL_CTX``, checked to be it; else why not."""
    lib = _libssl()
    if isinstance(lib, str):
        return lib
    pointer = _ssl_ctx(context)
    if pointer is None:
        return "the SSLContext object has no SSL_CTX where CPython keeps it"
    if lib.get_options(pointer) != int(context.options):
        return "the SSLContext object's layout is not CPython's: its SSL_CTX was not found"
    return lib, pointer


def use_session_cache(context: ssl.SSLContext, size: int = SESSION_CACHE_SIZE) -> str | None:
    """Resume ``context``'s sessions from its own cache, not from stateless tickets; None when
    done, else why the cache is not as wanted (tickets are off all the same: the cache then
    has OpenSSL's size and lifetime)."""
    context.options |= ssl.OP_NO_TICKET
    found = _found(context)
    if isinstance(found, str):
        return found
    lib, pointer = found
    if not lib.ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) & _SSL_SESS_CACHE_SERVER:
        return "the context's server session cache is off"
    lib.ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    if lib.ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) != size:
        return "OpenSSL did not take the session cache's size"
    lib.set_timeout(pointer, ROTATE_EVERY)
    return None


def install(context: ssl.SSLContext, keys: bytes) -> str | None:
    """Set ``context``'s ticket keys; None when done, else why not (the context then keeps
    OpenSSL's random keys: sessions resume only on the worker that made them)."""
    if len(keys) != _KEYS_LENGTH:
        raise ValueError("ticket keys are 80 bytes")
    found = _found(context)
    if isinstance(found, str):
        return found
    lib, pointer = found
    if lib.ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, _KEYS_LENGTH, keys) != 1:
        return "OpenSSL refused the ticket keys"
    back = ctypes.create_string_buffer(_KEYS_LENGTH)
    if lib.ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, _KEYS_LENGTH, back) != 1:
        return "OpenSSL did not give the ticket keys back"
    if not hmac.compare_digest(back.raw, keys):
        return "the ticket keys read back differ from those set"
    lib.set_timeout(pointer, ROTATE_EVERY)
    return None
