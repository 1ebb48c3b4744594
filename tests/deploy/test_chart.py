"""The Helm chart (deploy/helm/roombus): lint, render, and validate against Kubernetes' schemas.

Helm and kubeconform are built with Go by scripts/services/install (pinned in
scripts/services/versions). kubeconform reads its schemas from a local directory (the
kubernetes-validate wheel's copy for K8S_VERSION, also fetched by install): by default it would
download them at run time. `-strict` refuses unknown fields, and a kind without a schema is an
error, except the ServiceMonitor, whose CRD schema is not in that set (it is checked by hand).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import bridge
from tests.deploy.tools import ROOT, pinned, run, tool

CHART = ROOT / "deploy" / "helm" / "roombus"


@pytest.fixture(scope="module")
def helm() -> str:
    return tool(pinned("HELM_BIN"), f"helm {pinned('HELM_VERSION')}")


@pytest.fixture(scope="module")
def kubeconform() -> list[str]:
    binary = tool(pinned("KUBECONFORM_BIN"), f"kubeconform {pinned('KUBECONFORM_VERSION')}")
    schemas = Path(pinned("K8S_SCHEMAS"))
    version = pinned("K8S_VERSION")
    if not (schemas / f"v{version}-local-strict").is_dir():
        pytest.fail(f"no Kubernetes {version} schemas in {schemas}: run scripts/services/install")
    location = str(schemas) + "/{{.NormalizedKubernetesVersion}}-local{{.StrictSuffix}}"
    location += "/{{.ResourceKind}}{{.KindSuffix}}.json"
    return [binary, "-strict", "-summary", "-output", "json", "-kubernetes-version", version,
            "-schema-location", location]  # fmt: skip


REPLICAS_VALUES = ROOT / "deploy" / "helm" / "replicas-values.yaml"


def render(helm: str, *settings: str, values: Path | None = None) -> list[dict[str, Any]]:
    args = [helm, "template", "rb", str(CHART)]
    if values is not None:
        args += ["-f", str(values)]
    for setting in settings:
        args += ["--set", setting]
    out = run(args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate(kubeconform: list[str], docs: list[dict[str, Any]], *skip: str) -> dict[str, Any]:
    args = list(kubeconform)
    if skip:
        args += ["-skip", ",".join(skip)]
    done = run(args, input_text=yaml.safe_dump_all(docs), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_chart_version_follows_the_package(helm: str) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == bridge.__version__


def test_helm_lint(helm: str) -> None:
    done = run([helm, "lint", "--strict", str(CHART)])
    assert "0 chart(s) failed" in done.stdout, done.stdout


def test_rendered_manifests_are_valid_kubernetes(helm: str, kubeconform: list[str]) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Secret", "Service"], kinds
    summary = validate(kubeconform, docs)["summary"]
    # Really validated, each against its schema: nothing skipped, nothing without a schema.
    assert summary == {"valid": 4, "invalid": 0, "errors": 0, "skipped": 0}, summary


def test_deployment_probes_port_security_and_resources(helm: str) -> None:
    docs = {d["kind"]: d for d in render(helm, "resources.limits.cpu=1")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8081, "protocol": "TCP"}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"] == {"cpu": 1, "memory": "512Mi"}
    assert docs["Deployment"]["spec"]["replicas"] == 1


def test_config_map_is_a_valid_config_with_the_probe_port_and_file_secrets(
    helm: str, tmp_path: Path
) -> None:
    docs = {d["kind"]: d for d in render(helm, "config.bridge.http_port=9999")}
    text = docs["ConfigMap"]["data"]["config.yaml"]
    config = yaml.safe_load(text)
    # The probes' port wins over the given one; it listens beyond the pod's loopback.
    assert config["bridge"]["http_port"] == 8081
    assert config["bridge"]["http_host"] == "0.0.0.0"
    # The secret is a file of the chart's Secret, mounted where the config reads it.
    assert config["livekit"]["api_secret"] == "${file:/etc/roombus/secrets/livekit-api-secret}"
    secret = docs["Secret"]["stringData"]["livekit-api-secret"]
    mounts = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "secrets", "mountPath": "/etc/roombus/secrets", "readOnly": True} in mounts
    # `roombus check` accepts the rendered file (with the secret file where the pod has it).
    (tmp_path / "livekit-api-secret").write_text(secret)
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("/etc/roombus/secrets", str(tmp_path)))
    run([str(Path(sys.executable).parent / "roombus"), "check", str(path)])


def test_existing_secret_replaces_the_charts_own(helm: str, kubeconform: list[str]) -> None:
    docs = render(helm, "secrets.existingSecret=mine")
    assert "Secret" not in {d["kind"] for d in docs}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "secrets", "secret": {"secretName": "mine"}} in volumes
    assert validate(kubeconform, docs)["summary"]["valid"] == 3


def test_service_monitor_option(helm: str, kubeconform: list[str]) -> None:
    docs = render(helm, "serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    service = next(d for d in docs if d["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    # The core kinds are validated; the CRD's kind is skipped (no schema here), and counted.
    summary = validate(kubeconform, docs, "ServiceMonitor")["summary"]
    assert summary == {"valid": 4, "invalid": 0, "errors": 0, "skipped": 1}, summary


def test_replicas_values_render_bridge_replicas(
    helm: str, kubeconform: list[str], tmp_path: Path
) -> None:
    """deploy/helm/replicas-values.yaml: N replicas as a StatefulSet, with a PDB."""
    docs = render(helm, values=REPLICAS_VALUES)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap", "PodDisruptionBudget", "Secret", "Service", "Service", "StatefulSet"
    ], kinds  # fmt: skip
    summary = validate(kubeconform, docs)["summary"]
    assert summary == {"valid": 6, "invalid": 0, "errors": 0, "skipped": 0}, summary
    by_kind = {d["kind"]: d for d in docs}
    text = by_kind["ConfigMap"]["data"]["config.yaml"]
    config = yaml.safe_load(text)
    assert config["bridge"]["replicas"] == {
        "kafka": "main",
        "partitions": 12,
        "session_timeout": 10,
        "heartbeat_interval": 3,
        "replica_id": "${POD_NAME}",
        "handover_timeout": 10,
    }
    assert config["bridge"]["http_port"] == 8081
    workload = by_kind["StatefulSet"]
    assert workload["spec"]["replicas"] == 3
    assert workload["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    # replica_id ${POD_NAME}: the pod's own (stable) name, from the downward API.
    assert {
        "name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}
    } in container["env"]  # fmt: skip
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services[workload["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    pdb = by_kind["PodDisruptionBudget"]
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": workload["spec"]["selector"]["matchLabels"]},
    }
    # `roombus check` accepts the rendered file, with POD_NAME as the pod would have it.
    secret = by_kind["Secret"]["stringData"]["livekit-api-secret"]
    (tmp_path / "livekit-api-secret").write_text(secret)
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("/etc/roombus/secrets", str(tmp_path)))
    env = dict(os.environ, POD_NAME="rb-roombus-0")
    run([str(Path(sys.executable).parent / "roombus"), "check", str(path)], env=env)


def test_replicas_as_a_deployment_roll_one_pod_at_a_time(helm: str, kubeconform: list[str]) -> None:
    docs = render(helm, "workload=Deployment", "podDisruptionBudget.minAvailable=2",
                  values=REPLICAS_VALUES)  # fmt: skip
    by_kind = {d["kind"]: d for d in docs}
    assert "StatefulSet" not in by_kind
    assert len([d for d in docs if d["kind"] == "Service"]) == 1  # no headless one
    spec = by_kind["Deployment"]["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}
    }  # fmt: skip
    assert by_kind["PodDisruptionBudget"]["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in by_kind["PodDisruptionBudget"]["spec"]
    config = yaml.safe_load(by_kind["ConfigMap"]["data"]["config.yaml"])
    assert config["bridge"]["replicas"]["replica_id"] == "${POD_NAME}"
    summary = validate(kubeconform, docs)["summary"]
    assert summary == {"valid": 5, "invalid": 0, "errors": 0, "skipped": 0}, summary


def test_single_replica_default_has_no_replicas_section(helm: str) -> None:
    docs = {d["kind"]: d for d in render(helm)}
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert "replicas" not in config["bridge"]
    assert docs["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    env = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env] == ["ROOMBUS_HTTP_PORT"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["replicaCount=2"], "replicaCount > 1 needs replicas.enabled=true"),
        (["replicas.enabled=true"], "replicas.kafka: name the cluster"),
        (["replicas.enabled=true", "replicas.kafka=nope"], '"nope" is not a cluster'),
        (["workload=DaemonSet"], "workload must be Deployment or StatefulSet"),
    ],
)
def test_chart_refuses_replicas_without_sharding(
    helm: str, settings: list[str], message: str
) -> None:
    args = [helm, "template", "rb", str(CHART)]
    for setting in settings:
        args += ["--set", setting]
    done = run(args, check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
