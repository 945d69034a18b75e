"""Debian's Chromium as the browser tests need it: an NSS database that trusts the test server
CA and holds a client certificate, the policy that makes Chromium present that certificate
without asking, and the headless process with the DevTools protocol on a loopback port.

Chromium on Linux reads certificates from ``$HOME/.pki/nssdb``, so every browser gets a
``HOME`` of its own. It reads managed policies only from ``/etc/chromium/policies/managed``:
nothing else makes it choose a client certificate by itself, and without a choice it waits for
a person to pick one in a dialog that headless mode never shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

CHROMIUM = Path("/usr/bin/chromium")
POLICY_DIR = Path("/etc/chromium/policies/managed")
INSTALL_HINT = (
    "the browser tests need Debian's Chromium and the NSS tools: "
    "apt-get install chromium libnss3-tools fonts-liberation (as root; .ci/run installs them)"
)
#: the prefix of our policy files; the rest of the name is the pid and a random tag
POLICY_PREFIX = "sidecar-tests-"
#: the password of the PKCS#12 files handed to pk12util (it refuses an empty one)
_P12_PASSWORD = b"sidecar-tests"


class BrowserSetupError(Exception):
    """The browser cannot be set up here; the message says what is missing."""


def check_tools() -> None:
    """Fail with the install hint when Chromium or the NSS tools are not there."""
    missing = [str(CHROMIUM)] if not os.access(CHROMIUM, os.X_OK) else []
    missing += [tool for tool in ("certutil", "pk12util") if shutil.which(tool) is None]
    if missing:
        raise BrowserSetupError(f"not found: {', '.join(missing)}; {INSTALL_HINT}")


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BrowserSetupError(
            f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
        )


# ---- the NSS database -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate and its key, as the browser will hold them."""

    name: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def make_home(
    home: Path, *, trusted_cas: dict[str, bytes], identities: list[ClientIdentity]
) -> Path:
    """A private ``HOME`` whose NSS database trusts ``trusted_cas`` (name → PEM) to identify
    web servers and holds ``identities``. Returns ``home``."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    db = f"sql:{nssdb}"
    _run("certutil", "-N", "-d", db, "--empty-password")
    for name, pem in trusted_cas.items():
        file = home / f"{name}.pem"
        file.write_bytes(pem)
        # "C,,": a trusted CA for TLS servers, nothing else (not for e-mail or code)
        _run("certutil", "-A", "-d", db, "-n", name, "-t", "C,,", "-i", str(file))
    for identity in identities:
        file = home / f"{identity.name}.p12"
        file.write_bytes(
            pkcs12.serialize_key_and_certificates(
                identity.name.encode(),
                identity.key,
                identity.certificate,
                None,
                serialization.BestAvailableEncryption(_P12_PASSWORD),
            )
        )
        _run("pk12util", "-i", str(file), "-d", db, "-W", _P12_PASSWORD.decode())
    return home


# ---- the policy -----------------------------------------------------------------------------


def certificate_policy(issuer_cn: str) -> dict[str, list[str]]:
    """``AutoSelectCertificateForUrls``: on any ``https://localhost`` port, present the
    certificate issued by ``issuer_cn``, without asking. (Its entries are JSON in a string.)"""
    rule = {"pattern": "https://localhost:*", "filter": {"ISSUER": {"CN": issuer_cn}}}
    return {"AutoSelectCertificateForUrls": [json.dumps(rule)]}


@contextlib.contextmanager
def installed_policy(policy: dict[str, list[str]]) -> Iterator[Path]:
    """Write ``policy`` to a file of this session's own in the managed policy folder, and
    remove it at the end.

    The folder is the machine's: every Chromium on it reads every file there, and when two
    files set the same policy, one wins. So the policy must be the same for every test session
    (it is: the demo PKI's issuer has a fixed name), and each session removes only its own
    file, plus those of sessions whose process is gone.
    """
    try:
        POLICY_DIR.mkdir(parents=True, exist_ok=True)
        file = POLICY_DIR / f"{POLICY_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json"
        file.write_text(json.dumps(policy, indent=1) + "\n")
    except OSError as exc:
        raise BrowserSetupError(
            f"cannot write Chromium's managed policy in {POLICY_DIR} ({exc.strerror}): "
            "the browser tests need it to make Chromium present a client certificate, and "
            "Chromium reads it nowhere else; run them as root (CI does)"
        ) from exc
    _remove_stale_policies()
    try:
        yield file
    finally:
        file.unlink(missing_ok=True)


def _remove_stale_policies() -> None:
    for file in POLICY_DIR.glob(f"{POLICY_PREFIX}*.json"):
        pid = file.name.removeprefix(POLICY_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            file.unlink(missing_ok=True)


# ---- the process ----------------------------------------------------------------------------


@dataclass
class Chromium:
    """A running headless Chromium; ``websocket_url`` is its browser-wide DevTools endpoint."""

    process: subprocess.Popen[bytes]
    websocket_url: str
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def launch(home: Path, folder: Path, *, timeout: float = 30.0) -> Chromium:
    """Start headless Chromium with ``home`` as its ``HOME`` (its NSS database) and a user
    data folder in ``folder``; return once its DevTools endpoint is known.

    Never ``--ignore-certificate-errors``: the server certificate is verified against the NSS
    database, as for a person.
    """
    user_data = folder / "user-data"
    user_data.mkdir(parents=True)
    log = folder / "chromium.log"
    args = [
        str(CHROMIUM),
        "--headless",
        f"--user-data-dir={user_data}",
        # port 0: Chromium picks one and writes it to DevToolsActivePort
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--password-store=basic",
        "--window-size=1024,768",
        "--hide-scrollbars",
        "--mute-audio",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox on
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LANG": "C.UTF-8",
        "TZ": "UTC",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    browser = Chromium(process, "", log)
    port_file = user_data / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrowserSetupError(
                f"Chromium exited ({process.returncode}) before it opened DevTools:\n"
                f"{browser.log_tail()}"
            )
        lines = port_file.read_text().splitlines() if port_file.exists() else []
        if len(lines) >= 2 and lines[0].isdigit():
            browser.websocket_url = f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            return browser
        time.sleep(0.05)
    browser.stop()
    raise BrowserSetupError(
        f"Chromium opened no DevTools port within {timeout:g} s:\n{browser.log_tail()}"
    )
