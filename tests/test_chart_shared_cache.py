"""The chart's values for an external Redis or Valkey (``sharedCache``): what the pod mounts,
what the sidecar's configuration says, and the mistakes it refuses. Rendered offline, as in
``test_chart.py``; the configuration the pod gets must pass ``sidecar check-config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from sidecar.__main__ import main as sidecar_main

from .pki import PKI
from .test_chart import (
    CHART,
    GATEWAY,
    KUBERNETES,
    SIDECAR,
    Values,
    chart,
    fake_cluster,
    lay_out_pod,
    merged,
    pod_spec,
    render,
    sidecar_config,
    sidecar_container,
)

__all__ = ["chart"]  # the fixture

SHARED: Values = {
    "sharedCache": {
        "url": "rediss://redis.cache.svc.cluster.local:6380",
        "username": "sidecar",
        "passwordSecret": {"name": "redis-auth", "key": "password"},
        "tls": {
            "secretName": "redis-tls",
            "caKey": "ca.crt",
            "certificateKey": "tls.crt",
            "keyKey": "tls.key",
        },
    },
    "config": {"identity": {"cache": {"ttl": "2m", "shared": {"key_prefix": "shop:"}}}},
}


def cluster(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    out = fake_cluster(tmp_path)
    pki = PKI.create()
    client = pki.client("sidecar")
    out["secret/redis-auth"] = {"password": b"s3cret\n"}
    out["secret/redis-tls"] = {
        "ca.crt": pki.server_ca.pem,
        "tls.crt": client.pem,
        "tls.key": client.key_pem,
    }
    return out


@pytest.mark.parametrize("base", [SIDECAR, GATEWAY], ids=["sidecar", "gateway"])
def test_the_pod_gets_the_url_the_password_and_the_tls_files(
    chart: helm.Chart, base: Values, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = render(chart, merged(base, SHARED))
    shared = sidecar_config(objects)["identity"]["cache"]["shared"]
    assert shared == {
        "url": "rediss://redis.cache.svc.cluster.local:6380",
        "username": "sidecar",
        "password_file": "/etc/sidecar/redis/password",
        "ca": "/etc/sidecar/redis-tls/ca.crt",
        "certificate": "/etc/sidecar/redis-tls/tls.crt",
        "key": "/etc/sidecar/redis-tls/tls.key",
        "key_prefix": "shop:",  # config's own keys are kept
    }
    assert sidecar_config(objects)["identity"]["cache"]["ttl"] == "2m"
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["redis-password"]["secret"] == {
        "secretName": "redis-auth",
        "defaultMode": 0o440,
        "items": [{"key": "password", "path": "password"}],
    }
    assert volumes["redis-tls"]["secret"] == {"secretName": "redis-tls", "defaultMode": 0o440}
    mounts = {m["name"]: m for m in sidecar_container(objects)["volumeMounts"]}
    assert mounts["redis-password"] == {
        "name": "redis-password",
        "mountPath": "/etc/sidecar/redis",
        "readOnly": True,
    }
    assert mounts["redis-tls"]["mountPath"] == "/etc/sidecar/redis-tls"
    assert mounts["redis-tls"]["readOnly"] is True
    # The password is in no manifest; the ConfigMap names the file only.
    assert "s3cret" not in str(objects)
    for obj in objects:
        for version in KUBERNETES[1:]:
            kubernetes_validate.validate(obj, version, strict=True)
    # and the sidecar accepts what the pod gets
    config_path = lay_out_pod(objects, cluster(tmp_path), tmp_path / "pod")
    assert sidecar_main(["check-config", str(config_path)]) == 0, capsys.readouterr().err


def test_a_plain_url_alone(chart: helm.Chart) -> None:
    objects = render(chart, merged(SIDECAR, {"sharedCache": {"url": "redis://valkey:6379/1"}}))
    assert sidecar_config(objects)["identity"]["cache"] == {
        "shared": {"url": "redis://valkey:6379/1"}
    }
    names = {v["name"] for v in pod_spec(objects)["volumes"]}
    assert not names & {"redis-password", "redis-tls"}


def test_nothing_by_default(chart: helm.Chart) -> None:
    objects = render(chart, SIDECAR)
    assert "cache" not in sidecar_config(objects).get("identity", {})
    assert not {v["name"] for v in pod_spec(objects)["volumes"]} & {"redis-password", "redis-tls"}


def test_tls_with_the_system_cas(chart: helm.Chart) -> None:
    objects = render(
        chart,
        merged(
            SIDECAR,
            {"sharedCache": {"url": "rediss://cache.example.com", "tls": {"caKey": ""}}},
        ),
    )
    assert sidecar_config(objects)["identity"]["cache"]["shared"] == {
        "url": "rediss://cache.example.com"
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sharedCache": {"passwordSecret": {"name": "redis-auth"}}},
            "sharedCache.url is required",
        ),
        ({"sharedCache": {"username": "x"}}, "sharedCache.url is required"),
        (
            {"sharedCache": {"url": "redis://cache", "tls": {"secretName": "redis-tls"}}},
            "needs a rediss:// URL",
        ),
        (
            {
                "sharedCache": {
                    "url": "rediss://cache",
                    "tls": {"secretName": "redis-tls", "certificateKey": "tls.crt", "keyKey": ""},
                }
            },
            "go together",
        ),
        (
            {
                "sharedCache": {
                    "url": "rediss://cache",
                    "tls": {"certificateKey": "a", "keyKey": "b"},
                }
            },
            "needs sharedCache.tls.secretName",
        ),
        (
            {
                "sharedCache": {"url": "redis://cache"},
                "config": {"identity": {"cache": {"shared": {"url": "redis://elsewhere"}}}},
            },
            "config.identity.cache.shared.url is set by the chart",
        ),
    ],
)
def test_mistakes_are_explained(chart: helm.Chart, values: Values, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(merged(SIDECAR, values))


@pytest.mark.parametrize(
    "values",
    [
        {"sharedCache": {"url": "redis://:secret@cache"}},  # no credentials in the URL
        {"sharedCache": {"url": "memcached://cache"}},
        {"sharedCache": {"host": "cache"}},
    ],
)
def test_the_schema_refuses(chart: helm.Chart, values: Values) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.render(merged(SIDECAR, values))


def test_config_may_name_the_same_url(chart: helm.Chart) -> None:
    url = "redis://cache:6379"
    values: dict[str, Any] = {
        "sharedCache": {"url": url},
        "config": {"identity": {"cache": {"shared": {"url": url, "timeout": "20ms"}}}},
    }
    shared = sidecar_config(render(chart, merged(SIDECAR, values)))["identity"]["cache"]["shared"]
    assert shared == {"url": url, "timeout": "20ms"}


def test_lint(chart: helm.Chart) -> None:
    report = helm.lint(
        CHART, merged(SIDECAR, SHARED), strict=True, namespace="prod", kube_version="v1.29.0"
    )
    assert report["errors"] == []
