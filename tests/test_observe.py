"""Reading stage Jobs and pods (as the API server reports them) into what the planner needs."""

from __future__ import annotations

import json

from finetune_operator.cluster.observe import job_view, observe, pod_view
from finetune_operator.controller import _train_pod

from .test_restarts import _failed_job, _pod


def job(stage: str, run: int = 1, **status) -> dict:
    return {
        "metadata": {"name": f"demo-{stage}", "labels": {"finetune.dev/stage": stage, "finetune.dev/run": str(run)}},
        "spec": {},
        "status": status,
    }


def pod(stage: str, phase: str, message: str | None, index: str = "0", finished: str = "2026-11-26T12:00:00Z") -> dict:
    terminated = {"exitCode": 0 if phase == "Succeeded" else 1, "finishedAt": finished}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {
            "labels": {"job-name": f"demo-{stage}"},
            "annotations": {"batch.kubernetes.io/job-completion-index": index},
        },
        "status": {"phase": phase, "containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}]},
    }


def test_a_completed_job_brings_its_summary():
    summary = {"stage": "prepare", "ok": True, "message": "90 train / 10 eval rows"}
    seen = observe(
        1,
        [
            job(
                "prepare",
                succeeded=1,
                conditions=[{"type": "Complete", "status": "True"}],
                startTime="2026-11-26T11:59:00Z",
                completionTime="2026-11-26T12:00:00Z",
            )
        ],
        [pod("prepare", "Succeeded", json.dumps(summary))],
    )
    stage = seen.stage("prepare")
    assert stage.succeeded and not stage.failed and stage.summary == summary and stage.attempts == 1
    assert stage.completion_time == "2026-11-26T12:00:00Z"


def test_a_failed_job_brings_the_newest_failure_and_counts_attempts():
    failed = job(
        "train",
        failed=3,
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ],
    )
    pods = [
        pod("train", "Failed", json.dumps({"ok": False, "message": "old"}), finished="2026-11-26T11:00:00Z"),
        pod("train", "Failed", json.dumps({"ok": False, "message": "CUDA out of memory"})),
    ]
    stage = observe(1, [failed], pods).stage("train")
    assert stage.failed and stage.attempts == 3 and stage.summary["message"] == "CUDA out of memory"
    assert stage.message.startswith("BackoffLimitExceeded")


def test_log_fallback_and_progress_and_queueing():
    crashed = job("train", failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    stage = observe(1, [crashed], [pod("train", "Failed", "Traceback ...\nKilled\n")]).stage("train")
    assert stage.summary == {"ok": False, "message": "Traceback ...\nKilled"}
    line = json.dumps({"finetune.dev/progress": "progress", "stage": "train", "step": 7, "totalSteps": 10})
    running = observe(1, [job("train", active=1)], [], {"train": f"noise\n{line}\nmore noise\n"}).stage("train")
    assert running.active and running.progress["step"] == 7
    queued = job("train")
    queued["spec"]["suspend"] = True
    assert observe(1, [queued], []).stage("train").queued


def test_children_of_other_runs_are_reported_apart():
    seen = observe(2, [job("prepare", run=1, active=1)], [])
    assert seen.other_runs and not seen.stages


def test_an_ended_job_whose_pod_is_not_in_view_has_results_pending():
    failed = job("train", failed=2, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    one_pod_seen = [pod("train", "Failed", None)]
    assert observe(1, [failed], one_pod_seen).stage("train").results_pending  # the Job counts 2 ended pods
    both_seen = [pod("train", "Failed", None), pod("train", "Failed", None, finished="2026-11-26T12:05:00Z")]
    seen = observe(1, [failed], both_seen).stage("train")
    assert not seen.results_pending and seen.message.startswith("BackoffLimitExceeded")  # e.g. OOMKilled: no summary


def as_served(obj: dict, kind: str) -> dict:
    """`obj` with what the API server adds and `observe` never reads: managed fields, owner references, the Job
    controller's labels, a pod template or spec, image and IP fields, conditions that do not hold."""
    served = json.loads(json.dumps(obj))
    meta = served.setdefault("metadata", {})
    meta.update(namespace="ml", uid=meta.get("uid", f"uid-{meta.get('name', kind)}"), resourceVersion="42",
                creationTimestamp="2026-11-26T11:58:00Z", generation=1,
                ownerReferences=[{"apiVersion": "batch/v1", "kind": "Job", "name": "demo", "uid": "u-1",
                                  "controller": True, "blockOwnerDeletion": True}],
                managedFields=[{"manager": "kube-controller-manager", "fieldsV1": {"f:status": {}}}])  # fmt: skip
    meta.setdefault("labels", {}).update({"controller-uid": "u-1", "batch.kubernetes.io/controller-uid": "u-1",
                                          "app.kubernetes.io/managed-by": "finetune-operator"})  # fmt: skip
    container = {"name": "stage", "image": "ghcr.io/finetune-operator/trainer:0.1.0", "args": ["stage", "train"],
                 "resources": {"limits": {"cpu": "8", "memory": "64Gi"}},
                 "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}]}  # fmt: skip
    status = served.setdefault("status", {})
    if kind == "Job":
        served.setdefault("spec", {}).update(backoffLimit=0, template={"spec": {"containers": [container]}})
        status.setdefault("conditions", []).append({"type": "SuccessCriteriaMet", "status": "False"})
        status.update(ready=0, terminating=0, uncountedTerminatedPods={})
    else:
        served["spec"] = {"containers": [container], "nodeName": "node-1", "restartPolicy": "Never"}
        status.setdefault("conditions", []).append(
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-26T11:58:01Z"}
        )
        status.update(hostIP="10.0.0.1", podIP="10.1.0.7", podIPs=[{"ip": "10.1.0.7"}], qosClass="Burstable",
                      startTime="2026-11-26T11:58:01Z")  # fmt: skip
        for c in status.get("containerStatuses") or []:
            c.update(image=container["image"], imageID="sha256:abc", containerID="containerd://1", ready=False,
                     restartCount=0, started=False, lastState={})  # fmt: skip
            for state in c.get("state", {}).values():
                state.update(containerID="containerd://1", startedAt="2026-11-26T11:58:02Z")
    return served


def test_the_views_the_controller_keeps_observe_as_the_whole_objects():
    summary = json.dumps({"stage": "prepare", "ok": True, "message": "90 train / 10 eval rows"})
    done = job("prepare", succeeded=1, conditions=[{"type": "Complete", "status": "True"}],
               startTime="2026-11-26T11:59:00Z", completionTime="2026-11-26T12:00:00Z")  # fmt: skip
    running = job("train", active=2)
    worker0 = pod("train", "Running", None)
    worker0["metadata"].update(name="demo-train-0-x", labels={"job-name": "demo-train", "finetune.dev/stage": "train",
                                                              "finetune.dev/run": "1"})  # fmt: skip
    worker0["status"]["containerStatuses"] = [{"name": "stage", "state": {"running": {}}}]
    queued, deleting, older = job("evaluate"), job("export"), job("prepare", run=0, active=1)
    queued["spec"]["suspend"] = True
    deleting["metadata"]["deletionTimestamp"] = "2026-11-26T12:01:00Z"
    playground = {"metadata": {"labels": {"finetune.dev/stage": "playground", "finetune.dev/run": "1"}},
                  "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
    disrupted = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    evicted = _pod("w1", "1", "2026-11-26T12:00:01Z", 143, conditions=disrupted)
    cases = [
        ([done], [pod("prepare", "Succeeded", summary), pod("prepare", "Failed", "Traceback ...\nKilled\n", "1")]),
        ([_failed_job()], [_pod("w1", "1", "2026-11-26T12:00:01Z", 137), _pod("w0", "0", "2026-11-26T12:00:03Z", 6)]),
        ([_failed_job()], [evicted, _pod("w0", "0", "2026-11-26T12:00:01Z", 137, terminated={"reason": "OOMKilled"})]),
        ([_failed_job()], [_pod("w0", "0", "2026-11-26T12:00:01Z", None)]),
        ([done, running, queued, deleting, older], [worker0, playground]),
    ]
    for jobs, pods in cases:
        served_jobs, served_pods = [as_served(j, "Job") for j in jobs], [as_served(p, "Pod") for p in pods]
        jobs_kept, pods_kept = [job_view(j) for j in served_jobs], [pod_view(p) for p in served_pods]
        logs = {"train": json.dumps({"finetune.dev/progress": "progress", "step": 3})}
        assert observe(1, jobs_kept, pods_kept, logs) == observe(1, served_jobs, served_pods, logs)
        assert _train_pod(1, pods_kept) == _train_pod(1, served_pods)
        kept, whole = len(json.dumps([*jobs_kept, *pods_kept])), len(json.dumps([*served_jobs, *served_pods]))
        assert kept < whole / 2, (kept, whole)
    assert _train_pod(1, pods_kept) == "demo-train-0-x"  # the last case's running worker 0: its log is read
