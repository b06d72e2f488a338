"""kopf handlers: read (indexes of FineTuneJobs, their stage Jobs and pods), call the planner, write.

Event-driven, without kopf daemons or timers (those put a finalizer on every object): any change of a
FineTuneJob, or of one of its stage Jobs or pods, reconciles that FineTuneJob at once, so a stage starts within a
second of the previous Job completing. One background loop reconciles active jobs every few seconds for what has
no event: training progress from the log tail, the active deadline and the TTL after finishing.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import os
import random
import time
from typing import Any

import kopf
from pydantic import ValidationError

from .api.base import GROUP, PLURAL, VERSION
from .api.job import FineTuneJob
from .api.status import ACTIVE_PHASES, FineTuneJobStatus
from .cluster.build import build_stage
from .cluster.context import BuildContext, OperatorSettings, child_name
from .cluster.kube import KubeApi
from .cluster.observe import observe
from .cluster.plugins.storage import workspace_claim, workspace_pvc
from .cluster.telemetry import OperatorMetrics
from .planner import Plan, plan

LABEL = "finetune.dev/job"
POLL_SECONDS = float(os.environ.get("FINETUNE_POLL_SECONDS", "5"))
Key = tuple[str, str]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's own bookkeeping out of .status, which is the operator's contract with users.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.finetune.dev")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    memo.api = memo.get("api") or KubeApi()
    memo.settings = memo.get("settings") or OperatorSettings.from_env(os.environ)
    memo.locks = collections.defaultdict(asyncio.Lock)
    memo.written = {}
    # kopf hands each handler a shallow copy of this memo: share state through mutable containers only.
    memo.indexes = {}
    memo.metrics = memo.get("metrics") or OperatorMetrics(phases=lambda: _phases(memo))
    port = memo.get("metrics_port")
    memo.stop_metrics = memo.metrics.serve(port) if port else None
    memo.poller = asyncio.create_task(_poll(memo))


def _phases(memo: kopf.Memo) -> list[tuple[str, str]]:
    return [(ns, (w.get("status") or {}).get("phase", "Pending")) for (ns, _), w in list(memo.written.items())]


@kopf.on.cleanup()
async def stop_polling(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("poller"):
        memo.poller.cancel()
    if memo.get("stop_metrics"):
        await asyncio.to_thread(memo.stop_metrics)


@kopf.index(GROUP, VERSION, PLURAL)
def finetunejobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, name): dict(body)}


@kopf.index("batch", "v1", "jobs", labels={LABEL: kopf.PRESENT})
def stage_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[LABEL]): dict(body)}


@kopf.index("", "v1", "pods", labels={LABEL: kopf.PRESENT})
def stage_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[LABEL]): dict(body)}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_finetunejob(event: dict[str, Any], namespace: str, name: str, memo: kopf.Memo, **kw: Any) -> None:
    if event.get("type") == "DELETED":
        memo.written.pop((namespace, name), None)
        return  # the children go with their ownerReferences
    await reconcile((namespace, name), memo, kw)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL: kopf.PRESENT})
async def on_stage_job(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kw: Any) -> None:
    await reconcile((namespace, labels[LABEL]), memo, kw)


@kopf.on.event("", "v1", "pods", labels={LABEL: kopf.PRESENT})
async def on_stage_pod(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kw: Any) -> None:
    await reconcile((namespace, labels[LABEL]), memo, kw)


async def _poll(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(POLL_SECONDS)
        if not memo.indexes:
            continue
        for key in list(memo.indexes["finetunejobs"]):
            status = (memo.written.get(key) or {}).get("status") or {}
            if status.get("phase") in (*ACTIVE_PHASES, "Pending") or status.get("completionTime"):
                try:
                    await reconcile(key, memo, memo.indexes)
                except Exception:  # one broken job must not stop the others' progress
                    logging.getLogger(__name__).exception("periodic reconcile of %s failed", key)


def _train_log(api: KubeApi, job: FineTuneJob, pods: list[dict[str, Any]]) -> dict[str, str]:
    """The log tail of worker 0 of the current run's train stage, when it is running."""
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get("finetune.dev/stage") != "train" or labels.get("finetune.dev/run") != str(job.status.run):
            continue
        if (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index", "0") != "0":
            continue
        if (pod.get("status") or {}).get("phase") == "Running":
            tail = api.log_tail(job.namespace, meta["name"])
            return {"train": tail} if tail else {}
    return {}


def _started_but_unseen(api: KubeApi, job: FineTuneJob, stage: str) -> bool:
    """The status says this stage's Job was created, the index has no such Job, but the API server has it."""
    record = getattr(job.status.stages, stage)
    if record is None or record.state != "Running" or not record.job_name:
        return False
    return api.job_exists(job.namespace, child_name(job, stage))


def _current(body: dict[str, Any], written: dict[str, Any] | None) -> dict[str, Any]:
    """The body with the newest status: ours, when the watch has not delivered our last write yet."""
    if written and written.get("uid") == (body.get("metadata") or {}).get("uid"):
        return {**body, "status": written["status"]}
    return body


async def reconcile(key: Key, memo: kopf.Memo, indexes: dict[str, Any]) -> None:
    if {"finetunejobs", "stage_jobs", "stage_pods"} <= indexes.keys():
        memo.indexes.update({k: indexes[k] for k in ("finetunejobs", "stage_jobs", "stage_pods")})
    metrics: OperatorMetrics = memo.metrics
    started = time.monotonic()
    try:
        async with memo.locks[key]:
            await _reconcile(key, memo)
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_seconds.observe(time.monotonic() - started)


async def _reconcile(key: Key, memo: kopf.Memo) -> None:
    bodies = list(memo.indexes["finetunejobs"].get(key, []))
    if not bodies or (bodies[0].get("metadata") or {}).get("deletionTimestamp"):
        return
    body = _current(bodies[0], memo.written.get(key))
    api: KubeApi = memo.api
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError as exc:
        await _refuse(api, key, body, memo, exc)
        return
    jobs = list(memo.indexes["stage_jobs"].get(key, []))
    pods = list(memo.indexes["stage_pods"].get(key, []))
    logs = await asyncio.to_thread(_train_log, api, job, pods)
    result = plan(job, observe(job.status.run, jobs, pods, logs), dt.datetime.now(dt.UTC))
    if result.start and await asyncio.to_thread(_started_but_unseen, api, job, result.start):
        return  # our view of the children lags (a watch resuming after a pause); the Job's event comes next
    await asyncio.to_thread(apply, api, job, result, memo.settings)
    status = result.status.wire()
    previous = (memo.written.get(key) or {}).get("status")
    if status != previous and status != (body.get("status") or None):
        await asyncio.to_thread(api.patch_status, key[0], key[1], status)
    memo.metrics.record(previous or body.get("status"), status, (body.get("metadata") or {}).get("creationTimestamp"))
    memo.written[key] = {"uid": job.uid, "status": status}
    for event in result.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def apply(api: KubeApi, job: FineTuneJob, result: Plan, settings: OperatorSettings) -> None:
    """Carry out a plan: deletions first, then the stage to start."""
    ns = job.namespace
    for stage in result.stop:
        api.delete_stage(ns, child_name(job, stage))
    if result.delete_other_runs:
        api.delete_children(ns, job.name, keep_run=result.status.run)
    if result.cleanup:
        api.delete_children(ns, job.name, keep_run=None)
        ctx = BuildContext(job=job.model_copy(update={"status": result.status}), stage="prepare", settings=settings)
        if workspace_pvc(ctx) is not None:  # only a workspace the operator created is the operator's to delete
            api.delete_workspace(ns, workspace_claim(ctx))
    if result.playground:
        _apply_playground(api, job, result, settings)
    if result.start:
        planned = job.model_copy(update={"status": result.status})
        objects = build_stage(planned, result.start, settings).all()
        # The PVC and the ConfigMap before the Job that mounts them.
        order = {"PersistentVolumeClaim": 0, "ConfigMap": 1, "Service": 2, "PodGroup": 3, "Job": 4}
        for obj in sorted(objects, key=lambda o: order.get(o["kind"], 5)):
            api.create(obj)


def _apply_playground(api: KubeApi, job: FineTuneJob, result: Plan, settings: OperatorSettings) -> None:
    from .cluster.plugins.playground import build_playground, playground_name

    if result.playground == "delete":
        api.delete_playground(job.namespace, playground_name(job))
        return
    planned = job.model_copy(update={"status": result.status})
    order = {"ConfigMap": 0, "Service": 1, "Deployment": 2}
    for obj in sorted(build_playground(planned, settings), key=lambda o: order.get(o["kind"], 3)):
        api.create(obj)


async def _refuse(api: KubeApi, key: Key, body: dict[str, Any], memo: kopf.Memo, exc: ValidationError) -> None:
    """A spec this operator cannot read (an old CRD, a bypassed webhook): say so in status, do nothing else."""
    first = exc.errors()[0]
    where = "spec." + ".".join(str(p) for p in first["loc"][1:]) if first["loc"][:1] == ("spec",) else "spec"
    message = f"the spec cannot be used: {where}: {first['msg']}"
    status = FineTuneJobStatus.model_validate(body.get("status") or {}).wire() if _valid_status(body) else {}
    status.update(phase="Failed", message=message)
    if (memo.written.get(key) or {}).get("status") != status:
        await asyncio.to_thread(api.patch_status, key[0], key[1], status)
        kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
    memo.written[key] = {"uid": (body.get("metadata") or {}).get("uid"), "status": status}


def _valid_status(body: dict[str, Any]) -> bool:
    try:
        FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return False
    return True


def run_operator(
    namespaces: list[str],
    liveness: str | None,
    peering: str | None,
    metrics_port: int | None = None,
    priority: int | None = None,
) -> None:
    """Run the operator until it is stopped (what the operator image's entrypoint calls).

    With a peering name, replicas elect one active operator through kopf peering: the highest priority works,
    the others pause until its peering record expires. Equal priorities would freeze every replica, so each
    process draws its own unless one is given.
    """
    settings = OperatorSettings.from_env(os.environ)  # a bad value stops here, before anything is watched
    kopf.configure(verbose=False)
    if peering and priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness,
        peering_name=peering,
        standalone=peering is None,
        priority=priority,
        memo=kopf.Memo(metrics_port=metrics_port, settings=settings),
    )
