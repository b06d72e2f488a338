"""On the real API server with the test cluster (tests/cluster.py): a 2-worker train job loses a worker pod
mid-training (`kubectl delete pod`); the operator replaces the train Job, both workers resume from the checkpoint,
the job succeeds and the restart is in the FineTuneJob's status with its reason."""

from __future__ import annotations

import json
import re

import pytest

from .cluster import free_port, wait_until
from .conftest import first_word_rows, write_jsonl
from .test_cluster_e2e import NAME, Env, e2e_spec, env  # noqa: F401  (env is the fixture)

STEPS, EVERY = 60, 4  # enough steps that status (log poll, ~2 s behind) shows one past a checkpoint in time


def train_pods(job_env: Env, index: int) -> list[dict]:
    return [p for p in job_env.rest.list("pods", job_env.namespace)
            if (p["metadata"].get("labels") or {}).get("finetune.dev/stage") == "train"
            and p["metadata"]["name"].startswith(f"{NAME}-train-{index}-")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1500)  # prepare, two train attempts of two workers and export on 2 shared cores
def test_deleting_a_train_pod_of_two_workers_restarts_both_from_the_checkpoint_and_succeeds(env: Env):  # noqa: F811
    from finetune_operator.stages.tiny import build_tiny_model

    cluster = env.cluster()
    rows = first_word_rows(160)
    build_tiny_model(cluster.volume("models") / "tiny", [f"{r['instruction']}\n{r['input']}\n{r['output']}"
                                                          for r in rows], preset="micro")  # fmt: skip
    write_jsonl(cluster.volume("data") / "train.jsonl", rows)
    for claim in ("models", "data"):
        env.rest.create("persistentvolumeclaims", env.namespace, {"metadata": {"name": claim}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
    env.operator(through_proxy=False)
    spec = e2e_spec("pvc://models/tiny", "pvc://data/train.jsonl", "pvc://data/train.jsonl", "pvc://models/out")
    spec.update(
        training={"maxSteps": STEPS, "learningRate": 0.005, "batchSize": 8, "loggingSteps": 1,
                  "checkpointEverySteps": EVERY},
        resources={"gpusPerWorker": 0, "workers": 2},
        # Every pod of the test cluster shares this host's loopback, where a real pod has an IP of its own: a port
        # no other test uses keeps worker 0's rendezvous store to this job.
        distributed={"masterPort": free_port()},
        storage={"workspace": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}},
        evaluation={"enabled": False},
        runPolicy={"backoffLimit": 1, "terminationGracePeriodSeconds": 30},
    )  # fmt: skip
    env.apply(spec)

    def worker_1_past_a_checkpoint() -> str | None:
        progress = env.status().get("progress") or {}
        if (progress.get("lastCheckpoint") or {}).get("step", 0) < EVERY:
            return None
        assert progress.get("step", 0) < STEPS - EVERY, f"training ended before the test could delete a pod: {progress}"
        running = [p for p in train_pods(env, 1) if (p.get("status") or {}).get("phase") == "Running"]
        return running[0]["metadata"]["name"] if running else None

    victim = wait_until(worker_1_past_a_checkpoint, 600, "train past its first checkpoint", interval=0.3)
    env.rest.delete("pods", env.namespace, victim)  # as `kubectl delete pod`: SIGTERM, then the grace period
    # The pod stays Terminating while its worker checkpoints (a real kubelet's graceful deletion), then goes.
    wait_until(lambda: not any(p["metadata"]["name"] == victim for p in train_pods(env, 1)), 120,
               "the deleted pod gone after its worker stopped")  # fmt: skip
    try:
        status = env.wait_phase("Succeeded", timeout=900)
    finally:
        print(json.dumps(env.status().get("stages", {}).get("train"), indent=1))

    train = status["stages"]["train"]
    assert train["state"] == "Succeeded" and train["attempts"] == 2, train
    [restart] = train["restarts"]
    # SIGTERM reached the deleted pod's worker: every rank finished its step, saved that step's checkpoint and
    # exited 75, a disruption that costs no retry; the second attempt (a new Job) resumed there. The operator reads
    # the pod that is left, worker 0's: 75, or 143 when the Job controller's SIGTERM (the Job failed with the
    # deleted pod) ended its launcher after its worker had exited 75 (seen once in four runs).
    assert restart["reason"] == "Preempted" and restart["exitCode"] in (75, 143), restart
    assert restart["countsAgainstBackoffLimit"] is False and train.get("retriesUsed", 0) == 0, train
    stopped_at = int(re.search(r"after step (\d+): checkpoint-\1 saved on all 2 worker", restart["message"])[1])
    assert restart["resumeFrom"] == f"checkpoint-{stopped_at}", restart
    assert f"resumed at step {stopped_at}" in train["message"], train
    assert status["progress"]["step"] == STEPS and status["progress"]["lastCheckpoint"]["step"] == STEPS
    # Two workers per attempt and no more: the deleted pod was not replaced inside the failed attempt's Job
    # (podFailurePolicy: a terminating pod is replaced only once failed, and its failure ended that Job).
    trains = [pod for stage, pod in cluster.processes_started if stage == "train"]
    assert len(trains) == 4 and sorted(p.rsplit("-", 1)[0] for p in trains) == [f"{NAME}-train-{i}" for i in
                                                                                  (0, 0, 1, 1)], trains  # fmt: skip
    assert status["phase"] == "Succeeded" and status["artifacts"], status
    # Every pod forked from one warm server: the workers differ only in what is read at run time (their index).
    assert (cluster.launcher.servers_started, cluster.launcher.fresh) == (1, 0), cluster.launcher.why_fresh
