"""Reading stage Jobs and pods (as the API server reports them) into what the planner needs."""

from __future__ import annotations

import json

from finetune_operator.cluster.observe import observe


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
