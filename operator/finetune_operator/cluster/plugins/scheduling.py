"""Placement passed through from spec.scheduling: priority, node selector, tolerations, affinity."""

from __future__ import annotations

from ..context import BuildContext, StageObjects


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    scheduling = ctx.job.spec.scheduling
    pod = objs.pod
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = [t.wire() for t in scheduling.tolerations]
    if scheduling.affinity:
        pod["affinity"] = scheduling.affinity
