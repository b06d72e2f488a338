"""The playground (spec.playground): a Deployment and a ClusterIP Service that serve `finetune-operator
playground` on the run's workdir once export succeeded.

It reads the exported artifacts where export staged them (<workspace>/run-N/export/run-N, byte for byte what was
published and digested), the base model and evaluation samples from the same workdir, and gets the stage config
and the final status from its own ConfigMap. The pod is built like a stage pod: the same image, the security and
storage plugins (Pod Security "restricted", no API token, the workspace and pvc:// source claims mounted) and the
same placement; a GPU only when spec.playground.resources.gpus asks for one.
"""

from __future__ import annotations

from typing import Any

import yaml

from ...api.job import FineTuneJob
from ..base import CONFIG_FILE, stage_config
from ..context import CONFIG_MOUNT, CONTAINER, WORKSPACE_MOUNT, BuildContext, OperatorSettings, StageObjects
from . import scheduling, security, storage

COMPONENT = "playground"
PORT = 7860
STATUS_FILE = "status.yaml"
DEFAULT_RESOURCES = {"cpu": "2", "memory": "8Gi"}


def playground_name(job: FineTuneJob) -> str:
    return f"{job.name}-{COMPONENT}"


def url(job: FineTuneJob) -> str:
    return f"http://{playground_name(job)}.{job.namespace}.svc:{PORT}"


def port_forward(job: FineTuneJob) -> str:
    return f"kubectl port-forward -n {job.namespace} svc/{playground_name(job)} {PORT}:{PORT}"


def _selector(job: FineTuneJob) -> dict[str, str]:
    return {"finetune.dev/job": job.name, "finetune.dev/stage": COMPONENT}


def _container(ctx: BuildContext) -> dict[str, Any]:
    spec = ctx.job.spec
    play = spec.playground
    assert play is not None
    workdir = f"{WORKSPACE_MOUNT}/run-{ctx.run}"
    command = ["finetune-operator", "playground", workdir, "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
               "--status", f"{CONFIG_MOUNT}/{STATUS_FILE}", "--tuned", play.tuned,
               "--host", "0.0.0.0", "--port", str(PORT)]  # fmt: skip
    requests = {**DEFAULT_RESOURCES, **{k: v for k, v in (("cpu", play.resources.cpu),
                                                           ("memory", play.resources.memory)) if v}}  # fmt: skip
    limits = {"memory": requests["memory"]}  # CPU limits only throttle
    if play.resources.gpus:
        requests[spec.resources.gpu_resource_name] = limits[spec.resources.gpu_resource_name] = str(play.resources.gpus)
    probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "name": CONTAINER,
        "image": spec.image or ctx.settings.trainer_image,
        "imagePullPolicy": ctx.settings.image_pull_policy,
        "command": command,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": f"{WORKSPACE_MOUNT}/.cache/huggingface"},
            {"name": "GRADIO_TEMP_DIR", "value": "/tmp/gradio"},
            {"name": "GRADIO_ANALYTICS_ENABLED", "value": "False"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            *({"name": e.name, "value": e.value} for e in spec.env),
        ],
        "resources": {"requests": requests, "limits": limits},
        # Loading two models can take minutes on CPU: the startup probe allows 15 minutes before liveness counts.
        "startupProbe": {**probe, "failureThreshold": 90},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def build_playground(job: FineTuneJob, settings: OperatorSettings | None = None) -> list[dict[str, Any]]:
    """ConfigMap (stage config + final status), Deployment and Service of the job's current run."""
    ctx = BuildContext(job=job, stage=COMPONENT, settings=settings or OperatorSettings())
    name = playground_name(job)
    spec = job.spec
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.metadata(name),
        "data": {
            CONFIG_FILE: stage_config(ctx).model_dump_json(by_alias=True, indent=2),
            STATUS_FILE: yaml.safe_dump(job.status.wire(), sort_keys=False),
        },
    }
    pod: dict[str, Any] = {
        "containers": [_container(ctx)],
        "volumes": [{"name": "config", "configMap": {"name": name}}, {"name": "tmp", "emptyDir": {}}],
    }
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.metadata(name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _selector(job)},
            # One pod mounts the workspace at a time (ReadWriteOnce): replace, never surge.
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": ctx.labels()}, "spec": pod},
        },
    }
    objects = StageObjects(job=deployment)
    security.apply(ctx, objects)
    storage.apply(ctx, objects)  # the workspace (read-write: judgements are saved next to the artifacts)
    scheduling.apply(ctx, objects)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.metadata(name),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(job),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    # The workspace PVC exists since prepare: storage.apply lists it for stages, the playground must not own it.
    extra = [o for o in objects.extra if o["kind"] != "PersistentVolumeClaim"]
    return [config_map, deployment, service, *extra]
