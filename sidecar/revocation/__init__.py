"""Revocation: whether a client certificate that passed the TLS handshake is refused now.

The TLS handshake proves a certificate was issued by a trusted CA and is within its validity;
this package says whether it has been withdrawn since. Four sources, any of which refuses:

- ``crl``: certificate revocation lists from files (``tls.crl``), verified against the trust
  anchors, kept as sets of revoked serial numbers per issuing CA (pure);
- ``fetch``: CRLs fetched from the distribution points certificates name
  (``tls.crl_fetch``), cached, bounded and refreshed before they expire;
- ``ocsp``: an OCSP responder asked once per certificate (``tls.ocsp``), its signed answer
  cached until its nextUpdate;
- ``deny``: fingerprints and issuer + serial pairs refused whatever the CA says
  (``tls.deny``, and run-time entries from the admin listener, ``admin``).

``chain`` finds, among the trust anchors, who issued a certificate (Python 3.11 cannot show
the chain the client sent). ``gate.Revocation`` puts it together for the request path: one
synchronous ``check`` per request (a dict lookup, keyed by the certificate's fingerprint and
valid for the current generation of revocation data), ``settle`` to wait for an answer still
on its way, and ``connection_started`` as a connection's handshake completes. ``client`` is
the one module that talks to the network (aiohttp): the application hands its
``HttpTransport`` to ``gate``, so nothing the request path imports needs aiohttp.
``watch`` passes the identity backend's word on (Identity Plus ``PB 0004``/``PB 0005``);
``report`` is check-config's. Nothing here is imported by the package itself: ``config``
reads and verifies CRL files with ``crl`` and ``deny``, which import nothing else of it, and
``gate`` imports ``config``.
"""
