"""The chart's CRL mount (``crl``): a Secret or ConfigMap of CRLs mounted as a folder and named
in ``tls.crl``, laid out as the kubelet would (``..data`` and all), and checked by
``sidecar check-config`` inside the pod's layout."""

from __future__ import annotations

import os
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from sidecar.__main__ import main as sidecar_main
from tests.pki import PKI

from .revocation_parts import der, make_crl, pem
from .test_chart import (
    SIDECAR,
    chart,
    fake_cluster,
    lay_out_pod,
    merged,
    pod_spec,
    render,
    sidecar_config,
    sidecar_container,
)

__all__ = ["chart"]


@pytest.mark.parametrize("source", ["secretName", "configMapName"])
def test_crls_are_mounted_as_a_folder_and_named_in_tls_crl(
    chart: helm.Chart, source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = render(chart, merged(SIDECAR, {"crl": {source: "client-crl"}}))
    config = sidecar_config(objects)
    assert config["tls"]["crl"] == ["/etc/sidecar/crl"]
    [mount] = [m for m in sidecar_container(objects)["volumeMounts"] if m["name"] == "crl"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/sidecar/crl", True)
    [volume] = [v for v in pod_spec(objects)["volumes"] if v["name"] == "crl"]
    if source == "secretName":
        assert volume["secret"] == {"secretName": "client-crl", "defaultMode": 0o440}
    else:
        assert volume["configMap"] == {"name": "client-crl"}

    # What the pod gets passes check-config: the CRLs verify against the mounted anchors.
    pki = PKI.create()
    cluster = fake_cluster(tmp_path)
    cluster["secret/web-tls"] = {"tls.crt": pki.server.pem, "tls.key": pki.server.key_pem}
    cluster["secret/client-ca"] = {"ca.crt": pki.client_root.pem + pki.client_intermediate.pem}
    crls = {
        "intermediate.crl": der(make_crl(pki.client_intermediate, [7])),
        "root.pem": pem(make_crl(pki.client_root, [])),
    }
    cluster["secret/client-crl"] = cluster["configmap/client-crl"] = crls
    root = tmp_path / "pod"
    config_path = lay_out_pod(objects, cluster, root)
    folder = root / "etc/sidecar/crl"
    # as the kubelet writes a volume: the files behind ..data, one link per key
    stamped = folder / "..2026_01_01_00_00_00.000000000"
    stamped.mkdir()
    for name in crls:
        os.replace(folder / name, stamped / name)
        (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data").symlink_to(stamped.name)
    laid_out = yaml.safe_load(config_path.read_text())
    laid_out["tls"]["crl"] = [str(folder)]
    config_path.write_text(yaml.safe_dump(laid_out))
    assert sidecar_main(["check-config", str(config_path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "CN=Test Client Intermediate (1 revoked" in out
    assert "CN=Test Client Root (0 revoked" in out


def test_crl_takes_one_source(chart: helm.Chart) -> None:
    values = merged(SIDECAR, {"crl": {"secretName": "a", "configMapName": "b"}})
    with pytest.raises(helm.HelmRenderError, match="crl: give secretName or configMapName"):
        chart.render(values)


def test_config_cannot_name_other_crls_than_the_mount(chart: helm.Chart) -> None:
    values = merged(
        SIDECAR, {"crl": {"secretName": "a"}, "config": {"tls": {"crl": ["/elsewhere.crl"]}}}
    )
    with pytest.raises(helm.HelmRenderError, match=r"config\.tls\.crl is set by the chart"):
        chart.render(values)


def test_no_crl_no_mount(chart: helm.Chart) -> None:
    objects = render(chart, SIDECAR)
    assert "crl" not in sidecar_config(objects)["tls"]
    assert "crl" not in [m["name"] for m in sidecar_container(objects)["volumeMounts"]]
