"""GitOps health: the chart's Argo CD Lua check and Flux's kstatus rules, over statuses the real planner writes.

The Lua runs in a real Lua 5.1 interpreter (lupa) as Argo CD runs a health customization: the script body
with the live object as the global `obj`, returning a table with `status` and `message`.
"""

from __future__ import annotations

from typing import Any

import pytest
from lupa.lua51 import LuaRuntime  # Argo CD runs health checks in gopher-lua, a Lua 5.1

from .conftest import REPO
from .test_planner import RUNNING, SUMMARIES, ObservedStage, done, make_job, step

LUA_FILE = REPO / "charts" / "finetune-operator" / "files" / "argocd-health.lua"


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval("function(obj) " + LUA_FILE.read_text() + "\nend")
    result = check(lua.table_from(obj, recursive=True))
    return result["status"], result["message"]


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus's generic rules for custom resources (what Flux's health checks use)."""
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        return "InProgress"
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    if conditions.get("Stalled") == "True":
        return "Failed"
    return "Current"


def as_object(job) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": job.name, "namespace": job.namespace, "generation": job.generation},
        "status": job.status.wire(),
    }


def scenario(name: str) -> dict[str, Any]:
    job = make_job()
    if name == "new":
        return {**as_object(job), "status": None}
    step(job)
    if name == "queued":
        step(job, {"prepare": ObservedStage(exists=True, queued=True)})
    if name in ("training", "suspended", "succeeded", "failed", "gate-failed", "changed-after-success"):
        step(job, {"prepare": done("prepare"), "train": RUNNING})
    if name == "suspended":
        job.spec.run_policy.suspend = True
        step(job, {"prepare": done("prepare"), "train": RUNNING})
    if name == "failed":
        failed = ObservedStage(exists=True, failed=True, attempts=3, message="BackoffLimitExceeded: CUDA out of memory")
        step(job, {"prepare": done("prepare"), "train": failed})
    if name == "gate-failed":
        gate = {"ok": False, "reason": "GateFailed", "message": "quality gate failed: exactMatch = 0.1 (needs min 0.5)",
                "metrics": {"tuned": {"exactMatch": 0.1}}, "gatesPassed": False,
                "gates": [{"metric": "exactMatch", "value": 0.1, "min": 0.5, "passed": False}]}  # fmt: skip
        step(
            job,
            {s: done(s) for s in ("prepare", "train")} | {"evaluate": ObservedStage(True, failed=True, summary=gate)},
        )
    if name in ("succeeded", "changed-after-success"):
        step(job, {s: done(s) for s in SUMMARIES})
    obj = as_object(job)
    if name == "changed-after-success":
        obj["metadata"]["generation"] = 2  # a GitOps commit changed the spec; the operator has not seen it yet
    return obj


CASES = [
    ("new", "Progressing", "Waiting for the operator", "InProgress"),
    ("pending", "Progressing", "prepare", "InProgress"),
    ("queued", "Suspended", "prepare: waiting for admission", "InProgress"),
    ("training", "Progressing", "train", "InProgress"),
    ("suspended", "Suspended", "suspend", "Current"),
    ("failed", "Degraded", "CUDA out of memory", "Failed"),
    ("gate-failed", "Degraded", "exactMatch = 0.1", "Failed"),
    ("succeeded", "Healthy", "exactMatch 0.9 (base 0)", "Current"),
    ("changed-after-success", "Progressing", "generation 2", "InProgress"),
]


@pytest.mark.parametrize(("name", "health", "message", "flux"), CASES, ids=[c[0] for c in CASES])
def test_health_of_each_state(name: str, health: str, message: str, flux: str):
    obj = scenario(name)
    assert argocd_health(obj)[0] == health
    assert message in argocd_health(obj)[1]
    if obj["status"] is not None:
        assert kstatus(obj) == flux
