"""The pure planner: every state and transition, without a server or a process."""

from __future__ import annotations

import copy
import datetime as dt

import pytest

from finetune_operator.api.job import FineTuneJob
from finetune_operator.planner import Observed, ObservedStage, Plan, plan

from .conftest import MINIMAL_JOB

T0 = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
DONE = ObservedStage(exists=True, succeeded=True, attempts=1, completion_time="2026-11-26T12:01:00Z")
RUNNING = ObservedStage(exists=True, active=True, attempts=1, start_time="2026-11-26T12:00:00Z")


def make_job(generation: int = 1, **spec_changes) -> FineTuneJob:
    raw = copy.deepcopy(MINIMAL_JOB)
    raw["metadata"]["generation"] = generation
    for key, value in spec_changes.items():
        raw["spec"][key] = {**raw["spec"].get(key, {}), **value}
    return FineTuneJob.model_validate(raw)


def step(job: FineTuneJob, stages: dict[str, ObservedStage] | None = None, now=T0, **observed) -> Plan:
    """Plan, then store the new status on the job (as the executor would)."""
    result = plan(job, Observed(stages=stages or {}, **observed), now)
    job.status = result.status
    return result


def conditions(result: Plan) -> dict[str, str]:
    return {c.type: c.status for c in result.status.conditions}


SUMMARIES = {
    "prepare": {"ok": True, "message": "90 train / 10 eval rows", "lineage": {"modelRevision": "abc123",
                                                                           "datasetFingerprint": "f" * 64}},
    "train": {"ok": True, "message": "trained 10 steps", "steps": 10, "progress": {"step": 10, "totalSteps": 10,
                                                                                  "loss": 0.5}},
    "evaluate": {"ok": True, "message": "exactMatch 0.9", "metrics": {"base": {"exactMatch": 0.0},
                                                                     "tuned": {"exactMatch": 0.9}},
                 "gates": [], "gatesPassed": True, "summary": "exactMatch 0.9 (base 0)"},
    "export": {"ok": True, "message": "exported", "artifacts": [{"name": "merged", "format": "safetensors",
               "uri": "s3://b/out/merged", "sha256": "0" * 64, "sizeBytes": 10}],
               "servingConfig": {"uri": "s3://b/out/serving-config.pb", "sha256": "1" * 64}},
}  # fmt: skip


def done(stage: str) -> ObservedStage:
    return ObservedStage(**{**DONE.__dict__, "summary": SUMMARIES[stage]})


def test_a_new_job_starts_prepare():
    job = make_job()
    result = step(job)
    assert result.start == "prepare" and result.stop == []
    status = result.status
    assert status.phase == "Preparing" and status.current_stage == "prepare" and status.observed_generation == 1
    assert status.stages.prepare.state == "Running" and status.stages.prepare.job_name == "demo-prepare"
    assert conditions(result)["Ready"] == "False" and conditions(result)["Reconciling"] == "True"
    assert all(c.observed_generation == 1 for c in status.conditions)
    assert [e.reason for e in result.events] == ["StageStarted"]


def test_the_stages_run_in_order_and_results_land_in_status():
    job = make_job()
    step(job)
    seen = {"prepare": RUNNING}
    assert step(job, seen).start is None  # the child exists: never created twice
    seen["prepare"] = done("prepare")
    result = step(job, seen)
    assert result.start == "train" and result.status.lineage.model_revision == "abc123"
    assert conditions(result)["PrepareComplete"] == "True"
    assert [e.reason for e in result.events] == ["StageSucceeded", "StageStarted"]
    seen["train"] = ObservedStage(
        exists=True,
        active=True,
        progress={"step": 5, "totalSteps": 10, "loss": 1.25, "etaSeconds": 130, "tokensPerSecond": 900},
    )
    result = step(job, seen)
    assert result.start is None and result.status.progress.percent == 50 and result.status.progress.eta == "2m10s"
    reconciling = next(c for c in result.status.conditions if c.type == "Reconciling")
    assert reconciling.message == "train step 5/10 (50%), loss 1.25, ETA 2m10s"
    for stage in ("train", "evaluate", "export"):
        seen[stage] = done(stage)
        result = step(job, seen)
    status = result.status
    assert status.phase == "Succeeded" and status.completion_time
    assert status.metrics.tuned == {"exactMatch": 0.9} and status.metrics.summary == "exactMatch 0.9 (base 0)"
    assert status.artifacts[0].uri == "s3://b/out/merged" and status.serving_config.sha256 == "1" * 64
    assert conditions(result) == {
        "Ready": "True", "Succeeded": "True", "Failed": "False", "Suspended": "False", "PrepareComplete": "True",
        "TrainComplete": "True", "EvaluateComplete": "True", "ExportComplete": "True", "Reconciling": "False",
        "Stalled": "False", "Synced": "True"}  # fmt: skip
    assert [e.reason for e in result.events] == ["StageSucceeded", "Succeeded"]


def test_a_failed_stage_fails_the_job_with_its_message():
    job = make_job()
    step(job)
    failed = ObservedStage(
        exists=True,
        failed=True,
        attempts=3,
        message="BackoffLimitExceeded",
        summary={"ok": False, "message": "CUDA out of memory"},
    )
    result = step(job, {"prepare": done("prepare"), "train": failed})
    status = result.status
    assert status.phase == "Failed" and status.message == "train failed: CUDA out of memory"
    assert status.stages.train.attempts == 3 and result.start is None
    assert conditions(result)["Stalled"] == "True" and conditions(result)["Failed"] == "True"
    assert next(c for c in status.conditions if c.type == "Ready").reason == "StageFailed"
    assert ("Warning", "StageFailed") in [(e.type, e.reason) for e in result.events]
    assert step(job, {"prepare": done("prepare"), "train": failed}).events == []  # no repeated events


def test_a_failed_gate_stops_before_export():
    job = make_job()
    gate = {
        "ok": False,
        "reason": "GateFailed",
        "message": "quality gate failed: exactMatch = 0.1 (needs min 0.5)",
        "metrics": {"base": {}, "tuned": {"exactMatch": 0.1}},
        "gatesPassed": False,
        "gates": [{"metric": "exactMatch", "value": 0.1, "min": 0.5, "passed": False}],
    }
    seen = {"prepare": done("prepare"), "train": done("train"),
            "evaluate": ObservedStage(exists=True, failed=True, summary=gate)}  # fmt: skip
    result = step(job, seen)
    assert result.status.phase == "Failed" and result.start is None
    assert result.status.metrics.gates[0].passed is False
    assert next(c for c in result.status.conditions if c.type == "Ready").reason == "GateFailed"
    assert [e.reason for e in result.events] == ["StageSucceeded", "StageSucceeded", "GateFailed"]


def test_disabled_evaluation_is_skipped():
    job = make_job(evaluation={"enabled": False})
    result = step(job, {"prepare": done("prepare"), "train": done("train")})
    assert result.start == "export" and result.status.stages.evaluate.state == "Skipped"
    assert conditions(result)["EvaluateComplete"] == "True"


def test_suspend_stops_the_active_stage_and_resume_restarts_it():
    job = make_job()
    step(job, {"prepare": done("prepare"), "train": RUNNING})
    job.spec.run_policy.suspend = True
    result = step(job, {"prepare": done("prepare"), "train": RUNNING})
    assert result.stop == ["train"] and result.status.phase == "Suspended"
    assert conditions(result)["Suspended"] == "True" and conditions(result)["Reconciling"] == "False"
    assert result.status.stages.prepare.state == "Succeeded"  # finished stages are kept
    job.spec.run_policy.suspend = False
    result = step(job, {"prepare": done("prepare")})
    assert result.start == "train" and result.status.phase == "Training"
    assert "Resumed" in [e.reason for e in result.events]


def test_a_restarted_executor_never_reruns_a_recorded_stage():
    job = make_job()
    step(job, {"prepare": done("prepare")})  # prepare recorded as Succeeded, train started
    # The operator restarts; prepare's Job was deleted meanwhile; train's Job exists.
    result = step(job, {"train": RUNNING})
    assert result.start is None and result.status.stages.prepare.state == "Succeeded"
    result = step(job, {})  # even with no child at all, only the unfinished stage starts again
    assert result.start == "train"


def test_planning_is_deterministic():
    job_a, job_b = make_job(), make_job()
    seen = {"prepare": done("prepare")}
    assert plan(job_a, Observed(seen), T0).status == plan(job_b, Observed(seen), T0).status


def test_kueue_admission_wait_is_visible():
    job = make_job()
    result = step(job, {"prepare": ObservedStage(exists=True, queued=True)})
    reconciling = next(c for c in result.status.conditions if c.type == "Reconciling")
    assert reconciling.message == "prepare: waiting for admission" and reconciling.reason == "WaitingForAdmission"


def test_active_deadline_fails_the_run():
    job = make_job(runPolicy={"activeDeadlineSeconds": 60})
    step(job)
    result = step(job, {"prepare": RUNNING}, now=T0 + dt.timedelta(seconds=61))
    assert result.status.phase == "Failed" and result.stop == ["prepare"]
    assert "activeDeadlineSeconds" in result.status.message
    assert next(c for c in result.status.conditions if c.type == "Ready").reason == "DeadlineExceeded"


def test_a_running_job_with_a_deadline_asks_for_a_visit_when_it_passes():
    job = make_job(runPolicy={"activeDeadlineSeconds": 60})
    step(job)  # no event marks the deadline: the operator must come back by itself
    assert step(job, {"prepare": RUNNING}, now=T0 + dt.timedelta(seconds=45)).requeue_after == pytest.approx(15)
    assert step(make_job(), {"prepare": RUNNING}).requeue_after is None


def test_ttl_after_finished_cleans_up_once_due():
    job = make_job(runPolicy={"ttlSecondsAfterFinished": 600}, evaluation={"enabled": False})
    seen = {s: done(s) for s in ("prepare", "train", "export")}
    result = step(job, seen)
    assert result.status.phase == "Succeeded" and result.requeue_after == 600 and not result.cleanup
    assert step(job, seen, now=T0 + dt.timedelta(seconds=300)).requeue_after == pytest.approx(300)
    assert step(job, seen, now=T0 + dt.timedelta(seconds=601)).cleanup


def test_a_spec_change_after_completion_starts_a_new_run():
    job = make_job(evaluation={"enabled": False})
    seen = {s: done(s) for s in ("prepare", "train", "export")}
    step(job, seen)
    assert job.status.phase == "Succeeded"
    assert step(job, seen).start is None  # unchanged: nothing to do
    job.spec.training.learning_rate = 1e-5
    job.metadata["generation"] = 2
    result = step(job, seen, other_runs=True)
    assert result.status.run == 2 and result.delete_other_runs and result.start is None
    assert result.status.runs[0].run == 1 and result.status.runs[0].phase == "Succeeded"
    assert result.status.phase == "Pending" and "waiting for the children of earlier runs" in result.status.message
    assert [e.reason for e in result.events] == ["NewRun"]
    assert step(job, {}, other_runs=True).delete_other_runs  # keeps asking until they are gone
    result = step(job, {})
    assert result.start == "prepare" and result.status.run == 2 and result.status.observed_generation == 2
    assert [e.message for e in result.events] == ["run 2: prepare started (demo-prepare)"]  # not run 1's words


def test_an_allowed_change_while_running_applies_to_the_next_stage():
    job = make_job()
    step(job, {"prepare": done("prepare"), "train": RUNNING})
    job.spec.evaluation.max_samples = 10
    job.metadata["generation"] = 2
    result = step(job, {"prepare": done("prepare"), "train": RUNNING})
    assert result.status.run == 1 and result.start is None and result.status.observed_generation == 2


def test_a_run_defining_change_while_suspended_supersedes_the_run():
    job = make_job()
    step(job, {"prepare": done("prepare"), "train": RUNNING})
    job.spec.run_policy.suspend = True
    job.metadata["generation"] = 2
    step(job, {"prepare": done("prepare"), "train": RUNNING})
    job.spec.dataset.max_seq_length = 2048
    job.metadata["generation"] = 3
    result = step(job, {"prepare": done("prepare")}, other_runs=True)
    assert result.status.run == 2 and result.status.runs[-1].phase == "Superseded" and result.delete_other_runs


def test_condition_transition_times_only_move_on_change():
    job = make_job()
    first = step(job)
    later = step(job, {"prepare": RUNNING}, now=T0 + dt.timedelta(minutes=5))
    before = {c.type: c.last_transition_time for c in first.status.conditions}
    after = {c.type: c.last_transition_time for c in later.status.conditions}
    assert after["Ready"] == before["Ready"] == "2026-11-26T12:00:00Z"


def test_a_complete_job_whose_pod_is_not_seen_yet_waits_for_its_results():
    """Jobs and pods arrive on separate watches: a Complete Job can be seen before the pod carrying the summary."""
    job = make_job()
    step(job)
    complete_without_pod = ObservedStage(
        exists=True, succeeded=True, attempts=1, completion_time="2026-11-26T12:00:00Z", results_pending=True
    )
    result = step(job, {"prepare": complete_without_pod}, now=T0 + dt.timedelta(seconds=5))
    assert result.start is None and result.status.stages.prepare.state == "Running" and result.requeue_after
    assert result.status.message == "prepare finished; reading its results"
    result = step(job, {"prepare": done("prepare")}, now=T0 + dt.timedelta(seconds=6))
    assert result.start == "train" and result.status.lineage.model_revision == "abc123"


def test_results_of_a_stage_whose_pod_is_gone_are_reported_lost_not_waited_for_forever():
    job = make_job()
    step(job)
    complete_without_pod = ObservedStage(
        exists=True, succeeded=True, attempts=1, completion_time="2026-11-26T12:00:00Z", results_pending=True
    )
    result = step(job, {"prepare": complete_without_pod}, now=T0 + dt.timedelta(minutes=5))
    assert result.start == "train" and "results were lost" in result.status.stages.prepare.message


def test_a_failed_job_whose_pod_is_not_seen_yet_waits_for_the_reason():
    job = make_job()
    step(job)
    failed_without_pod = ObservedStage(
        exists=True, failed=True, attempts=1, message="PodFailurePolicy", completion_time="2026-11-26T12:00:00Z",
        results_pending=True,
    )  # fmt: skip
    result = step(job, {"prepare": failed_without_pod}, now=T0 + dt.timedelta(seconds=3))
    assert result.status.phase == "Preparing" and result.requeue_after
    failed = ObservedStage(exists=True, failed=True, attempts=1, summary={"ok": False, "message": "row 4: bad"})
    assert step(job, {"prepare": failed}).status.message == "prepare failed: row 4: bad"


def test_a_new_run_starts_on_a_new_generation_only_not_on_a_new_hash():
    """An operator upgrade that resolves the same spec to another hash (a new defaulted field) retrains nothing."""
    job = make_job(evaluation={"enabled": False})
    seen = {s: done(s) for s in ("prepare", "train", "export")}
    step(job, seen)
    finished = job.status.model_copy(deep=True)
    job.status.lineage.config_hash = "an older operator's hash of the same spec"
    result = step(job, seen)
    assert result.status.run == 1 and result.start is None and not result.delete_other_runs and not result.events
    assert result.status.lineage.config_hash == "an older operator's hash of the same spec"  # the run's own lineage
    job.status = finished
    job.spec.run_policy.ttl_seconds_after_finished = 3600  # an edit outside what a run makes
    job.metadata["generation"] = 2
    result = step(job, seen)
    assert result.status.run == 1 and result.status.observed_generation == 2 and not result.delete_other_runs
    job.spec.training.learning_rate = 1e-5
    job.metadata["generation"] = 3
    assert step(job, seen, other_runs=True).status.run == 2


def test_a_stage_hand_off_is_one_status_change_not_two():
    """The status planned when a stage's Job is created is the one planned when that Job is then seen running."""
    job = make_job()
    step(job, {"prepare": RUNNING})
    created = step(job, {"prepare": done("prepare")}, now=T0 + dt.timedelta(seconds=1))
    assert created.start == "train"
    seen_running = plan(job, Observed(stages={"prepare": done("prepare"), "train": RUNNING}), T0 + dt.timedelta(2))
    assert seen_running.start is None and seen_running.status.wire() == created.status.wire()
    assert created.status.message == "train running"


def test_the_planner_reads_no_clock_a_finished_train_is_stamped_with_the_time_given():
    job = make_job()
    step(job, {"prepare": done("prepare"), "train": RUNNING})
    later = T0 + dt.timedelta(hours=3)
    first = plan(job, Observed(stages={"prepare": done("prepare"), "train": done("train")}), later)
    again = plan(job, Observed(stages={"prepare": done("prepare"), "train": done("train")}), later)
    assert first.status.progress.updated_at == "2026-11-26T15:00:00Z" and first.status.progress.step == 10
    assert first.status.wire() == again.status.wire()


def test_an_api_error_shows_as_synced_false_without_recording_the_failed_plan():
    from finetune_operator.planner import report_api_error

    job = make_job()
    step(job, {"prepare": RUNNING})  # stored; the next plan (train's start) is then not carried out
    message = "create Job ml/demo-train: 500 Internal Server Error: etcdserver: request timed out"
    status = report_api_error(job, message, T0 + dt.timedelta(minutes=1))
    synced = next(c for c in status.conditions if c.type == "Synced")
    assert (synced.status, synced.reason, synced.message) == ("False", "ApiError", message)
    assert synced.last_transition_time == "2026-11-26T12:01:00Z"
    assert status.stages.train is None and status.phase == "Preparing"  # nothing claimed that did not happen
    job.status = status
    recovered = step(job, {"prepare": done("prepare")}, now=T0 + dt.timedelta(minutes=2))
    assert recovered.start == "train" and conditions(recovered)["Synced"] == "True"
