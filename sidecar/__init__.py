"""mTLS identity sidecar.

A request flows one way::

    TLS listener ── client certificate (tls, certs)
                 ── verdict (identity: cache → backend)
                 ── decision (policy: pure)
                 ── forward (upstream) | answer (responses)

``handler`` runs that path as plain calls for every request. ``config`` checks the YAML once
and hands each module its own frozen section; ``app`` assembles the listener and the
upstream client; ``__main__`` is the command line (``run``, ``check-config``, ``demo``).
Leaves (``certs``, ``policy``, ``headers``, ``responses``) do no I/O.
"""

__version__ = "0.1.0"
