"""Preference data: HH transcripts split at the assistant turn, one prompt/answer join in training and evaluation,
DPO and reward runs through evaluate with their own metrics."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from .conftest import WORDS, local_spec, run_stages, write_jsonl


def number_transcripts(count: int) -> list[dict[str, str]]:
    """HH-RLHF layout whose answers share a prefix ("Assistant: 8" vs "Assistant: 80"), some after a shared turn."""
    rows = []
    for i in range(count):
        n = i % 9 + 1
        head = f"\n\nHuman: what is {n} times {n}?"
        if i % 2:
            head = f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is {n} plus {n}?"
        right, wrong = (str(n * n), str(n * n * 10)) if i % 2 == 0 else (str(n + n), str(n + n) + "0")
        rows.append({"chosen": f"{head}\n\nAssistant: {right}", "rejected": f"{head}\n\nAssistant: {wrong}"})
    return rows


def dpo_spec(model: Path, data: Path, **sections) -> dict:
    spec = local_spec(model, data, dataset={"format": "preference", "columns": {}, "validationFraction": 0.2},
                      training={"objective": "dpo", "maxSteps": 2, "batchSize": 4})  # fmt: skip
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def test_transcripts_whose_answers_share_a_prefix_split_at_the_assistant_turn(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "hh.jsonl", number_transcripts(40))
    run_stages(tmp_path, dpo_spec(micro_model, data), "prepare")
    records = [json.loads(r) for r in load_from_disk(str(tmp_path / "work" / "data" / "train"))["record"]]
    assert records and all(r["prompt"].endswith("\n\nAssistant:") for r in records)
    for r in records:
        right, wrong = r["chosen"].strip(), r["rejected"].strip()
        assert r["chosen"] == f" {right}" and r["rejected"] == f" {wrong}" and wrong.startswith(right)
    assert any("Assistant: hello\n\nHuman:" in r["prompt"] for r in records)  # an earlier shared turn stays


def test_dpo_with_the_default_evaluation_runs_through_evaluate(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "hh.jsonl", number_transcripts(40))
    summary = run_stages(tmp_path, dpo_spec(micro_model, data), "prepare", "train", "evaluate")
    metrics = summary["metrics"]
    assert summary["ok"] is True and set(metrics["tuned"]) == {"perplexity", "loss"}
    assert 1 < metrics["tuned"]["perplexity"] < 1e4 and 1 < metrics["base"]["perplexity"] < 1e4
    assert metrics["train"].keys() == metrics["tuned"].keys()  # the train-set score next to the eval score
    assert summary["summary"].startswith("perplexity")


def _dpo_prompts_and_answers(tmp: Path, caplog) -> tuple[list[str], list[str], list[str]]:
    """What DPOTrainer tokenized for training (decoded), and the TRL warnings it logged."""
    from finetune_operator.stages.contract import StageConfig, Workdir
    from finetune_operator.stages.train import build_trainer, resolve_precision

    work = Workdir(tmp / "work")
    tokenizer = AutoTokenizer.from_pretrained(str(work.tokenizer))
    with caplog.at_level(logging.WARNING):
        trainer = build_trainer(StageConfig.load(tmp / "config.json"), work, tokenizer, resolve_precision("fp32"))
    rows = trainer.train_dataset
    prompts = [tokenizer.decode(x) for x in rows["prompt_ids"]]
    chosen = [tokenizer.decode(x) for x in rows["chosen_ids"]]
    return prompts, chosen, [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()]


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "no-template"])
def test_dpo_trains_on_the_prompt_evaluation_generates_from(tmp_path, micro_model, caplog, template):
    model = micro_model
    if not template:
        model = shutil.copytree(micro_model, tmp_path / "no-template")
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        (model / "chat_template.jinja").unlink(missing_ok=True)
    rows = [{"prompt": f"Give the first word.\n{a} {b}", "chosen": a, "rejected": b}
            for a, b in zip(WORDS, reversed(WORDS), strict=True)]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = dpo_spec(model, data, dataset={"evalSource": str(data)},
                    evaluation={"metrics": ["perplexity", "exactMatch"]})  # fmt: skip
    run_stages(tmp_path, spec, "prepare")
    prompts, chosen, warnings = _dpo_prompts_and_answers(tmp_path, caplog)
    evaluation = load_from_disk(str(tmp_path / "work" / "data" / "eval"))
    by_reference = dict(zip(evaluation["reference"], evaluation["prompt_text"], strict=True))
    assert not warnings  # TRL found every prompt to be a token prefix of prompt + answer
    for prompt, answer in zip(prompts, chosen, strict=True):
        word = answer.removesuffix("<|eos|>")
        assert prompt == by_reference[word]  # the very text evaluation generates from
        if template:
            assert prompt.startswith("<|user|>\nGive the first word.") and prompt.endswith("<|assistant|>\n")
        else:
            assert prompt == f"Give the first word.\n{word} {prompt.split()[-1]}\n"
    # perplexity is measured on the same sequence: the prompt, then the chosen answer and EOS
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "work" / "tokenizer"))
    row = evaluation[0]
    assert tok.decode(row["input_ids"]) == row["prompt_text"] + row["reference"] + "<|eos|>"
    assert tok.decode([t for t in row["labels"] if t != -100]) == row["reference"] + "<|eos|>"


def test_reward_model_is_scored_by_rounded_reward_accuracy(tmp_path, micro_model):
    rows = [{"prompt": f"Give the first word.\n{a} {b}", "chosen": a, "rejected": b}
            for a, b in zip(WORDS, reversed(WORDS), strict=True)]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows[:5])
    held = write_jsonl(tmp_path / "held.jsonl", rows[5:])  # 7 pairs: an accuracy of k/7 has endless decimals
    spec = local_spec(micro_model, data, dataset={"format": "preference", "columns": {}, "evalSource": str(held)},
                      method={"type": "full"}, training={"objective": "reward", "maxSteps": 2, "batchSize": 4},
                      evaluation={"metrics": ["rewardAccuracy"],
                                  "gates": [{"metric": "rewardAccuracy", "min": 0}]})  # fmt: skip
    summary = run_stages(tmp_path, spec, "prepare", "train", "evaluate")
    for which in ("base", "tuned", "train"):
        accuracy = summary["metrics"][which]["rewardAccuracy"]
        assert list(summary["metrics"][which]) == ["rewardAccuracy"] and accuracy == round(accuracy, 6)
    assert summary["gates"][0]["passed"] is True
