"""The chart's values for Identity Plus HTTP legacy (``identityPlus.sessionKeys``): the session
keys come from a Secret, mounted read-only, named by the configuration, and the pod's
configuration passes ``sidecar check-config``. Rendered offline, as in ``test_chart.py``."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from sidecar.__main__ import main as sidecar_main

from .test_chart import (
    GATEWAY,
    KUBERNETES,
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

LEGACY: Values = {
    "identityPlus": {
        "agentSecretName": "identityplus-agent",
        "sessionKeys": {"secretName": "session-keys", "keys": ["new.key", "old.key"]},
    },
    "config": {
        "listen": {"server_names": ["shop.example.com"]},
        "identity": {"backend": "identityplus", "identityplus": {"legacy": True}},
    },
}


def test_the_gateway_gets_its_session_keys_from_a_secret(
    chart: helm.Chart, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = render(chart, merged(GATEWAY, LEGACY))
    identityplus = sidecar_config(objects)["identity"]["identityplus"]
    assert identityplus["legacy"] is True
    assert identityplus["session_keys"] == [
        "/etc/sidecar/session/new.key",
        "/etc/sidecar/session/old.key",
    ]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["session-keys"]["secret"] == {
        "secretName": "session-keys",
        "defaultMode": 0o440,
        "items": [{"key": "new.key", "path": "new.key"}, {"key": "old.key", "path": "old.key"}],
    }
    mounts = {m["name"]: m for m in sidecar_container(objects)["volumeMounts"]}
    assert mounts["session-keys"] == {
        "name": "session-keys",
        "mountPath": "/etc/sidecar/session",
        "readOnly": True,
    }
    for obj in objects:
        for version in KUBERNETES[1:]:
            kubernetes_validate.validate(obj, version, strict=True)
    cluster = fake_cluster(tmp_path)
    cluster["secret/session-keys"] = {
        name: base64.b64encode(os.urandom(32)) + b"\n" for name in ("new.key", "old.key")
    }
    config_path = lay_out_pod(objects, cluster, tmp_path / "pod")
    assert sidecar_main(["check-config", str(config_path)]) == 0, capsys.readouterr().err


def test_nothing_is_mounted_without_it(chart: helm.Chart) -> None:
    objects = render(chart, GATEWAY)
    assert "session-keys" not in {v["name"] for v in pod_spec(objects)["volumes"]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"identityPlus": {"sessionKeys": {"secretName": ""}}},
            "identityPlus.sessionKeys.secretName is required",
        ),
        (
            {
                "config": {
                    "identity": {"identityplus": {"session_keys": ["/elsewhere/session.key"]}}
                }
            },
            "config.identity.identityplus.session_keys is set by the chart",
        ),
    ],
)
def test_mistakes_are_explained(chart: helm.Chart, values: Values, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(merged(merged(GATEWAY, LEGACY), values))
