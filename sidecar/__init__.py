"""mTLS identity sidecar.

A request flows one way, down this picture::

    listener          accepts, counts, retires and shuts down the client connections
    ├ tls_transport   TLS on each connection: the handshake, its alerts, the records
    ├ http1.client    our HTTP/1.1: request heads (http1.heads) and bodies (http1.bodies,
    │                 http1.inbound), deadlines, pipelining, flow control (flow), the
    │                 answers' framing
    └ fallback        aiohttp's server, for the upgrades http1.client hands over
        both protocols share a listener_state and put every request through:
    gateway           certificate (certs) → revoked? (revocation) → verdict (identity:
                      cache → backend) → decision (policy) → our answer (responses)
                      or a forward
    forwarder         the forward: http1.upstream connections in an http1.pool

``http1.client`` serves every request but an upgrade: a WebSocket (or ``CONNECT``) goes to
``fallback`` with its connection. ``addresses`` says which addresses are one client, for the
bounds on what one client may hold.
The ``gateway`` runs a request's steps as plain calls, each taking values and returning one;
the leaves (``certs``, ``policy`` with ``readings``, how applications may read a request
path, ``headers``, ``responses``, ``http1.heads``) do no I/O.
``config`` checks the YAML once and hands each module its own frozen section; ``app``
assembles one process; ``__main__`` is the command line (``run``, ``check-config``,
``explain``, ``demo``) and ``runtime`` its event loop; ``build`` says whether the request
path runs compiled. Imports point down the picture, never up and never in a circle
(``tests/test_architecture.py``).
The pieces for running behind a front proxy are leaves too: ``certformats`` (client
certificates in headers, read and written, with ``sfv`` and ``xfcc`` for their syntaxes),
``proxyproto`` (the PROXY protocol, read by ``tls_transport`` before TLS) and ``sessions``
(the sealed identity cookie of Identity Plus "HTTP legacy", whose flow ``identity.legacy`` owns
and the ``gateway`` calls first when it is on: the return from sign-on, and the certificate a
session cookie stands for); ``frontproxy`` is the ``gateway``'s other source of a request's
certificate and client address: a trusted proxy's header, verified again.

The decision's entry is ``servers``: the site the connection's SNI chose (``sni`` reads it
from the ClientHello for ``tls_transport`` when there are several), its names and its
routes; ``rules`` is what a route asks of a client (certificate matchers, addresses, trust);
both are leaves, like ``policy``. ``explain`` shows a decision step by step (``sidecar
explain``, the admin's ``/explain``) with the same functions.

Beside the path: the report headers an application sets on its responses (removed in
``forwarder.Forward.head`` by ``headers``) become Identity Plus calls once the answer has
gone (``gateway`` hands them to ``identity.reports``), as do the admin listener's ``POST
/identityplus/...`` (``admin_reports``); the admin listener's status page (``status``) reads
what the gateway observes (``observe``: refusals, backend latency) and the metrics registry.
``revocation`` says whether a client certificate is refused now (a deny-list, CRLs from files
and distribution points, OCSP): the gateway asks its ``gate`` before any cached verdict is
used, and the listener tells it of each connection as its handshake completes (resumed ones
too); its network side (``revocation.client``, aiohttp) is handed to it by ``app``.

Glossary, one word per thing, in names and docstrings alike:

- **connection**: a client's TLS connection, from accept to close (``TLSProtocol``, then
  ``ClientConnection`` or, once handed over, ``FallbackConnection``). A connection to the
  application is always an *upstream connection* (``UpstreamConnection``).
- **request**: one HTTP request from its head to its access event, ``request.Request``: what
  the protocol read, what the gateway made of it (its ``Step``), and how it ended.
- **verdict**: what the identity side says of a client certificate (``identity.Verdict``:
  allow, deny, validate, unknown); cached by ``identity.cache``.
- **decision**: what policy makes of a route and a verdict (``policy.Decision``: ``Forward``,
  ``Deny``, ``Redirect``, ``Unavailable``). ``policy.Forward`` is the decision to forward;
  the forward itself is ``forwarder.Forward``.
- **forward**: a request on its way to the upstream application and its answer on the way
  back (``forwarder.Forward``, from ``Forwarder.send``, the forwarder's one way in).
- **answer**: what the client gets: the upstream's, relayed by a forward, or our own
  (``responses.Answer``). *Response* is kept for the HTTP message as the wire and aiohttp
  call it (the upstream's response head, an aiohttp ``StreamResponse``).
- **plan**: everything a reload can change, swapped in as one value (``plan.Plan``); a
  request keeps the plan it began with.
"""

from .build import Build, choose

__version__ = "0.1.0"

#: compiled or interpreted, decided before any module of the request path is imported
BUILD: Build = choose()
