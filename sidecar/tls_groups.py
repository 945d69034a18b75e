"""The listener's key-exchange groups: X25519, P-256 and P-384, Mozilla's "intermediate" list.

OpenSSL's default list also offers P-521 and X448, and Python's ``ssl`` can only narrow it to a
single group (``SSLContext.set_ecdh_curve``). ``restrict_groups`` makes the one missing call,
``SSL_CTX_set1_groups_list``, on the context's own ``SSL_CTX``, the way nginx's
``ssl_ecdh_curve`` does: through ctypes, in the libssl that Python's ``_ssl`` is linked with.

Why not an OpenSSL configuration file (``OPENSSL_CONF`` with ``Groups`` in its ``ssl_conf``
section): it is read once per process when libcrypto first initialises, which ``import
hashlib`` already does, so it must be in the environment before the interpreter imports
anything; it cannot add to an operator's own ``ssl_conf`` section (OpenSSL has no way to merge
two), so an operator's ``OPENSSL_CONF`` would have to be replaced or left without the
restriction; and it would change every TLS client in the process and in its children too. The
call here touches only the listener's contexts, leaves the process's OpenSSL configuration as
the operator made it, and works the same in tests and in ``sidecar run``.

The pointer is read from Python's ``SSLContext`` object (``PyObject_HEAD`` then ``SSL_CTX *``:
CPython's layout since 3.x) and checked against two values the ``ssl`` module reports through
its own pointer before anything is written. Where that cannot be done (another Python
implementation, an ``_ssl`` with OpenSSL linked in statically), the context keeps OpenSSL's
default groups and the reason is returned, for the caller to log.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from functools import cache
from typing import Any

#: Mozilla's intermediate profile (https://ssl-config.mozilla.org/), in OpenSSL's names
GROUPS = "X25519:P-256:P-384"

# from openssl/ssl.h (the same numbers since OpenSSL 1.1.0)
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130


class _LibSSL:
    """The libssl functions needed here and in ``tls_tickets``, resolved where Python's
    ``_ssl`` finds them."""

    def __init__(self) -> None:
        library = ssl_library()
        self.ctrl = function(
            library,
            "SSL_CTX_ctrl",
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_long,
            ctypes.c_void_p,
        )
        self.get_options = function(
            library, "SSL_CTX_get_options", ctypes.c_uint64, ctypes.c_void_p
        )
        self.set_timeout = function(
            library, "SSL_CTX_set_timeout", ctypes.c_long, ctypes.c_void_p, ctypes.c_long
        )


def ssl_library() -> ctypes.CDLL:
    """Python's ``_ssl``, whose dependencies (libssl among them) ctypes searches for the
    functions it is asked for."""
    import _ssl

    return ctypes.CDLL(_ssl.__file__)


def function(library: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    """``library``'s function ``name``, with its result and argument types set."""
    found = getattr(library, name)
    found.restype = restype
    found.argtypes = list(argtypes)
    return found


@cache
def _libssl() -> _LibSSL | str:
    """The functions, or why they cannot be had here."""
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    try:
        return _LibSSL()
    except (ImportError, AttributeError, OSError) as exc:
        return f"libssl's SSL_CTX_ctrl cannot be reached from Python's _ssl ({exc})"


def _ssl_ctx(context: ssl.SSLContext) -> int | None:
    """The address of ``context``'s ``SSL_CTX``, read where CPython keeps it."""
    address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    return int(address) if address else None


def restrict_groups(context: ssl.SSLContext) -> str | None:
    """Offer only ``GROUPS`` on ``context``; None when done, else why it could not be done (the
    context then keeps OpenSSL's default groups, all of them strong)."""
    lib = _libssl()
    if isinstance(lib, str):
        return lib
    pointer = _ssl_ctx(context)
    if pointer is None:
        return "the SSLContext object has no SSL_CTX where CPython keeps it"
    # ssl reports "no minimum set" (0) as MINIMUM_SUPPORTED (-2)
    minimum = lib.ctrl(pointer, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None) or -2
    if lib.get_options(pointer) != int(context.options) or minimum != context.minimum_version:
        return "the SSLContext object's layout is not CPython's: its SSL_CTX was not found"
    if lib.ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS.encode("ascii")) != 1:
        return f"OpenSSL refused the groups {GROUPS}"
    return None
