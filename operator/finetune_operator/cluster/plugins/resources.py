"""CPU, memory and GPUs. prepare and export never request a GPU; train and evaluate request gpusPerWorker.

The CPU request also reaches the stage as FINETUNE_CPUS (the downward API, rounded up): without it torch starts a
math thread per core of the node, which on a shared node oversubscribes the cores the pod was given."""

from __future__ import annotations

from ..context import GPU_STAGES, BuildContext, StageObjects


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    spec = ctx.job.spec.resources
    values = dict(ctx.settings.stage_resources.get(ctx.stage, {}))
    override = getattr(spec, ctx.stage)
    if override is not None:
        values.update({k: v for k, v in (("cpu", override.cpu), ("memory", override.memory)) if v})
    requests = dict(values)
    limits = {k: v for k, v in values.items() if k == "memory"}  # CPU limits only throttle
    if ctx.stage in GPU_STAGES and spec.gpus_per_worker > 0:
        requests[spec.gpu_resource_name] = str(spec.gpus_per_worker)
        limits[spec.gpu_resource_name] = str(spec.gpus_per_worker)
    objs.container["resources"] = {"requests": requests, "limits": limits}
    if "cpu" in requests:
        objs.env("FINETUNE_CPUS", resourceFieldRef={"resource": "requests.cpu", "divisor": "1"})
    if ctx.stage == "train":
        # NCCL and dataloader workers need more shared memory than a container's default 64Mi.
        objs.pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}})
        objs.container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
