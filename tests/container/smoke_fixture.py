"""The host side of the container smoke test (smoke.sh): renders the Helm chart and lays out
what its sidecar container mounts (the chart's ConfigMap, the Secrets with a test PKI), so the
image runs the chart's own configuration at the chart's own paths; then speaks to the running
container as a client would.

    python -m tests.container.smoke_fixture prepare DIR      (renders charts/sidecar)
    python -m tests.container.smoke_fixture free-ports N
    python -m tests.container.smoke_fixture wait-status URL STATUS SECONDS
    python -m tests.container.smoke_fixture requests DIR HTTPS_PORT ADMIN_PORT

Each command prints what it checked and exits 1 on the first failed check.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from tests.pki import PKI

CHART = Path(__file__).resolve().parent.parent.parent / "charts" / "sidecar"

#: The chart's values for the smoke test: mode sidecar (the application is the echo server on
#: 127.0.0.1:8080), a static user bound by a certificate file from an extra Secret volume, and a
#: drain delay long enough to see /readyz turn 503.
VALUES: dict[str, Any] = {
    "mode": "sidecar",
    "nativeSidecar": False,
    "app": {"image": {"repository": "echo"}, "port": 8080},
    "tls": {"secretName": "web-tls"},
    "clientCA": {"secretName": "client-ca"},
    "shutdown": {"preStopSeconds": 0, "drainDelaySeconds": 2, "gracePeriodSeconds": 5},
    "extraVolumes": [{"name": "users", "secret": {"secretName": "sidecar-users"}}],
    "extraVolumeMounts": [{"name": "users", "mountPath": "/etc/sidecar/users", "readOnly": True}],
    "config": {
        "identity": {
            "static": {
                "users": [
                    {
                        "sub": "5f0c2a52-7a1e-4b8e-9a43-0d1f7f6b2c11",
                        "username": "alice",
                        "email": "alice@example.com",
                        "roles": ["administrator"],
                        "certificates": [{"file": "/etc/sidecar/users/alice.crt"}],
                    }
                ]
            }
        },
        "routes": [
            {"path": "/public/", "access": "public"},
            {"path": "/admin/", "roles": ["administrator"]},
            {"path": "/"},
        ],
    },
}


class CheckFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"  ok  {what}")


def prepare(folder: Path) -> None:
    """Render the chart and lay out what its sidecar container mounts, as the kubelet would.

    ``folder/volumes/<volume>`` holds each mounted Secret or ConfigMap (the configuration is
    the chart's own ConfigMap); ``folder/run-flags`` lists the engine flags for the sidecar
    container taken from the rendered pod (mounts, environment, user); ``folder/client``
    holds what the test's client uses.
    """
    import helm_python as helm  # a test dependency; imported here so the other commands need none
    import yaml

    pki = PKI.create()
    alice = pki.client("alice", email="alice@example.com")
    mallory = pki.client("mallory")  # trusted by the CA, bound to nobody
    cluster: dict[str, dict[str, bytes]] = {
        # what cert-manager writes into a kubernetes.io/tls Secret
        "secret/web-tls": {
            "tls.crt": pki.server.pem,
            "tls.key": pki.server.key_pem,
            "ca.crt": pki.server_ca.pem,
        },
        "secret/client-ca": {"ca.crt": pki.client_root.pem + pki.client_intermediate.pem},
        "secret/sidecar-users": {"alice.crt": alice.pem},
    }
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(VALUES, name="smoke", namespace="default")
    objects = [
        d for n, t in rendered.items() if n.endswith(".yaml") for d in yaml.safe_load_all(t) if d
    ]
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            cluster[f"configmap/{obj['metadata']['name']}"] = {
                k: v.encode() for k, v in obj["data"].items()
            }
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "sidecar")
    volumes = {v["name"]: v for v in pod["volumes"]}

    flags = [
        f"--user={container['securityContext']['runAsUser']}:{container['securityContext']['runAsGroup']}"
    ]
    flags += [f"--env={e['name']}={e['value']}" for e in container.get("env", [])]
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            flags.append(f"--tmpfs={mount['mountPath']}:rw,size=16m,mode=1777")
            continue
        if "secret" in volume:
            files = cluster[f"secret/{volume['secret']['secretName']}"]
        else:
            files = cluster[f"configmap/{volume['configMap']['name']}"]
        host = folder / "volumes" / mount["name"]
        host.mkdir(parents=True, exist_ok=True)
        for key, data in files.items():
            (host / key).write_bytes(data)
        flags.append(f"--volume={host}:{mount['mountPath']}:ro")
    (folder / "run-flags").write_text("\n".join(flags) + "\n")

    client = folder / "client"
    client.mkdir(parents=True, exist_ok=True)
    (client / "server-ca.crt").write_bytes(pki.server_ca.pem)
    alice.write(client, "alice", chain=[pki.client_intermediate])
    mallory.write(client, "mallory", chain=[pki.client_intermediate])
    (client / "alice.der.b64").write_text(
        base64.b64encode(alice.cert.public_bytes(serialization.Encoding.DER)).decode()
    )
    app = folder / "app"
    app.mkdir(exist_ok=True)
    (app / "echo_upstream.py").write_bytes(
        (Path(__file__).parent / "echo_upstream.py").read_bytes()
    )
    # The containers run as UID 10001, not as the owner of these files (the chart's fsGroup
    # does this in Kubernetes).
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    print(f"prepared {folder}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, http.client.HTTPException):
        return None


def wait_status(url: str, expected: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last: int | None = None
    while time.monotonic() < deadline:
        last = status_of(url)
        if last == expected:
            print(f"  ok  {url} answered {expected}")
            return
        time.sleep(0.2)
    raise CheckFailed(f"{url} did not answer {expected} within {seconds:g}s (last: {last})")


def _request(
    folder: Path, port: int, path: str, *, client: str | None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=str(folder / "client" / "server-ca.crt"))
    if client:
        ctx.load_cert_chain(
            folder / "client" / f"{client}.pem", folder / "client" / f"{client}.key"
        )
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _received(body: bytes) -> dict[str, str]:
    """The headers the echo application received, by lower-case name."""
    echoed: dict[str, Any] = json.loads(body)
    return {k.lower(): v for k, v in echoed["headers"]}


def requests(folder: Path, https_port: int, admin_port: int) -> None:
    status, _, body = _request(
        folder, https_port, "/hello?x=1", client="alice", headers={"X-USERINFO": "forged"}
    )
    check(status == 200, "mTLS request with alice's certificate reaches the application (200)")
    echoed = json.loads(body)
    check(echoed["path"] == "/hello?x=1", "path and query arrive unchanged")
    got = _received(body)
    userinfo = json.loads(base64.b64decode(got.get("x-userinfo", "")) or b"{}")
    check(
        userinfo.get("username") == "alice", "X-USERINFO names alice (the forged one is replaced)"
    )
    check(userinfo.get("roles") == ["administrator"], "X-USERINFO carries alice's roles")
    expected_cert = (folder / "client" / "alice.der.b64").read_text()
    check(
        got.get("x-app-certificate") == expected_cert,
        "X-APP-CERTIFICATE is the DER of alice's certificate",
    )
    check(got.get("x-forwarded-proto") == "https", "X-Forwarded-Proto is https")

    status, _, _ = _request(folder, https_port, "/admin/", client="alice")
    check(status == 200, "alice (administrator) may use /admin/")
    status, _, _ = _request(folder, https_port, "/hello", client=None)
    check(status == 401, "no client certificate on a protected path: 401")
    status, _, _ = _request(folder, https_port, "/hello", client="mallory")
    check(status == 403, "a certificate bound to nobody: 403")
    status, _, body = _request(folder, https_port, "/public/page", client=None)
    got = _received(body) if status == 200 else {}
    check(
        status == 200 and "x-userinfo" not in got,
        "public path without a certificate: forwarded anonymously",
    )

    admin = f"http://127.0.0.1:{admin_port}"
    check(status_of(f"{admin}/healthz") == 200, "/healthz answers 200")
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    check(
        response.status == 200 and "# TYPE" in metrics, "/metrics answers in Prometheus text format"
    )


def main(argv: list[str]) -> int:
    try:
        match argv:
            case ["prepare", folder]:
                prepare(Path(folder))
            case ["free-ports", count]:
                print(" ".join(str(p) for p in free_ports(int(count))))
            case ["wait-status", url, expected, seconds]:
                wait_status(url, int(expected), float(seconds))
            case ["requests", folder, https_port, admin_port]:
                requests(Path(folder), int(https_port), int(admin_port))
            case _:
                print(__doc__, file=sys.stderr)
                return 2
    except CheckFailed as exc:
        print(f"  FAILED  {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
