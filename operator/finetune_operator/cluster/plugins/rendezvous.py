"""Multi-node training: the train stage is an Indexed Job (completions = parallelism = workers); with more than
one worker a headless Service and the pods' subdomain make worker 0 reachable as <job>-train-0.<service>, and every
worker gets the rendezvous environment the stage program reads (see stages/distributed.py)."""

from __future__ import annotations

from ..context import BuildContext, StageObjects


def service_name(ctx: BuildContext) -> str:
    return ctx.name


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    if ctx.stage != "train":
        objs.job["spec"].update(completions=1, parallelism=1)
        return
    spec = ctx.job.spec
    workers = spec.resources.workers
    nproc = max(spec.resources.gpus_per_worker, 1)
    port = spec.distributed.master_port
    job_spec = objs.job["spec"]
    job_spec.update(completionMode="Indexed", completions=workers, parallelism=workers)
    master = "127.0.0.1"
    if workers > 1:
        objs.pod["subdomain"] = service_name(ctx)
        master = f"{ctx.name}-0.{service_name(ctx)}"
        objs.extra.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": ctx.metadata(service_name(ctx)),
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,  # workers rendezvous before any of them is Ready
                    "selector": {
                        "finetune.dev/job": ctx.job.name,
                        "finetune.dev/stage": "train",
                        "finetune.dev/run": str(ctx.run),
                    },
                    "ports": [{"name": "rendezvous", "port": port, "targetPort": port}],
                },
            }
        )
        objs.container["ports"] = [{"name": "rendezvous", "containerPort": port}]
    objs.env("MASTER_ADDR", master)
    objs.env("MASTER_PORT", str(port))
    objs.env("NNODES", str(workers))
    objs.env("NPROC_PER_NODE", str(nproc))
    objs.env("WORLD_SIZE", str(workers * nproc))
    objs.env("NODE_RANK", fieldRef={"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"})
