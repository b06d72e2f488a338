"""The operator's API client (cluster/kube.py): where its configuration comes from, how it retries, what it does
on a 409 and how it writes status. The children and status tests run on the real API server (tests/apiserver.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_operator.api.job import FineTuneJob
from finetune_operator.cluster.build import build_stage
from finetune_operator.cluster.context import OperatorSettings
from finetune_operator.cluster.kube import (
    REQUEST_TIMEOUT,
    SPEC_HASH,
    ApiCallError,
    KubeApi,
    KubeConfigError,
    RetryPolicy,
    check_reachable,
    collection,
    load_configuration,
)
from finetune_operator.controller import connection_info

from .apiserver import ApiServer
from .conftest import MINIMAL_JOB

REPO = Path(__file__).resolve().parents[1]
NO_POD: dict[str, str] = {}


# --------------------------------------------------------------------------------------------- configuration


def service_account(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return str(tmp_path / "token"), str(tmp_path / "ca.crt")


IN_A_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_a_pod_the_service_account_is_used_and_kopf_logs_in_with_it(tmp_path):
    configuration, source = load_configuration(environ=IN_A_POD, service_account=service_account(tmp_path))
    assert configuration.host == "https://10.96.0.1:443" and source == "in-cluster service account"
    info = connection_info(configuration)
    assert (info.server, info.scheme, info.token) == ("https://10.96.0.1:443", "bearer", "sa-token")
    assert info.ca_path == str(tmp_path / "ca.crt") and not info.insecure


def test_the_kubeconfig_flag_then_KUBECONFIG_win_over_the_service_account(apiserver: ApiServer, tmp_path):
    account = service_account(tmp_path)
    flag, _ = load_configuration(
        str(apiserver.kubeconfig), environ={**IN_A_POD, "KUBECONFIG": "/nowhere"}, service_account=account
    )
    env, source = load_configuration(
        environ={**IN_A_POD, "KUBECONFIG": str(apiserver.kubeconfig)}, service_account=account
    )
    assert flag.host == env.host == apiserver.url and source == f"kubeconfig {apiserver.kubeconfig}"
    assert check_reachable(env)  # the admin's client certificate works against the real server
    info = connection_info(env)  # what kopf's watches use: the same server and client certificate
    assert info.server == apiserver.url and info.certificate_path and info.private_key_path and info.ca_path


def test_context_picks_the_kubeconfig_context(apiserver: ApiServer, tmp_path):
    config = yaml.safe_load(apiserver.kubeconfig.read_text())
    real = config["contexts"][0]["name"]
    config["clusters"].append({"name": "elsewhere", "cluster": {"server": "https://127.0.0.1:9"}})
    config["contexts"].append({"name": "elsewhere", "context": {"cluster": "elsewhere", "user": "nobody"}})
    config["users"].append({"name": "nobody", "user": {"token": "x"}})
    config["current-context"] = "elsewhere"
    path = tmp_path / "two-contexts"
    path.write_text(yaml.safe_dump(config))
    assert load_configuration(str(path), environ=NO_POD)[0].host == "https://127.0.0.1:9"
    configuration, source = load_configuration(str(path), context=real, environ=NO_POD)
    assert configuration.host == apiserver.url and source.endswith(f"(context {real})")
    with pytest.raises(KubeConfigError, match=r"cannot be reached: .*Connection refused"):
        check_reachable(load_configuration(str(path), environ=NO_POD)[0], timeout=3)


def test_no_configuration_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeConfigError, match=r"not in a pod and no kubeconfig at ~/.kube/config; pass --kubeconfig"):
        load_configuration(environ=NO_POD)
    with pytest.raises(KubeConfigError, match="KUBECONFIG names no readable file: /nowhere"):
        load_configuration(environ={"KUBECONFIG": "/nowhere"})
    with pytest.raises(KubeConfigError, match="service account cannot be used: Service token file does not exist"):
        load_configuration(environ=IN_A_POD, service_account=(str(tmp_path / "no-token"), str(tmp_path / "ca")))


def run_operator_command(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO / "operator"))
    argv = [sys.executable, "-m", "finetune_operator", "operator", "--metrics-port", "0", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "error: no Kubernetes API configuration: not in a pod and no kubeconfig at ~/.kube/config"),
        (("--kubeconfig", "DEAD"), "error: the API server at https://127.0.0.1:9 cannot be reached: "),
        (("--kubeconfig", "DEAD", "--context", "nope"), "error: kubeconfig DEAD cannot be used: "),
    ],
)
def test_the_operator_without_a_cluster_stops_at_once_with_one_line(tmp_path, args, says):
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "x",
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
        })
    )  # fmt: skip
    done = run_operator_command(*(str(dead) if a == "DEAD" else a for a in args), home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(says.replace("DEAD", str(dead))), done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["FINETUNE_POLL_SECONDS", "FINETUNE_RETRY_SECONDS"])
def test_a_bad_interval_in_the_environment_stops_the_operator_with_one_line_naming_it(tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "soon")
    done = run_operator_command(home=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {name} must be a number of seconds above 0"), done.stderr


# --------------------------------------------------------------------------------------------------- retries


class Flaky:
    """Fails with `status` `times` times, then answers; records what it was called with."""

    def __init__(self, status: int, times: int, message: str = "", headers: dict[str, str] | None = None):
        self.status, self.times, self.message, self.headers = status, times, message, headers
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        if len(self.calls) <= self.times:
            reasons = {422: "Unprocessable Entity", 500: "Internal Server Error", 503: "Service Unavailable"}
            exc = ApiException(status=self.status, reason=reasons[self.status], body=json.dumps(
                {"kind": "Status", "message": self.message}))  # fmt: skip
            exc.headers = self.headers
            raise exc
        return "answered"


def offline_api(sleeps: list[float]) -> KubeApi:
    return KubeApi(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")), RetryPolicy(sleep=sleeps.append))


def test_a_transient_failure_is_retried_with_jittered_backoff_and_every_call_has_a_timeout():
    sleeps: list[float] = []
    flaky = Flaky(500, 2, "etcdserver: request timed out")
    assert offline_api(sleeps).call("create Job ml/demo-train", flaky) == "answered"
    assert len(flaky.calls) == 3 and all(c["_request_timeout"] == REQUEST_TIMEOUT for c in flaky.calls)
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.2 and 0 <= sleeps[1] <= 0.4


def test_retries_are_bounded_and_honour_retry_after_then_name_the_call_and_the_answer():
    sleeps: list[float] = []
    flaky = Flaky(503, 100, "the server is shutting down", headers={"Retry-After": "2"})
    with pytest.raises(ApiCallError) as raised:
        offline_api(sleeps).call("create Job ml/demo-train", flaky)
    assert len(flaky.calls) == 4 and sleeps == [2.0, 2.0, 2.0]
    assert str(raised.value) == "create Job ml/demo-train: 503 Service Unavailable: the server is shutting down"
    assert raised.value.retryable


def test_a_refusal_is_not_retried():
    sleeps: list[float] = []
    flaky = Flaky(422, 100, 'Job.batch "demo-train" is invalid: spec.template: Required value')
    with pytest.raises(ApiCallError, match=r"^create Job ml/demo-train: 422 Unprocessable Entity: Job.batch"):
        offline_api(sleeps).call("create Job ml/demo-train", flaky)
    assert len(flaky.calls) == 1 and sleeps == []


# ------------------------------------------------------------------------------- children, on the real server


@pytest.fixture
def api(apiserver: ApiServer) -> Any:
    kube = KubeApi(apiserver.api_client())
    yield kube
    kube.api_client.close()


def a_job(namespace: str, uid: str = "0b7f3a2e-0000-4000-8000-000000000001", run: int = 1) -> FineTuneJob:
    raw = json.loads(json.dumps(MINIMAL_JOB))
    raw["metadata"].update(namespace=namespace, uid=uid, generation=1)
    raw["status"] = {"run": run}
    return FineTuneJob.model_validate(raw)


def stage_objects(job: FineTuneJob, stage: str = "prepare") -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in build_stage(job, stage, OperatorSettings()).all()}


def read(api: KubeApi, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return api.request(f"read {kind}", "GET", f"{collection(kind, namespace)}/{name}")


def test_the_real_stage_objects_are_created_once_a_409_for_the_same_run_is_ours(api: KubeApi, namespace: str):
    job = a_job(namespace)
    objects = stage_objects(job)
    assert {kind: api.create(obj) for kind, obj in objects.items()} == {
        "Job": "created", "ConfigMap": "created", "PersistentVolumeClaim": "created"}  # fmt: skip
    again = stage_objects(job)  # built anew, as after an operator restart: the same spec hash
    assert {kind: api.create(obj) for kind, obj in again.items()} == {
        "Job": "exists", "ConfigMap": "exists", "PersistentVolumeClaim": "exists"}  # fmt: skip
    stored = read(api, "ConfigMap", namespace, "demo-prepare-config")
    assert len(stored["metadata"]["annotations"][SPEC_HASH]) == 64
    owner = read(api, "Job", namespace, "demo-prepare")["metadata"]["ownerReferences"][0]
    assert owner["uid"] == job.uid and owner["controller"] and not owner.get("blockOwnerDeletion")


def test_an_earlier_runs_child_is_replaced_not_reused(api: KubeApi, namespace: str):
    run1 = stage_objects(a_job(namespace, run=1))["ConfigMap"]
    assert api.create(run1) == "created"
    job = a_job(namespace, run=2)
    job.spec.training.epochs = 2
    run2 = stage_objects(job)["ConfigMap"]
    assert api.create(run2) == "replaced"
    stored = read(api, "ConfigMap", namespace, "demo-prepare-config")
    assert stored["metadata"]["labels"]["finetune.dev/run"] == "2"
    assert json.loads(stored["data"]["config.json"])["spec"]["training"]["epochs"] == 2


def test_a_child_left_by_an_earlier_job_of_the_same_name_is_replaced(api: KubeApi, namespace: str):
    assert api.create(stage_objects(a_job(namespace, uid="0b7f3a2e-0000-4000-8000-00000000000a"))["Job"]) == "created"
    assert api.create(stage_objects(a_job(namespace))["Job"]) == "replaced"
    stored = read(api, "Job", namespace, "demo-prepare")
    assert stored["metadata"]["ownerReferences"][0]["uid"] == "0b7f3a2e-0000-4000-8000-000000000001"


def test_an_object_the_operator_did_not_make_is_refused_and_left_alone(api: KubeApi, namespace: str):
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-prepare-config"},
              "data": {"config.json": "{}"}}  # fmt: skip
    api.request("create theirs", "POST", collection("ConfigMap", namespace), body=theirs)
    with pytest.raises(ApiCallError, match=r"ConfigMap .*/demo-prepare-config: an object of that name exists that"):
        api.create(stage_objects(a_job(namespace))["ConfigMap"])
    assert read(api, "ConfigMap", namespace, "demo-prepare-config")["data"] == {"config.json": "{}"}


def test_the_workspace_of_a_job_is_never_replaced_its_data_outlives_runs(api: KubeApi, namespace: str):
    assert api.create(stage_objects(a_job(namespace, run=1))["PersistentVolumeClaim"]) == "created"
    bigger = build_stage(a_job(namespace, run=2), "prepare", OperatorSettings(workspace_size="5Gi")).all()
    assert api.create(next(o for o in bigger if o["kind"] == "PersistentVolumeClaim")) == "exists"
    stored = read(api, "PersistentVolumeClaim", namespace, "demo-workspace")
    assert stored["spec"]["resources"]["requests"]["storage"] == "100Gi"


# ---------------------------------------------------------------------------------- status, on the real server

WIDGETS = ("test.finetune.dev", "v1", "widgets")


@pytest.fixture(scope="module")
def widget_crd(apiserver: ApiServer) -> tuple[str, str, str]:
    """A custom resource with a status subresource: how the server treats a status write does not depend on the
    FineTuneJob schema (the real CRD and the operator are tested together in test_cluster_e2e)."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.finetune.dev"},
        "spec": {"group": "test.finetune.dev", "scope": "Namespaced",
                 "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                   "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                   "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]},
    }  # fmt: skip
    apiserver.kubectl("apply", "-f", "-", input=json.dumps(crd))
    apiserver.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.test.finetune.dev")
    return WIDGETS


def test_a_status_write_removes_what_the_new_status_leaves_out(api: KubeApi, namespace: str, widget_crd):
    group, version, plural = widget_crd
    widgets = client.CustomObjectsApi(api.api_client)
    body = {"apiVersion": f"{group}/{version}", "kind": "Widget", "metadata": {"name": "demo"}, "spec": {}}
    widgets.create_namespaced_custom_object(group, version, namespace, plural, body)
    run1 = {"run": 1, "phase": "Succeeded", "metrics": {"tuned": {"exactMatch": 0.9}}, "completionTime": "t1",
            "stages": {"prepare": {"state": "Succeeded"}, "export": {"state": "Succeeded"}}}  # fmt: skip
    run2 = {"run": 2, "phase": "Training", "stages": {"prepare": {"state": "Succeeded"}},
            "runs": [{"run": 1, "phase": "Succeeded"}]}  # fmt: skip
    assert api.write_status(namespace, "demo", run1, resource=widget_crd)
    assert api.write_status(namespace, "demo", run2, resource=widget_crd)
    stored = widgets.get_namespaced_custom_object(group, version, namespace, plural, "demo")
    assert stored["status"] == run2  # run 1's metrics, completionTime and export stage are gone
    managers = {m["manager"] for m in stored["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert managers == {"finetune-operator"}
    # Why not a merge patch: it keeps what it does not mention.
    widgets.patch_namespaced_custom_object_status(group, version, namespace, plural, "demo", {"status": run1})
    widgets.patch_namespaced_custom_object_status(group, version, namespace, plural, "demo", {"status": run2})
    merged = widgets.get_namespaced_custom_object(group, version, namespace, plural, "demo")["status"]
    assert merged["metrics"] == run1["metrics"]
    assert not api.write_status(namespace, "gone", run2, resource=widget_crd)  # a deleted job: no error, no retry


def test_an_event_is_posted_about_the_object_from_any_thread(api: KubeApi, namespace: str):
    """Events go through the operator's client, not kopf.event (which works only inside a kopf handler)."""
    created = api.request("create", "POST", collection("ConfigMap", namespace), body={"metadata": {"name": "about"}})
    uid = created["metadata"]["uid"]
    about = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "about", "namespace": namespace, "uid": uid}}
    api.post_event(about, "Warning", "ApiError", "create Job ml/demo-train: 500 Internal Server Error")
    query = {"fieldSelector": f"involvedObject.uid={uid}"}
    [event] = api.request("list", "GET", collection("Event", namespace), query=query)["items"]
    assert (event["type"], event["reason"], event["source"]["component"]) == (
        "Warning",
        "ApiError",
        "finetune-operator",
    )
    assert event["message"] == "create Job ml/demo-train: 500 Internal Server Error" and event["lastTimestamp"]
