"""The Helm chart (charts/sidecar), rendered offline in both modes and with each optional object.

No cluster: helm-python-sdk renders and lints with Helm's own Go code (bundled in its wheel),
kubernetes-validate checks every manifest against Kubernetes' OpenAPI schemas (strict: unknown
fields are errors). Then what the pod gets is checked as the kubelet would lay it out: the
Secrets and ConfigMaps are written where the sidecar container mounts them, and the
configuration it receives must pass ``sidecar check-config``.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from multidict import CIMultiDict

from sidecar.__main__ import main as sidecar_main
from tests.pki import PKI, make_ca, make_leaf

CHART = Path(__file__).resolve().parent.parent / "charts" / "sidecar"
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion), the first with native
#: sidecars on by default, and the newest that kubernetes-validate knows.
KUBERNETES = ["1.25.0", "1.29.0", kubernetes_validate.utils.latest_version() + ".0"]

Values = dict[str, Any]
Manifest = dict[str, Any]

SIDECAR: Values = {
    "mode": "sidecar",
    "app": {"image": {"repository": "registry.example.com/shop/web", "tag": "2.4.1"}, "port": 8080},
    "tls": {"secretName": "web-tls"},
    "clientCA": {"secretName": "client-ca"},
}
GATEWAY: Values = {
    "mode": "gateway",
    "gateway": {"upstream": "http://web.shop.svc.cluster.local:8080"},
    "tls": {"secretName": "web-tls"},
    "clientCA": {"secretName": "client-ca"},
}


def merged(base: Values, extra: Values) -> Values:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


EVERYTHING: Values = {
    "podDisruptionBudget": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "networkPolicy": {
        "enabled": True,
        "httpsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
        ],
        "adminFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
    },
}

#: the README's example of gateway mode behind an ingress controller (issue #15)
BEHIND_INGRESS: Values = yaml.safe_load(
    (CHART.parent.parent / "examples" / "behind-ingress" / "values.yaml").read_text()
)

#: Each case: values, and the kinds of objects it must make.
CASES: dict[str, tuple[Values, set[str]]] = {
    "gateway-behind-ingress": (
        BEHIND_INGRESS,
        {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy"},
    ),
    "sidecar": (SIDECAR, {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy"}),
    "sidecar-classic": (
        merged(SIDECAR, {"nativeSidecar": False}),
        {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy"},
    ),
    "sidecar-no-policy": (
        merged(SIDECAR, {"networkPolicy": {"enabled": False}}),
        {"ConfigMap", "Deployment", "Service", "ServiceAccount"},
    ),
    "sidecar-everything": (
        merged(
            SIDECAR,
            {
                **EVERYTHING,
                "nativeSidecar": True,
                # Static users bound by certificate files from a mounted Secret.
                "config": {
                    "identity": {
                        "static": {
                            "users": [
                                {
                                    "sub": "u-1",
                                    "username": "alice",
                                    "roles": ["admin"],
                                    "certificates": [{"file": "/etc/sidecar/users/alice.crt"}],
                                }
                            ]
                        }
                    },
                    "routes": [{"path": "/public/", "access": "public"}, {"path": "/"}],
                    "log": {"level": "debug"},
                },
                "extraVolumes": [{"name": "users", "secret": {"secretName": "sidecar-users"}}],
                "extraVolumeMounts": [
                    {"name": "users", "mountPath": "/etc/sidecar/users", "readOnly": True}
                ],
                "app": {
                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}},
                    "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                },
            },
        ),
        {
            "ConfigMap",
            "Deployment",
            "Service",
            "ServiceAccount",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ServiceMonitor",
        },
    ),
    "gateway": (GATEWAY, {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy"}),
    "gateway-everything": (
        merged(
            GATEWAY,
            {
                **EVERYTHING,
                "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
                "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
                "clientCA": {"secretName": "", "configMapName": "client-ca-bundle"},
                "identityPlus": {"agentSecretName": "identityplus-agent"},
                "config": {
                    "identity": {"backend": "identityplus", "identityplus": {"timeout": "3s"}}
                },
                "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
            },
        ),
        {
            "ConfigMap",
            "Deployment",
            "Service",
            "ServiceAccount",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ServiceMonitor",
            "HorizontalPodAutoscaler",
        },
    ),
}


# ---- rendering ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: Values) -> list[Manifest]:
    files = chart.render(values, name="shop", namespace="prod", is_install=True)
    return [
        doc
        for path, text in sorted(files.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def notes(chart: helm.Chart, values: Values) -> str:
    return chart.render(values, name="shop", namespace="prod")["sidecar/templates/NOTES.txt"]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_spec(objects: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container(objects: list[Manifest]) -> dict[str, Any]:
    pod = pod_spec(objects)
    found: list[dict[str, Any]] = [
        c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "sidecar"
    ]
    assert len(found) == 1
    return found[0]


def sidecar_config(objects: list[Manifest]) -> dict[str, Any]:
    data = one(objects, "ConfigMap", "shop-sidecar-config")["data"]
    config: dict[str, Any] = yaml.safe_load(data["sidecar.yaml"])
    return config


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, Values, list[Manifest]]:
    name: str = request.param
    values = CASES[name][0]
    return name, values, render(chart, values)


# ---- lint and schemas -----------------------------------------------------------------------


def test_lint_is_clean(case: tuple[str, Values, list[Manifest]]) -> None:
    _, values, _ = case
    report = helm.lint(CHART, values, strict=True, namespace="prod", kube_version="v1.29.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert problems == []


def test_every_manifest_is_valid_kubernetes(case: tuple[str, Values, list[Manifest]]) -> None:
    name, _, objects = case
    assert {o["kind"] for o in objects} == CASES[name][1]
    native = bool(pod_spec(objects).get("initContainers"))
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a CRD: no schema in Kubernetes' own
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        for version in KUBERNETES:
            if native and version < "1.29":
                continue  # native sidecars need 1.29
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", ["sidecar-everything", "gateway-everything"])
def test_kubernetes_validate_command(chart: helm.Chart, name: str, tmp_path: Path) -> None:
    """The same check as the command an operator would run on `helm template` output."""
    files = chart.render(CASES[name][0], name="shop", namespace="prod")
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text("\n---\n".join(t for p, t in sorted(files.items()) if p.endswith(".yaml")))
    command = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(command), "--strict", "--quiet", str(manifests)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the CRD is left unchecked, and it says so.
    assert "Couldn't find schema for kind ServiceMonitor" in result.stdout + result.stderr


def test_validation_is_strict(chart: helm.Chart) -> None:
    """The check above would catch a misspelt field (not only a missing one)."""
    deployment = one(render(chart, SIDECAR), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES[-1], strict=True)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicas": 2}, "replicas"),
        ({"image": {"tagg": "x"}}, "/image"),
        ({"service": {"port": 443, "portt": 1}}, "/service"),
        ({"shutdown": {"drainDelay": 5}}, "/shutdown"),
        ({"mode": "daemonset"}, "/mode"),
    ],
)
def test_schema_refuses_unknown_keys_and_values(
    chart: helm.Chart, values: Values, where: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.render(merged(SIDECAR, values))


def test_config_is_passed_through_unchecked_by_the_chart(chart: helm.Chart) -> None:
    """The sidecar's own schema judges `config`, not the chart's (it is not reinvented there)."""
    objects = render(
        chart,
        merged(SIDECAR, {"config": {"limits": {"max_body_size": 1024}, "future_key": {"x": 1}}}),
    )
    config = sidecar_config(objects)
    assert config["limits"] == {"max_body_size": 1024}
    assert config["future_key"] == {"x": 1}


# ---- what the sidecar receives --------------------------------------------------------------


def fake_cluster(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets and ConfigMaps the cases name, as cert-manager and an operator would make them."""
    pki = PKI.create()
    alice = pki.client("alice")
    agent_ca = make_ca("Identity Plus Agent CA")
    agent = make_leaf(agent_ca, "shop.example.identity.plus")
    client_anchors = pki.client_root.pem + pki.client_intermediate.pem
    return {
        # kubernetes.io/tls Secret as cert-manager writes it
        "secret/web-tls": {
            "tls.crt": pki.server.pem,
            "tls.key": pki.server.key_pem,
            "ca.crt": pki.server_ca.pem,
        },
        "secret/client-ca": {"ca.crt": client_anchors},
        "configmap/client-ca-bundle": {"ca.crt": client_anchors},
        "secret/identityplus-agent": {"tls.crt": agent.pem, "tls.key": agent.key_pem},
        "secret/sidecar-users": {"alice.crt": alice.pem},
    }


def lay_out_pod(objects: list[Manifest], cluster: dict[str, dict[str, bytes]], root: Path) -> Path:
    """Write each volume the sidecar container mounts under ``root`` as the kubelet would, and
    the configuration with its paths moved under ``root``; return the configuration's path."""
    rendered = {
        f"configmap/{o['metadata']['name']}": o["data"] for o in objects if o["kind"] == "ConfigMap"
    }
    container = sidecar_container(objects)
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            continue
        if "secret" in volume:
            files = cluster[f"secret/{volume['secret']['secretName']}"]
        else:
            source = f"configmap/{volume['configMap']['name']}"
            files = (
                {k: v.encode() for k, v in rendered[source].items()}
                if source in rendered
                else cluster[source]
            )
        source_spec = volume.get("secret") or volume.get("configMap") or {}
        items = {i["key"]: i["path"] for i in source_spec.get("items", [])} or {k: k for k in files}
        for key, path in items.items():
            (target / path).write_bytes(files[key])

    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_path: Path = root / str(env["SIDECAR_CONFIG"]).lstrip("/")
    config = yaml.safe_load(config_path.read_text())

    def reroot(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: reroot(v) for k, v in node.items()}
        if isinstance(node, list):
            return [reroot(v) for v in node]
        if isinstance(node, str) and any(node.startswith(m.rstrip("/") + "/") for m in mounts):
            return str(root / node.lstrip("/"))
        return node

    config_path.write_text(yaml.safe_dump(reroot(config)))
    return config_path


def file_paths(config: dict[str, Any]) -> list[str]:
    """Every file path in a configuration that the chart or the cases set."""
    tls = config["tls"]
    paths = [tls["certificate"], tls["key"], *tls.get("client_ca", [])]
    identityplus = config.get("identity", {}).get("identityplus") or {}
    paths += [identityplus[k] for k in ("certificate", "key") if k in identityplus]
    for user in config.get("identity", {}).get("static", {}).get("users", []):
        paths += [c["file"] for c in user["certificates"] if "file" in c]
    return paths


def test_config_passes_check_config(
    case: tuple[str, Values, list[Manifest]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, objects = case
    config_path = lay_out_pod(objects, fake_cluster(tmp_path), tmp_path / "pod")
    code = sidecar_main(["check-config", str(config_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "configuration OK" in out


def test_secrets_are_mounted_where_the_config_names_them(
    case: tuple[str, Values, list[Manifest]],
) -> None:
    name, values, objects = case
    config = sidecar_config(objects)
    container = sidecar_container(objects)
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    read_only = {m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]}
    for path in file_paths(config):
        folder = path.rpartition("/")[0]
        assert folder in mounts, f"{path} is not in a mounted volume"
        assert read_only[folder] is True
    assert config["tls"]["certificate"] == "/etc/sidecar/tls/tls.crt"
    assert config["tls"]["key"] == "/etc/sidecar/tls/tls.key"
    assert mounts["/etc/sidecar/tls"]["secret"]["secretName"] == "web-tls"
    trust = mounts["/etc/sidecar/trust"]
    if values["clientCA"].get("configMapName"):
        assert trust["configMap"]["name"] == values["clientCA"]["configMapName"]
    else:
        assert trust["secret"]["secretName"] == values["clientCA"]["secretName"]
    assert config["tls"]["client_ca"] == ["/etc/sidecar/trust/ca.crt"]
    if values.get("identityPlus", {}).get("agentSecretName"):
        assert mounts["/etc/sidecar/agent"]["secret"]["secretName"] == "identityplus-agent"
        assert config["identity"]["identityplus"]["certificate"] == "/etc/sidecar/agent/tls.crt"
        assert config["identity"]["identityplus"]["key"] == "/etc/sidecar/agent/tls.key"
    else:
        assert "/etc/sidecar/agent" not in mounts
    # The configuration itself holds no key material.
    text = one(objects, "ConfigMap")["data"]["sidecar.yaml"]
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text, name


def test_probes_ask_the_admin_port(case: tuple[str, Values, list[Manifest]]) -> None:
    _, _, objects = case
    container = sidecar_container(objects)
    config = sidecar_config(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": config["listen"]["port"], "admin": config["admin"]["port"]}
    assert config["admin"]["host"] == "0.0.0.0"  # the kubelet probes the pod's address
    expected = {
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}


def test_security_context(case: tuple[str, Values, list[Manifest]]) -> None:
    _, _, objects = case
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = sidecar_container(objects)["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001  # the image's USER
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    tmp = next(m for m in sidecar_container(objects)["volumeMounts"] if m["mountPath"] == "/tmp")
    assert (
        next(v for v in pod["volumes"] if v["name"] == tmp["name"])["emptyDir"]["medium"]
        == "Memory"
    )
    resources = sidecar_container(objects)["resources"]
    assert set(resources) == {"requests", "limits"}
    for container in pod.get("initContainers", []) + pod["containers"]:
        if container["name"] == "app":
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_graceful_stop_adds_up(case: tuple[str, Values, list[Manifest]]) -> None:
    """The kubelet waits long enough for the preStop sleep, the drain and the grace period."""
    _, _, objects = case
    container = sidecar_container(objects)
    config = sidecar_config(objects)
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"  # in the image
    total = sleep + config["shutdown"]["drain_delay"] + config["shutdown"]["grace_period"]
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > total


def test_shutdown_values_reach_the_config(chart: helm.Chart) -> None:
    values = merged(
        SIDECAR,
        {"shutdown": {"preStopSeconds": 0, "drainDelaySeconds": 10, "gracePeriodSeconds": 60}},
    )
    objects = render(chart, values)
    assert sidecar_config(objects)["shutdown"] == {"drain_delay": 10, "grace_period": 60}
    assert "lifecycle" not in sidecar_container(objects)
    assert pod_spec(objects)["terminationGracePeriodSeconds"] == 75
    values["shutdown"]["terminationGracePeriodSeconds"] = 120
    assert pod_spec(render(chart, values))["terminationGracePeriodSeconds"] == 120


# ---- the two modes --------------------------------------------------------------------------


def test_sidecar_mode_runs_beside_the_application(chart: helm.Chart) -> None:
    objects = render(chart, SIDECAR)
    pod = pod_spec(objects)
    # Kubernetes 1.29+ (helm's default when no cluster is asked): a native sidecar.
    assert [c["name"] for c in pod["initContainers"]] == ["sidecar"]
    assert pod["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert pod["containers"][0]["image"] == "registry.example.com/shop/web:2.4.1"
    assert sidecar_config(objects)["upstream"]["url"] == "http://127.0.0.1:8080"
    # Only the sidecar's port is in the Service.
    service = one(objects, "Service")
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("https", 8443)]
    assert (
        service["spec"]["selector"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_sidecar_mode_without_native_sidecars(chart: helm.Chart) -> None:
    pod = pod_spec(render(chart, merged(SIDECAR, {"nativeSidecar": False})))
    assert "initContainers" not in pod
    assert [c["name"] for c in pod["containers"]] == ["sidecar", "app"]
    assert "restartPolicy" not in pod["containers"][0]


def test_application_init_containers_run_before_the_native_sidecar(chart: helm.Chart) -> None:
    init = [
        {"name": "migrate", "image": "registry.example.com/shop/web:2.4.1", "args": ["migrate"]}
    ]
    pod = pod_spec(render(chart, merged(SIDECAR, {"app": {"initContainers": init}})))
    assert [c["name"] for c in pod["initContainers"]] == ["migrate", "sidecar"]


def test_gateway_mode_is_the_sidecar_alone(chart: helm.Chart) -> None:
    objects = render(chart, GATEWAY)
    pod = pod_spec(objects)
    assert "initContainers" not in pod
    assert [c["name"] for c in pod["containers"]] == ["sidecar"]
    assert sidecar_config(objects)["upstream"]["url"] == "http://web.shop.svc.cluster.local:8080"
    assert one(objects, "Deployment")["spec"]["replicas"] == 1


def test_gateway_autoscaling(chart: helm.Chart) -> None:
    objects = render(chart, merged(GATEWAY, {"autoscaling": {"enabled": True, "minReplicas": 3}}))
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "shop-sidecar",
    }
    assert hpa["spec"]["minReplicas"] == 3
    assert "replicas" not in one(objects, "Deployment")["spec"]  # the HPA owns it


def test_optional_objects(chart: helm.Chart) -> None:
    objects = render(chart, CASES["sidecar-everything"][0])
    policy = one(objects, "NetworkPolicy")["spec"]
    opened = sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"])
    assert opened == [8443, 9090]  # not the application's 8080
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    monitor = one(objects, "ServiceMonitor")
    metrics = one(objects, "Service", "shop-sidecar-metrics")
    assert monitor["spec"]["endpoints"][0]["port"] == metrics["spec"]["ports"][0]["name"]
    assert metrics["spec"]["ports"][0]["targetPort"] == 9090
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    assert (
        not selector.items()
        <= one(objects, "Service", "shop-sidecar")["metadata"]["labels"].items()
    )
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )


# ---- configuration changes and mistakes -----------------------------------------------------


def checksum(objects: list[Manifest]) -> str:
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    value: str = annotations["checksum/config"]
    return value


def test_config_checksum_rolls_the_pods(chart: helm.Chart) -> None:
    before = checksum(render(chart, SIDECAR))
    assert checksum(render(chart, SIDECAR)) == before
    assert (
        checksum(render(chart, merged(SIDECAR, {"config": {"log": {"level": "debug"}}}))) != before
    )
    assert checksum(render(chart, merged(SIDECAR, {"ports": {"https": 9443}}))) != before


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"listen": {"port": 9443}}, "config.listen.port is set by the chart"),
        ({"tls": {"key": "/keys/server.key"}}, "config.tls.key is set by the chart"),
        ({"upstream": {"url": "http://elsewhere:80"}}, "config.upstream.url is set by the chart"),
        ({"shutdown": {"grace_period": "1m"}}, "config.shutdown.grace_period is set by the chart"),
    ],
)
def test_config_cannot_contradict_what_the_chart_wires(
    chart: helm.Chart, config: Values, message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(merged(SIDECAR, {"config": config}))


def test_config_may_repeat_what_the_chart_wires(chart: helm.Chart) -> None:
    objects = render(chart, merged(SIDECAR, {"config": {"listen": {"port": 8443, "workers": 2}}}))
    assert sidecar_config(objects)["listen"] == {"port": 8443, "workers": 2}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (merged(SIDECAR, {"tls": {"secretName": ""}}), "tls.secretName is required"),
        (
            merged(SIDECAR, {"clientCA": {"secretName": ""}}),
            "clientCA.secretName or clientCA.configMapName is required",
        ),
        (merged(SIDECAR, {"clientCA": {"configMapName": "x"}}), "not both"),
        (
            merged(SIDECAR, {"app": {"image": {"repository": ""}}}),
            "app.image.repository is required",
        ),
        (merged(SIDECAR, {"app": {"port": 9090}}), "app.port 9090 is one of the sidecar's ports"),
        (merged(SIDECAR, {"autoscaling": {"enabled": True}}), "autoscaling is for mode gateway"),
        (merged(GATEWAY, {"gateway": {"upstream": ""}}), "gateway.upstream is required"),
        (
            merged(GATEWAY, {"config": {"identity": {"backend": "identityplus"}}}),
            "identityPlus.agentSecretName is required",
        ),
    ],
)
def test_missing_or_contradictory_values_are_explained(
    chart: helm.Chart, values: Values, message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values)


def test_pinned_certificates_need_no_client_ca(chart: helm.Chart) -> None:
    values = merged(
        SIDECAR,
        {
            "clientCA": {"secretName": ""},
            "config": {"tls": {"pinned_certificates": ["/etc/sidecar/pins/a.pem"]}},
        },
    )
    objects = render(chart, values)
    assert "client_ca" not in sidecar_config(objects)["tls"]
    assert "/etc/sidecar/trust" not in [
        m["mountPath"] for m in sidecar_container(objects)["volumeMounts"]
    ]


def test_notes_tell_how_to_check_it(chart: helm.Chart) -> None:
    text = notes(chart, SIDECAR)
    assert "kubectl -n prod rollout status deployment/shop-sidecar" in text
    assert "sidecar check-config /etc/sidecar/config/sidecar.yaml" in text
    assert "curl" in text and "/readyz" in text
    assert "config.identity.static.users is empty" in text  # a hint, since nobody could get in
    assert "listen on 127.0.0.1:8080" in text
    assert "X-Sidecar-Admin" in text  # how to purge


# ---- the network -----------------------------------------------------------------------------


def opened(policy: Manifest) -> dict[int, list[Any] | None]:
    """Port -> who may reach it (None: anyone), from a NetworkPolicy's ingress rules."""
    out: dict[int, list[Any] | None] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] not in out, "a port in two rules"
            out[port["port"]] = rule.get("from")
    return out


@pytest.mark.parametrize("values", [SIDECAR, GATEWAY], ids=["sidecar", "gateway"])
def test_the_network_policy_is_on_by_default(chart: helm.Chart, values: Values) -> None:
    """TLS from anywhere (ingress controllers, other namespaces, load balancers); the admin
    port from the node only (the kubelet's probes; NetworkPolicies always admit the node);
    the application's port, in mode sidecar, from nobody."""
    objects = render(chart, values)
    policy = one(objects, "NetworkPolicy")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress only when asked for
    assert opened(policy) == {8443: None}  # neither 9090 nor the application's 8080


def test_the_network_policy_admits_who_it_is_told(chart: helm.Chart) -> None:
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}]
    ingress = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]
    values = merged(SIDECAR, {"networkPolicy": {"adminFrom": monitoring, "httpsFrom": ingress}})
    policy = one(render(chart, values), "NetworkPolicy")
    assert opened(policy) == {8443: ingress, 9090: monitoring}


def test_a_service_monitor_needs_admin_from(chart: helm.Chart) -> None:
    """Or Prometheus could not scrape: the policy would admit only the node."""
    values = merged(GATEWAY, {"serviceMonitor": {"enabled": True}})
    with pytest.raises(
        helm.HelmRenderError, match=r"serviceMonitor needs networkPolicy\.adminFrom"
    ):
        chart.render(values)
    render(chart, merged(values, {"networkPolicy": {"enabled": False}}))  # your own choice


def test_the_admin_listener_answers_to_the_metrics_service(chart: helm.Chart) -> None:
    """Its Host check (DNS rebinding) knows the -metrics Service's names, and keeps yours."""
    from sidecar.admin import known_names, refusal
    from sidecar.config import AdminConfig

    values = merged(
        CASES["gateway-everything"][0], {"config": {"admin": {"server_names": ["m.internal"]}}}
    )
    objects = render(chart, values)
    service = one(objects, "Service", "shop-sidecar-metrics")["metadata"]["name"]
    names = known_names(AdminConfig(**sidecar_config(objects)["admin"]))
    for host in (
        service,
        f"{service}.prod",
        f"{service}.prod.svc",
        f"{service}.prod.svc.cluster.local",
        "m.internal",
        "10.42.0.7",  # the pod's address: probes and Prometheus' endpoint discovery
    ):
        assert refusal("GET", CIMultiDict(Host=f"{host}:9090"), names) is None, host
    assert refusal("GET", CIMultiDict(Host="evil.example:9090"), names) is not None
    # without the -metrics Service there are no names to add
    assert "server_names" not in sidecar_config(render(chart, GATEWAY))["admin"]


def test_notes_say_who_reaches_what(chart: helm.Chart) -> None:
    text = " ".join(notes(chart, SIDECAR).split())
    assert "must listen on 127.0.0.1:8080 only" in text and "forged identity" in text
    assert "the TLS port 8443 from anyone" in text
    assert "the admin port 9090 from the node (probes) (networkPolicy.adminFrom is empty)" in text
    text = " ".join(notes(chart, merged(SIDECAR, {"networkPolicy": {"enabled": False}})).split())
    assert "must listen on 127.0.0.1:8080 only" in text
    assert "every pod in the cluster can reach the admin port 9090" in text
    assert "and the application's port 8080" in text
    text = " ".join(notes(chart, GATEWAY).split())
    assert "127.0.0.1" not in text.split("Network:")[1] and "forged" not in text


# ---- values.yaml and values.schema.json -----------------------------------------------------

KEY_LINE = re.compile(r"^( *)([A-Za-z][\w.-]*):(.*)$")


def values_keys() -> list[tuple[str, bool]]:
    """Every key path in values.yaml, and whether a comment documents it: on the line above,
    at the end of its line, or above the group of sibling keys it belongs to."""
    out: list[tuple[str, bool]] = []
    stack: list[tuple[int, str]] = []
    previous = ("blank", False, -1)  # kind of the previous line, documented, indent
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        match = KEY_LINE.match(line)
        if not stripped:
            previous = ("blank", False, -1)
        elif stripped.startswith("#"):
            previous = ("comment", True, -1)
        elif match is None:
            previous = ("other", False, -1)
        else:
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            kind, documented, at = previous
            documented = (
                "#" in match.group(3)
                or kind == "comment"
                or (kind == "key" and documented and at == indent)
            )
            out.append((".".join([k for _, k in stack] + [key]), documented))
            stack.append((indent, key))
            previous = ("key", documented, indent)
    return out


def schema_at(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in path:
        if node is None or "properties" not in node:
            return None
        node = node["properties"].get(part)
    return node


def test_every_value_is_documented_and_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    ours = []
    for path, documented in values_keys():
        parts = path.split(".")
        parent = schema_at(schema, parts[:-1])
        if parent is None or parent.get("additionalProperties") is not False:
            continue  # inside config or a Kubernetes object passed through
        assert schema_at(schema, parts) is not None, f"{path} is not in values.schema.json"
        assert documented, f"{path} has no comment in values.yaml"
        ours.append(path)

    def schema_paths(node: dict[str, Any], prefix: str) -> Iterator[str]:
        for key, child in node.get("properties", {}).items():
            yield prefix + key
            if child.get("additionalProperties") is False:
                yield from schema_paths(child, prefix + key + ".")

    missing = set(schema_paths(schema, "")) - set(ours) - {"global"}
    assert not missing, f"in the schema but not in values.yaml: {sorted(missing)}"


def test_defaults_pass_the_schema(chart: helm.Chart) -> None:
    chart.validate_schema(chart.values)
    chart.validate_schema(SIDECAR)
    chart.validate_schema(CASES["gateway-everything"][0])


# ---- trust reports -------------------------------------------------------------------------------

TRUST_REPORTS: Values = merged(
    GATEWAY,
    {
        "identityPlus": {"agentSecretName": "identityplus-agent"},
        "config": {"identity": {"backend": "identityplus"}},
        "trustReports": {
            "enabled": True,
            "settings": {"retries": 5, "backoff": "2s"},
            "headers": {"bind": "X-App-Bind"},
            "from": ["10.42.0.0/16"],
        },
    },
)


def test_trust_reports_are_written_into_the_config(
    chart: helm.Chart, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = render(chart, TRUST_REPORTS)
    config = sidecar_config(objects)
    assert config["identity"]["identityplus"]["reports"] == {
        "enabled": True,
        "retries": 5,
        "backoff": "2s",
    }
    assert config["headers"] == {"reports": {"bind": "X-App-Bind"}}
    assert config["admin"]["reports_from"] == ["10.42.0.0/16"]
    config_path = lay_out_pod(objects, fake_cluster(tmp_path), tmp_path / "pod")
    assert sidecar_main(["check-config", str(config_path)]) == 0, capsys.readouterr().err
    chart.validate_schema(TRUST_REPORTS)


def test_trust_reports_and_the_shared_cache_are_both_written_into_the_config(
    chart: helm.Chart, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # both write under identity (identityplus.reports and cache.shared): neither loses the other
    values = merged(TRUST_REPORTS, {"sharedCache": {"url": "redis://valkey:6379/1"}})
    objects = render(chart, values)
    config = sidecar_config(objects)
    assert config["identity"]["identityplus"]["reports"]["enabled"] is True
    assert config["identity"]["cache"]["shared"] == {"url": "redis://valkey:6379/1"}
    assert config["identity"]["backend"] == "identityplus"
    config_path = lay_out_pod(objects, fake_cluster(tmp_path), tmp_path / "pod")
    assert sidecar_main(["check-config", str(config_path)]) == 0, capsys.readouterr().err
    chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            merged(SIDECAR, {"trustReports": {"enabled": True}}),
            "trustReports.enabled needs config.identity.backend: identityplus",
        ),
        (
            merged(
                TRUST_REPORTS,
                {"config": {"identity": {"identityplus": {"reports": {"enabled": False}}}}},
            ),
            "config.identity.identityplus.reports and trustReports both",
        ),
        (
            merged(TRUST_REPORTS, {"config": {"admin": {"reports_from": []}}}),
            "config.admin.reports_from and trustReports.from both",
        ),
    ],
)
def test_trust_reports_set_twice_or_without_identity_plus_are_explained(
    chart: helm.Chart, values: Values, message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values)


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"enable": True}, "/trustReports"),
        ({"headers": {"bond": "X-B"}}, "'bond'"),
        ({"from": "10.0.0.0/8"}, "/trustReports/from"),
    ],
)
def test_the_schema_refuses_unknown_trust_report_keys(
    chart: helm.Chart, bad: Values, where: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.render(merged(SIDECAR, {"trustReports": bad}))
