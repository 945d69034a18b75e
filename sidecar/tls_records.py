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
all of them were read.
"""

from __future__ import annotations

import ctypes
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
        _records_c.setup(addresses, _ssl._SSLSocket)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return None
    read: Reader = _records_c.read
    return read
