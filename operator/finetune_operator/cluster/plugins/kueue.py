"""Kueue: GPU stages go to spec.scheduling.queueName, CPU stages to cpuQueueName. A queued Job is created
suspended and Kueue unsuspends it on admission; the operator never flips a Kueue-managed Job's suspend itself."""

from __future__ import annotations

from ..context import GPU_STAGES, BuildContext, StageObjects

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def queue_for(ctx: BuildContext) -> str | None:
    scheduling = ctx.job.spec.scheduling
    return scheduling.queue_name if ctx.stage in GPU_STAGES else scheduling.cpu_queue_name


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    queue = queue_for(ctx)
    if not queue:
        return
    objs.job["metadata"]["labels"][QUEUE_LABEL] = queue
    objs.job["spec"]["suspend"] = True
