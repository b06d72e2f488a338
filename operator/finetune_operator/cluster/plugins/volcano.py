"""Volcano gang scheduling of the GPU stages that train: schedulerName volcano, a PodGroup with minMember = the
stage's pods (the train workers; the search stage's one pod), and the group annotation on the pods, so all workers
start together or none holds a GPU, and every GPU pod of the job waits in the same Volcano queue."""

from __future__ import annotations

from ..context import BuildContext, StageObjects

GROUP_ANNOTATION = "scheduling.k8s.io/group-name"


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    gang = ctx.job.spec.scheduling.gang
    if gang is None or ctx.stage not in ("search", "train"):
        return
    spec = ctx.job.spec
    group: dict = {"minMember": spec.resources.workers if ctx.stage == "train" else 1}
    if gang.queue:
        group["queue"] = gang.queue
    if spec.scheduling.priority_class_name:
        group["priorityClassName"] = spec.scheduling.priority_class_name
    objs.extra.append(
        {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "PodGroup",
            "metadata": ctx.metadata(ctx.name),
            "spec": group,
        }
    )
    objs.pod["schedulerName"] = "volcano"
    template_meta = objs.job["spec"]["template"]["metadata"]
    template_meta.setdefault("annotations", {})[GROUP_ANNOTATION] = ctx.name
