"""`finetune-operator validate`: each rule rejects with a message that names the field and the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.validation import InvalidJobError, load_job, validate_object
from finetune_operator.cli import main

from .conftest import MINIMAL_JOB

DELETE = object()


def patched(patch: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep-merged copy of the minimal job; DELETE removes a key."""
    out = copy.deepcopy(base or MINIMAL_JOB)

    def merge(target: dict[str, Any], src: dict[str, Any]) -> None:
        for key, value in src.items():
            if value is DELETE:
                target.pop(key, None)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            else:
                target[key] = value

    merge(out, patch)
    return out


def spec(**patch: Any) -> dict[str, Any]:
    return {"spec": patch}


PREF = {"source": "s3://b/p.jsonl", "format": "preference"}
# (case id, patch, field path the error must name, words the message must contain, where the schema rejects)
#   "schema": the CRD's OpenAPI schema (or the API server's own checks) rejects it too;
#   "strict": the API server's strict field validation (kubectl's default) refuses unknown fields;
#   "routing": the server refuses it too (kubectl finds no such resource; a request to the FineTuneJob endpoint
#   cannot decode it), without naming a field;
#   "cel": a CRD x-kubernetes-validations rule rejects it; "semantic": only `validate` (no CRD can see it).
INVALID = [
    ("wrong-api-version", {"apiVersion": "finetune.dev/v1"}, "apiVersion", "finetune.dev/v1alpha1", "routing"),
    ("wrong-kind", {"kind": "TrainJob"}, "kind", "FineTuneJob", "routing"),
    ("missing-name", {"metadata": {"name": DELETE}}, "metadata.name", "required", "schema"),
    ("name-too-long", {"metadata": {"name": "x" * 48}}, "metadata.name", "at most 47", "cel"),
    ("name-uppercase", {"metadata": {"name": "MyJob"}}, "metadata.name", "lower-case", "schema"),
    ("name-leading-digit", {"metadata": {"name": "7b-tune"}}, "metadata.name", "DNS-1035", "cel"),
    ("name-with-dot", {"metadata": {"name": "llama.v2"}}, "metadata.name", "no dots", "cel"),
    ("missing-model", spec(model=DELETE), "spec.model", "is required", "schema"),
    ("missing-output", spec(output=DELETE), "spec.output", "is required", "schema"),
    ("bad-model-uri", spec(model={"source": "http://example.com/m"}), "spec.model.source", "hf://org/name", "schema"),
    ("unknown-field-typo", spec(trainng={"epochs": 1}), "spec.trainng", "did you mean 'training'", "strict"),
    ("nested-typo", spec(method={"lora": {"rank": 8}}), "spec.method.lora.rank", "unknown field", "strict"),
    ("bad-format", spec(dataset={"format": "instruct"}), "spec.dataset.format", "'completion'", "schema"),
    ("bad-method", spec(method={"type": "adapter"}), "spec.method.type", "'qlora'", "schema"),
    ("lr-zero", spec(training={"learningRate": 0}), "spec.training.learningRate", "greater than 0", "schema"),
    ("warmup-one", spec(training={"warmupRatio": 1.0}), "spec.training.warmupRatio", "less than 1", "schema"),
    ("workers-zero", spec(resources={"workers": 0}), "spec.resources.workers", "greater than or equal to 1", "schema"),
    ("lora-r-zero", spec(method={"lora": {"r": 0}}), "spec.method.lora.r", "greater than or equal to 1", "schema"),
    (
        "bad-quant-bits",
        spec(method={"type": "qlora", "quantization": {"bits": 3}}),
        "spec.method.quantization.bits",
        "4",
        "schema",
    ),
    (
        "val-fraction",
        spec(dataset={"validationFraction": 0.7}),
        "spec.dataset.validationFraction",
        "less than 0.5",
        "schema",
    ),
    ("seq-too-short", spec(dataset={"maxSeqLength": 8}), "spec.dataset.maxSeqLength", "16", "schema"),
    ("bad-quantity", spec(resources={"train": {"memory": "lots"}}), "spec.resources.train.memory", "pattern", "schema"),
    ("bad-metric", spec(evaluation={"metrics": ["accuracy"]}), "spec.evaluation.metrics[0]", "'perplexity'", "schema"),
    ("bad-export-format", spec(export={"formats": ["gguf"]}), "spec.export.formats[0]", "'onnx'", "schema"),
    ("no-metrics", spec(evaluation={"metrics": []}), "spec.evaluation.metrics", "at least 1", "schema"),
    ("backoff-negative", spec(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit", "0", "schema"),
    # types are strict, as on the server: no string for a bool or a number, no bool for a number
    (
        "bool-as-string",
        spec(model={"trustRemoteCode": "yes"}),
        "spec.model.trustRemoteCode",
        "write true or false, without quotes",
        "schema",
    ),
    (
        "number-as-string",
        spec(training={"learningRate": "1e-4"}),
        "spec.training.learningRate",
        "without quotes",
        "schema",
    ),
    ("integer-as-bool", spec(training={"batchSize": True}), "spec.training.batchSize", "whole number", "schema"),
    (
        "integer-fraction",
        spec(training={"maxSteps": 2.5, "epochs": DELETE}),
        "spec.training.maxSteps",
        "whole number",
        "schema",
    ),
    ("string-as-number", spec(model={"revision": 1234}), "spec.model.revision", "put it in quotes", "schema"),
    (
        "duplicate-metric",
        spec(evaluation={"metrics": ["perplexity", "perplexity"]}),
        "spec.evaluation.metrics[1]",
        "duplicate",
        "schema",
    ),
    # CEL rules
    (
        "qlora-needs-quantization",
        spec(method={"type": "qlora"}),
        "spec.method.quantization",
        "needs a quantization block",
        "cel",
    ),
    (
        "quantization-needs-qlora",
        spec(method={"type": "lora", "quantization": {"bits": 4}}),
        "spec.method.quantization",
        "only used by method type qlora",
        "cel",
    ),
    (
        "qlora-needs-gpus",
        spec(method={"type": "qlora", "quantization": {}}, resources={"gpusPerWorker": 0}),
        "spec.resources.gpusPerWorker",
        "qlora needs GPUs",
        "cel",
    ),
    ("epochs-and-steps", spec(training={"epochs": 1, "maxSteps": 10}), "spec.training.epochs", "at most one of", "cel"),
    ("dpo-needs-preference", spec(training={"objective": "dpo"}), "spec.dataset.format", "preference", "cel"),
    ("reward-needs-preference", spec(training={"objective": "reward"}), "spec.dataset.format", "preference", "cel"),
    ("preference-needs-dpo", spec(dataset=PREF), "spec.training.objective", "dpo or reward", "cel"),
    (
        "dpo-block-without-dpo",
        spec(training={"dpo": {"beta": 0.2}}),
        "spec.training.dpo",
        "only used by objective dpo",
        "cel",
    ),
    ("grpo-needs-reward", spec(training={"objective": "grpo"}), "spec.training.grpo", "needs a grpo block", "cel"),
    (
        "grpo-batch-multiple",
        spec(training={"objective": "grpo", "batchSize": 6, "grpo": {"numGenerations": 4}}),
        "spec.training.batchSize",
        "multiple of grpo.numGenerations",
        "cel",
    ),
    (
        "grpo-needs-prompts",
        spec(dataset={"format": "text"}, training={"objective": "grpo", "grpo": {}}),
        "spec.dataset.format",
        "grpo samples from prompts",
        "cel",
    ),
    (
        "reward-model-needs-source",
        spec(training={"objective": "grpo", "grpo": {"reward": {"type": "rewardModel"}}}),
        "spec.training.grpo.reward.source",
        "rewardModel needs source",
        "cel",
    ),
    ("workers-need-shared-workspace", spec(resources={"workers": 2}), "spec.storage.workspace", "ReadWriteMany", "cel"),
    (
        "workers-rwo-workspace",
        spec(resources={"workers": 2}, storage={"workspace": {"size": "10Gi"}}),
        "spec.storage.workspace",
        "ReadWriteMany",
        "cel",
    ),
    (
        "workspace-both",
        spec(storage={"workspace": {"size": "10Gi", "claimName": "x"}}),
        "spec.storage.workspace.claimName",
        "exactly one of claimName",
        "cel",
    ),
    (
        "kueue-and-volcano",
        spec(scheduling={"queueName": "q", "gang": {"scheduler": "volcano"}}),
        "spec.scheduling.gang",
        "not both",
        "cel",
    ),
    (
        "gate-without-bound",
        spec(evaluation={"gates": [{"metric": "perplexity"}]}),
        "spec.evaluation.gates[0].min",
        "needs min or max",
        "cel",
    ),
    (
        "gate-min-above-max",
        spec(evaluation={"gates": [{"metric": "perplexity", "min": 5, "max": 2}]}),
        "spec.evaluation.gates[0].min",
        "must not exceed",
        "cel",
    ),
    (
        "gate-metric-not-computed",
        spec(evaluation={"metrics": ["perplexity"], "gates": [{"metric": "bleu", "min": 1}]}),
        "spec.evaluation.gates",
        "also be listed",
        "cel",
    ),
    (
        "gates-without-evaluation",
        spec(evaluation={"enabled": False, "gates": [{"metric": "perplexity", "max": 5}]}),
        "spec.evaluation.gates",
        "gates need evaluation",
        "cel",
    ),
    (
        "text-has-no-references",
        spec(dataset={"format": "text"}, evaluation={"metrics": ["bleu"]}),
        "spec.evaluation.metrics",
        "text data has none",
        "cel",
    ),
    (
        "triton-needs-onnx",
        spec(export={"formats": ["merged"], "serving": {"runtime": "triton"}}),
        "spec.export.formats",
        "add 'onnx'",
        "cel",
    ),
    (
        "kserve-needs-model",
        spec(export={"formats": ["adapter"], "serving": {"runtime": "kserve"}}),
        "spec.export.formats",
        "add 'merged'",
        "cel",
    ),
    (
        "onnx-options-without-onnx",
        spec(export={"formats": ["merged"], "onnx": {"quantize": "dynamic-int8"}}),
        "spec.export.onnx",
        "'onnx' is not in",
        "cel",
    ),
    (
        "full-has-no-adapter",
        spec(method={"type": "full"}, export={"formats": ["adapter"]}),
        "spec.export.formats",
        "no adapter",
        "cel",
    ),
    (
        "fsdp-qlora",
        spec(method={"type": "qlora", "quantization": {}}, distributed={"strategy": "fsdp"}),
        "spec.distributed.strategy",
        "FSDP with QLoRA",
        "cel",
    ),
    (
        "all-linear-plus-more",
        spec(method={"lora": {"targetModules": ["all-linear", "q_proj"]}}),
        "spec.method.lora.targetModules",
        "list it alone",
        "cel",
    ),
    (
        "columns-wrong-role",
        spec(dataset={"columns": {"chosen": "good"}}),
        "spec.dataset.columns",
        "roles allowed",
        "cel",
    ),
    (
        "eval-source-and-fraction",
        spec(dataset={"evalSource": "s3://b/e.jsonl", "validationFraction": 0.1}),
        "spec.dataset.validationFraction",
        "not both",
        "cel",
    ),
    (
        "min-tokens-above-max",
        spec(dataset={"cleaning": {"minTokens": 100, "maxTokens": 10}}),
        "spec.dataset.cleaning.minTokens",
        "must not exceed maxTokens",
        "cel",
    ),
    (
        "preferred-batch-too-big",
        spec(
            export={
                "formats": ["onnx"],
                "serving": {"runtime": "triton", "batching": {"maxBatchSize": 4, "preferredBatchSizes": [8]}},
            }
        ),
        "spec.export.serving.batching.preferredBatchSizes",
        "must not exceed maxBatchSize",
        "cel",
    ),
    # semantic checks (no CRD can express them: they depend on where the job runs)
    (
        "local-path-on-cluster",
        spec(model={"source": "./model"}),
        "spec.model.source",
        "only `finetune-operator run`",
        "semantic",
    ),
    # rules across fields, checked by the CRD's CEL rules as well
    (
        "packing-preference",
        spec(dataset={**PREF, "packing": True}, training={"objective": "dpo"}),
        "spec.dataset.packing",
        "cannot be packed",
        "cel",
    ),
    (
        "dpo-prompt-too-long",
        spec(dataset={**PREF, "maxSeqLength": 512}, training={"objective": "dpo", "dpo": {"maxPromptLength": 512}}),
        "spec.training.dpo.maxPromptLength",
        "less than spec.dataset.maxSeqLength",
        "cel",
    ),
    (
        "grpo-completion-too-long",
        spec(dataset={"maxSeqLength": 64}, training={"objective": "grpo", "grpo": {"maxCompletionLength": 64}}),
        "spec.training.grpo.maxCompletionLength",
        "less than",
        "cel",
    ),
    (
        "paged-adam-on-cpu",
        spec(training={"optimizer": "paged_adamw_8bit"}, resources={"gpusPerWorker": 0}),
        "spec.training.optimizer",
        "needs GPUs",
        "cel",
    ),
    (
        "reward-with-generation-metric",
        spec(dataset=PREF, training={"objective": "reward"}, evaluation={"metrics": ["exactMatch"]}),
        "spec.evaluation.metrics",
        "objective reward is evaluated by rewardAccuracy",
        "cel",
    ),
    (
        "reward-accuracy-for-sft",
        spec(evaluation={"metrics": ["rewardAccuracy"]}),
        "spec.evaluation.metrics",
        "applies to objective reward only",
        "cel",
    ),
    (
        "empty-column-name",
        spec(dataset={"columns": {"prompt": " "}}),
        "spec.dataset.columns.prompt",
        "must not be empty or blank",
        "schema",
    ),
]


def test_the_table_covers_enough_rules():
    assert len(INVALID) >= 30
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("case", "patch", "path", "words", "layer"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(case, patch, path, words, layer):
    obj = patched(patch)
    parsed, problems = validate_object(obj)
    errors = [p for p in problems if p.severity == "error"]
    assert parsed is None and errors, f"{case} was accepted"
    matching = [p for p in errors if p.path == path]
    assert matching, f"no error at {path}; got {[p.format() for p in errors]}"
    assert any(words in p.message for p in matching), [p.message for p in matching]
    # test_api_server.py sends every case to the real API server: it refuses each one, naming the same field,
    # but the "semantic" ones (rules beyond the CRD).


def test_local_mode_rejects_pvc_and_missing_files(tmp_path):
    obj = patched(
        spec(model={"source": "pvc://models/llama"}, dataset={"source": "./nowhere.jsonl"}, output={"uri": "./out"})
    )
    _, problems = validate_object(obj, target="local", base_dir=tmp_path)
    by_path = {p.path: p.message for p in problems}
    assert "needs a cluster" in by_path["spec.model.source"]
    assert f"'{tmp_path / 'nowhere.jsonl'}' does not exist" in by_path["spec.dataset.source"]


def test_warnings_do_not_fail(job):
    job["spec"]["model"].pop("revision")
    job["spec"]["evaluation"] = {"gates": [{"metric": "perplexity", "min": 3}]}
    parsed, problems = validate_object(job)
    assert parsed is not None
    assert {p.path for p in problems if p.severity == "warning"} >= {"spec.model.revision", "spec.evaluation.gates[0]"}


def test_metrics_that_do_not_apply_to_the_objective_warn(job):
    job["spec"]["dataset"] = {"source": "s3://b/p.jsonl", "format": "preference"}
    job["spec"]["training"]["objective"] = "reward"
    job["spec"]["evaluation"] = {"metrics": ["perplexity", "rewardAccuracy"],
                                 "gates": [{"metric": "rewardAccuracy", "min": 0.6}]}  # fmt: skip
    parsed, problems = validate_object(job)
    assert parsed is not None
    warning = next(p for p in problems if p.path == "spec.evaluation.metrics")
    assert warning.severity == "warning"
    assert warning.message == (
        "perplexity does not apply to objective reward and is not computed; reward is evaluated by rewardAccuracy"
    )
    job["spec"]["evaluation"] = {}  # the default metrics are not the user's choice: no warning
    assert not [p for p in validate_object(job)[1] if p.path == "spec.evaluation.metrics"]


ACTIVE = {"status": {"phase": "Training"}}


@pytest.mark.parametrize(
    ("phase", "change", "allowed"),
    [
        ("Training", {"training": {"learningRate": 0.1}}, False),
        ("Preparing", {"dataset": {"maxSeqLength": 2048}}, False),
        ("Training", {"resources": {"workers": 2}, "storage": {"workspace": {"claimName": "rwx"}}}, False),
        ("Training", {"evaluation": {"maxSamples": 10}}, True),  # applies to the next stage
        ("Training", {"runPolicy": {"suspend": True}}, True),
        ("Succeeded", {"training": {"learningRate": 0.1}}, True),  # starts a new run
        ("Suspended", {"training": {"learningRate": 0.1}}, True),
    ],
)
def test_immutable_while_running_transition_rule(phase, change, allowed):
    old = copy.deepcopy(MINIMAL_JOB)
    old["spec"] = validate_object(old)[0].wire()
    old["status"] = {"phase": phase}
    new = patched(spec(**change), old)
    new.pop("status")
    _, problems = validate_object(new, old=old)
    errors = [p for p in problems if p.severity == "error" and "cannot change while the job is running" in p.message]
    assert (not errors) == allowed, problems


def test_cli_prints_one_line_per_problem_and_exits_1(tmp_path, capsys):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(patched(spec(method={"type": "qlora"}, training={"maxSteps": 5}))))
    assert main(["validate", str(manifest)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"{manifest}: spec.method.quantization: method type qlora needs a quantization block" in lines[0]
    assert any(line.startswith(f"{manifest}: spec.training.epochs: set at most one of") for line in lines)


def test_load_job_raises_with_every_error(tmp_path: Path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(patched(spec(method={"type": "qlora"}))))
    with pytest.raises(InvalidJobError) as raised:
        load_job(manifest, target="cluster")
    assert "spec.method.quantization" in str(raised.value)
    manifest.write_text("a: [1,\n")
    with pytest.raises(InvalidJobError, match="not valid YAML"):
        load_job(manifest)
