"""Evaluate (base vs tuned, gates) and export (adapter, merged, ONNX, Triton, KServe, protobuf serving config)."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import text_format

from finetune_operator.serving import serving_config_pb2, triton_model_config_pb2
from finetune_operator.stages.contract import EXIT_CONFIG_ERROR, EXIT_GATE_FAILED
from finetune_operator.stages.export import digest
from finetune_operator.stages.runner import run_stage

from .conftest import first_word_rows, local_spec, stage_config, write_jsonl

# Real training runs of the ML stack: CI runs them; `-m "not slow"` (the quick loop) leaves them out.
pytestmark = pytest.mark.slow

LEARN = {"maxSteps": 600, "learningRate": 0.005, "batchSize": 16, "loggingSteps": 100, "checkpointEverySteps": 1000}
METRICS = {"metrics": ["perplexity", "exactMatch", "bleu", "rougeL"], "generation": {"maxNewTokens": 4}}


def _results(work: Path, stage: str) -> dict:
    return json.loads((work / "summaries" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_model) -> Path:
    """A full fine-tune of the micro model on the first-word task (prepared + trained once for the module)."""
    tmp = tmp_path_factory.mktemp("learned")
    data = write_jsonl(tmp / "d.jsonl", first_word_rows(400))
    spec = local_spec(micro_model, data, method={"type": "full"}, dataset={"validationFraction": 0.1},
                      training=LEARN, evaluation=METRICS)  # fmt: skip
    config = stage_config(tmp, spec)
    for stage in ("prepare", "train"):
        assert run_stage(stage, config, tmp / "work") == 0
    return tmp


def _with(trained: Path, tmp: Path, **changes) -> tuple[Path, Path]:
    """A copy of the trained workdir and a config with changed sections (same model, data, training)."""
    work = shutil.copytree(trained / "work", tmp / "work")
    spec = json.loads((trained / "config.json").read_text())["spec"]
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value}
    return stage_config(tmp, spec), work


def test_tuned_model_beats_the_base_model(trained, tmp_path):
    config, work = _with(
        trained,
        tmp_path,
        evaluation={"gates": [{"metric": "exactMatch", "min": 0.5}, {"metric": "perplexity", "max": 2.0}]},
    )
    assert run_stage("evaluate", config, work) == 0
    summary = _results(work, "evaluate")
    base, tuned = summary["metrics"]["base"], summary["metrics"]["tuned"]
    assert base["exactMatch"] == 0.0 and tuned["exactMatch"] >= 0.8
    assert tuned["perplexity"] < base["perplexity"] / 10
    assert tuned["bleu"] >= base["bleu"] and tuned["rougeL"] > base["rougeL"]  # one-word answers: no 4-grams
    assert summary["gatesPassed"] is True and [g["passed"] for g in summary["gates"]] == [True, True]
    assert summary["summary"].startswith("exactMatch")
    # The same metrics on as many training rows, next to the eval score: memorisation would show as a gap.
    train = summary["metrics"]["train"]
    assert train.keys() == tuned.keys() and train["exactMatch"] >= 0.8
    assert f"train {train['exactMatch']:.4g}" in summary["summary"]
    samples = [json.loads(line) for line in (work / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and {"prompt", "reference", "base", "tuned"} <= samples[0].keys()
    assert sum(s["tuned"] == s["reference"] for s in samples) >= 8


def test_failed_gate_fails_the_stage_and_blocks_export(trained, tmp_path):
    config, work = _with(
        trained, tmp_path, evaluation={"compareBase": False, "gates": [{"metric": "perplexity", "max": 1.0}]}
    )
    assert run_stage("evaluate", config, work) == EXIT_GATE_FAILED
    summary = _results(work, "evaluate")
    assert summary["ok"] is False and summary["reason"] == "GateFailed"
    assert (
        summary["message"].startswith("quality gate failed: perplexity = ") and "(needs max 1.0)" in summary["message"]
    )
    assert "base" not in json.loads((work / "evaluate" / "results.json").read_text())
    assert run_stage("export", config, work) == EXIT_CONFIG_ERROR
    assert "quality gates failed" in _results(work, "export")["message"]


@pytest.fixture(scope="module")
def lora_exported(tmp_path_factory, micro_model) -> Path:
    """A LoRA run exported in every format with a Triton repository and dynamic int8."""
    tmp = tmp_path_factory.mktemp("exported")
    data = write_jsonl(tmp / "d.jsonl", first_word_rows(120))
    spec = local_spec(micro_model, data, method={"type": "lora", "lora": {"r": 8, "alpha": 16}},
                      training={"maxSteps": 20, "learningRate": 0.01},
                      evaluation={"metrics": ["perplexity"], "maxSamples": 8},
                      export={"formats": ["adapter", "merged", "onnx"], "onnx": {"quantize": "dynamic-int8"},
                              "serving": {"runtime": "triton", "name": "words",
                                          "batching": {"maxBatchSize": 4, "preferredBatchSizes": [2, 4]}}},
                      output={"uri": str(tmp / "published")})  # fmt: skip
    config = stage_config(tmp, spec, name="words-job")
    for stage in ("prepare", "train", "evaluate", "export"):
        assert run_stage(stage, config, tmp / "work") == 0, stage
    return tmp


def test_every_artifact_is_published_with_its_digest(lora_exported):
    summary = _results(lora_exported / "work", "export")
    names = [a["name"] for a in summary["artifacts"]]
    assert names == ["adapter", "merged", "onnx", "onnx-int8", "triton-repository", "serving-config"]
    for artifact in summary["artifacts"]:
        path = Path(artifact["uri"])
        assert path.exists() and path.is_relative_to(lora_exported / "published")
        assert digest(path) == (artifact["sha256"], artifact["sizeBytes"])
    published = lora_exported / "published"
    assert (published / "adapter" / "adapter_model.safetensors").exists()
    assert (published / "merged" / "model.safetensors").exists() and (published / "merged" / "tokenizer.json").exists()
    assert (published / "onnx-int8" / "model_quantized.onnx").stat().st_size < (
        published / "onnx" / "model.onnx"
    ).stat().st_size


def test_merged_model_equals_base_plus_adapter(lora_exported):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    published = lora_exported / "published"
    sources = json.loads((lora_exported / "work" / "sources.json").read_text())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sources["model"]["path"]),
                                             str(published / "adapter")).eval()  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(published / "merged").eval()
    ids = torch.tensor([[5, 9, 30, 41, 7, 12]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-4)


def test_onnx_logits_agree_with_pytorch(lora_exported):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    published = lora_exported / "published"
    check = _results(lora_exported / "work", "export")["onnxCheck"]
    assert check["passed"] and check["maxAbsDiff"] < 1e-3
    # An independent check: prompt of 7 tokens, empty cache, batch of 1.
    model = AutoModelForCausalLM.from_pretrained(published / "merged").eval()
    session = ort.InferenceSession(str(published / "onnx" / "model.onnx"))
    ids = np.array([[3, 17, 25, 8, 40, 11, 2]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for node in session.get_inputs():
        if node.name.startswith("past_key_values"):
            feeds[node.name] = np.zeros((1, node.shape[1], 0, node.shape[3]), dtype=np.float32)
        elif node.name == "position_ids":
            feeds[node.name] = np.arange(ids.shape[1])[None]
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-3


def test_triton_config_matches_the_onnx_graph(lora_exported):
    repo = lora_exported / "published" / "triton" / "words"
    config = text_format.Parse((repo / "config.pbtxt").read_text(), triton_model_config_pb2.ModelConfig())
    assert config.name == "words" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    graph = onnx.load(str(repo / "1" / "model.onnx"), load_external_data=False).graph
    onnx_types = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}

    def shape(value) -> list[int]:  # Triton leaves the batch dimension out when max_batch_size > 0
        dims = value.type.tensor_type.shape.dim[1:]
        return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]

    for triton_side, onnx_side in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in triton_side] == [v.name for v in onnx_side]
        for tensor, value in zip(triton_side, onnx_side, strict=True):
            assert list(tensor.dims) == shape(value), tensor.name
            assert (
                triton_model_config_pb2.DataType.Name(tensor.data_type) == onnx_types[value.type.tensor_type.elem_type]
            )
    assert {"input_ids", "attention_mask"} <= {t.name for t in config.input}
    assert "logits" in {t.name for t in config.output}


def test_serving_config_round_trips_and_matches_the_files(lora_exported):
    published = lora_exported / "published"
    binary = serving_config_pb2.ServingConfig()
    binary.ParseFromString((published / "serving-config.pb").read_bytes())
    text = text_format.Parse((published / "serving-config.pbtxt").read_text(), serving_config_pb2.ServingConfig())
    assert binary == text
    assert binary.model_name == "words" and binary.runtime == "triton" and binary.primary_format == "onnx"
    assert binary.max_sequence_length == 64 and binary.lineage.method == "lora" and binary.lineage.objective == "sft"
    assert binary.lineage.job == "words-job" and len(binary.lineage.dataset_fingerprint) == 64
    assert binary.tokenizer.eos_token == "<|eos|>" and binary.tokenizer.vocab_size > 100
    assert binary.quantization.method == "onnx-dynamic-int8" and binary.batching.max_batch_size == 4
    assert binary.resources.parameter_count > 0 and "perplexity" in binary.tuned_metrics
    for artifact in binary.artifacts:
        assert digest(Path(artifact.uri)) == (artifact.sha256, artifact.size_bytes), artifact.name
    status = _results(lora_exported / "work", "export")["servingConfig"]
    assert status["sha256"] == digest(published / "serving-config.pb")[0]


def test_kserve_manifest_points_at_the_merged_model(trained, tmp_path, capfd):
    config, work = _with(trained, tmp_path, evaluation={"gates": [], "compareBase": False},
                         export={"formats": ["merged"], "serving": {"runtime": "kserve"}},
                         output={"uri": str(tmp_path / "out")})  # fmt: skip
    assert run_stage("evaluate", config, work) == 0
    assert run_stage("export", config, work) == 0
    log = capfd.readouterr().out
    assert "copying the fine-tuned model" in log and "merging the adapter" not in log  # full: no adapter
    manifest = yaml.safe_load((tmp_path / "out" / "kserve" / "inferenceservice.yaml").read_text())
    assert manifest["kind"] == "InferenceService" and manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "huggingface" and model["storageUri"] == str(tmp_path / "out" / "merged")
    # A full fine-tune's "merged" is the trained model itself.
    assert filecmp.cmp(
        tmp_path / "out" / "merged" / "model.safetensors", work / "train" / "final" / "model.safetensors"
    )


def test_metric_modules_load_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from finetune_operator.metrics import load_metric

    refs = ["the cat sat on the mat", "a dog ran"]
    assert load_metric("bleu").compute(predictions=refs, references=refs)["bleu"] == pytest.approx(100.0)
    rouge = load_metric("rougeL").compute(predictions=["the cat sat", "a dog"], references=refs)
    assert 0 < rouge["rougeL"] < 1 and set(rouge) == {"rouge1", "rouge2", "rougeL"}
    assert load_metric("exactMatch").compute(predictions=[" a  dog ran", "x"], references=[*refs[1:], "y"]) == {
        "exactMatch": 0.5}  # fmt: skip
    ppl = load_metric("perplexity").compute(predictions=[2.0, 4.0], references=[2, 4])
    assert ppl["perplexity"] == pytest.approx(np.e)


def test_generated_protobuf_code_is_current(tmp_path):
    from finetune_operator.serving.generate import HERE, generate

    for path in generate(tmp_path):
        assert path.read_text() == (HERE / path.name).read_text(), "run python -m finetune_operator.serving.generate"
