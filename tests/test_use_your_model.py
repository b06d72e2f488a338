"""The exported model, used the way its users will: the standard generate call and pipeline() on every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def exported(exported_lora_run) -> Path:
    """conftest's LoRA run of the micro model, exported as adapter, merged and ONNX (only read here)."""
    return exported_lora_run


def samples(out: Path) -> list[dict]:
    lines = (out / ".work" / "run-1" / "evaluate" / "samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def load(fmt: str, out: Path):
    from transformers import AutoModelForCausalLM

    if fmt == "merged":
        return AutoModelForCausalLM.from_pretrained(out / "merged")
    if fmt == "adapter":
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    from optimum.onnxruntime import ORTModelForCausalLM

    return ORTModelForCausalLM.from_pretrained(out / "onnx")


@pytest.mark.parametrize("fmt", ["merged", "adapter", "onnx"])
def test_the_standard_generate_call_gives_what_evaluate_scored(exported, fmt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported / fmt)
    assert "token_type_ids" not in tok.model_input_names
    model = load(fmt, exported)
    expected = samples(exported)
    assert any(s["tuned"] for s in expected), "the tuned model generated nothing: the comparison would be empty"
    for sample in expected:
        encoded = tok(sample["prompt"], return_tensors="pt")
        assert set(encoded) == {"input_ids", "attention_mask"}
        ids = model.generate(**encoded, max_new_tokens=4, do_sample=False)
        completion = tok.decode(ids[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert completion == sample["tuned"], sample["prompt"]


@pytest.mark.parametrize("fmt", ["merged", "onnx"])
def test_pipeline_gives_what_evaluate_scored(exported, fmt):
    from transformers import AutoTokenizer, pipeline

    generator = pipeline(
        "text-generation", model=load(fmt, exported), tokenizer=AutoTokenizer.from_pretrained(exported / fmt)
    )
    for sample in samples(exported):
        result = generator(sample["prompt"], max_new_tokens=4, do_sample=False, return_full_text=False)
        assert result[0]["generated_text"].strip() == sample["tuned"], sample["prompt"]


def test_pipeline_from_the_merged_folder_alone(exported):
    """`pipeline(model=PATH)`: the folder carries everything (config, weights, tokenizer, generation config)."""
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(exported / "merged"))
    sample = samples(exported)[0]
    result = generator(sample["prompt"], max_new_tokens=4, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"].strip() == sample["tuned"]
