"""Build the objects of a stage (and of all stages, for `finetune-operator render`)."""

from __future__ import annotations

from typing import Any

from ..api.job import FineTuneJob
from ..planner import stages_for
from .base import base_stage
from .context import BuildContext, OperatorSettings, StageObjects
from .plugins import PLUGINS


def build_stage(job: FineTuneJob, stage: str, settings: OperatorSettings | None = None) -> StageObjects:
    ctx = BuildContext(job=job, stage=stage, settings=settings or OperatorSettings())
    objects = base_stage(ctx)
    for plugin in PLUGINS:
        plugin(ctx, objects)
    return objects


def render(
    job: FineTuneJob, stages: list[str] | None = None, settings: OperatorSettings | None = None
) -> list[dict[str, Any]]:
    """Every object the operator would create for the job's current run, deduplicated (the workspace PVC once)."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    objects = [o for stage in stages or stages_for(job.spec) for o in build_stage(job, stage, settings).all()]
    if not stages and job.spec.playground and job.spec.playground.enabled:
        from .plugins.playground import build_playground

        objects += build_playground(job, settings)  # created by the operator once export succeeded
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        if key not in seen:
            seen.add(key)
            out.append(obj)
    return out
