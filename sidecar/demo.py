"""``sidecar demo``: the whole product on one machine with nothing set up.

Makes a throwaway PKI in a state folder (a server CA and a certificate for localhost; a client
root CA with an intermediate, and client certificates for demo users with different roles),
writes a configuration next to it, starts an echo upstream and the sidecar, and prints curl
commands that work as pasted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import signal
import sys
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import log
from .config import load
from .demo_echo import echo_app
from .errors import ConfigError
from .runtime import run_loop

_USERS = (
    # file name, CN, sub, username, given, family, email, roles
    (
        "alice",
        "Alice Liddell",
        "2d73cf2a-5339-421e-81cd-8fa0d25a100b",
        "alice",
        "Alice",
        "Liddell",
        "alice@example.com",
        ["administrator"],
    ),
    (
        "bob",
        "Bob Builder",
        "6c0c8c2e-1f0a-4f51-9b1e-2b6a0c7f1d11",
        "bob",
        "Bob",
        "Builder",
        "bob@example.com",
        ["member"],
    ),
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    usage: x509.ObjectIdentifier | None = None,
    days: int = 365,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def _write(
    folder: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | None,
    chain: tuple[x509.Certificate, ...] = (),
) -> None:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    (folder / f"{name}.pem").write_bytes(pem)
    if key is not None:
        path = folder / f"{name}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)


def make_pki(folder: Path) -> None:
    """Create the demo PKI in ``folder`` (kept between runs: delete the folder to start over)."""
    folder.mkdir(parents=True, exist_ok=True)
    server_ca_key = _key()
    server_ca = _cert("Sidecar Demo Server CA", server_ca_key, None, ca=True)
    server_key = _key()
    server = _cert(
        "localhost",
        server_key,
        (server_ca, server_ca_key),
        ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        days=90,
    )
    _write(folder, "server-ca", server_ca, None)
    _write(folder, "server", server, server_key)

    root_key = _key()
    root = _cert("Sidecar Demo Client Root CA", root_key, None, ca=True)
    inter_key = _key()
    inter = _cert("Sidecar Demo Client Intermediate CA", inter_key, (root, root_key), ca=True)
    # The trust file holds the root and its intermediate, as the contract allows.
    _write(folder, "client-ca", root, None, chain=(inter,))
    # mallory's certificate comes from the trusted CA but is bound to nobody: TLS accepts it,
    # the policy refuses it.
    for file, cn in [*((u[0], u[1]) for u in _USERS), ("mallory", "Mallory Stranger")]:
        key = _key()
        cert = _cert(
            cn, key, (inter, inter_key), ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=90
        )
        _write(folder, file, cert, key)


def write_config(folder: Path, *, port: int, upstream_port: int, admin_port: int) -> Path:
    users = []
    for file, _cn, sub, username, given, family, email, roles in _USERS:
        users.append(
            f"""      - sub: {sub}
        username: {username}
        given_name: {given}
        family_name: {family}
        email: {email}
        roles: [{", ".join(roles)}]
        certificates:
          - file: {file}.pem"""
        )
    text = f"""# Written by `sidecar demo`. Every key is explained in config/sidecar.example.yaml.
listen:
  host: 127.0.0.1
  port: {port}
tls:
  certificate: server.pem
  key: server.key
  client_ca: [client-ca.pem]
  client_certificate: optional
upstream:
  url: http://127.0.0.1:{upstream_port}
identity:
  backend: static
  static:
    users:
{chr(10).join(users)}
routes:
  - path: /public/
    access: public
  - path: /admin/
    roles: [administrator]
  - path: /
admin:
  host: 127.0.0.1
  port: {admin_port}
log:
  format: console
"""
    path = folder / "sidecar.yaml"
    path.write_text(text)
    return path


def _instructions(folder: Path, port: int, admin_port: int) -> str:
    d = folder.resolve()
    base = f"https://localhost:{port}"
    ca = f"--cacert {d}/server-ca.pem"

    def who(name: str) -> str:
        return f"--cert {d}/{name}.pem --key {d}/{name}.key"

    return f"""
The sidecar is listening on {base} in front of an echo application.
Paste these in another terminal:

  # alice (role administrator) is allowed into /admin/, and the upstream shows what it received:
  curl {ca} {who("alice")} {base}/admin/reports

  # bob (role member) is identified but lacks the administrator role: 403
  curl {ca} {who("bob")} {base}/admin/reports

  # bob may use the rest of the application:
  curl {ca} {who("bob")} {base}/app/

  # no certificate on a protected path: 401; on a public path: forwarded anonymously
  curl {ca} {base}/app/
  curl {ca} {base}/public/hello

  # a certificate from the trusted CA that is bound to no user: 403
  curl {ca} {who("mallory")} {base}/app/

  # identity headers sent by the client are replaced, never passed on:
  curl {ca} {who("bob")} -H 'X-USERINFO: eyJzdWIiOiJhZG1pbiJ9' {base}/app/

  # the admin listener: readiness and Prometheus metrics
  curl http://127.0.0.1:{admin_port}/readyz
  curl -s http://127.0.0.1:{admin_port}/metrics | grep sidecar_requests_total

Files (certificates, keys, sidecar.yaml): {d}
Press Ctrl-C to stop.
"""


def run_demo(folder: Path, *, port: int, upstream_port: int, admin_port: int) -> int:
    if not (folder / "client-ca.pem").exists():
        make_pki(folder)
    config_path = write_config(
        folder, port=port, upstream_port=upstream_port, admin_port=admin_port
    )
    try:
        config = load(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    log.configure("console", "info")
    return run_loop(_demo(config, folder, port, upstream_port))


async def _demo(config: object, folder: Path, port: int, upstream_port: int) -> int:
    from .app import Sidecar
    from .config import Config

    assert isinstance(config, Config)
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", upstream_port)
    try:
        await site.start()
    except OSError as exc:
        print(
            f"demo: cannot start the echo upstream on 127.0.0.1:{upstream_port}: {exc.strerror} "
            "(use --upstream-port)",
            file=sys.stderr,
        )
        await runner.cleanup()
        return 1
    sidecar = Sidecar(config)
    try:
        await sidecar.start()
    except OSError as exc:
        print(
            f"demo: cannot listen on 127.0.0.1:{port}: {exc.strerror} (use --port)", file=sys.stderr
        )
        await runner.cleanup()
        return 1
    print(_instructions(folder, port, config.admin.port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop(grace=2)
    await runner.cleanup()
    return 0
