"""Retries and fast failure, by the exit-code taxonomy of stages/contract.py.

Every stage: a podFailurePolicy fails at once what a retry cannot fix (3: bad configuration or data; 4: a quality
gate failed; 5: a bug in our code), and the pods get spec.runPolicy.terminationGracePeriodSeconds to stop (train
saves a checkpoint at the current step in it).

prepare, evaluate and export are single pods: the Job retries them (backoffLimit from runPolicy) and does not
count disruptions (DisruptionTarget: eviction, preemption, node drain or shutdown) against the retries.

train is a gang: a Job that replaced one worker pod alone would leave it unable to rejoin the others' rendezvous.
So the train Job gets backoffLimit 0 and fails as a whole on the first failed pod (the Job controller then stops
the other workers); the operator records the attempt in the FineTuneJob status and creates a new train Job, whose
workers all resume from the newest complete checkpoint. The operator, not the Job, counts retries against
backoffLimit, and a disruption or a SIGTERM'd attempt (exit 75) costs none (see planner._restart_gang)."""

from __future__ import annotations

from ...stages.contract import NON_RETRYABLE_EXIT_CODES
from ..context import CONTAINER, BuildContext, StageObjects

DISRUPTED = {"type": "DisruptionTarget", "status": "True"}


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    spec = objs.job["spec"]
    run_policy = ctx.job.spec.run_policy
    objs.pod["terminationGracePeriodSeconds"] = run_policy.termination_grace_period_seconds
    fail_fast = {
        "action": "FailJob",
        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(NON_RETRYABLE_EXIT_CODES)},
    }
    if ctx.stage == "train":
        spec["backoffLimit"] = 0
        spec["podFailurePolicy"] = {"rules": [fail_fast, {"action": "FailJob", "onPodConditions": [DISRUPTED]}]}
        return
    spec["backoffLimit"] = run_policy.backoff_limit
    spec["podFailurePolicy"] = {"rules": [fail_fast, {"action": "Ignore", "onPodConditions": [DISRUPTED]}]}
