"""Acting on the estimate: status.estimate after prepare, the planner's refusal before the train Job holds GPUs,
batchSize: auto, the `estimate` command, and the new fields on the real API server."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import estimate as E
from finetune_operator.api.job import FineTuneJob
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.planner import Observed, ObservedStage, plan

REPO = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LLAMA_8B = E.KNOWN_CONFIGS["meta-llama/llama-3.1-8b"]
PREFLIGHT = {  # what the prepare stage counts: 20k rows, mean 600 tokens, the longest clipped to 2048
    "rows": {"train": 20000},
    "tokens": {"rows": 20000, "mean": 600.0, "max": 3000, "percentiles": {"p99": 1800.0}},
    "packing": None,
}


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": "hf://meta-llama/Llama-3.1-8B"},
        "dataset": {"source": "hf://org/data", "format": "text", "maxSeqLength": 2048},
        "method": {"type": "full"},
        "training": {"epochs": 1, "batchSize": 1, "gradientCheckpointing": True, "gradientAccumulationSteps": 8},
        "resources": {"gpusPerWorker": 1, "gpuMemory": "80Gi"},
        "output": {"uri": "s3://bucket/out"},
    }
    for path, value in overrides.items():
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def _job(spec: dict[str, Any]) -> FineTuneJob:
    return FineTuneJob(
        metadata={"name": "ft", "namespace": "ns", "generation": 1, "uid": "u"},
        spec=FineTuneJobSpec.model_validate(spec),
    )


def _after_prepare(job: FineTuneJob) -> tuple[FineTuneJob, Any]:
    """Run the planner through prepare succeeding with the summary the prepare stage writes."""
    spec = job.spec
    result = E.job_estimate(spec, LLAMA_8B, E.data_shape(spec, PREFLIGHT))
    summary = {"ok": True, "message": "prepared", "estimate": E.status_estimate(result, spec, LLAMA_8B, "config.json")}
    first = plan(job, Observed(), NOW)
    assert first.start == "prepare"
    job.status = first.status
    done = ObservedStage(exists=True, succeeded=True, summary=summary, completion_time="2026-01-01T00:00:00Z")
    return job, plan(job, Observed(stages={"prepare": done}), NOW + dt.timedelta(seconds=5))


def test_planner_refuses_an_8b_full_fine_tune_on_one_80gb_gpu_before_the_train_job_exists():
    _, decision = _after_prepare(_job(_spec()))
    status = decision.status
    assert decision.start is None  # no train Job, no GPU held
    assert status.phase == "Failed"
    assert status.estimate is not None and status.estimate.fits is False
    assert status.estimate.memory_per_gpu_gi_b > 80
    assert "optimizer states" in status.message  # the biggest term (2 x fp32 per weight) is named ...
    assert "fsdp" in status.message and "qlora" in status.message  # ... and the fixes
    reasons = {c.type: c.reason for c in status.conditions}
    assert reasons["Failed"] == "InsufficientGpuMemory"
    assert any(e.reason == "InsufficientGpuMemory" and e.type == "Warning" for e in decision.events)
    assert any(e.reason == "Estimated" for e in decision.events)


def test_planner_accepts_the_same_run_with_fsdp_over_8_gpus():
    spec = _spec(**{"resources.gpusPerWorker": 8, "distributed.strategy": "fsdp"})
    _, decision = _after_prepare(_job(spec))
    assert decision.start == "train"
    estimate = decision.status.estimate
    assert estimate.fits is True and estimate.world_size == 8
    assert estimate.memory_per_gpu_gi_b < 80
    assert estimate.steps == 20000 // (1 * 8 * 8) + 1  # 20k sequences / (micro 1 x accumulation 8 x 8 GPUs)


def test_planner_re_estimates_when_resources_change_after_prepare():
    _, decision = _after_prepare(_job(_spec()))
    assert decision.status.phase == "Failed"
    # The same prepared data on 8 GPUs with FSDP: resources do not start a new run, the estimate is redone.
    fresh = _job(_spec(**{"resources.gpusPerWorker": 8, "distributed.strategy": "fsdp"}))
    _, decision = _after_prepare(fresh)
    assert decision.status.estimate.fits and decision.start == "train"


def test_a_known_gpu_in_the_node_selector_gives_the_memory():
    spec = _spec(**{"resources.gpuMemory": None, "scheduling.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"}})
    spec["resources"].pop("gpuMemory")
    spec["method"] = {"type": "lora"}
    spec["model"]["dtype"] = "bfloat16"
    _, decision = _after_prepare(_job(spec))
    estimate = decision.status.estimate
    assert estimate.gpu_memory_gi_b == pytest.approx(22.49, abs=0.01) and estimate.gpu == "L4"
    assert estimate.fits is True  # LoRA on 8B bf16 (15 GiB) with checkpointing, one 2048-token sequence
    spec["training"]["batchSize"] = 4  # four sequences: their 4 x 2048 x 128k fp32 logits no longer fit
    _, decision = _after_prepare(_job(spec))
    assert decision.status.estimate.fits is False
    message = decision.status.message
    assert "model weights" in message and "qlora" in message and "smaller spec.training.batchSize" in message
    assert len(estimate.time_hours) == 2 and estimate.time_hours[0] < estimate.time_hours[1]


def test_batch_size_auto_keeps_the_effective_batch():
    spec = _spec(**{"training.batchSize": "auto", "training.effectiveBatchSize": 64, "method": {"type": "qlora",
                    "quantization": {"bits": 4}}})  # fmt: skip
    spec["training"].pop("gradientAccumulationSteps")
    job, decision = _after_prepare(_job(spec))
    estimate = decision.status.estimate
    assert decision.start == "train"
    assert estimate.micro_batch > 1  # QLoRA with checkpointing leaves room on 80 GiB
    assert estimate.micro_batch * estimate.gradient_accumulation_steps == 64
    assert estimate.effective_batch_size == 64
    # the largest power of two that fits: twice as much would not
    arch = E.Architecture.from_config(LLAMA_8B)
    plan_ = E.plan_from_spec(job.spec, seq_len=2048, micro_batch=estimate.micro_batch * 2)
    assert not E.estimate(arch, plan_).fits(80 * 1024**3)
    # on 4 GPUs the same effective batch is split across them
    micro, accumulation = E.auto_batch(64, 4, 16)
    assert (micro, accumulation) == (16, 1)
    assert E.auto_batch(64, 4, 4) == (4, 4)
    assert E.auto_batch(48, 1, 32) == (24, 2)  # the micro-batch divides the per-GPU share exactly


def test_batch_size_auto_needs_effective_batch_size():
    from finetune_operator.api.validation import validate_object

    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
                "spec": _spec(**{"training.batchSize": "auto"})}  # fmt: skip
    _, problems = validate_object(manifest, target="cluster")
    assert any(p.path == "spec.training.effectiveBatchSize" for p in problems if p.severity == "error")
    manifest["spec"]["training"]["batchSize"] = "big"
    _, problems = validate_object(manifest, target="cluster")
    assert any("batchSize" in p.path for p in problems if p.severity == "error")


def test_estimate_command_reads_a_local_config_and_refuses_what_cannot_fit(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
                "spec": _spec(**{"model.source": str(model), "dataset.source": str(tmp_path / "d.jsonl"),
                                 "output.uri": str(tmp_path / "out")})}  # fmt: skip
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    cmd = [sys.executable, "-m", "finetune_operator", "estimate", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "DOES NOT FIT" in done.stdout and "optimizer states" in done.stdout
    done = subprocess.run([*cmd, "--json", "--gpu-memory", "640Gi"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fits"] is True


def test_examples_estimate_offline_from_the_table():
    for example in ("lora-sft-llama-8b-kueue.yaml", "qlora-mistral-7b.yaml", "dpo-preference-pairs.yaml"):
        cmd = [sys.executable, "-m", "finetune_operator", "estimate", str(REPO / "examples" / example), "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["configSource"] == "table of common architectures"
        assert 1 < summary["memoryPerGpuGiB"] < 80


def test_new_fields_are_accepted_by_the_real_api_server(crd_installed, namespace):
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "auto", "namespace": namespace},
        "spec": _spec(**{"training.batchSize": "auto", "training.effectiveBatchSize": 32}),
    }  # fmt: skip
    manifest["spec"]["output"]["uri"] = "s3://bucket/out"
    done = crd_installed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert done.returncode == 0, done.stderr
    stored = json.loads(crd_installed.kubectl("get", "ftj", "auto", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["training"]["batchSize"] == "auto" and stored["spec"]["resources"]["gpuMemory"] == "80Gi"
    manifest["metadata"]["name"] = "bad"
    manifest["spec"]["training"]["batchSize"] = "huge"
    done = crd_installed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert done.returncode != 0 and "batchSize is a number of sequences from 1 to 4096, or auto" in done.stderr
    manifest["metadata"]["name"] = "noeff"
    manifest["spec"]["training"]["batchSize"] = "auto"
    manifest["spec"]["training"].pop("effectiveBatchSize")
    done = crd_installed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert done.returncode != 0 and "effectiveBatchSize" in done.stderr


def test_an_out_of_memory_recovery_is_recorded_in_status_with_a_warning_event():
    spec = _spec(**{"resources.gpusPerWorker": 8, "distributed.strategy": "fsdp"})
    job, decision = _after_prepare(_job(spec))
    job.status = decision.status
    prepare = ObservedStage(exists=True, succeeded=True, summary={"ok": True, "message": "prepared"})
    recovery = {"atStep": 200, "microBatch": 1, "gradientAccumulationSteps": 16}
    train = ObservedStage(
        exists=True, succeeded=True, completion_time="2026-01-01T01:00:00Z",
        summary={"ok": True, "message": "trained", "steps": 400, "microBatch": 1, "gradientAccumulationSteps": 16,
                 "oomRecoveries": [recovery]},
    )  # fmt: skip
    after = plan(job, Observed(stages={"prepare": prepare, "train": train}), NOW + dt.timedelta(hours=1))
    estimate = after.status.estimate
    assert [r.wire() for r in estimate.oom_recoveries] == [recovery]
    assert (estimate.micro_batch, estimate.gradient_accumulation_steps) == (1, 16)
    warning = [e for e in after.events if e.reason == "OutOfMemoryRecovered"]
    assert warning and "step 200" in warning[0].message and warning[0].type == "Warning"
