"""The train stage sizes its batch from the estimate (batchSize: auto) and survives CUDA out-of-memory by halving
the micro-batch, doubling accumulation and resuming from its last checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import first_word_rows, local_spec, run_stages, write_jsonl


def test_halving_keeps_the_effective_batch():
    from finetune_operator.stages.train import halve_batch

    first = halve_batch({"microBatch": 8, "gradientAccumulationSteps": 2}, at_step=10)
    assert (first["microBatch"], first["gradientAccumulationSteps"]) == (4, 4)
    odd = halve_batch({"microBatch": 6, "gradientAccumulationSteps": 1}, at_step=0)
    assert odd["microBatch"] * odd["gradientAccumulationSteps"] == 6 and odd["microBatch"] == 3
    assert halve_batch(first, 12)["oomRecoveries"][-1] == {
        "atStep": 12,
        "microBatch": 2,
        "gradientAccumulationSteps": 8,
    }


@pytest.mark.slow
def test_prepare_records_the_estimate_and_train_uses_the_auto_batch(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(60))
    spec = local_spec(micro_model, data, training={"batchSize": "auto", "effectiveBatchSize": 8, "maxSteps": 2},
                      resources={"gpuMemory": "1Gi"})  # fmt: skip
    prepared = run_stages(tmp_path, spec, "prepare")
    estimate = prepared["estimate"]
    assert estimate["fits"] is True and estimate["configSource"] == "config.json"
    assert estimate["microBatch"] * estimate["gradientAccumulationSteps"] == 8
    assert estimate["microBatch"] == 8  # the micro model fits 8 sequences in 1 GiB many times over
    assert (tmp_path / "work" / "reports" / "estimate.json").exists()
    trained = run_stages(tmp_path, spec, "train")
    assert (trained["microBatch"], trained["gradientAccumulationSteps"]) == (8, 1)


@pytest.mark.slow
def test_injected_out_of_memory_resumes_from_the_checkpoint_with_half_the_micro_batch(
    tmp_path, micro_model, monkeypatch
):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(120))
    training = {"maxSteps": 6, "batchSize": 4, "gradientAccumulationSteps": 2, "checkpointEverySteps": 2,
                "learningRate": 0.01, "loggingSteps": 1}  # fmt: skip
    spec = local_spec(micro_model, data, method={"type": "full"}, training=training)
    run_stages(tmp_path / "plain", spec, "prepare")
    shutil.copytree(tmp_path / "plain", tmp_path / "oom")  # the same prepared data for both runs
    baseline = run_stages(tmp_path / "plain", spec, "train")

    monkeypatch.setenv("FINETUNE_INJECT_OOM_AT_STEP", "3")
    recovered = run_stages(tmp_path / "oom", spec, "train")
    assert recovered["steps"] == 6
    assert recovered["oomRecoveries"] == [{"atStep": 2, "microBatch": 2, "gradientAccumulationSteps": 4}]
    assert (recovered["microBatch"], recovered["gradientAccumulationSteps"]) == (2, 4)
    assert "recovered from 1 CUDA out-of-memory error" in recovered["message"]
    state = json.loads((tmp_path / "oom" / "work" / "train" / "checkpoints" / "checkpoint-6" / "trainer_state.json")
                       .read_text())  # fmt: skip
    assert state["train_batch_size"] == 2
    # Same effective batch, same data order: the run ends where the uninterrupted one did.
    assert recovered["finalLoss"] == pytest.approx(baseline["finalLoss"], rel=0.05)
