"""The base stage Job and its ConfigMap: the container runs the stage program with the resolved config."""

from __future__ import annotations

from ..stages.contract import StageConfig
from .context import CONFIG_MOUNT, CONTAINER, PVC_ROOT, WORKSPACE_MOUNT, BuildContext, StageObjects

CONFIG_FILE = "config.json"


def config_map_name(ctx: BuildContext) -> str:
    return f"{ctx.name}-config"


def stage_config(ctx: BuildContext) -> StageConfig:
    lineage = ctx.job.status.lineage
    return StageConfig(
        job=ctx.job.name,
        namespace=ctx.job.namespace,
        run=ctx.run,
        spec=ctx.job.spec,
        pvc_root=PVC_ROOT,
        termination_log="/dev/termination-log",
        extra={"lineage": {"configHash": lineage.config_hash if lineage else None}},
    )


def base_stage(ctx: BuildContext) -> StageObjects:
    spec = ctx.job.spec
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.metadata(config_map_name(ctx)),
        "data": {CONFIG_FILE: stage_config(ctx).model_dump_json(by_alias=True, indent=2)},
    }
    container = {
        "name": CONTAINER,
        "image": spec.image or ctx.settings.trainer_image,
        "imagePullPolicy": ctx.settings.image_pull_policy,
        "command": [
            "finetune-operator",
            "stage",
            ctx.stage,
            "--config",
            f"{CONFIG_MOUNT}/{CONFIG_FILE}",
            "--workdir",
            ctx.workdir,
        ],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": f"{WORKSPACE_MOUNT}/.cache/huggingface"},
            *({"name": e.name, "value": e.value} for e in spec.env),
        ],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(ctx)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": ctx.metadata(ctx.name),
        "spec": {
            "template": {"metadata": {"labels": ctx.labels()}, "spec": pod},
        },
    }
    return StageObjects(job=job, extra=[config_map])
