"""Operator metrics from status transitions: counted once per transition, never again after a restart."""

from __future__ import annotations

from finetune_operator.cluster.telemetry import OperatorMetrics

CREATED = "2026-11-26T12:00:00Z"


def stage(state: str, attempts: int = 1, start: str = "2026-11-26T12:00:30Z", end: str | None = None):
    record = {"state": state, "attempts": attempts, "startTime": start}
    if end:
        record["completionTime"] = end
    return record


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_durations_retries_and_time_to_first_stage():
    metrics = OperatorMetrics()
    pending = {"phase": "Pending"}
    preparing = {"phase": "Preparing", "stages": {"prepare": stage("Running")}}
    prepared = {"phase": "Training", "stages": {"prepare": stage("Succeeded", end="2026-11-26T12:02:30Z"),
                                                "train": stage("Running", start="2026-11-26T12:02:31Z")}}  # fmt: skip
    retried = {**prepared, "stages": {**prepared["stages"], "train": stage("Running", 3, "2026-11-26T12:02:31Z")}}
    for before, after in [(None, pending), (pending, preparing), (preparing, prepared), (prepared, retried)]:
        metrics.record(before, after, CREATED)
    assert sample(metrics, "finetune_time_to_first_stage_seconds_sum") == 30
    assert sample(metrics, "finetune_stage_duration_seconds_sum", stage="prepare", outcome="Succeeded") == 120
    assert sample(metrics, "finetune_stage_retries_total", stage="train") == 2
    # A restarted operator starts from the stored status: the same status again counts nothing.
    metrics.record(retried, retried, CREATED)
    assert sample(metrics, "finetune_stage_duration_seconds_count", stage="prepare", outcome="Succeeded") == 1
    assert sample(metrics, "finetune_stage_retries_total", stage="train") == 2
    assert sample(metrics, "finetune_time_to_first_stage_seconds_count") == 1


def test_a_new_run_counts_its_own_stages_but_not_queueing_since_creation():
    metrics = OperatorMetrics()
    first = {"run": 1, "phase": "Succeeded", "stages": {"prepare": stage("Succeeded", end="2026-11-26T12:01:30Z")}}
    second = {"run": 2, "phase": "Preparing", "stages": {"prepare": stage("Failed", 2, "2026-11-27T09:00:00Z",
                                                                             "2026-11-27T09:00:10Z")}}  # fmt: skip
    metrics.record(first, second, CREATED)
    assert sample(metrics, "finetune_stage_duration_seconds_count", stage="prepare", outcome="Failed") == 1
    assert sample(metrics, "finetune_stage_retries_total", stage="prepare") == 1
    assert sample(metrics, "finetune_time_to_first_stage_seconds_count") == 0


def test_jobs_by_phase_lists_every_phase_per_namespace():
    metrics = OperatorMetrics(phases=lambda: [("ml", "Training"), ("ml", "Training"), ("team-b", "Failed")])
    assert sample(metrics, "finetune_jobs", namespace="ml", phase="Training") == 2
    assert sample(metrics, "finetune_jobs", namespace="ml", phase="Succeeded") == 0
    assert sample(metrics, "finetune_jobs", namespace="team-b", phase="Failed") == 1
