"""The shared workspace PVC (created by the operator when spec.storage.workspace.size is given, or by default),
and the PVCs named by pvc:// sources, mounted under /mnt/pvc/<claim> (read-only unless the output is there)."""

from __future__ import annotations

from typing import Any

from ..context import PVC_ROOT, WORKSPACE_MOUNT, BuildContext, StageObjects


def workspace_claim(ctx: BuildContext) -> str:
    workspace = ctx.job.spec.storage.workspace
    return workspace.claim_name if workspace and workspace.claim_name else f"{ctx.job.name}-workspace"


def workspace_pvc(ctx: BuildContext) -> dict[str, Any] | None:
    workspace = ctx.job.spec.storage.workspace
    if workspace and workspace.claim_name:
        return None
    size = workspace.size if workspace and workspace.size else ctx.settings.workspace_size
    modes = list(workspace.access_modes) if workspace else ["ReadWriteOnce"]
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": size}}}
    storage_class = (workspace.storage_class_name if workspace else None) or ctx.settings.workspace_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    metadata = ctx.metadata(workspace_claim(ctx), component="workspace")
    metadata["labels"].pop("finetune.dev/run")  # shared by the runs of the job
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}


def source_claims(ctx: BuildContext) -> dict[str, bool]:
    """Claims named by pvc:// URIs -> whether this stage writes to it."""
    spec = ctx.job.spec
    uris = [spec.model.source, spec.dataset.source, spec.dataset.eval_source or ""]
    if spec.model.tokenizer and spec.model.tokenizer.source:
        uris.append(spec.model.tokenizer.source)
    if spec.training.grpo and spec.training.grpo.reward.source:
        uris.append(spec.training.grpo.reward.source)
    claims = {u.removeprefix("pvc://").split("/", 1)[0]: False for u in uris if u.startswith("pvc://")}
    if spec.output.uri.startswith("pvc://"):
        claim = spec.output.uri.removeprefix("pvc://").split("/", 1)[0]
        claims[claim] = ctx.stage == "export"
        if ctx.stage != "export" and claim not in {u.removeprefix("pvc://").split("/", 1)[0] for u in uris}:
            del claims[claim]
    return claims


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    pvc = workspace_pvc(ctx)
    if pvc is not None:
        objs.extra.append(pvc)
    objs.pod["volumes"].append({"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(ctx)}})
    objs.container["volumeMounts"].append({"name": "workspace", "mountPath": WORKSPACE_MOUNT})
    for index, (claim, writable) in enumerate(sorted(source_claims(ctx).items())):
        volume = f"pvc-{index}"
        objs.pod["volumes"].append(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}}
        )
        objs.container["volumeMounts"].append(
            {"name": volume, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable}
        )
