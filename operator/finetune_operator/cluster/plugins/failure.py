"""Retries and fast failure: backoffLimit from runPolicy, and a podFailurePolicy that does not retry what a retry
cannot fix (exit code 3: bad configuration or data; 4: a quality gate failed) but does not count evictions and
other disruptions against the retries."""

from __future__ import annotations

from ...stages.contract import EXIT_CONFIG_ERROR, EXIT_GATE_FAILED
from ..context import CONTAINER, BuildContext, StageObjects


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    spec = objs.job["spec"]
    spec["backoffLimit"] = ctx.job.spec.run_policy.backoff_limit
    spec["podFailurePolicy"] = {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_CONFIG_ERROR, EXIT_GATE_FAILED],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
