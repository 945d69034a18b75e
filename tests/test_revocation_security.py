"""Revocation attacked from outside (issue #14): revoked certificates against the real TLS
listener, with Python's and curl's clients.

CRLs are made with ``cryptography`` and loaded from files (swapped through a Kubernetes-style
``..data`` symlink while connections are open) or fetched from a distribution point served
by a local aiohttp server; the deny-list is set in the configuration and through the admin
listener. OCSP, with a real ``openssl ocsp`` responder, is in ``test_ocsp_security.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from structlog.testing import capture_logs

from sidecar.revocation import fetch as fetch_module
from sidecar.revocation import gate as gate_module

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .fake_identityplus import fake_identityplus
from .pki import Issued, make_ca
from .revocation_parts import DistributionPoint, client_with, der, distribution_point, make_crl, pem
from .test_config import problems_of
from .test_identity_e2e import Reply, StartIdentityPlus, admin, fetch, start_ip
from .test_limits import request
from .test_listener import connect, eventually
from .test_operations import metric
from .test_signals import slow_upstream
from .test_tls_security import client_ctx
from .test_tls_security import fetch as fetch_resumable

__all__ = ["distribution_point", "fake_identityplus", "slow_upstream", "start_ip"]

REVOKED_DETAIL = "Your client certificate has been revoked."
UNAVAILABLE_DETAIL = "The revocation status of your client certificate cannot be checked right now."


def sha256_of(who: Issued) -> str:
    return hashlib.sha256(who.der).hexdigest()


def serial(who: Issued) -> int:
    return int(who.cert.serial_number)


def revoked_reply(reply: Reply) -> bool:
    return reply.status == 403 and reply.problem()["detail"] == REVOKED_DETAIL


def unavailable_reply(reply: Reply) -> bool:
    return (
        reply.status == 503
        and reply.problem()["detail"] == UNAVAILABLE_DETAIL
        and reply.headers.get("Retry-After") == "5"
    )


def with_crl(
    config_dir: ConfigDir, upstream: Upstream, *crls: x509.CertificateRevocationList, **tls: Any
) -> dict[str, Any]:
    """The base configuration with ``crls`` written to files and listed in ``tls.crl``."""
    data = config_dir.base(upstream.port)
    names = []
    for i, crl in enumerate(crls):
        name = f"crl-{i}.pem"
        (config_dir.path / name).write_bytes(pem(crl))
        names.append(name)
    data["tls"]["crl"] = names
    data["tls"].update(tls)
    return data


async def curl(running: Running, who: Issued, path: str) -> tuple[int, str]:
    """curl's status and body for one request with ``who``'s certificate."""
    folder = running.config_dir.path / "curl"
    cert, key = who.write(folder, sha256_of(who)[:12])
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--cacert",
        str(running.config_dir.path / "server-ca.pem"),
        "--cert",
        str(cert),
        "--key",
        str(key),
        f"{running.url}{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    body, _, status = out.decode().rpartition("\n")
    return int(status), body


# ---- CRL files -------------------------------------------------------------------------------


async def test_a_certificate_in_a_crl_is_refused_everywhere_and_never_forwarded(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [serial(certs.alice)])
    running = await start_sidecar(with_crl(config_dir, upstream, crl))
    with capture_logs() as events:
        for path in ("/admin/reports", "/", "/public/page"):
            assert revoked_reply(await fetch(running, path, certs.alice)), path
    assert upstream.seen == []
    access = [e for e in events if e["event"] == "request"]
    assert [(e["status"], e["reason"], e["decision"]) for e in access] == [
        (403, "revoked", "denied")
    ] * 3
    [refused] = [e for e in events if e["event"] == "revocation_refused"]  # once, then remembered
    assert "listed in the CRL of CN=Test Client Intermediate" in refused["detail"]
    # curl sees the same; a certificate the CRL does not list passes
    status, body = await curl(running, certs.alice, "/public/page")
    assert (status, json.loads(body)["detail"]) == (403, REVOKED_DETAIL)
    assert (await curl(running, certs.bob, "/public/page"))[0] == 200
    assert (await fetch(running, "/app", certs.bob)).status == 200
    assert [s.raw_path for s in upstream.seen] == ["/public/page", "/app"]
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_revocation_checks_total", outcome="revoked") == 4
    assert metric(text, "sidecar_revocation_checks_total", outcome="good") == 2


async def test_a_revoked_certificate_is_refused_on_a_request_with_a_body_too(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """aiohttp's path (a body hands the connection over) asks the same handler."""
    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [serial(certs.alice)])
    running = await start_sidecar(with_crl(config_dir, upstream, crl))
    reply = await fetch(running, "/app", certs.alice, method="POST", data=b"x" * 5000)
    assert revoked_reply(reply)
    assert upstream.seen == []


async def test_a_revoked_certificate_is_refused_where_the_certificate_alone_decides(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """Route policy (#16): a route with ``access: certificate`` and matchers asks no identity
    backend; revocation is checked before its decision all the same, and an address-exempt
    health path forwards nothing for a revoked certificate either."""
    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [serial(certs.alice)])
    data = with_crl(config_dir, upstream, crl)
    both = [sha256_of(certs.alice), sha256_of(certs.bob)]
    data["routes"] = [
        {"path": "/svc/", "access": "certificate", "allow": {"fingerprint": both}},
        {"path": "/healthz", "addresses": {"exempt": ["127.0.0.0/8"]}},
        {"path": "/"},
    ]
    running = await start_sidecar(data)
    for path in ("/svc/orders", "/healthz"):
        assert revoked_reply(await fetch(running, path, certs.alice)), path
        assert (await fetch(running, path, certs.bob)).status == 200
        status, body = await curl(running, certs.alice, path)
        assert (status, json.loads(body)["detail"]) == (403, REVOKED_DETAIL)
    assert [s.raw_path for s in upstream.seen] == ["/svc/orders", "/healthz"]


async def test_the_connection_of_a_revoked_certificate_is_not_kept(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [serial(certs.alice)])
    running = await start_sidecar(with_crl(config_dir, upstream, crl))
    async with connect(running, certs.alice) as conn:
        conn.send(request("/public/a") + request("/public/b"))
        response = await conn.response()
        assert response.status == 403
        assert "close" in response.tokens("Connection")
        assert await conn.ended() == b""  # the pipelined second request is never served
    assert upstream.seen == []


@pytest.mark.parametrize("form", ["pem", "der", "folder"])
async def test_crl_files_are_read_as_pem_der_or_a_folder(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, form: str
) -> None:
    certs = config_dir.certs
    pki = certs.pki
    leaf_crl = make_crl(pki.client_intermediate, [serial(certs.alice)])
    root_crl = make_crl(pki.client_root, [])
    data = config_dir.base(upstream.port)
    if form == "pem":  # two CRLs in one PEM file
        (config_dir.path / "crls.pem").write_bytes(pem(root_crl) + pem(leaf_crl))
        data["tls"]["crl"] = "crls.pem"
    elif form == "der":
        (config_dir.path / "int.crl").write_bytes(der(leaf_crl))
        data["tls"]["crl"] = ["int.crl"]
    else:
        folder = config_dir.path / "crls"
        folder.mkdir()
        (folder / "int.crl").write_bytes(der(leaf_crl))
        (folder / "root.pem").write_bytes(pem(root_crl))
        (folder / ".hidden").write_bytes(b"not a CRL: names starting with a dot are skipped")
        data["tls"]["crl"] = ["crls"]
    running = await start_sidecar(data)
    assert revoked_reply(await fetch(running, "/public/x", certs.alice))
    assert (await fetch(running, "/public/x", certs.bob)).status == 200


def test_check_config_refuses_crls_it_cannot_trust_with_their_key_path(
    config_dir: ConfigDir,
) -> None:
    pki = config_dir.certs.pki
    impostor = make_ca("Test Client Intermediate")  # the same name, another key
    stranger = make_ca("Some Other CA")
    files = {
        "forged.pem": pem(make_crl(pki.client_intermediate, [1], signer=impostor)),
        "foreign.pem": pem(make_crl(stranger, [1])),
        "delta.pem": pem(
            make_crl(pki.client_intermediate, [1], extensions=[(x509.DeltaCRLIndicator(1), True)])
        ),
        "garbage.crl": b"\x30\x03\x02\x01\x01",
        "cert.pem": pki.client_root.pem,
    }
    for name, content in files.items():
        (config_dir.path / name).write_bytes(content)
    data = config_dir.base()
    data["tls"]["crl"] = [*files, "missing.pem"]
    problems = problems_of(config_dir.write(data))
    assert problems == [
        f"tls.crl[0]: {config_dir.path / 'forged.pem'}: its signature does not verify against "
        "the trusted CA CN=Test Client Intermediate (tls.client_ca)",
        f"tls.crl[1]: {config_dir.path / 'foreign.pem'}: issued by CN=Some Other CA, which is "
        "not a trusted CA (tls.client_ca)",
        f"tls.crl[2]: {config_dir.path / 'delta.pem'}: a delta CRL; only complete CRLs are "
        "supported",
        f"tls.crl[3]: {config_dir.path / 'garbage.crl'}: not a PEM or DER CRL",
        f"tls.crl[4]: {config_dir.path / 'cert.pem'}: holds no PEM CRL (-----BEGIN X509 CRL-----)",
        f"tls.crl[5]: not found: {config_dir.path / 'missing.pem'}",
    ]


def test_check_config_reports_revocation_settings_and_problems(config_dir: ConfigDir) -> None:
    pki = config_dir.certs.pki
    bad = config_dir.base()
    bad["tls"].update(
        {
            "crl_mode": "leaf sometimes",
            "ocsp": "maybe",
            "ocsp_responder": "ftp://ocsp.example",
            "crl_fetch": {"max_size": 1 << 30, "max_bytes": 1 << 20},
            "deny": [
                {"sha256": "abc"},
                {"issuer": "CN=Test Client Intermediate"},
                {"issuer": "not a name", "serial": 3},
                {"sha256": "ab" * 32, "serial": 3},
            ],
        }
    )
    problems = problems_of(config_dir.write(bad))
    assert problems == [
        "tls.crl_mode: unknown crl_mode word(s) 'sometimes': give leaf or chain, and require "
        "or if_present",
        "tls.crl_fetch.max_size: larger than max_bytes, so no such CRL could be kept",
        "tls.ocsp: Input should be 'off', 'soft' or 'hard'",
        "tls.ocsp_responder: not an http:// or https:// URL: 'ftp://ocsp.example'",
        "tls.deny[0].sha256: not a SHA-256 fingerprint (expected 64 hex digits, colons "
        "optional), got 3 characters",
        "tls.deny[1]: give sha256, or issuer and serial (both)",
        "tls.deny[2].issuer: not an RFC 4514 name: 'not a name' (e.g. CN=Example Client "
        "CA,O=Example)",
        "tls.deny[3]: give sha256, or issuer and serial, not both",
    ]
    # A valid one: the summary says what is checked, the warnings what is at risk.
    expired = make_crl(
        pki.client_intermediate,
        [5],
        this_update=dt.timedelta(days=-9),
        next_update=dt.timedelta(days=-2),
    )
    data = with_crl(config_dir, Upstream(1), expired, ocsp="soft", crl_mode="chain, require")
    data["tls"]["deny"] = [{"issuer": "CN = Test Client Intermediate", "serial": "0x1F"}]
    path = config_dir.write(data)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert "revocation  CRL chain require, grace 0s: CN=Test Client Intermediate (1 revoked" in (
        done.stdout
    )
    assert "OCSP soft, responder each certificate's own (authorityInfoAccess)" in done.stdout
    assert "deny-list 1 entry" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert any(
        "tls.crl: the CRL of CN=Test Client Intermediate" in w
        and "tls.crl_grace (0 s) has passed" in w
        for w in warnings
    ), warnings
    assert any(
        "tls.crl_mode: require, and no CRL in tls.crl for CN=Test Client Root" in w
        for w in warnings
    ), warnings


# ---- reloads: a Kubernetes ..data swap while connections are open -----------------------------


def swap(folder: Path, files: dict[str, bytes]) -> None:
    """Publish ``files`` in ``folder`` the way the kubelet updates a Secret volume: a new
    timestamped folder, then the ``..data`` symlink replaced at once (rename)."""
    stamp = f"..{dt.datetime.now(dt.UTC):%Y_%m_%d_%H_%M_%S.%f}"
    (folder / stamp).mkdir()
    for name, content in files.items():
        (folder / stamp / name).write_bytes(content)
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    (folder / "..data_tmp").symlink_to(stamp)
    os.replace(folder / "..data_tmp", folder / "..data")


async def test_a_crl_swapped_through_data_refuses_the_next_request_on_an_open_connection(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    intermediate = certs.pki.client_intermediate
    volume = config_dir.path / "crl-volume"
    volume.mkdir()
    swap(volume, {"ca.crl": der(make_crl(intermediate, [], number=1))})
    data = config_dir.base(upstream.port)
    data["tls"]["crl"] = ["crl-volume/ca.crl"]
    data["reload"] = {"watch": True, "interval": "100ms"}
    running = await start_sidecar(data)
    async with connect(running, certs.alice) as alice, connect(running, certs.bob) as bob:
        alice.send(request("/public/before"))
        assert (await alice.response()).status == 200
        bob.send(request("/public/before"))
        assert (await bob.response()).status == 200
        reloads = running.sidecar.metrics.reloads.labels("success")
        swap(volume, {"ca.crl": der(make_crl(intermediate, [serial(certs.alice)], number=2))})
        await eventually(lambda: reloads._value.get() >= 1, "the swap to be seen", timeout=10)
        alice.send(request("/public/after"))
        response = await alice.response()
        assert response.status == 403 and json.loads(response.body)["detail"] == REVOKED_DETAIL
        assert await alice.ended() == b""
        bob.send(request("/public/after"))  # another certificate's open connection goes on
        assert (await bob.response()).status == 200
    assert [s.raw_path for s in upstream.seen] == [
        "/public/before",
        "/public/before",
        "/public/after",
    ]


async def test_a_resumed_session_is_checked_too(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """CVE-2022-21654: a session resumed after the CRL changed must not skip the check."""
    certs = config_dir.certs
    intermediate = certs.pki.client_intermediate
    running = await start_sidecar(with_crl(config_dir, upstream, make_crl(intermediate, [])))
    ctx = client_ctx(running, certs.alice)
    first = await fetch_resumable(running, ctx, "/public/first")
    (config_dir.path / "crl-0.pem").write_bytes(
        pem(make_crl(intermediate, [serial(certs.alice)], number=2))
    )
    assert await running.sidecar.reload("test")
    again = await fetch_resumable(running, ctx, "/public/again", first.session)
    assert (first.status, again.reused, again.status) == (200, True, 403)
    assert [s.raw_path for s in upstream.seen] == ["/public/first"]


@pytest.mark.parametrize("how", ["denied at run time", "listed in a reloaded CRL"])
async def test_a_revoked_certificate_is_refused_through_a_resumed_session_and_a_cached_verdict(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, how: str
) -> None:
    """Revocation is checked before a cached verdict is used, whatever becomes of that verdict:
    here nothing drops it (the purge hook is taken away), the client resumes its TLS session
    (so no handshake sees the certificate again), and the cache still says allow."""
    certs = config_dir.certs
    intermediate = certs.pki.client_intermediate
    running = await start_sidecar(with_crl(config_dir, upstream, make_crl(intermediate, [])))
    ctx = client_ctx(running, certs.alice)
    first = await fetch_resumable(running, ctx, "/admin/first")
    assert first.status == 200
    cache = running.sidecar._cache()
    alice = running.sidecar.peer_certs._parsed[certs.alice.der]
    assert cache is not None and cache.peek(alice) is not None
    running.sidecar.revocation.forget = None  # the cached verdict stays whatever happens
    if how == "denied at run time":
        assert (await admin(running, "POST", f"/deny?sha256={sha256_of(certs.alice)}"))[0] == 200
    else:
        (config_dir.path / "crl-0.pem").write_bytes(
            pem(make_crl(intermediate, [serial(certs.alice)], number=2))
        )
        assert await running.sidecar.reload("test")
    again = await fetch_resumable(running, ctx, "/admin/again", first.session)
    assert (again.reused, again.status) == (True, 403)
    verdict = cache.peek(alice)
    assert verdict is not None and verdict.kind == "allow"  # still cached, and not used
    assert [s.raw_path for s in upstream.seen] == ["/admin/first"]


async def test_a_reload_with_an_untrusted_crl_keeps_the_old_one(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    intermediate = certs.pki.client_intermediate
    running = await start_sidecar(
        with_crl(config_dir, upstream, make_crl(intermediate, [serial(certs.alice)]))
    )
    forged = make_crl(intermediate, [], number=5, signer=make_ca("Test Client Intermediate"))
    (config_dir.path / "crl-0.pem").write_bytes(pem(forged))
    with capture_logs() as events:
        assert not await running.sidecar.reload("test")
    [failed] = [e for e in events if e["event"] == "reload_failed"]
    assert "its signature does not verify" in failed["problem"]
    assert revoked_reply(await fetch(running, "/public/x", certs.alice))  # the old CRL holds


async def test_a_newly_loaded_crl_drops_the_cached_verdict(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    intermediate = certs.pki.client_intermediate
    running = await start_sidecar(with_crl(config_dir, upstream, make_crl(intermediate, [])))
    assert (await fetch(running, "/admin/x", certs.alice)).status == 200
    assert (await fetch(running, "/app", certs.bob)).status == 200
    cache = running.sidecar._cache()
    assert cache is not None and len(cache) == 2
    (config_dir.path / "crl-0.pem").write_bytes(
        pem(make_crl(intermediate, [serial(certs.alice)], number=2))
    )
    assert await running.sidecar.reload("test")
    assert cache.peek(running.sidecar.peer_certs._parsed[certs.alice.der]) is None
    assert len(cache) == 1  # bob's stays
    assert revoked_reply(await fetch(running, "/admin/x", certs.alice))


# ---- expired CRLs: the grace, readiness, the loud log -----------------------------------------


async def test_an_expired_crl_refuses_its_certificates_and_makes_the_process_unready(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gate_module, "_TICK", 0.05)
    certs = config_dir.certs
    expired = make_crl(
        certs.pki.client_intermediate,
        [],
        this_update=dt.timedelta(days=-8),
        next_update=dt.timedelta(hours=-1),
    )
    with capture_logs() as events:
        running = await start_sidecar(with_crl(config_dir, upstream, expired))
        assert unavailable_reply(await fetch(running, "/public/x", certs.bob))
        assert unavailable_reply(await fetch(running, "/admin/x", certs.alice))
        await eventually(
            lambda: any(e["event"] == "crl_expired" for e in events), "the loud log line"
        )
        await asyncio.sleep(0.3)  # several more ticks: still one line (once a minute)
    status, body = await curl(running, certs.bob, "/public/y")
    assert (status, json.loads(body)["detail"]) == (503, UNAVAILABLE_DETAIL)
    assert upstream.seen == []
    status, ready = await admin(running, "GET", "/readyz")
    assert status == 503 and ready["reason"].startswith(
        "CRL expired: CN=Test Client Intermediate (nextUpdate "
    )
    loud = [e for e in events if e["event"] == "crl_expired"]
    assert len(loud) == 1 and loud[0]["log_level"] == "error"  # once a minute, not per tick
    assert any(e["event"] == "revocation_configuration" for e in events)
    _, text = await admin(running, "GET", "/metrics")
    issuer = "CN=Test Client Intermediate"
    next_update = metric(text, "sidecar_crl_next_update_timestamp_seconds", issuer=issuer)
    assert expired.next_update_utc is not None
    assert abs(next_update - expired.next_update_utc.timestamp()) < 1
    assert metric(text, "sidecar_revocation_checks_total", outcome="unavailable") == 3


async def test_crl_grace_keeps_an_expired_crl_in_use(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gate_module, "_TICK", 0.05)
    certs = config_dir.certs
    stale = make_crl(
        certs.pki.client_intermediate,
        [serial(certs.alice)],
        this_update=dt.timedelta(days=-8),
        next_update=dt.timedelta(hours=-1),
    )
    with capture_logs() as events:
        running = await start_sidecar(with_crl(config_dir, upstream, stale, crl_grace="2h"))
        assert (await fetch(running, "/public/x", certs.bob)).status == 200
        # a certificate listed in it stays refused, however old the CRL
        assert revoked_reply(await fetch(running, "/public/x", certs.alice))
        await eventually(lambda: any(e["event"] == "crl_stale" for e in events), "the warning")
        await asyncio.sleep(0.3)
    assert (await admin(running, "GET", "/readyz"))[0] == 200
    [warning] = [e for e in events if e["event"] == "crl_stale"]
    assert 3500 < warning["refused_in"] <= 3600


async def test_the_grace_ends_while_the_process_runs(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """The answer remembered for a certificate holds only until its CRL passes its grace (the
    request path's clock moved on by two hours rather than waited for)."""
    certs = config_dir.certs
    ending = make_crl(certs.pki.client_intermediate, [], next_update=dt.timedelta(hours=1))
    running = await start_sidecar(with_crl(config_dir, upstream, ending, crl_grace="30m"))
    assert running.sidecar.handler is not None
    shift = 0.0
    running.sidecar.handler.clock = lambda: time.time() + shift
    assert (await fetch(running, "/public/x", certs.bob)).status == 200
    shift = 4500.0  # past nextUpdate (1 h), within the grace (30 min)
    assert (await fetch(running, "/public/x", certs.bob)).status == 200
    shift = 7200.0
    assert unavailable_reply(await fetch(running, "/public/x", certs.bob))


# ---- crl_mode: leaf or chain, require or if_present -----------------------------------------


async def test_a_ca_without_a_crl_is_refused_under_require_and_unchecked_under_if_present(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    other_ca = make_ca("Another Client CA")
    (config_dir.path / "client-ca.pem").write_bytes(
        certs.pki.client_root.pem + certs.pki.client_intermediate.pem + other_ca.pem
    )
    visitor = client_with(other_ca, "Visitor")
    crl = make_crl(certs.pki.client_intermediate, [])
    running = await start_sidecar(with_crl(config_dir, upstream, crl))
    assert (await fetch(running, "/public/x", certs.bob)).status == 200
    assert unavailable_reply(await fetch(running, "/public/x", visitor))
    data = with_crl(config_dir, upstream, crl, crl_mode="if_present")
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    assert (await fetch(running, "/public/x", visitor)).status == 200


async def test_chain_mode_checks_the_intermediate_against_the_roots_crl(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    pki = config_dir.certs.pki
    branch = client_with(pki.client_root, "Branch Office CA", ca=True)
    (config_dir.path / "client-ca.pem").write_bytes(
        pki.client_root.pem + pki.client_intermediate.pem + branch.pem
    )
    clerk = client_with(branch, "Clerk")
    root_crl = make_crl(pki.client_root, [serial(branch)])
    branch_crl = make_crl(branch, [])
    int_crl = make_crl(pki.client_intermediate, [])
    running = await start_sidecar(
        with_crl(config_dir, upstream, root_crl, branch_crl, int_crl, crl_mode="chain")
    )
    reply = await fetch(running, "/public/x", clerk)
    assert revoked_reply(reply)
    assert (await fetch(running, "/public/x", config_dir.certs.bob)).status == 200
    # in leaf mode only the clerk's own issuer is asked
    config_dir.write(with_crl(config_dir, upstream, root_crl, branch_crl, int_crl, crl_mode="leaf"))
    assert await running.sidecar.reload("test")
    assert (await fetch(running, "/public/x", clerk)).status == 200


async def test_an_issuer_not_among_the_anchors_cannot_be_checked(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """A client that sends its own intermediate: the chain is rebuilt from tls.client_ca only,
    so its CRL cannot be found; require fails closed."""
    pki = config_dir.certs.pki
    (config_dir.path / "client-ca.pem").write_bytes(pki.client_root.pem)
    hidden = client_with(pki.client_root, "Unlisted Intermediate", ca=True)
    traveller = client_with(hidden, "Traveller")
    running = await start_sidecar(with_crl(config_dir, upstream, make_crl(pki.client_root, [])))
    ctx = running.client_ssl(traveller, chain=[hidden])
    reply = await fetch_with(running, ctx, "/public/x")
    assert unavailable_reply(reply)
    config_dir.write(
        with_crl(config_dir, upstream, make_crl(pki.client_root, []), crl_mode="if_present")
    )
    assert await running.sidecar.reload("test")
    assert (await fetch_with(running, ctx, "/public/x")).status == 200


async def fetch_with(running: Running, ctx: ssl.SSLContext, path: str) -> Reply:
    import aiohttp
    from multidict import CIMultiDict

    async with (
        aiohttp.ClientSession() as session,
        session.get(running.url + path, ssl=ctx) as resp,
    ):
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


# ---- CRL distribution points -----------------------------------------------------------------


def fetching(config_dir: ConfigDir, upstream: Upstream, **fetch: Any) -> dict[str, Any]:
    data = config_dir.base(upstream.port)
    data["tls"]["crl_fetch"] = {"enabled": True, "timeout": "1s", **fetch}
    return data


async def test_crls_are_fetched_from_the_distribution_point_once(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    distribution_point: DistributionPoint,
) -> None:
    intermediate = config_dir.certs.pki.client_intermediate
    url = distribution_point.url("/int.crl")
    good = [client_with(intermediate, f"Good {i}", crl_urls=[url]) for i in range(20)]
    bad = client_with(intermediate, "Bad", crl_urls=[url])
    distribution_point.files["/int.crl"] = der(make_crl(intermediate, [serial(bad)]))
    distribution_point.delay = 0.3  # so that the first requests all arrive while it is fetched
    running = await start_sidecar(fetching(config_dir, upstream))
    replies = await asyncio.gather(*(fetch(running, "/public/x", who) for who in good))
    assert [r.status for r in replies] == [200] * 20
    assert revoked_reply(await fetch(running, "/public/x", bad))
    assert distribution_point.hits == {"/int.crl": 1}  # single-flight, then cached
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_crl_fetches_total", result="ok") == 1
    assert (
        metric(
            text, "sidecar_crl_next_update_timestamp_seconds", issuer="CN=Test Client Intermediate"
        )
        > 0
    )


async def test_a_distribution_point_that_fails_fails_closed(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    distribution_point: DistributionPoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    intermediate = config_dir.certs.pki.client_intermediate
    url = distribution_point.url("/int.crl")
    who = client_with(intermediate, "Traveller", crl_urls=[url])
    monkeypatch.setattr(fetch_module, "_BACKOFF_FIRST", 4.0)
    running = await start_sidecar(fetching(config_dir, upstream))
    distribution_point.status = 500
    distribution_point.files["/int.crl"] = der(make_crl(intermediate, []))
    assert unavailable_reply(await fetch(running, "/public/x", who))
    # within the backoff the point is not asked again, whatever the traffic
    for _ in range(3):
        assert unavailable_reply(await fetch(running, "/public/x", who))
    assert distribution_point.hits == {"/int.crl": 1}
    assert upstream.seen == []
    distribution_point.status = 200
    await asyncio.sleep(4.1)  # the first backoff
    assert (await fetch(running, "/public/x", who)).status == 200


@pytest.mark.parametrize("fault", ["slow", "too-large", "forged", "down"])
async def test_a_crl_that_cannot_be_had_in_time_or_trusted_is_no_crl(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    distribution_point: DistributionPoint,
    fault: str,
) -> None:
    intermediate = config_dir.certs.pki.client_intermediate
    url = distribution_point.url("/int.crl")
    if fault == "down":
        url = "http://127.0.0.1:9/int.crl"
    who = client_with(intermediate, "Traveller", crl_urls=[url])
    crl = make_crl(intermediate, range(1, 3000))  # about 70 KB
    if fault == "forged":
        crl = make_crl(intermediate, [], signer=make_ca("Test Client Intermediate"))
    distribution_point.files["/int.crl"] = der(crl)
    if fault == "slow":
        distribution_point.delay = 10
    limits = {"max_size": 65536} if fault == "too-large" else {}
    running = await start_sidecar(fetching(config_dir, upstream, **limits))
    started = asyncio.get_running_loop().time()
    assert unavailable_reply(await fetch(running, "/public/x", who))
    # bounded by the 1 s timeout, not by the 10 s the slow point takes
    assert asyncio.get_running_loop().time() - started < 8
    kind = {"slow": "timeout", "too-large": "too-large", "forged": "bad-crl", "down": "connect"}
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_crl_fetches_total", result=kind[fault]) == 1
    assert upstream.seen == []


async def test_a_fetched_crl_is_fetched_again_before_its_next_update(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    distribution_point: DistributionPoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch_module, "_REFRESH_MIN", 0.2)
    monkeypatch.setattr(gate_module, "_TICK", 0.1)
    intermediate = config_dir.certs.pki.client_intermediate
    url = distribution_point.url("/int.crl")
    who = client_with(intermediate, "Traveller", crl_urls=[url])
    # valid for another minute, and due to be fetched again at once (80 % of its life passed)
    distribution_point.files["/int.crl"] = der(
        make_crl(
            intermediate,
            [],
            this_update=dt.timedelta(minutes=-10),
            next_update=dt.timedelta(minutes=1),
        )
    )
    running = await start_sidecar(fetching(config_dir, upstream))
    async with connect(running, who) as conn:
        conn.send(request("/public/first"))
        assert (await conn.response()).status == 200
        distribution_point.files["/int.crl"] = der(make_crl(intermediate, [serial(who)], number=2))
        await eventually(lambda: distribution_point.hits["/int.crl"] >= 2, "a refresh", timeout=5)
        await asyncio.sleep(0.2)
        conn.send(request("/public/second"))
        assert (await conn.response()).status == 403  # no reload: the refreshed CRL says so
    assert [s.raw_path for s in upstream.seen] == ["/public/first"]


# ---- the deny-list ---------------------------------------------------------------------------


async def test_denied_certificates_are_refused_whatever_the_ca_and_backend_say(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    data = config_dir.base(upstream.port)
    data["tls"]["deny"] = [
        {"sha256": ":".join(f"{b:02X}" for b in bytes.fromhex(sha256_of(certs.alice)))},
        {"issuer": "cn=test client intermediate", "serial": hex(serial(certs.bob))},
    ]
    running = await start_sidecar(data)
    for who in (certs.alice, certs.bob):
        assert revoked_reply(await fetch(running, "/admin/x", who))
        assert revoked_reply(await fetch(running, "/public/x", who))
    assert (await fetch(running, "/public/x", certs.stranger)).status == 200
    assert [s.raw_path for s in upstream.seen] == ["/public/x"]
    for who in (certs.alice, certs.bob):  # curl too
        status, body = await curl(running, who, "/public/y")
        assert (status, json.loads(body)["detail"]) == (403, REVOKED_DETAIL)
    assert [s.raw_path for s in upstream.seen] == ["/public/x"]


async def test_deny_at_run_time_reaches_an_open_connection_and_can_be_undone(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    data = config_dir.base(upstream.port)
    data["tls"]["deny"] = [{"sha256": sha256_of(certs.bob)}]
    running = await start_sidecar(data)
    alice = sha256_of(certs.alice)
    async with connect(running, certs.alice) as conn:
        conn.send(request("/admin/one"))
        assert (await conn.response()).status == 200
        assert await admin(running, "POST", f"/deny?sha256={alice.upper()}") == (
            200,
            {"denied": alice, "new": True},
        )
        conn.send(request("/admin/two"))
        assert (await conn.response()).status == 403
    cache = running.sidecar._cache()
    assert cache is not None and len(cache) == 0  # its verdict was dropped
    assert await admin(running, "GET", "/deny") == (
        200,
        {"configured": [sha256_of(certs.bob)], "runtime": [alice]},
    )
    assert (await admin(running, "DELETE", f"/deny?sha256={alice}"))[0] == 200
    assert (await fetch(running, "/admin/three", certs.alice)).status == 200
    status, doc = await admin(running, "DELETE", f"/deny?sha256={sha256_of(certs.bob)}")
    assert status == 409 and "tls.deny" in doc["error"]
    assert (await admin(running, "DELETE", f"/deny?sha256={alice}"))[0] == 404
    assert (await admin(running, "POST", "/deny?sha256=nothex"))[0] == 400
    assert (await admin(running, "POST", f"/deny?sha256={alice}&x=1"))[0] == 400
    # a reload keeps run-time entries
    assert (await admin(running, "POST", f"/deny?sha256={alice}"))[0] == 200
    assert await running.sidecar.reload("test")
    assert revoked_reply(await fetch(running, "/public/x", certs.alice))
    assert [s.raw_path for s in upstream.seen] == ["/admin/one", "/admin/three"]


async def test_deny_needs_what_every_admin_state_change_needs(running: Running) -> None:
    import aiohttp

    url = f"http://127.0.0.1:{running.sidecar.admin_port}/deny?sha256={'ab' * 32}"
    async with aiohttp.ClientSession() as session:
        async with session.post(url) as resp:  # no X-Sidecar-Admin: a web page could send it
            assert resp.status == 403
        async with session.post(
            url, headers={"Origin": "https://evil.example", "X-Sidecar-Admin": "1"}
        ) as resp:
            assert resp.status == 403
    assert running.sidecar.revocation.denied()["runtime"] == []


# ---- lifetimes you can watch ---------------------------------------------------------------------


async def test_lifetimes_are_exported(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [])
    running = await start_sidecar(with_crl(config_dir, upstream, crl))
    assert (await fetch(running, "/public/x", certs.bob)).status == 200
    short = client_with(certs.pki.client_intermediate, "Short-lived", days=2)
    assert (await fetch(running, "/public/x", short)).status == 200
    _, text = await admin(running, "GET", "/metrics")
    name = "sidecar_client_certificate_remaining_seconds"
    assert metric(text, f"{name}_count") == 2
    assert metric(text, f"{name}_bucket", le="259200.0") == 1  # within 3 days: the short one
    for anchor in (certs.pki.client_root, certs.pki.client_intermediate):
        value = metric(
            text,
            "sidecar_trust_anchor_expiry_timestamp_seconds",
            subject=anchor.cert.subject.rfc4514_string(),
            sha256=sha256_of(anchor),
        )
        assert value == anchor.cert.not_valid_after_utc.timestamp()
    assert metric(text, "sidecar_server_certificate_expiry_timestamp_seconds") > 0
    next_update = metric(
        text, "sidecar_crl_next_update_timestamp_seconds", issuer="CN=Test Client Intermediate"
    )
    assert crl.next_update_utc is not None
    assert abs(next_update - crl.next_update_utc.timestamp()) < 1
    assert metric(text, "sidecar_ocsp_cache_entries") == 0
    assert metric(text, "sidecar_deny_list_entries", source="runtime") == 0


# ---- several workers: a run-time deny reaches every one, a restarted one too --------------------


async def _statuses(config_dir: ConfigDir, port: int, who: str) -> set[int]:
    """What ``who`` gets for /app/ on 16 new connections (both workers get some)."""
    import aiohttp

    from .test_signals import client_ctx

    out = set()
    for _ in range(16):
        async with (
            aiohttp.ClientSession() as fresh,
            fresh.get(f"https://localhost:{port}/app/", ssl=client_ctx(config_dir, who)) as resp,
        ):
            out.add(resp.status)
    return out


def _kill_a_worker(supervisor: int) -> None:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    os.kill(int(children[0]), 9)


async def _restarted(session: Any, base: str) -> None:
    """Back once the supervisor at ``base`` has restarted a worker and is ready again."""
    for _ in range(150):
        await asyncio.sleep(0.1)
        async with session.get(f"{base}/metrics") as resp:
            restarted = "sidecar_worker_restarts_total 1.0" in await resp.text()
        async with session.get(f"{base}/readyz") as ready:
            if restarted and ready.status == 200:
                return
    pytest.fail("the killed worker was not restarted")


@pytest.mark.own_process
async def test_deny_reaches_every_worker_and_a_restarted_one(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    import aiohttp

    from .test_signals import start

    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    alice = sha256_of(config_dir.certs.alice)
    base = f"http://127.0.0.1:{admin_port}"
    header = {"X-Sidecar-Admin": "1"}

    try:
        async with aiohttp.ClientSession() as session:
            assert await _statuses(config_dir, port, "alice") == {200}
            async with session.post(f"{base}/deny?sha256={alice}", headers=header) as resp:
                assert resp.status == 200
                assert await resp.json() == {"denied": alice, "new": True, "workers": 2}
            assert await _statuses(config_dir, port, "alice") == {403}
            _kill_a_worker(proc.pid)
            await _restarted(session, base)
            assert await _statuses(config_dir, port, "alice") == {
                403
            }  # the new worker denies it too
            async with session.get(f"{base}/deny") as resp:
                assert (await resp.json())["runtime"] == [alice]
            async with session.get(f"{base}/metrics") as resp:  # every worker holds the one entry
                assert metric(await resp.text(), "sidecar_deny_list_entries", source="runtime") == 1
            async with session.delete(f"{base}/deny?sha256={alice}", headers=header) as resp:
                assert resp.status == 200
            assert await _statuses(config_dir, port, "alice") == {200}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proc.communicate()


@pytest.mark.own_process
async def test_changes_made_while_a_worker_restarts_hold_in_it(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    """Alice denied, then one worker killed; while the supervisor restarts it, Alice and Bob
    are denied and taken off again and again, ending with Alice off and Bob on (the
    restarting worker misses relays, or reads them from the supervisor's list, depending on
    when they land). Once it is ready every worker allows Alice and refuses Bob."""
    import aiohttp

    from .test_signals import start

    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    data["log"] = {"level": "error"}  # no line per change: nobody reads the pipe meanwhile
    proc, port, admin_port = await start(config_dir, data)
    alice, bob = sha256_of(config_dir.certs.alice), sha256_of(config_dir.certs.bob)
    base = f"http://127.0.0.1:{admin_port}"
    header = {"X-Sidecar-Admin": "1"}

    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/deny?sha256={alice}", headers=header) as resp:
                assert resp.status == 200
            _kill_a_worker(proc.pid)
            # changes all through the restart (0.5 s) and the start: Alice on and off, Bob
            # on and off, ending with Alice off and Bob on
            until = asyncio.get_running_loop().time() + 3.0
            while asyncio.get_running_loop().time() < until:
                for method, who in (("POST", alice), ("DELETE", bob), ("DELETE", alice)):
                    async with session.request(
                        method, f"{base}/deny?sha256={who}", headers=header
                    ) as resp:
                        assert resp.status in (200, 207, 404), await resp.text()
                async with session.post(f"{base}/deny?sha256={bob}", headers=header) as resp:
                    assert resp.status in (200, 207)
                await asyncio.sleep(0.01)
            await _restarted(session, base)
            assert await _statuses(config_dir, port, "alice") == {200}
            assert await _statuses(config_dir, port, "bob") == {403}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proc.communicate()


# ---- the identity backend's word: Identity Plus PB 0004 / PB 0005 -----------------------------


@pytest.mark.parametrize("code", ["PB 0004", "PB 0005"])
async def test_an_identity_plus_revocation_is_told_to_the_fleet_hook(
    start_ip: StartIdentityPlus, code: str
) -> None:
    env = await start_ip()
    who = env.client("Reported")
    env.fake.set_simple(who.cert.serial_number, code)
    told: list[tuple[str, str]] = []
    env.running.sidecar.revocation.on_revoked.append(lambda sha256, why: told.append((sha256, why)))
    assert (await env.get("/app", who)).status == 403
    assert told == [(sha256_of(who), f"the identity backend ({code})")]
    # the refusal itself is what the cache keeps: the next request asks nobody
    assert (await env.get("/app", who)).status == 403
    assert env.fake.calls[who.cert.serial_number] == 1
