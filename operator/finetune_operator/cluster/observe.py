"""Turn what the API server reports about a FineTuneJob's children into the planner's `Observed`. Pure.

Stage results travel in the pods' termination messages (the stage programs write a JSON summary there), progress
in the train pod's log lines; the workload needs no API access for either.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..planner import EndedAttempt, Observed, ObservedStage
from ..stages.contract import (
    EXIT_FAILURE,
    EXIT_OUT_OF_MEMORY,
    EXIT_PREEMPTED,
    SIGKILL_EXIT_CODE,
    most_significant,
    parse_line,
    retryable,
)


def _condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def _termination_summary(pods: Iterable[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    """The stage summary from the newest pod that ended in `phase` (Succeeded or Failed), rank 0 first."""
    ended = [p for p in pods if (p.get("status") or {}).get("phase") == phase]
    ended.sort(
        key=lambda p: (
            (p.get("metadata") or {}).get("annotations", {}).get("batch.kubernetes.io/job-completion-index", "0")
            != "0",
            -_finished_at(p),
        )
    )
    found = []
    for pod in ended:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            message = terminated.get("message")
            if not message:
                continue
            try:
                summary = json.loads(message)
            except json.JSONDecodeError:
                summary = {"ok": False, "message": message.strip()[-500:]}  # FallbackToLogsOnError: the log tail
            if isinstance(summary, dict):
                found.append(summary)
    # A non-retryable failure on any worker is the cause; the others' messages are its consequences.
    causes = [s for s in found if not retryable(int(s.get("exitCode", 0) or 0)) and s.get("exitCode")]
    return (causes or found or [None])[0]


def _finished_at(pod: dict[str, Any]) -> float:
    import datetime as dt

    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        finished = ((status.get("state") or {}).get("terminated") or {}).get("finishedAt")
        if finished:
            return dt.datetime.fromisoformat(finished.replace("Z", "+00:00")).timestamp()
    return 0.0


def last_progress(log_tail: str | None) -> dict[str, Any] | None:
    """The newest train progress record in a pod log tail."""
    if not log_tail:
        return None
    for line in reversed(log_tail.splitlines()):
        record = parse_line(line)
        if record and record.get("finetune.dev/progress") == "progress":
            return record
    return None


def _pod_exit_code(pod: dict[str, Any]) -> int | None:
    """How one pod of a gang ended, as a stage exit code: a disruption (DisruptionTarget: eviction, preemption,
    node drain or shutdown) reads as EXIT_PREEMPTED whatever the container said; the kernel's OOM kill as OOM."""
    status = pod.get("status") or {}
    if any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or []):
        return EXIT_PREEMPTED
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated:
            if terminated.get("reason") == "OOMKilled":
                return EXIT_OUT_OF_MEMORY
            return int(terminated.get("exitCode", EXIT_FAILURE))
    return SIGKILL_EXIT_CODE if status.get("phase") == "Failed" else None  # gone without a container status


def ended_attempt(job: dict[str, Any], pods: list[dict[str, Any]]) -> EndedAttempt:
    """How a failed gang Job's attempt ended: the most significant of its failed pods' codes, first failure
    first (its victims saw a lost peer, or were stopped when the Job failed)."""
    failed = sorted((p for p in pods if (p.get("status") or {}).get("phase") == "Failed"), key=_finished_at)
    codes = [c for c in (_pod_exit_code(p) for p in failed) if c is not None]
    condition = _condition(job, "Failed") or {}
    message = condition.get("message")
    if not codes:
        # The pods are gone; the Job's condition still names a pod failure policy match or the backoff limit.
        text = f"{condition.get('reason', '')} {message or ''}"
        codes = [EXIT_PREEMPTED] if "DisruptionTarget" in text else [_code_in(text)]
    summary = _termination_summary(pods, "Failed") or {}
    return EndedAttempt(
        uid=(job.get("metadata") or {}).get("uid") or (job.get("metadata") or {}).get("name", ""),
        exit_code=most_significant(codes) or EXIT_FAILURE,
        message=summary.get("message") or message,
        last_checkpoint=summary.get("lastCheckpoint"),
    )


def _code_in(text: str) -> int:
    import re

    match = re.search(r"exit code (\d+)", text)
    return int(match.group(1)) if match else EXIT_FAILURE


def observe_stage(
    job: dict[str, Any], pods: list[dict[str, Any]], log_tail: str | None = None, gang: bool = False
) -> ObservedStage:
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    complete, failed = _condition(job, "Complete"), _condition(job, "Failed")
    suspended = bool(spec.get("suspend")) and not status.get("active")
    summary = _termination_summary(pods, "Succeeded" if complete else "Failed") if (complete or failed) else None
    ended_in_view = sum(1 for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"))
    ended_reported = int(status.get("succeeded") or 0) + int(status.get("failed") or 0)
    return ObservedStage(
        exists=True,
        active=bool(status.get("active")),
        succeeded=complete is not None,
        failed=failed is not None,
        queued=suspended and not complete and not failed,
        attempts=int(status.get("failed") or 0) + (1 if status.get("active") or complete else 0),
        message=f"{failed.get('reason')}: {failed.get('message', '')}".strip(": ") if failed else None,
        summary=summary,
        results_pending=bool(complete or failed) and summary is None and ended_in_view < ended_reported,
        progress=last_progress(log_tail),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime") or (failed or {}).get("lastTransitionTime"),
        ended_attempt=ended_attempt(job, pods) if gang and failed else None,
    )


# What `observe` (and the controller's train-pod lookup) reads of a stage Job and of a pod: the controller keeps only
# this of every child in memory. A stage Job's pod template, a pod's spec, image and IP fields are most of their
# size, and at a thousand jobs the operator holds eight children per job, finished ones included.
OWN_LABEL_PREFIX = "finetune.dev/"
POD_LABELS = ("job-name", "batch.kubernetes.io/job-name")
POD_ANNOTATIONS = ("batch.kubernetes.io/job-completion-index",)
JOB_SPEC_FIELDS = ("suspend", "completions", "parallelism", "completionMode")
JOB_STATUS_FIELDS = ("active", "succeeded", "failed", "startTime", "completionTime")
CONDITION_FIELDS = ("type", "status", "reason", "message", "lastTransitionTime")
TERMINATED_FIELDS = ("exitCode", "reason", "message", "finishedAt")


def _pick(source: dict[str, Any] | None, keys: Iterable[str]) -> dict[str, Any]:
    return {k: source[k] for k in keys if source and source.get(k) is not None}


def _metadata_view(meta: dict[str, Any], labels: Iterable[str] = (), annotations: Iterable[str] = ()) -> dict[str, Any]:
    own = meta.get("labels") or {}
    view = _pick(meta, ("name", "namespace", "uid", "deletionTimestamp"))
    view["labels"] = {k: v for k, v in own.items() if k.startswith(OWN_LABEL_PREFIX) or k in labels}
    view["annotations"] = _pick(meta.get("annotations"), annotations)
    return view


def _true_conditions(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Only conditions that hold are ever read (`_condition`, DisruptionTarget, Ready)."""
    return [_pick(c, CONDITION_FIELDS) for c in status.get("conditions") or [] if c.get("status") == "True"]


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The part of a stage Job that `observe` reads: `observe` of views equals `observe` of the whole objects."""
    status = job.get("status") or {}
    return {
        "metadata": _metadata_view(job.get("metadata") or {}),
        "spec": _pick(job.get("spec"), JOB_SPEC_FIELDS),
        "status": {**_pick(status, JOB_STATUS_FIELDS), "conditions": _true_conditions(status)},
    }


def _ended_view(container: dict[str, Any]) -> dict[str, Any]:
    terminated = _pick(container["state"]["terminated"], TERMINATED_FIELDS)
    return {"name": container.get("name"), "state": {"terminated": terminated}}


def pod_view(pod: dict[str, Any]) -> dict[str, Any]:
    """The part of a stage pod that `observe` reads: its phase, the conditions that hold, and how each container
    ended (exit code, reason, termination message: the stage's summary)."""
    status = pod.get("status") or {}
    ended = [_ended_view(c) for c in status.get("containerStatuses") or [] if (c.get("state") or {}).get("terminated")]
    return {
        "metadata": _metadata_view(pod.get("metadata") or {}, POD_LABELS, POD_ANNOTATIONS),
        "status": {**_pick(status, ("phase",)), "conditions": _true_conditions(status), "containerStatuses": ended},
    }


def observe(
    run: int, jobs: Iterable[dict[str, Any]], pods: Iterable[dict[str, Any]], logs: dict[str, str] | None = None
) -> Observed:
    """`jobs` and `pods` are the FineTuneJob's children (by label); `logs` maps a stage to its log tail."""
    pods = list(pods)
    observed = Observed()
    observed.playground_ready = playground_ready(run, pods)
    for job in jobs:
        labels = (job.get("metadata") or {}).get("labels") or {}
        stage = labels.get("finetune.dev/stage")
        if labels.get("finetune.dev/run") != str(run):
            observed.other_runs = True
            continue
        if (job.get("metadata") or {}).get("deletionTimestamp"):
            continue  # going away (suspend, a new run): as good as gone
        mine = [
            p
            for p in pods
            if ((p.get("metadata") or {}).get("labels") or {}).get("job-name") == job["metadata"]["name"]
            or ((p.get("metadata") or {}).get("labels") or {}).get("batch.kubernetes.io/job-name")
            == job["metadata"]["name"]
        ]
        observed.stages[stage] = observe_stage(job, mine, (logs or {}).get(stage), gang=stage == "train")
    return observed


def playground_ready(run: int, pods: Iterable[dict[str, Any]]) -> bool:
    """A pod of the current run's playground Deployment reports Ready (its HTTP probe answers)."""
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get("finetune.dev/stage") != "playground" or labels.get("finetune.dev/run") != str(run):
            continue
        if meta.get("deletionTimestamp"):
            continue
        conditions = (pod.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return True
    return False
