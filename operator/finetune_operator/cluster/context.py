"""What every builder and plugin gets: the job, the stage, the operator's settings, and the objects so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api.base import API_VERSION, KIND
from ..api.job import FineTuneJob

CONTAINER = "stage"
WORKSPACE_MOUNT = "/workspace"
CONFIG_MOUNT = "/etc/finetune"
PVC_ROOT = "/mnt/pvc"
GPU_STAGES = ("train", "evaluate")


@dataclass(frozen=True)
class OperatorSettings:
    """Cluster-wide defaults (Helm values -> operator environment)."""

    trainer_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    workspace_size: str = "100Gi"
    workspace_storage_class: str | None = None
    stage_resources: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "prepare": {"cpu": "4", "memory": "16Gi"},
            "train": {"cpu": "8", "memory": "64Gi"},
            "evaluate": {"cpu": "4", "memory": "32Gi"},
            "export": {"cpu": "4", "memory": "32Gi"},
        }
    )


@dataclass
class StageObjects:
    """The objects of one stage: its Job first, then whatever the plugins add (ConfigMap, Service, PodGroup...)."""

    job: dict[str, Any]
    extra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pod(self) -> dict[str, Any]:
        return self.job["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        return next(c for c in self.pod["containers"] if c["name"] == CONTAINER)

    def env(self, name: str, value: str | None = None, **source: Any) -> None:
        entry: dict[str, Any] = {"name": name}
        if source:
            entry["valueFrom"] = source
        else:
            entry["value"] = value
        self.container.setdefault("env", []).append(entry)

    def all(self) -> list[dict[str, Any]]:
        return [self.job, *self.extra]


@dataclass(frozen=True)
class BuildContext:
    job: FineTuneJob
    stage: str
    settings: OperatorSettings

    @property
    def name(self) -> str:
        return child_name(self.job, self.stage)

    @property
    def run(self) -> int:
        return self.job.status.run

    @property
    def workdir(self) -> str:
        return f"{WORKSPACE_MOUNT}/run-{self.run}"

    def labels(self, component: str | None = None) -> dict[str, str]:
        return labels(self.job, component or self.stage)

    def owner(self) -> list[dict[str, Any]]:
        return [owner_reference(self.job)]

    def metadata(self, name: str, component: str | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.job.namespace,
            "labels": self.labels(component),
            "ownerReferences": self.owner(),
        }


def child_name(job: FineTuneJob, stage: str) -> str:
    return f"{job.name}-{stage}"


def labels(job: FineTuneJob, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetunejob",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "finetune-operator",
        "app.kubernetes.io/part-of": "finetune-operator",
        "finetune.dev/job": job.name,
        "finetune.dev/stage": component,
        "finetune.dev/run": str(job.status.run),
    }


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid or "00000000-0000-0000-0000-000000000000",
        "controller": True,
        "blockOwnerDeletion": True,
    }
