"""mTLS identity sidecar.

A request flows one way::

    TLS listener ── client certificate (tls, certs)
                 ── verdict (identity: cache → backend)
                 ── decision (policy: pure)
                 ── forward (upstream) | answer (responses)

``tls_transport`` runs TLS on each accepted connection (the handshake, its alerts, the
records) and gives the HTTP protocol an asyncio transport over it. ``listener`` is the TLS
listener's own HTTP/1.1 protocol: it serves requests without a body
(nearly all a browser sends) and relays the upstream's answer as bytes; the first request it
does not serve (a body, an upgrade, a malformed head) moves the connection to aiohttp's server
(``server``). Both hold reading while a client is not taking its answers and cut it off
after ``limits.send_timeout`` (``flow``). ``handler`` runs the path above as plain calls for
every request, whichever protocol parsed it. ``config`` checks the YAML once
and hands each module its own frozen section; ``app`` assembles the listener and the
upstream client; ``__main__`` is the command line (``run``, ``check-config``, ``demo``).
``build`` says whether the request path runs compiled (setup.py) or interpreted.
Leaves (``certs``, ``policy`` with ``readings``, how applications may read a request path,
``headers``, ``responses``) do no I/O; so do the pieces for running behind a front proxy:
``certformats`` (client certificates in headers, read and written, with ``sfv`` and ``xfcc``
for their syntaxes), ``proxyproto`` (the PROXY protocol) and ``sessions`` (the sealed
identity cookie of Identity Plus "HTTP legacy").
"""

from .build import Build, choose

__version__ = "0.1.0"

#: compiled or interpreted, decided before any module of the request path is imported
BUILD: Build = choose()
