"""Real parts for the revocation tests.

- CRLs made with ``cryptography`` (``make_crl``), and client certificates that name a CRL
  distribution point and an OCSP responder (``client_with``);
- ``OCSPResponder``: a real ``openssl ocsp -index ... -port 0`` responder, signing as the CA
  itself or as a delegated responder, optionally with a corrupted signature (``-badsig``);
- ``DistributionPoint``: an aiohttp server that serves CRLs by path and counts the fetches;
- ``Relay``: a TCP proxy on 127.0.0.1 that forwards after a delay (a slow responder), and
  counts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import subprocess
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from sidecar.config import TLSConfig
from sidecar.revocation.chain import Anchors
from sidecar.revocation.fetch import Transport
from sidecar.revocation.gate import Prepared, Revocation

from .pki import Issued, new_key
from .servers import serve_app


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_crl(
    issuer: Issued,
    revoked: Iterable[int] = (),
    *,
    this_update: dt.timedelta = dt.timedelta(minutes=-5),
    next_update: dt.timedelta = dt.timedelta(days=7),
    number: int = 1,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    signer: Issued | None = None,
) -> x509.CertificateRevocationList:
    """A CRL in ``issuer``'s name, signed by ``signer``'s key (``issuer``'s by default), dated
    relative to now."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(_now() + this_update)
        .next_update(_now() + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_now() - dt.timedelta(hours=1))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
    return builder.sign((signer or issuer).key, hashes.SHA256())


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER)


def client_with(
    issuer: Issued,
    cn: str,
    *,
    crl_urls: Iterable[str] = (),
    ocsp_urls: Iterable[str] = (),
    eku: list[x509.ObjectIdentifier] | None = None,
    ca: bool = False,
    days: int = 30,
) -> Issued:
    """A client certificate (or, with ``ca``, an intermediate CA) that ``issuer`` signed,
    naming CRL distribution points and OCSP responders."""
    key = new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(days=1))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    urls = list(crl_urls)
    if urls:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(u) for u in urls], None, None, None
                    )
                ]
            ),
            critical=False,
        )
    responders = list(ocsp_urls)
    if responders:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u)
                    )
                    for u in responders
                ]
            ),
            critical=False,
        )
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


# ---- an OCSP responder: openssl ocsp ------------------------------------------------------------


def _index_time(moment: dt.datetime) -> str:
    return moment.strftime("%y%m%d%H%M%SZ")


@dataclass
class OCSPResponder:
    """``openssl ocsp`` answering for ``ca`` from an index of certificates."""

    folder: Path
    ca: Issued
    signer: Issued
    badsig: bool = False
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    good: list[Issued] = field(default_factory=list)
    revoked: list[Issued] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def write_index(self) -> Path:
        lines = []
        expiry = _index_time(_now() + dt.timedelta(days=365))
        when = _index_time(_now() - dt.timedelta(hours=1))
        for who, status in [*((g, "V") for g in self.good), *((r, "R") for r in self.revoked)]:
            serial = f"{who.cert.serial_number:X}"
            serial = serial if len(serial) % 2 == 0 else "0" + serial
            subject = "/CN=" + str(
                who.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            )
            revoked = f"{when},keyCompromise" if status == "R" else ""
            lines.append(f"{status}\t{expiry}\t{revoked}\t{serial}\tunknown\t{subject}\n")
        index = self.folder / "index.txt"
        index.write_text("".join(lines))
        (self.folder / "index.txt.attr").write_text("unique_subject = no\n")
        return index

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.write_index()
        signer_pem, signer_key = self.signer.write(self.folder, "responder")
        ca_pem, _ = self.ca.write(self.folder, "ca")
        command = [
            "openssl",
            "ocsp",
            "-index",
            str(index),
            "-port",
            "0",
            "-rsigner",
            str(signer_pem),
            "-rkey",
            str(signer_key),
            "-CA",
            str(ca_pem),
            "-nmin",
            "10",
            "-ignore_err",
        ]
        if self.badsig:
            command.append("-badsig")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.folder
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        found = re.search(r"ACCEPT .*:(\d+)", line)
        assert found, f"openssl ocsp did not start: {line!r}"
        self.port = int(found.group(1))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None


def delegated_responder(ca: Issued, *, eku: bool = True) -> Issued:
    """A responder certificate ``ca`` issued, with the OCSP-signing usage (or, without ``eku``,
    with clientAuth only: not authorised to answer)."""
    usage = [ExtendedKeyUsageOID.OCSP_SIGNING if eku else ExtendedKeyUsageOID.CLIENT_AUTH]
    return client_with(ca, "Test OCSP Responder", eku=usage)


# ---- a CRL distribution point -----------------------------------------------------------------


@dataclass
class DistributionPoint:
    """Serves ``files[path]`` (bytes) at ``http://127.0.0.1:<port><path>``; counts the GETs."""

    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    status: int = 200

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def distribution_point() -> AsyncIterator[DistributionPoint]:
    point = DistributionPoint()

    async def serve(request: web.Request) -> web.StreamResponse:
        point.hits[request.path] = point.hits.get(request.path, 0) + 1
        if point.delay:
            await asyncio.sleep(point.delay)
        body = point.files.get(request.path)
        if body is None or point.status != 200:
            return web.Response(status=404 if body is None else point.status)
        return web.Response(body=body, content_type="application/pkix-crl")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner, point.port = await serve_app(app, shutdown_timeout=0.1)
    yield point
    await runner.cleanup()


# ---- a TCP relay that delays ------------------------------------------------------------------


@dataclass
class Relay:
    """Forwards 127.0.0.1:<port> to ``target`` after ``delay`` seconds; counts connections."""

    target: int
    delay: float = 0.0
    port: int = 0
    connections: int = 0
    #: HTTP requests seen going to the target (each starts with its method)
    requests: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        async def pipe(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upward: bool = False
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    if upward:
                        self.requests += data.count(b"POST ") + data.count(b"GET ")
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await asyncio.sleep(self.delay)
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except (OSError, asyncio.CancelledError):
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer, upward=True), pipe(up_reader, writer))

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.get_running_loop().create_task(serve(reader, writer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()


def no_revocation() -> Revocation:
    """Revocation with nothing configured, which refuses nothing: for a plan built by hand."""

    def no_network(timeout: float) -> Transport:
        raise AssertionError("revocation with nothing configured asked the network")

    return Revocation(
        Prepared(
            TLSConfig.model_construct(certificate=Path(), key=Path()),
            Anchors([], []),
            frozenset(),
        ),
        transports=no_network,
    )
