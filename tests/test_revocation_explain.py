"""``sidecar explain`` and the admin's ``GET /explain`` say when revocation refuses a
certificate (issue #14 with #16's explain): otherwise an operator asking why a revoked
certificate is refused would be told it is forwarded.
"""

from __future__ import annotations

import subprocess
import sys

import aiohttp

from .conftest import ConfigDir, SidecarFactory, Upstream
from .revocation_parts import make_crl
from .test_identity_e2e import admin, fetch
from .test_revocation_security import sha256_of, with_crl


async def test_the_admin_listener_explains_a_revoked_certificate(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    certs = config_dir.certs
    running = await start_sidecar(config_dir.base(upstream.port))
    alice = sha256_of(certs.alice)
    assert (await fetch(running, "/app", certs.alice)).status == 200
    assert (await admin(running, "POST", f"/deny?sha256={alice}"))[0] == 200
    base = f"http://127.0.0.1:{running.sidecar.admin_port}/explain"
    before = running.sidecar.revocation.outcome_counts()
    params = {"sha256": alice, "path": "/app"}
    async with aiohttp.ClientSession() as session, session.get(base, params=params) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["status"] == 403 and "(revoked)" in doc["decision"], doc
    [step] = [s for s in doc["steps"] if s["check"] == "revocation"]
    assert step["outcome"] == "fail" and "deny-list" in step["detail"]
    assert running.sidecar.revocation.outcome_counts() == before  # explaining counts no request


def test_the_command_line_explains_a_revoked_certificate(config_dir: ConfigDir) -> None:
    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [int(certs.alice.cert.serial_number)])
    path = config_dir.write(with_crl(config_dir, Upstream(1), crl, ocsp="hard"))

    def explain(who: str) -> list[str]:
        cert = str(config_dir.path / f"{who}.pem")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "explain",
                "--config",
                str(path),
                "--path",
                "/app",
                "--cert",
                cert,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    alice = explain("alice")
    assert any(
        line.startswith("FAIL  revocation") and "listed in the CRL" in line for line in alice
    ), alice
    assert alice[-1].startswith("decision  403 Forbidden") and alice[-1].endswith("(revoked)")
    bob = explain("bob")
    assert any(
        line.startswith("pass  revocation") and "OCSP not asked by sidecar explain" in line
        for line in bob
    ), bob
    assert bob[-1].startswith("decision  forwarded"), bob
