"""The pure core: (FineTuneJob, what was observed, now) -> (what to start or stop, the new status, events).

No I/O here. The operator (kopf) observes stage Jobs and their pods, the local mode observes its processes; both
hand the same `Observed` to `plan` and carry out the `Plan` it returns. Because every decision is a function of
the stored status and the observed children, a restarted executor continues exactly where the last one stopped:
a stage whose success is recorded in status is never run again, and a stage whose child exists is never created
twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .api.job import FineTuneJob
from .api.spec import STAGES, FineTuneJobSpec
from .api.status import (
    ACTIVE_PHASES,
    FINISHED_PHASES,
    Artifact,
    Condition,
    FineTuneJobStatus,
    GateResult,
    Lineage,
    MetricsStatus,
    Progress,
    RunRecord,
    SearchStatus,
    ServingConfigStatus,
    StageStatus,
)

STAGE_PHASE = {
    "prepare": "Preparing",
    "search": "Searching",
    "train": "Training",
    "evaluate": "Evaluating",
    "export": "Exporting",
}
RUN_DEFINING = ("model", "dataset", "method", "training", "search", "distributed")
MAX_RUNS_KEPT = 10
# A Job can be seen Complete before its pod, which carries the stage's summary: wait this long for the pod.
SUMMARY_GRACE_SECONDS = 60


@dataclass
class ObservedStage:
    """What an executor sees of one stage of the current run."""

    exists: bool = False
    active: bool = False
    succeeded: bool = False
    failed: bool = False
    queued: bool = False
    """The child exists but waits for admission (e.g. a Kueue-suspended Job)."""
    attempts: int = 0
    message: str | None = None
    """The failure reason reported by the executor (e.g. BackoffLimitExceeded: ...)."""
    summary: dict[str, Any] | None = None
    """The stage program's JSON summary (termination message / summary file)."""
    progress: dict[str, Any] | None = None
    """The last progress record (train)."""
    start_time: str | None = None
    completion_time: str | None = None
    results_pending: bool = False
    """The stage ended but the pod carrying its summary is not in view yet (separate watches lag)."""


@dataclass
class Observed:
    stages: dict[str, ObservedStage] = field(default_factory=dict)
    other_runs: bool = False
    """Children of an earlier run still exist (they are deleted before a new run starts)."""

    def stage(self, name: str) -> ObservedStage:
        return self.stages.get(name, ObservedStage())


@dataclass
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    status: FineTuneJobStatus
    start: str | None = None
    """A stage whose children must be created now."""
    stop: list[str] = field(default_factory=list)
    """Stages whose children must be deleted (suspend, deadline, failure of the run)."""
    delete_other_runs: bool = False
    cleanup: bool = False
    """Delete every child (ttlSecondsAfterFinished has passed)."""
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _summary_may_come(seen: ObservedStage, now: dt.datetime) -> bool:
    finished = parse_time(seen.completion_time)
    return finished is not None and (now - finished).total_seconds() < SUMMARY_GRACE_SECONDS


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def config_hash(spec: FineTuneJobSpec, fields: tuple[str, ...] | None = None) -> str:
    """sha256 of the resolved spec (runPolicy left out: suspending or a TTL do not change what a run makes)."""
    data = spec.wire()
    data.pop("runPolicy", None)
    if fields is not None:
        data = {k: v for k, v in data.items() if k in fields}
        data["workers"] = spec.resources.workers
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def stages_for(spec: FineTuneJobSpec) -> list[str]:
    optional = {"evaluate": spec.evaluation.enabled, "search": spec.search is not None}
    return [s for s in STAGES if optional.get(s, True)]


def format_eta(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def _progress(record: dict[str, Any], now: dt.datetime) -> Progress:
    total = record.get("totalSteps")
    step = int(record.get("step", 0))
    return Progress(
        step=step,
        total_steps=total,
        epoch=record.get("epoch"),
        loss=record.get("loss"),
        learning_rate=record.get("learningRate"),
        tokens_per_second=record.get("tokensPerSecond"),
        eta=format_eta(record.get("etaSeconds")),
        percent=int(100 * step / total) if total else None,
        updated_at=timestamp(now),
    )


def _progress_text(stage: str, status: FineTuneJobStatus, queued: bool) -> str:
    if queued:
        return f"{stage}: waiting for admission"
    p = status.progress
    if stage == "train" and p and p.total_steps:
        text = f"train step {p.step}/{p.total_steps} ({p.percent}%)"
        if p.loss is not None:
            text += f", loss {p.loss:.4g}"
        if p.eta:
            text += f", ETA {p.eta}"
        return text
    return f"{stage} running"


def _absorb_summary(status: FineTuneJobStatus, stage: str, summary: dict[str, Any] | None) -> None:
    """Copy what a finished stage reported into status (metrics, artifacts, serving config, lineage)."""
    if not summary:
        return
    if stage == "prepare" and summary.get("lineage"):
        lineage = status.lineage or Lineage()
        lineage.model_revision = summary["lineage"].get("modelRevision") or lineage.model_revision
        lineage.dataset_fingerprint = summary["lineage"].get("datasetFingerprint")
        status.lineage = lineage
    if stage == "train" and summary.get("progress"):
        final = dict(summary["progress"])
        final.update(step=summary.get("steps", final.get("step")), etaSeconds=0)
        status.progress = _progress(
            final,
            parse_time(status.progress.updated_at)
            if status.progress and status.progress.updated_at
            else dt.datetime.now(dt.UTC),
        )
    if stage == "search" and summary.get("search"):
        status.search = SearchStatus.model_validate(summary["search"])
    if stage == "evaluate" and "metrics" in summary:
        status.metrics = MetricsStatus(
            base=summary["metrics"].get("base", {}),
            tuned=summary["metrics"].get("tuned", {}),
            gates=[GateResult.model_validate(g) for g in summary.get("gates", [])],
            gates_passed=summary.get("gatesPassed"),
            summary=summary.get("summary"),
        )
    if stage == "export":
        status.artifacts = [Artifact.model_validate(a) for a in summary.get("artifacts", [])]
        if summary.get("servingConfig"):
            status.serving_config = ServingConfigStatus.model_validate(summary["servingConfig"])


def _set_condition(
    conditions: list[Condition],
    old: dict[str, Condition],
    type_: str,
    state: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> None:
    value = "Unknown" if state is None else ("True" if state else "False")
    previous = old.get(type_)
    since = previous.last_transition_time if previous and previous.status == value else now
    conditions.append(
        Condition(
            type=type_,
            status=value,
            observed_generation=generation,
            last_transition_time=since,
            reason=reason,
            message=message,
        )
    )


def _conditions(job: FineTuneJob, status: FineTuneJobStatus, old: FineTuneJobStatus, now: str, queued: bool) -> None:
    prior = {c.type: c for c in old.conditions}
    out: list[Condition] = []
    phase = status.phase
    failure = _failure_reason(status)
    message = status.message or ""

    def condition(type_: str, state: bool | None, reason: str, text: str = "") -> None:
        _set_condition(out, prior, type_, state, reason, text, job.generation, now)

    finished = phase in FINISHED_PHASES
    condition("Ready", phase == "Succeeded", "Succeeded" if phase == "Succeeded" else (failure or phase), message)
    condition("Succeeded", phase == "Succeeded" if finished else None, phase if finished else "Running", message)
    condition("Failed", phase == "Failed", failure or "NotFailed", message if phase == "Failed" else "")
    suspended = phase == "Suspended"
    condition(
        "Suspended",
        suspended,
        "Suspended" if suspended else "NotSuspended",
        "spec.runPolicy.suspend is true" if suspended else "",
    )
    for stage in STAGES:
        record = getattr(status.stages, stage)
        if stage == "search" and record is None and job.spec.search is None:
            continue  # an optional stage the job does not have
        state = record.state if record else "Pending"
        condition(
            f"{stage.capitalize()}Complete",
            state in ("Succeeded", "Skipped"),
            f"Stage{state}",
            (record.message or "") if record else "",
        )
    # kstatus: Reconciling while work is under way, Stalled when it cannot make progress without a change.
    active = phase in ACTIVE_PHASES or phase == "Pending"
    progress = _progress_text(status.current_stage or "prepare", status, queued) if active else ""
    # "WaitingForAdmission" tells GitOps health checks that the job is queued (Kueue), not stuck.
    condition("Reconciling", active, "WaitingForAdmission" if queued else (phase if active else "Idle"), progress)
    condition("Stalled", phase == "Failed", failure or "NotStalled", message if phase == "Failed" else "")
    status.conditions = out


def _failure_reason(status: FineTuneJobStatus) -> str | None:
    if status.phase != "Failed":
        return None
    for stage in STAGES:
        record = getattr(status.stages, stage)
        if record and record.state == "Failed":
            if stage == "evaluate" and status.metrics and status.metrics.gates_passed is False:
                return "GateFailed"
            return "StageFailed"
    return "DeadlineExceeded" if status.message and "activeDeadlineSeconds" in status.message else "Failed"


def _events(old: FineTuneJobStatus, new: FineTuneJobStatus) -> list[Event]:
    events: list[Event] = []
    if new.run != old.run:
        events.append(Event("Normal", "NewRun", f"run {new.run} started: the spec changed"))
    for stage in STAGES:
        before = getattr(old.stages, stage) if new.run == old.run else None
        after = getattr(new.stages, stage)
        was, now = (before.state if before else "Pending"), (after.state if after else "Pending")
        if was == now or after is None:
            continue
        if now == "Running":
            events.append(Event("Normal", "StageStarted", f"{stage} started ({after.job_name})"))
        elif now == "Succeeded":
            events.append(Event("Normal", "StageSucceeded", f"{stage} succeeded: {after.message or ''}".rstrip(": ")))
        elif now == "Failed":
            reason = (
                "GateFailed"
                if stage == "evaluate" and new.metrics and new.metrics.gates_passed is False
                else "StageFailed"
            )
            events.append(Event("Warning", reason, f"{stage} failed: {after.message}"))
    if new.phase != old.phase:
        if new.phase == "Succeeded":
            events.append(Event("Normal", "Succeeded", new.message or "all stages succeeded"))
        elif new.phase == "Suspended":
            events.append(Event("Normal", "Suspended", new.message or "suspended"))
        elif old.phase == "Suspended":
            events.append(Event("Normal", "Resumed", f"resumed in phase {new.phase}"))
        elif new.phase == "Failed" and not any(e.type == "Warning" for e in events):
            events.append(Event("Warning", "Failed", new.message or "failed"))
    return events


def plan(job: FineTuneJob, observed: Observed, now: dt.datetime) -> Plan:
    """Decide the next step of a FineTuneJob. Pure: the same inputs always give the same plan."""
    spec = job.spec
    old = job.status
    status = old.model_copy(deep=True)
    stamp = timestamp(now)
    result = Plan(status=status)
    full_hash = config_hash(spec)
    run_hash = config_hash(spec, RUN_DEFINING)

    # A new run: the spec changed after the run finished, or what defines a run changed while it was suspended.
    if status.lineage and status.lineage.config_hash:
        finished_and_changed = status.phase in FINISHED_PHASES and status.lineage.config_hash != full_hash
        started = any(
            (r := getattr(status.stages, s)) is not None and r.state not in ("Pending", "Skipped") for s in STAGES
        )
        superseded = (
            status.phase not in FINISHED_PHASES
            and started
            and status.lineage.run_hash is not None
            and status.lineage.run_hash != run_hash
        )
        if finished_and_changed or superseded:
            record = RunRecord(
                run=status.run,
                generation=status.observed_generation,
                phase=status.phase if finished_and_changed else "Superseded",
                config_hash=status.lineage.config_hash,
                start_time=status.start_time,
                completion_time=status.completion_time or stamp,
                message=status.message,
                metrics=status.metrics.tuned if status.metrics else {},
            )
            status = FineTuneJobStatus(run=old.run + 1, runs=[*old.runs, record][-MAX_RUNS_KEPT:])
            result.status = status
            result.delete_other_runs = True
            # What was observed belongs to the previous run now.
            observed = Observed(other_runs=observed.other_runs or any(s.exists for s in observed.stages.values()))
            if not finished_and_changed:
                result.stop = [s for s in STAGES if observed.stage(s).exists]

    status.observed_generation = job.generation
    status.lineage = status.lineage or Lineage()
    status.lineage.base_model = spec.model.source
    status.lineage.config_hash = full_hash
    status.lineage.run_hash = run_hash
    status.start_time = status.start_time or stamp
    sequence = stages_for(spec)
    if not spec.evaluation.enabled:
        status.stages.evaluate = StageStatus(state="Skipped", message="spec.evaluation.enabled is false")

    queued = False
    if status.phase in FINISHED_PHASES and status.run == old.run:
        _finish_housekeeping(job, status, result, now)
    elif observed.other_runs:
        status.phase, status.message = "Pending", "waiting for the children of earlier runs to be deleted"
        result.delete_other_runs = True
        result.requeue_after = 2
    else:
        queued = _advance(job, observed, status, result, now, sequence)

    _conditions(job, status, old if status.run == old.run else FineTuneJobStatus(), stamp, queued)
    result.events = _events(old, status)
    return result


def _finish_housekeeping(job: FineTuneJob, status: FineTuneJobStatus, result: Plan, now: dt.datetime) -> None:
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done = parse_time(status.completion_time)
    if ttl is None or done is None:
        return
    remaining = (done + dt.timedelta(seconds=ttl) - now).total_seconds()
    if remaining <= 0:
        result.cleanup = True
    else:
        result.requeue_after = remaining


def _advance(
    job: FineTuneJob,
    observed: Observed,
    status: FineTuneJobStatus,
    result: Plan,
    now: dt.datetime,
    sequence: list[str],
) -> bool:
    """Walk the stages of the current run; returns whether the active stage waits for admission."""
    spec = job.spec
    stamp = timestamp(now)
    active = [
        s
        for s in sequence
        if observed.stage(s).exists and not observed.stage(s).succeeded and not observed.stage(s).failed
    ]

    if spec.run_policy.suspend:
        result.stop = active
        status.phase, status.message = "Suspended", "spec.runPolicy.suspend is true: finished stages are kept"
        for stage in active:
            record = getattr(status.stages, stage)
            if record:
                record.state, record.message = "Pending", "stopped by suspend; resumes when unsuspended"
        return False

    deadline = spec.run_policy.active_deadline_seconds
    started = parse_time(status.start_time)
    if deadline and started and (now - started).total_seconds() > deadline:
        result.stop = active
        status.phase = "Failed"
        status.message = f"the run exceeded spec.runPolicy.activeDeadlineSeconds ({deadline}s)"
        status.completion_time = stamp
        return False

    for stage in sequence:
        record = getattr(status.stages, stage) or StageStatus()
        setattr(status.stages, stage, record)
        seen = observed.stage(stage)
        if record.state == "Succeeded":
            continue  # recorded results survive a deleted child and an operator restart
        if (seen.succeeded or seen.failed) and seen.results_pending and _summary_may_come(seen, now):
            status.phase, status.current_stage = STAGE_PHASE[stage], stage  # type: ignore[assignment]
            record.state = "Running"
            record.attempts = max(record.attempts, seen.attempts, 1)
            status.message = f"{stage} finished; reading its results"
            result.requeue_after = 2
            return False
        if seen.succeeded:
            record.state = "Succeeded"
            record.attempts = max(record.attempts, seen.attempts, 1)
            record.start_time = record.start_time or seen.start_time
            record.completion_time = seen.completion_time or stamp
            record.message = (seen.summary or {}).get("message") or (
                "succeeded, but its results were lost: the stage pod was gone before they were read"
            )
            _absorb_summary(status, stage, seen.summary)
            continue
        if seen.failed:
            summary = seen.summary or {}
            record.state = "Failed"
            record.attempts = max(record.attempts, seen.attempts, 1)
            record.completion_time = seen.completion_time or stamp
            record.message = summary.get("message") or seen.message or "failed"
            if stage == "evaluate":
                _absorb_summary(status, stage, summary)
            status.phase, status.current_stage = "Failed", stage
            status.message = f"{stage} failed: {record.message}"
            status.completion_time = stamp
            return False
        status.phase, status.current_stage = STAGE_PHASE[stage], stage  # type: ignore[assignment]
        if seen.exists:
            record.state = "Running"
            record.attempts = max(record.attempts, seen.attempts, 1)
            record.start_time = record.start_time or seen.start_time or stamp
            if stage == "train" and seen.progress:
                status.progress = _progress(seen.progress, now)
            status.message = _progress_text(stage, status, seen.queued)
            return seen.queued
        record.state = "Running"
        record.attempts = max(record.attempts, 1)
        record.start_time = record.start_time or stamp
        record.job_name = f"{job.name}-{stage}"
        result.start = stage
        status.message = f"{stage} starting"
        return False

    status.phase, status.current_stage = "Succeeded", sequence[-1]
    status.completion_time = status.completion_time or stamp
    status.message = "all stages succeeded" + (
        f"; {status.metrics.summary}" if status.metrics and status.metrics.summary else ""
    )
    if spec.run_policy.ttl_seconds_after_finished is not None:
        result.requeue_after = float(spec.run_policy.ttl_seconds_after_finished)
    return False
