"""Credentials reach a stage only where it needs them, only as secretKeyRef env or envFrom, never in status:
model and dataset secrets for prepare (it fetches everything once), output secrets for export."""

from __future__ import annotations

from ...api.spec import Credentials
from ...stages.sources import TOKEN_ENV
from ..context import BuildContext, StageObjects


def _mount(objs: StageObjects, kind: str, credentials: Credentials | None) -> None:
    if credentials is None:
        return
    ref = credentials.secret_ref
    if ref.key:
        objs.env(TOKEN_ENV[kind], secretKeyRef={"name": ref.name, "key": ref.key})
    else:
        env_from = objs.container.setdefault("envFrom", [])
        if {"secretRef": {"name": ref.name}} not in env_from:
            env_from.append({"secretRef": {"name": ref.name}})


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    spec = ctx.job.spec
    if ctx.stage == "prepare":
        _mount(objs, "model", spec.model.credentials)
        _mount(objs, "dataset", spec.dataset.credentials)
    if ctx.stage == "export":
        _mount(objs, "output", spec.output.credentials)
