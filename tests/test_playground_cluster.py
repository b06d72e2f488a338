"""spec.playground on a cluster: the rendered Deployment/Service/ConfigMap, the planner's create/delete
decisions and the status URL, and the objects on the real API server."""

from __future__ import annotations

import datetime as dt
import uuid

import kubernetes_validate
import pytest
import yaml

from finetune_operator.api.job import FineTuneJob
from finetune_operator.cli import build_parser, main
from finetune_operator.cluster.build import render
from finetune_operator.cluster.observe import observe
from finetune_operator.cluster.plugins.playground import PORT, build_playground
from finetune_operator.planner import config_hash

from .conftest import MINIMAL_JOB
from .test_planner import T0, done, make_job, step
from .test_render import KUBERNETES_VERSION, assert_restricted, job_from

PLAYGROUND = {"enabled": True}


def exported(job: FineTuneJob, now: dt.datetime = T0):
    """Walk the job through its four stages; returns the plan of the pass that saw export succeed."""
    seen: dict = {}
    result = step(job, now=now)
    for stage in ("prepare", "train", "evaluate", "export"):
        seen[stage] = done(stage)
        result = step(job, dict(seen), now=now)
    assert job.status.phase == "Succeeded"
    return result, seen


def objects_of(job: FineTuneJob) -> dict[str, dict]:
    return {o["kind"]: o for o in build_playground(job)}


def test_rendered_playground_is_valid_restricted_and_wired():
    job = job_from(MINIMAL_JOB, playground=PLAYGROUND)
    job.status.run = 3
    objects = objects_of(job)
    assert sorted(objects) == ["ConfigMap", "Deployment", "Service"]
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"  # removed with the job
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/finetune-operator/trainer:0.1.0"  # the stages' image
    assert "nvidia.com/gpu" not in container["resources"]["requests"]  # no GPU unless asked
    # The command is the CLI's, on this run's workdir, with the ConfigMap's config and status.
    args = build_parser().parse_args(container["command"][1:])
    assert (args.target, args.host, args.port) == ("/workspace/run-3", "0.0.0.0", PORT)
    config_map = objects["ConfigMap"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/workspace", "/etc/finetune", "/tmp"}
    assert yaml.safe_load(config_map["data"]["status.yaml"])["run"] == 3
    assert '"job": "demo"' in config_map["data"]["config.json"]
    # The Service reaches the pod: selector within the pod labels, named port to the container port.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"] == "http"
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert labels["finetune.dev/stage"] == "playground" and labels["finetune.dev/run"] == "3"


def test_playground_gpu_and_resources_only_when_asked():
    job = job_from(MINIMAL_JOB, playground={"enabled": True, "resources": {"gpus": 1, "memory": "24Gi"}},
                   resources={"gpuResourceName": "amd.com/gpu"})  # fmt: skip
    container = objects_of(job)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["amd.com/gpu"] == container["resources"]["limits"]["amd.com/gpu"] == "1"
    assert container["resources"]["limits"]["memory"] == "24Gi"


def test_render_cli_includes_the_playground_only_when_enabled(tmp_path, capsys):
    raw = {**MINIMAL_JOB, "spec": {**MINIMAL_JOB["spec"], "playground": PLAYGROUND}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    assert main(["render", str(tmp_path / "job.yaml")]) == 0
    kinds = [(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(capsys.readouterr().out)]
    assert ("Deployment", "demo-playground") in kinds and ("Service", "demo-playground") in kinds
    assert not any(k == "Deployment" for k, _ in [(o["kind"], 0) for o in render(job_from(MINIMAL_JOB))])


def test_planner_creates_the_playground_after_export_and_reports_its_url():
    job = make_job(playground=PLAYGROUND)
    result, seen = exported(job)
    assert result.playground == "create"
    play = result.status.playground
    assert play.state == "Starting" and play.run == 1 and play.name == "demo-playground"
    assert play.url == f"http://demo-playground.ml.svc:{PORT}"
    assert play.port_forward == f"kubectl port-forward -n ml svc/demo-playground {PORT}:{PORT}"
    assert "PlaygroundStarted" in [e.reason for e in result.events]
    again = step(job, dict(seen), now=T0 + dt.timedelta(seconds=5))
    assert again.playground is None and again.status.playground.state == "Starting"  # never created twice
    ready = step(job, dict(seen), now=T0 + dt.timedelta(seconds=9), playground_ready=True)
    assert ready.playground is None and ready.status.playground.state == "Ready"


def test_no_playground_unless_enabled_and_exported():
    job = make_job()
    result, _ = exported(job)
    assert result.playground is None and result.status.playground is None
    failing = make_job(playground=PLAYGROUND)
    step(failing)
    result = step(failing, {"prepare": _failed()})
    assert result.status.phase == "Failed" and result.playground is None and result.status.playground is None


def _failed():
    from finetune_operator.planner import ObservedStage

    return ObservedStage(exists=True, failed=True, attempts=3, message="BackoffLimitExceeded: boom",
                         completion_time="2026-11-26T12:01:00Z")  # fmt: skip


def test_playground_goes_after_its_ttl():
    job = make_job(playground={"enabled": True, "ttlSecondsAfterFinished": 600})
    result, seen = exported(job)
    assert result.playground == "create" and result.status.playground.expires_at == "2026-11-26T12:10:00Z"
    assert result.requeue_after == 600
    later = step(job, dict(seen), now=T0 + dt.timedelta(seconds=601), playground_ready=True)
    assert later.playground == "delete" and later.status.playground.state == "Expired"
    assert later.status.playground.url is None and "PlaygroundRemoved" in [e.reason for e in later.events]
    assert step(job, dict(seen), now=T0 + dt.timedelta(seconds=700)).playground is None  # deleted once


def test_playground_goes_with_the_job_ttl_and_with_a_new_run():
    job = make_job(playground=PLAYGROUND, runPolicy={"ttlSecondsAfterFinished": 60})
    _, seen = exported(job)
    cleanup = step(job, dict(seen), now=T0 + dt.timedelta(seconds=61))
    assert cleanup.cleanup and cleanup.playground == "delete" and cleanup.status.playground.state == "Removed"

    job = make_job(playground=PLAYGROUND)
    _, seen = exported(job)
    job.spec.training.epochs = 2  # a spec change after completion (a new metadata.generation): run 2
    job.metadata["generation"] = job.generation + 1
    rerun = step(job, dict(seen), now=T0 + dt.timedelta(seconds=30))
    assert rerun.status.run == 2 and rerun.playground == "delete"


def test_turning_the_playground_on_does_not_start_a_new_run():
    job = make_job()
    _, seen = exported(job)
    before = config_hash(job.spec)
    job.spec = make_job(playground=PLAYGROUND).spec
    assert config_hash(job.spec) == before
    result = step(job, dict(seen), now=T0 + dt.timedelta(seconds=30))
    assert result.status.run == 1 and result.playground == "create"


def test_observe_reads_playground_readiness_from_its_pods():
    pod = {"metadata": {"labels": {"finetune.dev/stage": "playground", "finetune.dev/run": "2"}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
    assert observe(2, [], [pod]).playground_ready
    assert not observe(3, [], [pod]).playground_ready  # another run's pod
    pod["status"]["conditions"][0]["status"] = "False"
    assert not observe(2, [], [pod]).playground_ready


def test_the_operator_creates_and_removes_the_playground_on_the_real_api_server(apiserver, namespace):
    """What the operator does after export, against the API server of ../shared/apiserver: the controller's apply()
    of the planner's decisions. That server serves core and batch kinds but no apps/v1, so the ConfigMap and the
    Service are created for real and the Deployment, posted last, is refused there with a 404 (a real cluster takes
    it; its manifest is checked against the schema above); the TTL's removal then deletes what exists."""
    from finetune_operator.cluster.context import OperatorSettings
    from finetune_operator.cluster.kube import ApiCallError, KubeApi, collection
    from finetune_operator.controller import apply

    api = KubeApi(apiserver.api_client())
    job = make_job(playground={"enabled": True, "ttlSecondsAfterFinished": 600})
    job.metadata.update(namespace=namespace, uid=str(uuid.uuid4()))
    result, seen = exported(job)
    assert result.playground == "create"
    with pytest.raises(ApiCallError) as refused:
        apply(api, job, result, OperatorSettings())
    assert refused.value.status == 404 and refused.value.action.startswith("create Deployment"), refused.value

    def read(kind: str) -> dict:
        return api.request(f"read {kind}", "GET", f"{collection(kind, namespace)}/demo-playground")

    service = read("Service")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == PORT
    assert service["spec"]["selector"] == {"finetune.dev/job": "demo", "finetune.dev/stage": "playground"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == job.metadata["uid"]
    config_map = read("ConfigMap")
    assert yaml.safe_load(config_map["data"]["status.yaml"])["run"] == 1 and "config.json" in config_map["data"]
    # A second pass (the Deployment retried) leaves the two as they are: ours, same run, same spec.
    assert [api.create(o) for o in build_playground(job) if o["kind"] != "Deployment"] == ["exists", "exists"]

    later = step(job, dict(seen), now=T0 + dt.timedelta(seconds=601))
    assert later.playground == "delete"
    apply(api, job, later, OperatorSettings())  # the Deployment's 404 is tolerated like any absent child
    for kind in ("Service", "ConfigMap"):
        with pytest.raises(ApiCallError) as gone:
            read(kind)
        assert gone.value.status == 404
