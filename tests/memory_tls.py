"""A TLS handshake between two ``SSLObject``s over memory BIOs, in this thread (no sockets):
for tests of what OpenSSL's callbacks do during a handshake. Importable by the scripts
tests run in processes of their own."""

from __future__ import annotations

import contextlib
import ssl


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, rounds: int = 10
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """The server's and the client's ends after ``rounds`` of records passed both ways (a
    handshake takes three or four); kept alive by the caller: OpenSSL drops the session of
    a connection freed before it was shut down."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(rounds):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return s, c
