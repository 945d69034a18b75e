"""The header names the sidecar itself frames, routes or strips requests by.

``headers`` applies them to every request; ``config`` keeps them out of what may be configured
as an identity header (``SIDECAR_HEADERS``) or stripped (``FRAMING``). Lower case; header names
are compared with every character but letters and digits read as a dash
(``headers.normal_name``).
"""

from __future__ import annotations

# RFC 9110 §7.6.1 plus the de-facto ones proxies drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Headers by which an application learns who the client is, how it came in and under which
# path prefix it is served: only trusted proxies may send them. Every other X-Forwarded-*
# (-Server, -Ssl, -Scheme, -Uri, ...) is one of them too: ``headers`` strips them by prefix.
FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
        # the path prefix the application is mounted under: Spring's ForwardedHeaderFilter,
        # Symfony, Laravel and Traefik put it in front of the path and of the links they build
        "x-forwarded-prefix",
        # the client's address, in the spellings of CDNs and load balancers (Akamai and
        # Cloudflare Enterprise, Cloudflare, Rackspace/Riverbed, and frameworks that read
        # them first: Laravel, Django packages, ASP.NET helpers); rate limits, audit logs and
        # address allow-lists believe them
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "x-cluster-client-ip",
        # more of them, from the lists applications search for an address (Rails' RemoteIp
        # and the PHP "real IP" idiom: Client-IP; django-ipware and python-ipware: the rest),
        # the CDNs and platforms that set them, and Envoy's "the client is internal"
        "client-ip",
        "x-forwarded",
        "forwarded-for",
        "x-original-forwarded-for",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-proxyuser-ip",
        "fastly-client-ip",
        "fly-client-ip",
        "x-appengine-user-ip",
        "x-azure-clientip",
        "x-azure-socketip",
        "do-connecting-ip",
        "cf-connecting-ipv6",
        "cf-pseudo-ipv4",
        "x-envoy-external-address",
        "x-envoy-internal",
        "via",
        # the host the client asked for, in the spellings link and redirect builders read
        "x-host",
        "x-original-host",
    }
)
# Headers with which an application serves another path than the request line's: IIS URL
# Rewrite and ASP.NET read X-Original-URL, Zend Framework 1 and old Symfony (before 2.8.44
# and 3.4.14, CVE-2018-14773) X-Rewrite-URL and X-Original-URL. The sidecar's policy judged
# the request line, and a path in a header would be judged by nobody: no peer may send
# them, trusted proxy or not.
REROUTING = frozenset({"x-original-url", "x-rewrite-url"})
#: what the upstream needs to frame and route a request: never removed
FRAMING = frozenset({"host", "content-length"})
#: every name above, and our X-Request-ID: no configured header may take one of them
SIDECAR_HEADERS = HOP_BY_HOP | FORWARDING | REROUTING | FRAMING | {"x-request-id"}
