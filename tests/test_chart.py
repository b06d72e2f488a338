"""The Helm chart: rendered and linted by the real Helm engine, every object validated against Kubernetes' schemas."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from finetune_operator.cli import build_parser
from finetune_operator.cluster.context import OperatorSettings

from .conftest import REPO
from .helm import CHART, NAMESPACE, allows, one, render_chart
from .test_render import KUBERNETES_VERSION, assert_restricted

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-ha": {"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2},
    "clusterwide-ha-monitored": {
        "replicaCount": 2,
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "trainer": {"image": "registry.example.com/ml/trainer:0.1.0-cu128", "pullPolicy": "Always"},
        "stageResources": {"train": {"cpu": "32", "memory": "400Gi"}},
        "workspace": {"size": "2Ti", "storageClassName": "fast-rwx"},
        "imagePullSecrets": [{"name": "registry"}],
        "tolerations": [{"key": "node-role", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "priorityClassName": "system-cluster-critical",
    },
    "bring-your-own-account-no-metrics": {
        "serviceAccount": {"create": False, "name": "platform-operator"},
        "rbac": {"create": False},
        "metrics": {"enabled": False},
    },
}
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean_and_renders_valid_objects(values):
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.34.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    objects = render_chart(values)
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "finetune-operator"
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert_restricted(pod, api_access=True)
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == (values.get("serviceAccount", {}).get("name") or "fto-finetune-operator")


def test_operator_arguments_and_environment_are_what_the_operator_reads():
    values = VALUE_SETS["clusterwide-ha-monitored"]
    container = one(render_chart(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # the chart only passes options the CLI has
    assert args.peering == "fto-finetune-operator" and args.metrics_port == 8000 and not args.namespace
    environment = {e["name"]: e["value"] for e in container["env"]}
    settings = OperatorSettings.from_env(environment)
    assert settings.trainer_image == values["trainer"]["image"] and settings.image_pull_policy == "Always"
    assert settings.stage_resources["train"] == {"cpu": "32", "memory": "400Gi"}
    assert settings.stage_resources["prepare"] == {"cpu": "4", "memory": "16Gi"}  # the other defaults stay
    assert settings.workspace_size == "2Ti" and settings.workspace_storage_class == "fast-rwx"
    assert settings.poll_seconds == float(environment["FINETUNE_POLL_SECONDS"]) == 5
    probes = {container[p]["httpGet"]["port"] for p in ("livenessProbe", "startupProbe")}
    assert probes == {"health"} and args.liveness == "http://0.0.0.0:8080/healthz"


def test_one_replica_is_standalone_and_never_overlaps():
    deployment = one(render_chart(), "Deployment")
    args = build_parser().parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.peering is None and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [o for o in render_chart() if "Peering" in o["kind"]]


def test_two_replicas_elect_one_through_peering():
    objects = render_chart(VALUE_SETS["clusterwide-ha-monitored"])
    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "fto-finetune-operator"
    rules = one(objects, "ClusterRole")["rules"]
    assert allows(rules, "patch", "kopf.dev", "clusterkopfpeerings")
    assert "strategy" not in one(objects, "Deployment")["spec"]  # rolling updates are safe with peering


def test_namespaced_mode_grants_workload_rights_only_in_watched_namespaces():
    objects = render_chart(VALUE_SETS["namespaced-ha"])
    cluster_rules = one(objects, "ClusterRole")["rules"]
    assert not allows(cluster_rules, "create", "batch", "jobs")  # nothing cluster-wide beyond discovery
    assert allows(cluster_rules, "watch", "apiextensions.k8s.io", "customresourcedefinitions")
    roles = {o["metadata"]["namespace"]: o["rules"] for o in objects if o["kind"] == "Role"}
    assert sorted(roles) == ["team-a", "team-b"]
    assert all(allows(r, "create", "batch", "jobs") and allows(r, "patch", "kopf.dev", "kopfpeerings")
               for r in roles.values())  # fmt: skip
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {NAMESPACE}
    assert sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == "KopfPeering") == ["team-a", "team-b"]
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser().parse_args(args).namespace == ["team-a", "team-b"]


def test_least_privilege_no_wildcards_no_secrets_no_escalation():
    for values in VALUE_SETS.values():
        for obj in render_chart(values):
            for rule in obj.get("rules", []):
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
                assert not {"secrets", "roles", "rolebindings", "clusterroles"} & set(rule["resources"]), rule
                assert not {"escalate", "bind", "impersonate", "update"} & set(rule["verbs"]), rule


def test_service_monitor_scrapes_the_metrics_port():
    objects = render_chart(VALUE_SETS["clusterwide-ha-monitored"])
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    ports = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": 8000, "protocol": "TCP"} in ports


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"trainer": {"imag": "x"}}, "imag"),
        ({"stageResources": {"train": {"cpu": "lots"}}}, "cpu"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"metrics": {"port": 70000}}, "port"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_key(values, named):
    with pytest.raises(helm_python.HelmError) as caught:
        render_chart(values)
    assert named in str(caught.value)


def test_same_port_for_metrics_and_health_is_refused():
    with pytest.raises(helm_python.HelmError, match=r"metrics\.port and health\.port must differ"):
        render_chart({"metrics": {"port": 8080}})


def test_chart_crds_are_the_generated_ones():
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (REPO / "crds").iterdir())
    for name in chart_crds:
        assert (CHART / "crds" / name).read_text() == (REPO / "crds" / name).read_text(), name
    # test_api_server.py applies them to the real API server.


def test_chart_defaults_match_the_operator_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults = OperatorSettings()
    assert values["trainer"]["image"] == defaults.trainer_image
    assert values["stageResources"] == defaults.stage_resources
    assert values["workspace"]["size"] == defaults.workspace_size
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject
    json.loads((CHART / "values.schema.json").read_text())


def test_the_kubectl_install_manifest_is_the_rendered_chart_and_valid():
    result = subprocess.run(
        [sys.executable, "scripts/render_install_manifest.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all((REPO / "deploy" / "finetune-operator.yaml").read_text()))
    kinds = [o["kind"] for o in objects]
    assert kinds.index("Namespace") < kinds.index("Deployment") and kinds.count("CustomResourceDefinition") == 3
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
