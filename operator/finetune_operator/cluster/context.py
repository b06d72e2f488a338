"""What every builder and plugin gets: the job, the stage, the operator's settings, and the objects so far."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.base import API_VERSION, KIND
from ..api.job import FineTuneJob
from ..api.spec import STAGES

CONTAINER = "stage"
WORKSPACE_MOUNT = "/workspace"
CONFIG_MOUNT = "/etc/finetune"
PVC_ROOT = "/mnt/pvc"
GPU_STAGES = ("search", "train", "evaluate")


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
            "search": {"cpu": "8", "memory": "64Gi"},
            "train": {"cpu": "8", "memory": "64Gi"},
            "evaluate": {"cpu": "4", "memory": "32Gi"},
            "export": {"cpu": "4", "memory": "32Gi"},
        }
    )
    poll_seconds: float = 5.0
    """How often the operator reads running train pods' logs and revisits jobs no event will wake."""
    retry_seconds: float = 1.0
    """The first wait before a failed reconcile is retried; it doubles with each failure in a row (up to 60 s)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """The settings the Helm chart passes as FINETUNE_* environment variables (the rest keep defaults)."""
        base = cls()
        resources = {stage: dict(values) for stage, values in base.stage_resources.items()}
        raw = environ.get("FINETUNE_STAGE_RESOURCES")
        if raw:
            for stage, values in _stage_resources(raw).items():
                resources[stage].update(values)
        return cls(
            trainer_image=environ.get("FINETUNE_TRAINER_IMAGE") or base.trainer_image,
            image_pull_policy=environ.get("FINETUNE_IMAGE_PULL_POLICY") or base.image_pull_policy,
            workspace_size=environ.get("FINETUNE_WORKSPACE_SIZE") or base.workspace_size,
            workspace_storage_class=environ.get("FINETUNE_WORKSPACE_STORAGE_CLASS") or None,
            stage_resources=resources,
            poll_seconds=_seconds(environ, "FINETUNE_POLL_SECONDS", base.poll_seconds),
            retry_seconds=_seconds(environ, "FINETUNE_RETRY_SECONDS", base.retry_seconds),
        )


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:  # nan fails too
        raise ValueError(f"{name} must be a number of seconds above 0 and at most 3600 (got {raw!r}), e.g. {default:g}")
    return value


def _stage_resources(raw: str) -> dict[str, dict[str, str]]:
    fix = 'e.g. {"train": {"cpu": "8", "memory": "64Gi"}} (Helm value stageResources)'
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"FINETUNE_STAGE_RESOURCES is not JSON ({exc}); expected {fix}") from None
    stages = STAGES
    if not isinstance(value, dict):
        raise ValueError(f"FINETUNE_STAGE_RESOURCES must be an object; expected {fix}")
    for stage, values in value.items():
        if stage not in stages:
            raise ValueError(f"FINETUNE_STAGE_RESOURCES: unknown stage {stage!r} (one of {', '.join(stages)})")
        if not isinstance(values, dict) or not set(values) <= {"cpu", "memory"}:
            raise ValueError(f"FINETUNE_STAGE_RESOURCES.{stage} takes only cpu and memory; expected {fix}")
    return {stage: {k: str(v) for k, v in values.items()} for stage, values in value.items()}


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
        # No blockOwnerDeletion: it needs `update` on finetunejobs/finalizers (refused where the
        # OwnerReferencesPermissionEnforcement admission plugin runs), and nothing waits on foreground deletion.
    }
