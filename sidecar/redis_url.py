"""Where the shared verdict cache lives: a ``redis://`` URL read into a ``RedisTarget``.

Pure parsing, checked at configuration time. Six schemes: ``redis`` and ``rediss`` (TLS) for
one server, ``redis+sentinel``/``rediss+sentinel`` for the master of a Sentinel service, and
``redis+cluster``/``rediss+cluster`` for a Redis Cluster (Valkey speaks the same protocol).
Credentials and options never go in the URL: the URL is logged and shown by ``check-config``,
so the password comes from a file (``identity.cache.shared.password_file``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["standalone", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT: dict[Mode, int] = {"standalone": 6379, "sentinel": 26379, "cluster": 6379}
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """One server, a Sentinel service's master, or a cluster; ``tls`` for ``rediss``."""

    mode: Mode
    tls: bool
    #: (host, port): the server, the sentinels, or the cluster's seed nodes
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    #: the Sentinel service name (``redis+sentinel://h:26379/<service>``)
    service: str | None = None

    def describe(self) -> str:
        """The URL again, normalised (for logs and check-config)."""
        scheme = next(k for k, v in _SCHEMES.items() if v == (self.mode, self.tls))
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        path = f"/{self.service}" if self.service else ""
        if self.mode != "cluster" and self.db:
            path += f"/{self.db}"
        return f"{scheme}://{hosts}{path}"


def parse_redis_url(url: str) -> RedisTarget:
    """``url`` as a ``RedisTarget``; raises ``ValueError`` saying what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(
            f"not a Redis URL: {url!r} (redis://, rediss://, redis+sentinel://, "
            "rediss+sentinel://, redis+cluster:// or rediss+cluster://)"
        )
    mode, tls = _SCHEMES[scheme.lower()]
    if any(c in rest for c in "?#"):
        raise ValueError("no query or fragment in the URL: every option is a key of its own")
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise ValueError(
            "no credentials in the URL (it is logged): the user name goes in username, "
            "the password in a file named by password_file"
        )
    if not authority:
        raise ValueError(f"no host in {url!r}")
    nodes = tuple(_node(part, _DEFAULT_PORT[mode]) for part in authority.split(","))
    if mode == "standalone" and len(nodes) > 1:
        raise ValueError(
            "one host for redis:// (several sentinels: redis+sentinel://, "
            "cluster seed nodes: redis+cluster://)"
        )
    segments = [s for s in path.split("/")] if path else []
    service: str | None = None
    if mode == "sentinel":
        if not segments or not segments[0]:
            raise ValueError(
                "a Sentinel URL names its service: redis+sentinel://host:26379/<service>[/<db>]"
            )
        service = segments.pop(0)
        if not _SERVICE.match(service):
            raise ValueError(f"not a Sentinel service name: {service!r}")
    db = 0
    if segments and segments != [""]:
        if mode == "cluster":
            raise ValueError("a Redis Cluster has database 0 only: no path in redis+cluster://")
        if len(segments) > 1 or not segments[0].isdigit() or len(segments[0]) > 5:
            raise ValueError(f"the path is a database number (0, 1, ...), not {path!r}")
        db = int(segments[0])
    return RedisTarget(mode=mode, tls=tls, nodes=nodes, db=db, service=service)


def _node(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"unclosed [ in {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
        port_text = after[1:] if after.startswith(":") else after
        if after and not after.startswith(":"):
            raise ValueError(f"not host:port: {text!r}")
    else:
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = ""
        if not _HOST.match(host):
            raise ValueError(f"not a host name or address: {host!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"not a port: {port_text!r}")
    return host, int(port_text)
