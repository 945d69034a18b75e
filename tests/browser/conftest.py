"""Fixtures for the browser tests: the demo PKI, Chromium's certificate policy, one headless
Chromium per profile (with alice's certificate, or with none), a fresh tab per test, the demo's
echo application, sidecars started from the demo's configuration, and screenshots.

The browsers live for the session (starting one takes about a second); each test gets a tab in
a browser context of its own, so no cookie, cache or client-certificate decision crosses tests.
A test that cannot run (no Chromium, no NSS tools, no right to write the policy) fails with
the reason: nothing here is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sidecar import config as config_mod
from sidecar.app import Sidecar
from sidecar.demo import make_pki, write_config
from sidecar.demo_echo import echo_app
from sidecar.metrics import Metrics
from tests.servers import serve_app

from .cdp import CDPError, Connection, Navigation, Page
from .chromium import (
    BrowserSetupError,
    Chromium,
    ClientIdentity,
    certificate_policy,
    check_tools,
    installed_policy,
    launch,
    make_home,
)

#: screenshots, named per test; git ignores the folder, CI keeps it as an artefact
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


# ---- the demo PKI -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPKI:
    """``sidecar demo``'s PKI (``make_pki``), made once for the session."""

    folder: Path

    def identity(self, name: str) -> ClientIdentity:
        cert = x509.load_pem_x509_certificate((self.folder / f"{name}.pem").read_bytes())
        key = serialization.load_pem_private_key((self.folder / f"{name}.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        return ClientIdentity(name, cert, key)

    def serial(self, name: str) -> int:
        return int(self.identity(name).certificate.serial_number)

    @property
    def client_issuer_cn(self) -> str:
        """The CN of the CA that issued the demo users' certificates."""
        issuer = self.identity("alice").certificate.issuer
        return str(issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    def copy_to(self, folder: Path) -> Path:
        shutil.copytree(self.folder, folder)
        return folder


@pytest.fixture(scope="session")
def demo_pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    folder = tmp_path_factory.mktemp("demo-pki")
    make_pki(folder)
    return DemoPKI(folder)


@pytest.fixture
def demo_folder(demo_pki: DemoPKI, tmp_path: Path) -> Path:
    """This test's copy of the demo PKI, where its configuration is written."""
    return demo_pki.copy_to(tmp_path / "demo")


# ---- Chromium ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_policy(demo_pki: DemoPKI) -> Iterator[Path]:
    """The managed policy file that makes Chromium present a demo user's certificate to
    ``https://localhost`` on any port; removed at the end of the session."""
    try:
        check_tools()
        with installed_policy(certificate_policy(demo_pki.client_issuer_cn)) as file:
            yield file
    except BrowserSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class Browsers:
    """One headless Chromium per profile, started when first asked for."""

    folder: Path
    pki: DemoPKI
    running: dict[str, Chromium] = field(default_factory=dict)

    def get(self, profile: str) -> Chromium:
        """``alice``: holds alice's certificate; ``anonymous``: holds none. Both trust the
        demo's server CA."""
        if profile not in self.running:
            identities = {"alice": [self.pki.identity("alice")], "anonymous": []}[profile]
            try:
                home = make_home(
                    self.folder / profile / "home",
                    trusted_cas={
                        "demo-server-ca": (self.pki.folder / "server-ca.pem").read_bytes()
                    },
                    identities=identities,
                )
                self.running[profile] = launch(home, self.folder / profile)
            except BrowserSetupError as exc:
                pytest.fail(str(exc), pytrace=False)
        return self.running[profile]

    def stop(self) -> None:
        for browser in self.running.values():
            browser.stop()


@pytest.fixture(scope="session")
def browsers(
    tmp_path_factory: pytest.TempPathFactory, demo_pki: DemoPKI, chromium_policy: Path
) -> Iterator[Browsers]:
    registry = Browsers(tmp_path_factory.mktemp("browsers"), demo_pki)
    try:
        yield registry
    finally:
        registry.stop()


def artifact(item: pytest.Item, label: str = "") -> Path:
    """``tests/artifacts/<module>--<test>[--label].png``."""
    module = item.module.__name__.rsplit(".", 1)[-1] if isinstance(item, pytest.Function) else ""
    name = "--".join(part for part in (module, item.name, label) if part)
    return ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test, so that a page fixture knows it failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


async def _open_page(browser: Chromium, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    try:
        connection = await Connection.open(browser.websocket_url)
    except (OSError, aiohttp.ClientError) as exc:
        pytest.fail(
            f"cannot reach Chromium's DevTools ({exc}); its log ends:\n{browser.log_tail()}",
            pytrace=False,
        )
    try:
        page = await connection.new_page()
        yield page
        call = request.node.stash.get(_REPORTS, {}).get("call")
        if call is not None and call.failed:
            # best effort: a page stuck in a certificate choice cannot be captured
            with contextlib.suppress(CDPError):
                await page.screenshot(artifact(request.node, "failure"), timeout=5)
        await connection.close_page(page)
    finally:
        await connection.close()


# The pages depend on ``serve_sidecar`` so that they close first, as a person closes a tab
# before the server stops: the browser then drops its keep-alive connections itself. Otherwise
# a stopping sidecar closes them, TLS waits for the browser's close_notify, which an idle
# Chromium never sends, and the socket outlives the test's event loop.


@pytest.fixture
async def page(
    browsers: Browsers, request: pytest.FixtureRequest, serve_sidecar: StartSidecar
) -> AsyncIterator[Page]:
    """A tab of the browser that holds alice's certificate."""
    async for tab in _open_page(browsers.get("alice"), request):
        yield tab


@pytest.fixture
async def anonymous_page(
    browsers: Browsers, request: pytest.FixtureRequest, serve_sidecar: StartSidecar
) -> AsyncIterator[Page]:
    """A tab of a browser that holds no client certificate."""
    async for tab in _open_page(browsers.get("anonymous"), request):
        yield tab


Screenshot = Callable[[Page], Awaitable[Path]]


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Screenshot:
    """Save what ``page`` shows as ``tests/artifacts/<module>--<test>.png``."""

    async def take(page: Page) -> Path:
        path = await page.screenshot(artifact(request.node))
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), path
        return path

    return take


AdminScreenshot = Callable[[Sidecar, str], Awaitable[tuple[Navigation, Path]]]


@pytest.fixture
def admin_screenshot(page: Page, screenshot: Screenshot) -> AdminScreenshot:
    """Open ``path`` on a sidecar's admin listener, as an operator types it into the address
    bar, and save the screenshot; the navigation and the file."""

    async def take(sidecar: Sidecar, path: str) -> tuple[Navigation, Path]:
        nav = await page.goto(f"http://127.0.0.1:{sidecar.admin_port}{path}")
        return nav, await screenshot(page)

    return take


# ---- the sidecar and its application ------------------------------------------------------------


@pytest.fixture
async def demo_upstream() -> AsyncIterator[int]:
    """The demo's echo application (``sidecar.demo_echo``) on a free port."""
    runner, port = await serve_app(echo_app())
    yield port
    await runner.cleanup()


def demo_config(folder: Path, *, upstream_port: int, **sections: Any) -> Path:
    """The configuration ``sidecar demo`` writes (free ports), with ``sections`` replaced."""
    path = write_config(folder, port=0, upstream_port=upstream_port, admin_port=0)
    if sections:
        data = yaml.safe_load(path.read_text())
        data.update(sections)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


StartSidecar = Callable[[Path], Awaitable[Sidecar]]


@pytest.fixture
async def serve_sidecar() -> AsyncIterator[StartSidecar]:
    """Start a sidecar in this process from a configuration file; stopped after the test."""
    started: list[Sidecar] = []

    async def start(path: Path) -> Sidecar:
        sidecar = Sidecar(config_mod.load(path), config_path=path, metrics=Metrics())
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        port = sidecar.port
        await sidecar.stop(grace=1)
        await _connections_closed(port)


async def _connections_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until no connection to ``port`` is open on our side any more.

    ``Sidecar.stop`` closes a connection that aiohttp's server took over (after a request with
    a body) with a TLS close_notify and then waits for the peer's, up to 30 s; the browser
    answers only once its tab's context is gone (the page fixtures close first), a moment
    later. Without this wait, the socket would outlive the test's event loop.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while _open_connections(port) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def _open_connections(port: int) -> int:
    """Connections whose local port is ``port``, ESTABLISHED (01) or CLOSE_WAIT (08): those
    whose socket may still be open here."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in itertools.islice(lines, 1, None):
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in ("01", "08"):
                    count += 1
    return count
