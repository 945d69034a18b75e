"""A real PHP application server for the interop tests: ``php -S`` with a front controller.

PHP is where two of the sidecar's readings matter in practice: ``$_SERVER`` names request
headers ``HTTP_`` + the name upper-cased with ``-``, ``.`` and space all turned into ``_`` (so
``X.USERINFO`` is read as ``X-USERINFO``), and a request for ``/index.php/admin/x`` runs
``index.php`` with ``PATH_INFO`` ``/admin/x``, which front controllers (Symfony, Laravel, Slim)
route. The built-in server does both as PHP-FPM behind nginx or Apache does. The fixture's
``index.php`` answers JSON: the ``PATH_INFO`` it routes by, and every ``HTTP_*`` variable.

A missing ``php`` is a failure, not a skip (``.ci/run`` installs ``php-cli``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

FRONT_CONTROLLER = r"""<?php
// Routes as a Symfony or Laravel front controller does: by PATH_INFO, else by the URI's path.
header('Content-Type: application/json');
$headers = [];
foreach ($_SERVER as $key => $value) {
    if (strncmp($key, 'HTTP_', 5) === 0) {
        $headers[$key] = $value;
    }
}
$uri = $_SERVER['REQUEST_URI'];
$routed = $_SERVER['PATH_INFO'] ?? parse_url($uri, PHP_URL_PATH);
echo json_encode([
    'uri' => $uri,
    'script' => $_SERVER['SCRIPT_NAME'] ?? null,
    'routed' => $routed,
    'admin_area' => str_starts_with($routed, '/admin'),
    'headers' => $headers,
], JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
"""


@dataclass
class PhpServer:
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def php_server(tmp_path: Path) -> Iterator[PhpServer]:
    """``php -S`` serving a folder whose only file is the front controller ``index.php``
    (the built-in server sends every path that names no file to it)."""
    binary = shutil.which("php")
    if binary is None:
        pytest.fail("php is not installed (Debian: apt-get install php-cli); .ci/run installs it")
    root = tmp_path / "php-root"
    root.mkdir()
    (root / "index.php").write_text(FRONT_CONTROLLER)
    port = _free_port()
    process = subprocess.Popen(
        [binary, "-n", "-S", f"127.0.0.1:{port}", "-t", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    out = process.stdout.read().decode() if process.stdout else ""
                    pytest.fail(f"php -S did not start listening on port {port}: {out}")
                time.sleep(0.05)
        yield PhpServer(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
