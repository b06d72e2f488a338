"""`finetune-operator render`: every object the operator creates, validated and checked for what users rely on."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from finetune_operator.api.job import FineTuneJob
from finetune_operator.cli import main
from finetune_operator.cluster.build import build_stage, render

from .conftest import EXAMPLES, MINIMAL_JOB

CLUSTER_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))
KUBERNETES_VERSION = "1.34.0"
PSS_VOLUMES = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI", "csi",
               "ephemeral"}  # fmt: skip


def job_from(raw: dict[str, Any], **spec_changes: Any) -> FineTuneJob:
    raw = copy.deepcopy(raw)
    raw["metadata"].setdefault("namespace", "default")
    raw["metadata"]["uid"] = "0f5e2a4c-1111-2222-3333-444455556666"
    for key, value in spec_changes.items():
        raw["spec"][key] = {**raw["spec"].get(key, {}), **value}
    return FineTuneJob.model_validate(raw)


def example_job(path) -> FineTuneJob:
    return job_from(yaml.safe_load(path.read_text()))


def pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["labels"]["finetune.dev/stage"], o["spec"]["template"]["spec"])
            for o in objects if o["kind"] == "Job"]  # fmt: skip


def assert_restricted(pod: dict[str, Any], *, api_access: bool = False) -> None:
    """The Pod Security Standard "restricted" profile, rule by rule."""
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= PSS_VOLUMES, volume
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and not ctx.get("privileged")
        assert ctx["capabilities"]["drop"] == ["ALL"] and not set(ctx["capabilities"].get("add", [])) - {
            "NET_BIND_SERVICE"}  # fmt: skip
        assert ctx.get("runAsUser", pod["securityContext"].get("runAsUser")) != 0
        assert not any(p.get("hostPort") for p in container.get("ports", []))
    if not api_access:
        assert pod["automountServiceAccountToken"] is False  # stage programs need no API access


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.stem)
def test_every_rendered_object_is_valid_kubernetes(path):
    job = example_job(path)
    objects = render(job)
    kinds = {o["kind"] for o in objects}
    assert {"Job", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["apiVersion"] == "scheduling.volcano.sh/v1beta1":
            assert obj["kind"] == "PodGroup" and obj["spec"]["minMember"] >= 1
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                            "name": job.name, "uid": job.uid, "controller": True}]  # fmt: skip
        # no blockOwnerDeletion: it would need `update` on finetunejobs/finalizers, which the chart does not grant
        assert meta["labels"]["finetune.dev/job"] == job.name and meta["namespace"] == job.namespace
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert len(meta["name"]) <= 63
    for stage, pod in pods(objects):
        assert_restricted(pod)
        requests = pod["containers"][0]["resources"]["requests"]
        gpu = job.spec.resources.gpu_resource_name
        if stage in ("prepare", "export"):
            assert gpu not in requests  # no GPU is held while preparing or exporting
        else:
            assert requests[gpu] == str(job.spec.resources.gpus_per_worker)


def test_stage_jobs_carry_the_contract():
    job = job_from(MINIMAL_JOB, runPolicy={"backoffLimit": 5})
    objs = build_stage(job, "prepare")
    spec = objs.job["spec"]
    assert objs.job["metadata"]["name"] == "demo-prepare" and spec["backoffLimit"] == 5
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In",
                                                             "values": [3, 4, 5]}}  # fmt: skip
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    container = objs.container
    assert container["command"][:3] == ["finetune-operator", "stage", "prepare"]
    assert container["command"][-1] == "/workspace/run-1"
    config_map = next(o for o in objs.extra if o["kind"] == "ConfigMap")
    assert '"job": "demo"' in config_map["data"]["config.json"]
    pvc = next(o for o in objs.extra if o["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "demo-workspace" and pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"


def test_train_is_one_gang_attempt_per_job_and_the_operator_counts_retries():
    job = job_from(MINIMAL_JOB, runPolicy={"backoffLimit": 5, "terminationGracePeriodSeconds": 900})
    spec = build_stage(job, "train").job["spec"]
    # The first failed worker fails the Job (the others are stopped); the operator starts the next attempt.
    assert spec["backoffLimit"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [3, 4, 5]
    assert rules[1] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 900


def test_single_worker_train_is_indexed_without_a_service():
    objs = build_stage(job_from(MINIMAL_JOB), "train")
    spec = objs.job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 1, 1)
    env = {e["name"]: e.get("value") for e in objs.container["env"]}
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["NNODES"] == "1" and env["NPROC_PER_NODE"] == "1"
    assert not [o for o in objs.extra if o["kind"] == "Service"] and "subdomain" not in objs.pod


def test_multi_node_train_has_rendezvous_service_and_volcano_gang():
    job = example_job(EXAMPLES / "multinode-full-finetune.yaml")
    objs = build_stage(job, "train")
    service = next(o for o in objs.extra if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert objs.pod["subdomain"] == service["metadata"]["name"]
    env = {e["name"]: e for e in objs.container["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{job.name}-train-0.{service['metadata']['name']}"
    assert env["WORLD_SIZE"]["value"] == "32" and env["NPROC_PER_NODE"]["value"] == "8"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    group = next(o for o in objs.extra if o["kind"] == "PodGroup")
    assert group["spec"] == {"minMember": 4, "queue": "research"}
    assert objs.pod["schedulerName"] == "volcano"
    assert objs.job["spec"]["template"]["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group[
        "metadata"]["name"]  # fmt: skip
    pvc = next(o for o in objs.extra if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "cephfs"
    assert "schedulerName" not in build_stage(job, "prepare").pod  # the gang is for train only


@pytest.mark.parametrize("stage", ["prepare", "train", "export"])
def test_each_stage_learns_its_cpu_request_for_its_math_threads(stage):
    """torch would start a thread per core of the node; the stage divides its pod's CPU request instead."""
    objs = build_stage(job_from(MINIMAL_JOB, resources={"train": {"cpu": "6"}}), stage)
    env = {e["name"]: e for e in objs.container["env"]}
    assert env["FINETUNE_CPUS"]["valueFrom"] == {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}
    assert objs.container["resources"]["requests"]["cpu"] == {"prepare": "4", "train": "6", "export": "4"}[stage]
    assert "cpu" not in objs.container["resources"]["limits"]  # a request, not a throttle


def test_kueue_queues_per_stage_kind():
    job = example_job(EXAMPLES / "lora-sft-llama-8b-kueue.yaml")
    queues = {}
    for stage in ("prepare", "train", "evaluate", "export"):
        objs = build_stage(job, stage)
        queues[stage] = objs.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
        assert objs.job["spec"]["suspend"] is True  # Kueue admits it; the operator never flips it
        assert objs.pod["priorityClassName"] == "ml-batch"
    assert queues == {"prepare": "cpu-queue", "train": "gpu-queue", "evaluate": "gpu-queue", "export": "cpu-queue"}
    plain = build_stage(job_from(MINIMAL_JOB), "train")
    assert "kueue.x-k8s.io/queue-name" not in plain.job["metadata"]["labels"] and "suspend" not in plain.job["spec"]


def test_credentials_only_where_needed_and_only_by_reference():
    job = example_job(EXAMPLES / "lora-sft-llama-8b-kueue.yaml")
    prepare = build_stage(job, "prepare").container
    env = {e["name"]: e for e in prepare["env"]}
    assert env["FT_MODEL_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert prepare["envFrom"] == [{"secretRef": {"name": "s3-reader"}}]
    train = build_stage(job, "train").container
    assert "envFrom" not in train and "FT_MODEL_TOKEN" not in {e["name"] for e in train["env"]}
    assert build_stage(job, "export").container["envFrom"] == [{"secretRef": {"name": "s3-writer"}}]


def test_pvc_sources_are_mounted_read_only_and_the_output_claim_writable_in_export():
    job = example_job(EXAMPLES / "qlora-mistral-7b.yaml")
    for stage, writable in (("prepare", False), ("export", True)):
        objs = build_stage(job, stage)
        mounts = {m["mountPath"]: m for m in objs.container["volumeMounts"]}
        assert mounts["/mnt/pvc/models"]["readOnly"] is not writable
        assert mounts["/mnt/pvc/datasets"]["readOnly"] is True
    claims = [v["persistentVolumeClaim"]["claimName"] for v in build_stage(job, "train").pod["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert "mistral-qlora-work" in claims  # the existing workspace claim; no PVC is created for it
    assert not [o for o in build_stage(job, "train").extra if o["kind"] == "PersistentVolumeClaim"]


def test_render_cli_prints_every_stage(capsys):
    assert main(["render", str(EXAMPLES / "dpo-preference-pairs.yaml"), "--namespace", "ml"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    jobs = [d["metadata"]["name"] for d in docs if d["kind"] == "Job"]
    assert jobs == ["qwen-dpo-hh-prepare", "qwen-dpo-hh-train", "qwen-dpo-hh-evaluate", "qwen-dpo-hh-export"]
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    assert main(["render", str(EXAMPLES / "dpo-preference-pairs.yaml"), "--stage", "train"]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["Job", "ConfigMap", "PersistentVolumeClaim"]


def test_render_refuses_an_invalid_manifest(tmp_path, capsys):
    bad = copy.deepcopy(MINIMAL_JOB)
    bad["spec"]["method"] = {"type": "qlora"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["render", str(path)]) == 1
    assert "spec.method.quantization" in capsys.readouterr().err
