"""The train stage on the micro model: every objective, LoRA/QLoRA/full, resume after a kill, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.stages.contract import parse_line
from finetune_operator.stages.runner import run_stage

from .conftest import first_word_rows, local_spec, output_of, stage_config, write_jsonl

# Real training runs of the ML stack: CI runs them; `-m "not slow"` (the quick loop) leaves them out.
pytestmark = pytest.mark.slow


def run(tmp: Path, spec: dict, *stages: str) -> dict:
    config = stage_config(tmp, spec)
    for stage in stages:
        code = run_stage(stage, config, tmp / "work")
        summary = json.loads((tmp / "work" / "summaries" / f"{stage}.json").read_text())
        assert code == 0, summary
    return summary


def preference_rows(count: int) -> list[dict]:
    rows = first_word_rows(count, seed=3)
    return [{"prompt": f"{r['instruction']}\n{r['input']}", "chosen": r["output"], "rejected": r["input"].split()[-1]}
            for r in rows]  # fmt: skip


def test_full_sft_learns_and_reports_progress(tmp_path, micro_model, capfd):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(200))
    spec = local_spec(micro_model, data, method={"type": "full"},
                      training={"maxSteps": 40, "learningRate": 0.01, "batchSize": 16, "loggingSteps": 5,
                                "checkpointEverySteps": 20})  # fmt: skip
    summary = run(tmp_path, spec, "prepare", "train")
    assert summary["steps"] == 40 and summary["precision"] == "fp32" and summary["artifact"] == "model"
    assert summary["finalLoss"] < 0.6 * summary["firstLoss"], summary
    assert (tmp_path / "work" / "train" / "final" / "model.safetensors").exists()
    assert (tmp_path / "work" / "train" / "final" / "tokenizer.json").exists()
    progress = [r for r in map(parse_line, capfd.readouterr().out.splitlines()) if r and r.get(
        "finetune.dev/progress") == "progress"]  # fmt: skip
    assert [p["step"] for p in progress][-2:] == [35, 40]
    assert {"step", "totalSteps", "epoch", "loss", "learningRate", "tokensPerSecond", "etaSeconds"} <= progress[
        -1
    ].keys()
    assert progress[-1]["totalSteps"] == 40 and progress[-1]["tokensPerSecond"] > 0

    again = run_stage("train", tmp_path / "config.json", tmp_path / "work")
    assert again == 0
    assert "already trained" in json.loads((tmp_path / "work" / "summaries" / "train.json").read_text())["message"]


def test_lora_sft_saves_an_adapter(tmp_path, micro_sp_model):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(80))
    spec = local_spec(micro_sp_model, data, method={"type": "lora", "lora": {"r": 4, "alpha": 8}},
                      training={"maxSteps": 6, "learningRate": 0.01})  # fmt: skip
    summary = run(tmp_path, spec, "prepare", "train")
    final = tmp_path / "work" / "train" / "final"
    assert summary["artifact"] == "adapter"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and (final / "adapter_model.safetensors").exists()


def test_dpo_prefers_the_chosen_answers(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(120))
    spec = local_spec(micro_model, data, dataset={"format": "preference", "columns": {}},
                      training={"objective": "dpo", "maxSteps": 30, "learningRate": 0.01, "batchSize": 8,
                                "dpo": {"beta": 0.5, "maxPromptLength": 24}})  # fmt: skip
    summary = run(tmp_path, spec, "prepare", "train")
    assert summary["objective"] == "dpo" and summary["finalLoss"] < summary["firstLoss"] - 0.03, summary  # ln 2 first
    assert (tmp_path / "work" / "train" / "final" / "adapter_model.safetensors").exists()


def test_reward_model_trains_on_pairs(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(120))
    spec = local_spec(
        micro_model,
        data,
        dataset={"format": "preference", "columns": {}},
        method={"type": "full"},
        training={"objective": "reward", "maxSteps": 60, "learningRate": 0.01, "batchSize": 8},
    )
    summary = run(tmp_path, spec, "prepare", "train")
    config = json.loads((tmp_path / "work" / "train" / "final" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert summary["finalLoss"] < summary["firstLoss"], summary


def test_grpo_with_exact_match_reward(tmp_path, micro_model, capfd):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(40))
    spec = local_spec(micro_model, data,
                      training={"objective": "grpo", "maxSteps": 3, "batchSize": 4, "learningRate": 0.001,
                                "grpo": {"numGenerations": 4, "maxCompletionLength": 6}})  # fmt: skip
    summary = run(tmp_path, spec, "prepare", "train")
    assert summary["objective"] == "grpo" and summary["steps"] == 3
    assert (tmp_path / "work" / "train" / "final" / "adapter_model.safetensors").exists()


def test_qlora_loads_the_base_in_4bit_nf4_on_cpu(tmp_path, micro_model):
    import bitsandbytes as bnb

    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.stages.contract import StageConfig
    from finetune_operator.stages.train import load_base_model, resolve_precision

    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(60))
    spec = local_spec(micro_model, data, resources={"gpusPerWorker": 1},
                      method={"type": "qlora", "quantization": {"bits": 4, "type": "nf4", "computeDtype": "float32"}},
                      training={"maxSteps": 4, "learningRate": 0.01})  # fmt: skip
    config = StageConfig(job="q", spec=FineTuneJobSpec.model_validate(spec))
    model = load_base_model(config, str(micro_model), resolve_precision("auto"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    summary = run(tmp_path, spec, "prepare", "train")
    assert summary["artifact"] == "adapter" and summary["finalLoss"] is not None


def _train_process(launcher: Any, config: Path, work: Path, env: dict | None = None) -> Any:
    """The train stage program as a pod runs it, forked from the session's warm server (`warm_launcher`)."""
    argv = [sys.executable, "-m", "finetune_operator.stages", "train", "--config", str(config), "--workdir", str(work)]
    return launcher.start(argv, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _losses(lines: list[str]) -> dict[int, float]:
    records = [parse_line(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r and r.get("finetune.dev/progress") == "progress"}


@pytest.mark.slow
def test_killed_train_stage_resumes_from_its_checkpoint(tmp_path, micro_model, warm_launcher):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(200))
    spec = local_spec(micro_model, data, method={"type": "full"},
                      training={"maxSteps": 30, "learningRate": 0.005, "batchSize": 8, "loggingSteps": 1,
                                "checkpointEverySteps": 10})  # fmt: skip
    config = stage_config(tmp_path, spec)
    assert run_stage("prepare", config, tmp_path / "work") == 0
    reference_work = tmp_path / "reference"
    import shutil

    shutil.copytree(tmp_path / "work", reference_work)
    reference = _train_process(warm_launcher, config, reference_work)
    reference_losses = _losses(output_of(reference, timeout=600).splitlines())

    proc = _train_process(warm_launcher, config, tmp_path / "work")
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        record = parse_line(line)
        if record and record.get("step", 0) >= 14 and (tmp_path / "work/train/checkpoints/checkpoint-10").exists():
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "work" / "train" / "final").exists()

    resumed = _train_process(warm_launcher, config, tmp_path / "work")
    out = output_of(resumed, timeout=600).splitlines()
    assert resumed.returncode == 0
    summary = json.loads((tmp_path / "work" / "summaries" / "train.json").read_text())
    assert summary["steps"] == 30 and summary["resumedFrom"] == "checkpoint-10"
    after = _losses(out)
    assert min(after) == 11 and max(after) == 30
    # Same data order and state after the resume as in an uninterrupted run.
    for step, loss in after.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-3, abs=1e-3), step


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, micro_model, warm_launcher):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(160))
    spec = local_spec(micro_model, data, method={"type": "lora"},
                      training={"epochs": 1, "maxSteps": None, "batchSize": 8, "learningRate": 0.01})  # fmt: skip
    spec["training"].pop("maxSteps")
    config = stage_config(tmp_path, spec)
    assert run_stage("prepare", config, tmp_path / "work") == 0
    rows = json.loads((tmp_path / "work" / "summaries" / "prepare.json").read_text())["rows"]["train"]
    proc = _train_process(
        warm_launcher,
        config,
        tmp_path / "work",
        {"NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"},
    )
    out = output_of(proc, timeout=600)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "work" / "summaries" / "train.json").read_text())
    assert summary["worldSize"] == 2
    assert summary["steps"] == -(-rows // 16)  # two processes x 8 rows per optimizer step
    assert (tmp_path / "work" / "train" / "final" / "adapter_model.safetensors").exists()
