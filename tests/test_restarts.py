"""Train attempts the operator restarts as a gang: how a failed train Job is read, and what the planner does."""

from __future__ import annotations

import datetime as dt
import json

from finetune_operator.cluster.observe import observe
from finetune_operator.planner import EndedAttempt, ObservedStage
from finetune_operator.stages.contract import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, EXIT_WORKER_LOST

from .test_planner import DONE, RUNNING, T0, done, make_job, step

CHECKPOINT = {"step": 40, "time": "2026-11-26T12:05:00Z", "location": "/workspace/run-1/checkpoint-40"}
PROGRESS = {"step": 40, "totalSteps": 100, "loss": 1.2, "lastCheckpoint": CHECKPOINT}


def training(job, minutes: int = 5):
    """Prepare done, train running with progress and a checkpoint."""
    step(job)
    step(job, {"prepare": done("prepare")})
    running = ObservedStage(**{**RUNNING.__dict__, "progress": PROGRESS})
    return step(job, {"prepare": done("prepare"), "train": running}, now=T0 + dt.timedelta(minutes=minutes))


def failed_train(code: int, uid: str) -> ObservedStage:
    return ObservedStage(exists=True, failed=True, attempts=1, completion_time="2026-11-26T12:06:00Z",
                         ended_attempt=EndedAttempt(uid=uid, exit_code=code, message="peer gone"))  # fmt: skip


def test_a_lost_worker_restarts_the_whole_train_job_once_and_records_why():
    job = make_job()
    training(job)
    assert job.status.progress.last_checkpoint.step == 40
    observed = {"prepare": done("prepare"), "train": failed_train(EXIT_WORKER_LOST, "uid-1")}
    result = step(job, observed, now=T0 + dt.timedelta(minutes=6))
    assert result.stop == ["train"] and result.start is None and result.status.phase == "Training"
    train = result.status.stages.train
    [restart] = train.restarts
    assert (restart.attempt, restart.reason, restart.exit_code, restart.resume_from) == (
        1, "WorkerLost", EXIT_WORKER_LOST, "checkpoint-40")  # fmt: skip
    assert restart.counts_against_backoff_limit and train.retries_used == 1 and train.attempts == 2
    assert "attempt 2 resumes from checkpoint-40" in result.status.message
    # Seen again while it is being deleted: recorded once.
    again = step(job, observed, now=T0 + dt.timedelta(minutes=6, seconds=5))
    assert len(again.status.stages.train.restarts) == 1 and again.status.stages.train.attempts == 2
    # Gone: the next attempt's Job is created; the record stays in the FineTuneJob.
    after = step(job, {"prepare": done("prepare")}, now=T0 + dt.timedelta(minutes=7))
    assert after.start == "train" and after.status.stages.train.restarts[0].reason == "WorkerLost"
    final = step(job, {"prepare": done("prepare"), "train": done("train")}, now=T0 + dt.timedelta(minutes=9))
    assert final.status.stages.train.state == "Succeeded" and final.status.stages.train.attempts == 2


def test_a_preempted_attempt_resumes_from_the_checkpoint_its_sigterm_saved_not_the_last_one_logged():
    job = make_job()
    training(job)  # the last progress line read names checkpoint-40
    saved = {"step": 43, "time": "2026-11-26T12:05:40Z", "location": "/workspace/run-1/checkpoint-43"}
    ended = EndedAttempt(uid="uid-1", exit_code=EXIT_PREEMPTED, message="stopped by SIGTERM after step 43",
                         last_checkpoint=saved)  # fmt: skip
    observed = {"prepare": done("prepare"), "train": ObservedStage(exists=True, failed=True, attempts=1,
                                                                   ended_attempt=ended)}  # fmt: skip
    result = step(job, observed, now=T0 + dt.timedelta(minutes=6))
    [restart] = result.status.stages.train.restarts
    assert (restart.reason, restart.resume_from, restart.counts_against_backoff_limit) == (
        "Preempted", "checkpoint-43", False)  # fmt: skip
    assert result.status.progress.last_checkpoint.step == 43
    assert "attempt 2 resumes from checkpoint-43" in result.status.message


def test_preemptions_cost_no_retry_but_errors_run_out():
    job = make_job(runPolicy={"backoffLimit": 1})
    training(job)
    for n, code in enumerate([EXIT_PREEMPTED, EXIT_PREEMPTED, EXIT_PREEMPTED, 1]):
        result = step(job, {"prepare": done("prepare"), "train": failed_train(code, f"uid-{n}")})
        assert result.stop == ["train"] and result.status.phase == "Training", n
        step(job, {"prepare": done("prepare")})
    train = job.status.stages.train
    assert [r.reason for r in train.restarts] == ["Preempted", "Preempted", "Preempted", "Error"]
    assert train.retries_used == 1 and train.attempts == 5
    result = step(job, {"prepare": done("prepare"), "train": failed_train(1, "uid-last")})
    assert result.status.phase == "Failed" and result.stop == []


def test_a_config_error_is_not_restarted():
    job = make_job()
    training(job)
    result = step(job, {"prepare": done("prepare"), "train": failed_train(EXIT_CONFIG_ERROR, "uid-1")})
    assert result.status.phase == "Failed" and result.status.stages.train.restarts == []


def _pod(name: str, index: str, finished: str, code: int | None = None, **status) -> dict:
    terminated = {"exitCode": code, "finishedAt": finished} if code is not None else None
    return {
        "metadata": {"name": name, "labels": {"job-name": "demo-train"},
                     "annotations": {"batch.kubernetes.io/job-completion-index": index}},
        "status": {"phase": "Failed", **({"containerStatuses": [{"state": {"terminated": {**terminated,
                   **status.pop("terminated", {})}}}]} if terminated else {}), **status},
    }  # fmt: skip


def _failed_job() -> dict:
    return {
        "metadata": {"name": "demo-train", "uid": "u-7", "labels": {"finetune.dev/stage": "train",
                                                                    "finetune.dev/run": "1"}},
        "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                "message": "Job has reached the specified backoff limit"}]},
    }  # fmt: skip


def test_a_failed_train_job_is_read_as_its_root_cause():
    killed = _pod("w1", "1", "2026-11-26T12:00:01Z", 137)
    victim = _pod("w0", "0", "2026-11-26T12:00:03Z", EXIT_WORKER_LOST)
    ended = observe(1, [_failed_job()], [victim, killed]).stages["train"].ended_attempt
    assert ended == EndedAttempt(uid="u-7", exit_code=137, message="Job has reached the specified backoff limit")

    evicted = _pod(
        "w1",
        "1",
        "2026-11-26T12:00:01Z",
        143,
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    )
    assert observe(1, [_failed_job()], [evicted]).stages["train"].ended_attempt.exit_code == EXIT_PREEMPTED
    summary = {"ok": False, "exitCode": EXIT_PREEMPTED, "message": "stopped by SIGTERM after step 43",
               "lastCheckpoint": {"step": 43, "location": "/workspace/run-1/checkpoint-43"}}  # fmt: skip
    preempted = _pod("w0", "0", "2026-11-26T12:00:01Z", EXIT_PREEMPTED, terminated={"message": json.dumps(summary)})
    ended = observe(1, [_failed_job()], [preempted]).stages["train"].ended_attempt
    assert (ended.exit_code, ended.message, ended.last_checkpoint) == (
        EXIT_PREEMPTED, summary["message"], summary["lastCheckpoint"])  # fmt: skip
    oom = _pod("w0", "0", "2026-11-26T12:00:01Z", 137, terminated={"reason": "OOMKilled"})
    assert observe(1, [_failed_job()], [oom]).stages["train"].ended_attempt.exit_code == 7

    gone = _failed_job()
    gone["status"]["conditions"][0].update(
        reason="PodFailurePolicy",
        message="Container stage for pod ml/demo-train-1-x failed with exit code 3 matching FailJob rule at index 0",
    )
    assert observe(1, [gone], []).stages["train"].ended_attempt.exit_code == EXIT_CONFIG_ERROR
    assert observe(1, [gone], []).stages["train"].failed


def test_other_stages_are_not_gang_restarted():
    job = _failed_job()
    job["metadata"]["labels"]["finetune.dev/stage"] = "prepare"
    assert observe(1, [job], []).stages["prepare"].ended_attempt is None
    assert DONE.ended_attempt is None
