"""Many TLS records decrypted in one call (``_records_c.c``), for ``tls_transport``.

``ssl.SSLObject.read`` decrypts one record (16 KiB at most) per call into a new bytes object;
a read of the socket that brought many records (an upload arrives 256 KiB at a time) then
costs a Python call per record and a join that copies them all once more. ``reader()`` is
the C function that decrypts all of them into one bytes object (``read(raw, raw.context,
limit)``, ``raw`` being the ``SSLObject``'s ``_ssl._SSLSocket``) with the compiled build,
where libssl's functions are found; else None, and ``tls_transport`` reads record by record.
The C function reads the ``SSL`` where CPython keeps it only in an object of exactly the
``_ssl._SSLSocket`` type, over memory BIOs, whose context field holds what the ``context``
given with it is (a check of the layout); else it raises, and nothing is read. Given the
bytes of a socket read as well (``read(raw, raw.context, limit, data)``, the incoming BIO
being empty), it decrypts them where they are: ``MemoryBIO.write`` would zero-fill the BIO's
room and copy them into it first. OpenSSL's read buffer is kept for the records of one call
(CPython's ``SSL_MODE_RELEASE_BUFFERS`` frees it after each record) and released once when
all of them were read, where OpenSSL's ``SSL_free_buffers`` is safe (``frees_buffers_safely``).
"""

from __future__ import annotations

import ctypes
import ssl
from functools import cache
from typing import Any, Protocol

from .tls_groups import function, ssl_library

#: how a read ended (``_records_c``): more bytes are needed, the peer's close_notify came, a
#: record failed (``ssl.SSLObject.read`` raises why), the limit was reached
WANT = 0
CLOSED = 1
FAILED = 2
FULL = 3


class Reader(Protocol):
    """``_records_c.read``: ``(raw, raw.context, limit) -> (plaintext, how)`` reads what the
    incoming BIO holds; with ``data`` (the incoming BIO being empty), the bytes of a socket
    read, without writing them into the BIO (what the records leave of them goes there)."""

    def __call__(
        self, raw: Any, context: Any, limit: int, data: bytes | memoryview = ..., /
    ) -> tuple[bytes, int]: ...


def frees_buffers_safely(version: int) -> bool:
    """Whether the OpenSSL of this version number (``ssl.OPENSSL_VERSION_NUMBER``: the
    library ``_ssl`` runs with) keeps, in ``SSL_free_buffers``, a read buffer that holds a
    record begun. Fixed in 3.0.14, 3.1.6, 3.2.2 and 3.3.1 (CVE-2024-4741); before, it looked
    only at the bytes read ahead and freed a buffer whose record header was read and whose
    body was still to come: the C reader then never calls it (the buffer stays until a read
    ends a record with ``SSL_MODE_RELEASE_BUFFERS`` set, or the connection ends). 1.1.1's fix
    (1.1.1y) is in its paid support only: 1.x is taken as unfixed."""
    major = version >> 28
    if major != 3:
        return major > 3
    minor = (version >> 20) & 0xFF
    patch = (version >> 4) & 0xFF
    return patch >= {0: 14, 1: 6, 2: 2, 3: 1}.get(minor, 0)


@cache
def reader() -> Reader | None:
    """The C reader (see the module's docstring), or None."""
    from . import BUILD

    if not BUILD.compiled:
        return None
    try:
        from . import _records_c  # type: ignore[attr-defined]
    except ImportError:
        return None
    if (_records_c.WANT, _records_c.CLOSED, _records_c.FAILED, _records_c.FULL) != (
        WANT,
        CLOSED,
        FAILED,
        FULL,
    ):
        return None
    try:
        import _ssl

        library = ssl_library()
        pointer = ctypes.c_void_p
        addresses = tuple(
            ctypes.cast(f, pointer).value
            for f in (
                function(
                    library,
                    "SSL_read_ex",
                    ctypes.c_int,
                    pointer,
                    pointer,
                    ctypes.c_size_t,
                    ctypes.POINTER(ctypes.c_size_t),
                ),
                function(library, "SSL_get_error", ctypes.c_int, pointer, ctypes.c_int),
                function(library, "ERR_clear_error", None),
                function(library, "SSL_get_rbio", pointer, pointer),
                function(library, "SSL_set0_rbio", None, pointer, pointer),
                function(library, "BIO_new_mem_buf", pointer, pointer, ctypes.c_int),
                function(
                    library,
                    "BIO_ctrl",
                    ctypes.c_long,
                    pointer,
                    ctypes.c_int,
                    ctypes.c_long,
                    pointer,
                ),
                function(library, "BIO_up_ref", ctypes.c_int, pointer),
                function(library, "BIO_write", ctypes.c_int, pointer, pointer, ctypes.c_int),
                function(library, "BIO_free", ctypes.c_int, pointer),
                function(
                    library,
                    "SSL_ctrl",
                    ctypes.c_long,
                    pointer,
                    ctypes.c_int,
                    ctypes.c_long,
                    pointer,
                ),
                function(library, "SSL_free_buffers", ctypes.c_int, pointer),
            )
        )
        socket_type = _ssl._SSLSocket  # type: ignore[attr-defined]
        _records_c.setup(addresses, socket_type, frees_buffers_safely(ssl.OPENSSL_VERSION_NUMBER))
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return None
    read: Reader = _records_c.read
    return read
