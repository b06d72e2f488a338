"""On the real API server with the test cluster (tests/cluster.py): a 2-worker train job loses a worker pod
mid-training; the operator replaces the train Job, both workers resume from the checkpoint, the job succeeds and
the restart is in the FineTuneJob's status with its reason."""

from __future__ import annotations

import pytest

from .cluster import wait_until
from .conftest import first_word_rows, write_jsonl
from .test_cluster_e2e import NAME, Env, e2e_spec, env  # noqa: F401  (env is the fixture)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deleting_a_train_pod_of_two_workers_restarts_both_from_the_checkpoint_and_succeeds(env: Env):  # noqa: F811
    from finetune_operator.stages.tiny import build_tiny_model

    cluster = env.cluster()
    rows = first_word_rows(240)
    build_tiny_model(cluster.volume("models") / "tiny", [f"{r['instruction']}\n{r['input']}\n{r['output']}"
                                                          for r in rows], preset="micro")  # fmt: skip
    write_jsonl(cluster.volume("data") / "train.jsonl", rows)
    for claim in ("models", "data"):
        env.rest.create("persistentvolumeclaims", env.namespace, {"metadata": {"name": claim}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
    env.operator(through_proxy=False)
    spec = e2e_spec("pvc://models/tiny", "pvc://data/train.jsonl", "pvc://data/train.jsonl", "pvc://models/out")
    spec.update(
        training={"maxSteps": 30, "learningRate": 0.005, "batchSize": 8, "loggingSteps": 1, "checkpointEverySteps": 5},
        resources={"gpusPerWorker": 0, "workers": 2},
        storage={"workspace": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}},
        evaluation={"enabled": False},
        runPolicy={"backoffLimit": 1, "terminationGracePeriodSeconds": 30},
    )
    spec.pop("export")
    env.apply(spec)

    def training_past_a_checkpoint() -> str | None:
        progress = env.status().get("progress") or {}
        if (progress.get("lastCheckpoint") or {}).get("step", 0) >= 5 and progress.get("step", 0) < 25:
            pods = [p for p in env.rest.list("pods", env.namespace)
                    if p["metadata"].get("labels", {}).get("finetune.dev/stage") == "train"
                    and (p.get("status") or {}).get("phase") == "Running"]  # fmt: skip
            return next((p["metadata"]["name"] for p in pods if p["metadata"]["name"].startswith(f"{NAME}-train-1")),
                        None)  # fmt: skip
        return None

    victim = wait_until(training_past_a_checkpoint, 400, "train past its first checkpoint", interval=0.3)
    env.rest.delete("pods", env.namespace, victim)  # as `kubectl delete pod`: SIGTERM, then the grace period
    status = env.wait_phase("Succeeded", timeout=600)

    train = status["stages"]["train"]
    assert train["attempts"] == 2, train
    [restart] = train["restarts"]
    # The deleted worker's SIGTERM stops both at the same step with a checkpoint (a disruption: no retry used); a
    # worker the test cluster's kubelet SIGKILLs before that checkpoint is done reads as a lost worker.
    assert (restart["reason"], restart["countsAgainstBackoffLimit"]) in (("Preempted", False), ("WorkerLost", True))
    assert restart["resumeFrom"], restart
    assert status["progress"]["step"] == 30 and status["progress"]["lastCheckpoint"]["step"] == 30
    trains = [pod for stage, pod in cluster.processes_started if stage == "train"]
    assert len(trains) >= 4, cluster.processes_started  # two workers, twice
