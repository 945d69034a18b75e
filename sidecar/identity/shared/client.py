"""Builds the redis-py client for ``identity.cache.shared``: one server, a Sentinel master, or
a cluster, with TLS that always verifies and a password read from its file.

redis-py (``redis.asyncio``) is the client: Redis' own, maintained with the server, with
Sentinel, Cluster (its pub/sub included, since 8.0), Lua scripts by SHA with a fallback to
``EVAL``, and TLS with a CA and a client certificate. Every Redis call the cache makes is
bounded by the cache itself (``store``), so the client is told never to retry on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider

from ...certs import read_certificates, to_pem
from ...config import SharedCacheConfig, read_password

#: Redis calls in flight per worker: a burst of misses queues for these instead of opening
#: hundreds of connections
MAX_CONNECTIONS = 16
#: connections per Redis server per worker: those, the subscriber's and a spare
_POOL = MAX_CONNECTIONS + 2


class FileCredentials(CredentialProvider):
    """The password read from its file at each new connection: a rotated password (a
    Kubernetes Secret update) is used from the next connection on, without a reload."""

    def __init__(self, username: str | None, password_file: Path) -> None:
        self._username = username
        self._file = password_file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = read_password(self._file)
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def connection_options(config: SharedCacheConfig, *, io_timeout: float) -> dict[str, Any]:
    """The options every connection to a Redis server (not a sentinel) gets."""
    options: dict[str, Any] = {
        "socket_timeout": io_timeout,
        "socket_connect_timeout": io_timeout,
        "socket_keepalive": True,
        # The cache decides what a failed call means (store._call): no retries in the client.
        "retry": Retry(NoBackoff(), 0),
        # RESP2: every Redis and Valkey version speaks it (RESP3 needs Redis 6).
        "protocol": 2,
        "client_name": "sidecar",
        "health_check_interval": 0,
    }
    if config.password_file is not None:
        options["credential_provider"] = FileCredentials(config.username, config.password_file)
    elif config.username is not None:
        options["username"] = config.username
    options.update(tls_options(config))
    return options


def tls_options(config: SharedCacheConfig) -> dict[str, Any]:
    """rediss: verify the server (certificate and host name) against ``ca`` or the system
    store; present ``certificate``/``key`` when set. Never anything weaker."""
    if not config.target().tls:
        return {}
    options: dict[str, Any] = {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
    if config.ca is not None:
        # PEM or DER, like every certificate file: handed over as PEM text
        options["ssl_ca_data"] = to_pem(read_certificates(config.ca))
    if config.certificate is not None and config.key is not None:
        options["ssl_certfile"] = str(config.certificate)
        options["ssl_keyfile"] = str(config.key)
    return options


def build_client(config: SharedCacheConfig, *, io_timeout: float) -> Redis | RedisCluster:
    """A client for ``config``'s target; it connects on its first call."""
    target = config.target()
    options = connection_options(config, io_timeout=io_timeout)
    if target.mode == "cluster":
        # One retry: a MOVED after a resharding is followed (the call stays bounded by the
        # cache's own timeout).
        options["retry"] = Retry(NoBackoff(), 1)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=_POOL,
            **options,
        )
    if target.mode == "sentinel":
        assert target.service is not None
        sentinel_options = {
            key: value
            for key, value in options.items()
            if key.startswith(("socket_", "ssl")) or key in ("retry", "protocol")
        }
        sentinel = Sentinel(
            list(target.nodes), sentinel_kwargs=sentinel_options, **options, db=target.db
        )
        client: Redis = sentinel.master_for(
            target.service, max_connections=_POOL, check_connection=False
        )
        return client
    host, port = target.nodes[0]
    return Redis(host=host, port=port, db=target.db, max_connections=_POOL, **options)


async def close_client(client: Any) -> None:
    """Close a client of ``build_client`` and every connection it opened: a Sentinel
    master's client does not own its pool, and the sentinels have clients of their own."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        await pool.disconnect()
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()
