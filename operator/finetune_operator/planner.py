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

from . import estimate as estimator
from .api.job import FineTuneJob
from .api.spec import STAGES, FineTuneJobSpec
from .api.status import (
    ACTIVE_PHASES,
    FINISHED_PHASES,
    MAX_RESTARTS_KEPT,
    Artifact,
    CheckpointRef,
    Condition,
    EstimateStatus,
    FineTuneJobStatus,
    GateResult,
    Lineage,
    MetricsStatus,
    OomRecovery,
    PlaygroundStatus,
    Progress,
    RestartRecord,
    RunRecord,
    SearchStatus,
    ServingConfigStatus,
    StageStatus,
)
from .stages.contract import counts_against_backoff, exit_reason, retryable

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
    ended_attempt: EndedAttempt | None = None
    """How a failed train Job's attempt ended (cluster): the planner restarts the whole gang when it can."""


@dataclass
class EndedAttempt:
    """A failed attempt of a gang stage, as read from its Job and pods."""

    uid: str
    """The Job's uid."""
    exit_code: int
    """The exit code that decided (see stages.contract.most_significant); 75 for a disruption."""
    message: str | None = None
    last_checkpoint: dict[str, Any] | None = None
    """The newest complete checkpoint the attempt's summary names (a SIGTERM saves one just before the exit, after
    the last progress line the operator may have read)."""


@dataclass
class Observed:
    stages: dict[str, ObservedStage] = field(default_factory=dict)
    other_runs: bool = False
    """Children of an earlier run still exist (they are deleted before a new run starts)."""
    playground_ready: bool = False
    """The playground pod of the current run is Ready."""

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
    playground: Literal["create", "delete"] | None = None
    """Create the playground of the current run (spec.playground), or delete the one that exists."""


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
    data.pop("playground", None)  # looking at the result is not part of making it
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
        last_checkpoint=CheckpointRef.model_validate(record["lastCheckpoint"])
        if record.get("lastCheckpoint")
        else None,
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


def _absorb_summary(status: FineTuneJobStatus, stage: str, summary: dict[str, Any] | None, now: dt.datetime) -> None:
    """Copy what a finished stage reported into status (metrics, artifacts, serving config, lineage)."""
    if not summary:
        return
    if stage == "prepare" and summary.get("lineage"):
        lineage = status.lineage or Lineage()
        lineage.model_revision = summary["lineage"].get("modelRevision") or lineage.model_revision
        lineage.dataset_fingerprint = summary["lineage"].get("datasetFingerprint")
        status.lineage = lineage
    _absorb_restarts(getattr(status.stages, stage), summary)
    if stage == "prepare" and summary.get("estimate"):
        status.estimate = EstimateStatus.model_validate(summary["estimate"])
    if stage == "train" and status.estimate and summary.get("oomRecoveries"):
        status.estimate.oom_recoveries = [OomRecovery.model_validate(r) for r in summary["oomRecoveries"]]
        status.estimate.micro_batch = summary.get("microBatch", status.estimate.micro_batch)
        status.estimate.gradient_accumulation_steps = summary.get(
            "gradientAccumulationSteps", status.estimate.gradient_accumulation_steps
        )
    if stage == "train" and summary.get("progress"):
        final = dict(summary["progress"])
        final.update(step=summary.get("steps", final.get("step")), etaSeconds=0)
        final["lastCheckpoint"] = summary.get("lastCheckpoint") or final.get("lastCheckpoint")
        status.progress = _progress(
            final,
            (parse_time(status.progress.updated_at) if status.progress else None) or now,
        )
    if stage == "search" and summary.get("search"):
        status.search = SearchStatus.model_validate(summary["search"])
    if stage == "evaluate" and "metrics" in summary:
        status.metrics = MetricsStatus(
            base=summary["metrics"].get("base", {}),
            tuned=summary["metrics"].get("tuned", {}),
            train=summary["metrics"].get("train", {}),
            gates=[GateResult.model_validate(g) for g in summary.get("gates", [])],
            gates_passed=summary.get("gatesPassed"),
            summary=summary.get("summary"),
        )
    if stage == "export":
        status.artifacts = [Artifact.model_validate(a) for a in summary.get("artifacts", [])]
        if summary.get("servingConfig"):
            status.serving_config = ServingConfigStatus.model_validate(summary["servingConfig"])


def _absorb_restarts(record: StageStatus | None, summary: dict[str, Any]) -> None:
    """Local mode restarts inside the stage and reports its attempts in the summary."""
    if record is not None and summary.get("restarts"):
        record.restarts = [RestartRecord.model_validate(r) for r in summary["restarts"]][-MAX_RESTARTS_KEPT:]
        record.retries_used = sum(r.counts_against_backoff_limit for r in record.restarts)


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
    # Planned means written: a plan whose API calls fail is not stored, `report_api_error` is instead.
    condition("Synced", True, "ReconcileSuccess")
    status.conditions = out


def _failure_reason(status: FineTuneJobStatus) -> str | None:
    if status.phase != "Failed":
        return None
    for stage in STAGES:
        record = getattr(status.stages, stage)
        if record and record.state == "Failed":
            if stage == "evaluate" and status.metrics and status.metrics.gates_passed is False:
                return "GateFailed"
            if stage == "train" and (record.message or "").startswith("InsufficientGpuMemory"):
                return "InsufficientGpuMemory"
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
                else "InsufficientGpuMemory"
                if (after.message or "").startswith("InsufficientGpuMemory")
                else "StageFailed"
            )
            events.append(Event("Warning", reason, f"{stage} failed: {after.message}"))
    if new.estimate and (old.estimate is None or new.run != old.run):
        events.append(Event("Normal", "Estimated", estimator.one_line(new.estimate.wire())))
    recovered = len(new.estimate.oom_recoveries) if new.estimate else 0
    if new.estimate and recovered > (len(old.estimate.oom_recoveries) if old.estimate else 0):
        last = new.estimate.oom_recoveries[-1]
        events.append(
            Event(
                "Warning",
                "OutOfMemoryRecovered",
                f"train ran out of GPU memory and resumed from step {last.at_step} with micro-batch "
                f"{last.micro_batch} x accumulation {last.gradient_accumulation_steps}",
            )
        )
    if new.phase != old.phase:
        if new.phase == "Succeeded":
            events.append(Event("Normal", "Succeeded", new.message or "all stages succeeded"))
        elif new.phase == "Suspended":
            events.append(Event("Normal", "Suspended", new.message or "suspended"))
        elif old.phase == "Suspended":
            events.append(Event("Normal", "Resumed", f"resumed in phase {new.phase}"))
        elif new.phase == "Failed" and not any(e.type == "Warning" for e in events):
            events.append(Event("Warning", "Failed", new.message or "failed"))
    if new.run > 1:  # a later run's events must read differently from the first run's (kubectl describe, audits)
        for event in events:
            if event.reason != "NewRun":
                event.message = f"run {new.run}: {event.message}"
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
    # Only an edit (a new metadata.generation) starts one: an operator upgrade that resolves the same spec to
    # another hash (a new defaulted field) must not retrain finished jobs.
    edited = old.observed_generation is not None and job.generation != old.observed_generation
    if edited and status.lineage and status.lineage.config_hash:
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
    if status.phase not in FINISHED_PHASES or status.run != old.run:  # a finished run keeps the lineage it ran with
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

    _playground(job, observed, old, status, result, now)
    _conditions(job, status, old if status.run == old.run else FineTuneJobStatus(), stamp, queued)
    result.events = _events(old, status) + result.events
    return result


def _newest_checkpoint(status: FineTuneJobStatus, ended: EndedAttempt) -> CheckpointRef | None:
    """The checkpoint the next attempt resumes from: the newer of the last one in progress and the one the ended
    attempt's summary names (which then becomes progress.lastCheckpoint too)."""
    known = status.progress.last_checkpoint if status.progress else None
    if ended.last_checkpoint and (known is None or ended.last_checkpoint.get("step", -1) > known.step):
        known = CheckpointRef.model_validate(ended.last_checkpoint)
        if status.progress is not None:
            status.progress.last_checkpoint = known
    return known


def _restart_gang(
    job: FineTuneJob,
    status: FineTuneJobStatus,
    record: StageStatus,
    ended: EndedAttempt,
    result: Plan,
    now: dt.datetime,
) -> bool:
    """Replace a failed train Job as a whole (every worker, from the newest complete checkpoint) when the failure
    is retryable and retries are left; disruptions cost none. Returns False when the stage has failed for good."""
    code = ended.exit_code
    if not retryable(code):
        return False
    counted = counts_against_backoff(code)
    recorded = any(r.job_uid == ended.uid for r in record.restarts)
    if not recorded:
        limit = job.spec.run_policy.backoff_limit
        if counted and record.retries_used >= limit:
            return False
        checkpoint = _newest_checkpoint(status, ended)
        record.restarts = [
            *record.restarts,
            RestartRecord(
                attempt=record.attempts or 1,
                reason=exit_reason(code),  # type: ignore[arg-type]
                exit_code=code,
                message=ended.message,
                time=timestamp(now),
                counts_against_backoff_limit=counted,
                resume_from=f"checkpoint-{checkpoint.step}" if checkpoint else None,
                job_uid=ended.uid,
            ),
        ][-MAX_RESTARTS_KEPT:]
        record.retries_used += counted
        record.attempts = (record.attempts or 1) + 1
    last = record.restarts[-1]
    record.state = "Running"
    record.message = f"attempt {last.attempt} ended ({last.reason}, exit {last.exit_code}); attempt {record.attempts} "
    record.message += f"resumes from {last.resume_from}" if last.resume_from else "starts from the beginning"
    status.message = f"train restarting: {record.message}"
    result.stop = ["train"]  # the new attempt's Job is created once the failed one is gone
    result.requeue_after = 2
    return True


def _fits_before_train(spec: FineTuneJobSpec, status: FineTuneJobStatus, record: StageStatus, stamp: str) -> bool:
    """Re-estimate from the prepare stage's record with the current spec (resources may have changed since) and
    refuse a run that cannot fit its GPUs, before the train Job holds any. Pure: no I/O."""
    if status.estimate is None or not status.estimate.architecture:
        return True
    try:
        data = {
            "sequenceLength": status.estimate.sequence_length or spec.dataset.max_seq_length,
            "tokensPerEpoch": status.estimate.tokens_per_epoch,
            "sequences": status.estimate.sequences,
        }
        fresh = estimator.job_estimate(spec, status.estimate.architecture, data)
    except (estimator.EstimateError, KeyError, TypeError, ValueError):
        return True  # an estimate that cannot be made never blocks a run
    kept = status.estimate
    wire = estimator.status_estimate(fresh, spec, kept.architecture, kept.config_source or "")
    status.estimate = EstimateStatus.model_validate({**wire, "oomRecoveries": [r.wire() for r in kept.oom_recoveries]})
    if status.estimate.fits is not False:
        return True
    record.state, record.completion_time = "Failed", stamp
    record.message = f"InsufficientGpuMemory: {status.estimate.message}"
    status.phase, status.current_stage = "Failed", "train"
    status.message = f"train refused before any GPU was held: {status.estimate.message}"
    status.completion_time = stamp
    return False


def _playground(
    job: FineTuneJob,
    observed: Observed,
    old: FineTuneJobStatus,
    status: FineTuneJobStatus,
    result: Plan,
    now: dt.datetime,
) -> None:
    """spec.playground: up once the run succeeded and exported, down after its TTL, a cleanup or a new run."""
    from .cluster.plugins.playground import playground_name, port_forward, url

    play = job.spec.playground
    current = status.playground if status.playground and status.playground.run == status.run else None
    live = old.playground is not None and old.playground.state in ("Starting", "Ready")
    exported = (
        status.phase == "Succeeded" and status.stages.export is not None and (status.stages.export.state == "Succeeded")
    )
    wanted = bool(play and play.enabled and exported and not result.cleanup)
    expires = None
    if wanted and play and play.ttl_seconds_after_finished is not None and status.completion_time:
        expires = parse_time(status.completion_time) + dt.timedelta(seconds=play.ttl_seconds_after_finished)
        if now >= expires:
            wanted = False
    if not wanted:
        if live:
            result.playground = "delete"
            result.events.append(Event("Normal", "PlaygroundRemoved", f"playground of run {old.playground.run} "
                                                                      "removed"))  # fmt: skip
        if current is not None and current.state in ("Starting", "Ready"):
            current.state = "Expired" if expires is not None and now >= expires else "Removed"
            current.url = current.port_forward = None
        return
    if current is None or current.state not in ("Starting", "Ready"):
        result.playground = "create"
        current = PlaygroundStatus(state="Starting", run=status.run, name=playground_name(job))
        result.events.append(Event("Normal", "PlaygroundStarted", f"playground starting: {port_forward(job)}"))
    current.state = "Ready" if observed.playground_ready else "Starting"
    current.url, current.port_forward = url(job), port_forward(job)
    current.expires_at = timestamp(expires) if expires else None
    status.playground = current
    if expires is not None:
        remaining = (expires - now).total_seconds()
        result.requeue_after = min(result.requeue_after or remaining, remaining)


def _requeue(result: Plan, seconds: float) -> None:
    """Ask for a visit in `seconds` at the latest (the earliest of what asks for one)."""
    seconds = max(seconds, 0.0)
    result.requeue_after = seconds if result.requeue_after is None else min(result.requeue_after, seconds)


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
    if deadline and started:
        _requeue(result, deadline - (now - started).total_seconds())  # no event marks the deadline passing

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
            _requeue(result, 2)
            return False
        if seen.succeeded:
            record.state = "Succeeded"
            record.attempts = max(record.attempts, seen.attempts, 1)
            record.start_time = record.start_time or seen.start_time
            record.completion_time = seen.completion_time or stamp
            record.message = (seen.summary or {}).get("message") or (
                "succeeded, but its results were lost: the stage pod was gone before they were read"
            )
            _absorb_summary(status, stage, seen.summary, now)
            continue
        if seen.failed and seen.ended_attempt and _restart_gang(job, status, record, seen.ended_attempt, result, now):
            status.phase, status.current_stage = STAGE_PHASE[stage], stage  # type: ignore[assignment]
            return False
        if seen.failed:
            summary = seen.summary or {}
            _absorb_restarts(record, summary)
            record.state = "Failed"
            record.attempts = max(record.attempts, seen.attempts, 1)
            record.completion_time = seen.completion_time or stamp
            record.message = summary.get("message") or seen.message or "failed"
            if stage == "evaluate":
                _absorb_summary(status, stage, summary, now)
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
        if stage == "train" and not _fits_before_train(spec, status, record, stamp):
            return False
        record.state = "Running"
        record.attempts = max(record.attempts, 1)
        record.start_time = record.start_time or stamp
        record.job_name = f"{job.name}-{stage}"
        result.start = stage
        # The same words the next reconcile finds (the Job seen running): one status write per hand-off.
        status.message = _progress_text(stage, status, False)
        return False

    status.phase, status.current_stage = "Succeeded", sequence[-1]
    status.completion_time = status.completion_time or stamp
    status.message = "all stages succeeded" + (
        f"; {status.metrics.summary}" if status.metrics and status.metrics.summary else ""
    )
    if spec.run_policy.ttl_seconds_after_finished is not None:
        result.requeue_after = float(spec.run_policy.ttl_seconds_after_finished)
    return False


def report_api_error(job: FineTuneJob, message: str, now: dt.datetime) -> FineTuneJobStatus:
    """The stored status with `Synced` False naming the API error that keeps the operator from acting on the job.

    Nothing else changes: the plan that failed to be carried out is not recorded (no stage marked started whose
    Job was never created); the next successful reconcile sets `Synced` back to True.
    """
    status = job.status.model_copy(deep=True)
    prior = {c.type: c for c in status.conditions}
    kept = [c for c in status.conditions if c.type != "Synced"]
    _set_condition(kept, prior, "Synced", False, "ApiError", message, job.generation, timestamp(now))
    status.conditions = kept
    return status
