"""The export stage: adapter, merged safetensors, ONNX (Optimum), serving configs, digests, upload.

Everything is first written under <workdir>/export/<run>/ and then published to spec.output.uri: copied for a
local path or pvc://, uploaded with fsspec for s3:// and gs://. status.artifacts carries the published URIs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from .contract import StageConfig, StageError, Workdir, emit
from .sources import parse_location

SERVING_TEXT_IN_STATUS = 1536  # the whole termination message must fit in 4096 bytes
ONNX_FILE = "model.onnx"


def digest(path: Path) -> tuple[str, int]:
    """sha256 of a file, or of the sorted '<relative path> <file sha256>' lines of a directory; total size."""

    def file_digest(file: Path) -> str:
        h = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if path.is_file():
        return file_digest(path), path.stat().st_size
    lines, size = [], 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        lines.append(f"{file.relative_to(path).as_posix()} {file_digest(file)}")
        size += file.stat().st_size
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), size


def merge_model(config: StageConfig, workdir: Workdir, target: Path) -> Path:
    """The adapter merged into a full-precision copy of the base (a QLoRA base is reloaded unquantized)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = config.spec
    reward = spec.training.objective == "reward"
    loader = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    if spec.method.type == "full":
        shutil.copytree(workdir.final, target, ignore=shutil.ignore_patterns("training_args.bin", "finetune-*.json"))
        return target
    from peft import PeftModel

    quant = spec.method.quantization
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        quant.compute_dtype if quant else spec.model.dtype, torch.float32
    )
    if not torch.cuda.is_available() and dtype != torch.float32:
        dtype = torch.float32  # half-precision merges on CPU are slow and lossy for no gain
    base = loader.from_pretrained(workdir.read_sources()["model"]["path"], dtype=dtype,
                                  trust_remote_code=spec.model.trust_remote_code,
                                  **({"num_labels": 1} if reward else {}))  # fmt: skip
    merged = PeftModel.from_pretrained(base, str(workdir.final)).merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    return target


def save_tokenizer(workdir: Workdir, target: Path) -> None:
    """Save the tokenizer users load next to an artifact, listing only the inputs training fed the model.

    GPT-2-style tokenizers list `token_type_ids` among their model inputs, and GPT-2, GPT-Neo, GPT-J, CodeGen
    and others add token-type embeddings when given them: the standard
    `model.generate(**tok(prompt, return_tensors="pt"))` and `pipeline()` would then run the model on inputs
    it was never trained with and generate other text. No stage feeds `token_type_ids`, so none is exported.
    """
    from transformers import AutoTokenizer

    names = AutoTokenizer.from_pretrained(str(workdir.tokenizer)).model_input_names
    tokenizer = AutoTokenizer.from_pretrained(
        str(workdir.tokenizer), model_input_names=[n for n in names if n != "token_type_ids"]
    )
    tokenizer.save_pretrained(str(target))


def export_onnx(config: StageConfig, merged: Path, target: Path) -> dict[str, Any]:
    """Optimum ONNX export with past key values, then an onnxruntime vs PyTorch logits check."""
    from optimum.exporters.onnx import main_export

    onnx_spec = config.spec.export.onnx
    main_export(
        model_name_or_path=str(merged), output=str(target), task="text-generation-with-past",
        opset=onnx_spec.opset if onnx_spec else None, device="cpu", do_validation=False,
        trust_remote_code=config.spec.model.trust_remote_code, local_files_only=True,
    )  # fmt: skip
    save_tokenizer_from(merged, target)
    check = compare_logits(merged, target / ONNX_FILE, onnx_spec.tolerance if onnx_spec else 1e-3)
    if not check["passed"]:
        raise StageError(
            f"ONNX export check failed: max |logits difference| {check['maxAbsDiff']:.3g} exceeds tolerance "
            f"{check['tolerance']} (raise spec.export.onnx.tolerance if this precision is acceptable)"
        )
    quantized = None
    if onnx_spec and onnx_spec.quantize == "dynamic-int8":
        quantized = quantize_dynamic_int8(target)
    return {"check": check, "quantized": quantized}


def save_tokenizer_from(merged: Path, target: Path) -> None:
    """The merged folder's (already cleaned) tokenizer, whatever Optimum chose to copy."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(merged)).save_pretrained(str(target))


def _onnx_feeds(session: Any, input_ids: Any) -> dict[str, Any]:
    import numpy as np

    batch, length = input_ids.shape
    feeds: dict[str, Any] = {}
    for node in session.get_inputs():
        if node.name == "input_ids":
            feeds[node.name] = input_ids
        elif node.name == "attention_mask":
            feeds[node.name] = np.ones((batch, length), dtype=np.int64)
        elif node.name == "position_ids":
            feeds[node.name] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
        elif node.name.startswith("past_key_values"):
            # Empty cache: [batch, heads, 0, head_dim]; heads and head_dim are fixed in the graph.
            dims = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(node.shape)]
            feeds[node.name] = np.zeros(dims, dtype=np.float16 if "16" in node.type else np.float32)
        else:
            raise StageError(f"the exported graph has an unexpected input {node.name}")
    return feeds


def compare_logits(merged: Path, onnx_file: Path, tolerance: float, samples: int = 3) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    worst = 0.0
    for length in range(4, 4 + samples * 3, 3):
        ids = generator.integers(0, model.config.vocab_size, size=(2, length), dtype=np.int64)
        onnx_logits = session.run(["logits"], _onnx_feeds(session, ids))[0]
        with torch.no_grad():
            torch_logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    return {"maxAbsDiff": worst, "tolerance": tolerance, "passed": worst <= tolerance, "samples": samples}


def quantize_dynamic_int8(onnx_dir: Path) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    target = onnx_dir.parent / "onnx-int8"
    quantizer = ORTQuantizer.from_pretrained(str(onnx_dir), file_name=ONNX_FILE)
    quantizer.quantize(save_dir=str(target), quantization_config=AutoQuantizationConfig.avx512_vnni(
        is_static=False, per_channel=False))  # fmt: skip
    for extra in onnx_dir.iterdir():  # tokenizer and config travel with the quantized graph
        if extra.is_file() and extra.suffix != ".onnx" and not (target / extra.name).exists():
            shutil.copy2(extra, target / extra.name)
    return target


ONNX_TO_TRITON = {
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(bool)": "TYPE_BOOL",
}


def triton_config(onnx_file: Path, name: str, batching: Any) -> Any:
    """A Triton ModelConfig for the ONNX graph: real tensor names, dtypes and dims (batch dim left to Triton)."""
    import onnxruntime as ort

    from ..serving import triton_model_config_pb2 as triton

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    config = triton.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=batching.max_batch_size)
    for nodes, field in ((session.get_inputs(), config.input), (session.get_outputs(), config.output)):
        for node in nodes:
            dims = [d if isinstance(d, int) else -1 for d in node.shape[1:]]
            field.add(name=node.name, data_type=triton.DataType.Value(ONNX_TO_TRITON[node.type]), dims=dims)
    if batching.preferred_batch_sizes:
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
    config.instance_group.add(count=1, kind=triton.ModelInstanceGroup.KIND_AUTO)
    return config


def kserve_manifest(config: StageConfig, name: str, uri: str, fmt: str) -> dict[str, Any]:
    res = config.spec.resources
    gpus = res.gpus_per_worker
    resources: dict[str, Any] = {"limits": {res.gpu_resource_name: str(gpus)}} if gpus else {}
    predictor: dict[str, Any] = {
        "model": {
            "modelFormat": {"name": "huggingface" if fmt == "merged" else "onnx"},
            "storageUri": uri,
            **({"args": [f"--model_name={name}"]} if fmt == "merged" else {}),
            **({"resources": resources} if resources else {}),
        }
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": config.namespace,
                     "labels": {"finetune.dev/job": config.job, "finetune.dev/run": str(config.run)}},
        "spec": {"predictor": predictor},
    }  # fmt: skip


def publish(local: Path, config: StageConfig, relative: str) -> str:
    """Copy or upload one artifact to spec.output.uri and return its URI there."""
    base = config.spec.output.uri.rstrip("/")
    loc = parse_location(config.spec.output.uri, config)
    uri = f"{base}/{relative}"
    if loc.scheme == "local":
        dest = (Path(loc.path) / relative).resolve()
        if not config.spec.output.uri.startswith("pvc://"):
            uri = str(dest)  # a relative path in the spec means nothing to whoever reads the status later
        if dest == local.resolve():
            return uri
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if local.is_dir() else shutil.copy2)(local, dest)
        return uri
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(local), path, recursive=local.is_dir())
    return uri


def run_export(config: StageConfig, workdir: Workdir) -> dict[str, Any]:
    from google.protobuf import text_format
    from transformers import AutoTokenizer

    from ..serving import serving_config_pb2 as pb

    spec = config.spec
    results_file = workdir.evaluation / "results.json"
    evaluation = json.loads(results_file.read_text()) if results_file.exists() else {}
    if evaluation and evaluation.get("gatesPassed") is False:
        raise StageError("the quality gates failed in the evaluate stage: nothing is exported", config_error=True)
    if not workdir.final.exists():
        raise StageError("the train stage has not completed in this workdir (no train/final)")
    staging = workdir.export / f"run-{config.run}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    formats = list(spec.export.formats)
    name = spec.export.serving.name if spec.export.serving and spec.export.serving.name else config.job
    artifacts: list[dict[str, Any]] = []
    details: dict[str, Any] = {}

    def record(artifact_name: str, fmt: str, path: Path, relative: str) -> None:
        sha, size = digest(path)
        uri = publish(path, config, relative)
        artifacts.append({"name": artifact_name, "format": fmt, "uri": uri, "sha256": sha, "sizeBytes": size})

    if "adapter" in formats:
        emit("step", "export", message="adapter")
        adapter = staging / "adapter"
        shutil.copytree(workdir.final, adapter, ignore=shutil.ignore_patterns("training_args.bin", "finetune-*.json"))
        save_tokenizer(workdir, adapter)
        record("adapter", "peft-adapter", adapter, "adapter")
    merged: Path | None = None
    if "merged" in formats or "onnx" in formats:
        full = spec.method.type == "full"  # a full fine-tune has no adapter: its weights are the model
        emit(
            "step",
            "export",
            message="copying the fine-tuned model" if full else "merging the adapter into the base model",
        )
        merged = merge_model(config, workdir, staging / "merged")
        save_tokenizer(workdir, merged)  # Optimum copies it into the ONNX export from here
        if "merged" in formats:
            record("merged", "safetensors", merged, "merged")
    onnx_dir: Path | None = None
    if "onnx" in formats:
        if spec.training.objective == "reward":
            raise StageError("spec.export.formats: onnx export covers causal LMs; a reward model exports as merged",
                             config_error=True)  # fmt: skip
        emit("step", "export", message="exporting ONNX with Optimum")
        assert merged is not None
        onnx_dir = staging / "onnx"
        details["onnx"] = export_onnx(config, merged, onnx_dir)
        record("onnx", "onnx", onnx_dir, "onnx")
        if details["onnx"]["quantized"]:
            record("onnx-int8", "onnx", details["onnx"]["quantized"], "onnx-int8")
            details["onnx"]["quantized"] = str(details["onnx"]["quantized"])

    serving = spec.export.serving
    if serving and serving.runtime == "triton":
        assert onnx_dir is not None  # the CRD requires onnx for triton
        repo = staging / "triton"
        (repo / name / "1").mkdir(parents=True)
        shutil.copy2(onnx_dir / ONNX_FILE, repo / name / "1" / ONNX_FILE)
        for data in onnx_dir.glob(f"{ONNX_FILE}_data"):
            shutil.copy2(data, repo / name / "1" / data.name)
        pbtxt = text_format.MessageToString(triton_config(onnx_dir / ONNX_FILE, name, serving.batching))
        (repo / name / "config.pbtxt").write_text(pbtxt)
        record("triton-repository", "triton", repo, "triton")
    if serving and serving.runtime == "kserve":
        fmt = "merged" if "merged" in formats else "onnx"
        target = next(a["uri"] for a in artifacts if a["name"] == fmt)
        manifest = staging / "kserve" / "inferenceservice.yaml"
        manifest.parent.mkdir(parents=True)
        manifest.write_text(yaml.safe_dump(kserve_manifest(config, name, target, fmt), sort_keys=False))
        record("kserve-manifest", "kserve", manifest, "kserve/inferenceservice.yaml")

    tokenizer = AutoTokenizer.from_pretrained(str(workdir.tokenizer))
    sources = workdir.read_sources()
    lineage = config.extra.get("lineage", {})
    primary = "onnx" if serving and serving.runtime == "triton" else ("merged" if "merged" in formats else formats[0])
    message = pb.ServingConfig(
        model_name=name,
        model_version=f"{config.run}" + (f"-{lineage['configHash'][:12]}" if lineage.get("configHash") else ""),
        runtime=serving.runtime if serving else "",
        primary_format=primary,
        max_sequence_length=spec.dataset.max_seq_length,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    for a in artifacts:
        message.artifacts.add(name=a["name"], format=a["format"], uri=a["uri"], sha256=a["sha256"],
                              size_bytes=a["sizeBytes"])  # fmt: skip
    message.tokenizer.CopyFrom(pb.Tokenizer(
        uri=next((a["uri"] for a in artifacts if a["name"] in ("merged", "adapter", "onnx")), ""),
        class_name=type(tokenizer).__name__, vocab_size=len(tokenizer), eos_token=tokenizer.eos_token or "",
        pad_token=tokenizer.pad_token or "", chat_template=tokenizer.chat_template or "",
        padding_side=tokenizer.padding_side,
    ))  # fmt: skip
    quantized = spec.export.onnx is not None and spec.export.onnx.quantize == "dynamic-int8"
    message.quantization.CopyFrom(pb.Quantization(method="onnx-dynamic-int8" if quantized else "none",
                                                  bits=8 if quantized else 0))  # fmt: skip
    gen = spec.evaluation.generation
    message.generation.CopyFrom(pb.GenerationDefaults(
        max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
        eos_token_id=tokenizer.eos_token_id or 0, pad_token_id=tokenizer.pad_token_id or 0,
    ))  # fmt: skip
    weights = next((a["sizeBytes"] for a in artifacts if a["name"] == "merged"), 0)
    message.resources.CopyFrom(pb.ResourceHints(
        gpus=spec.resources.gpus_per_worker, gpu_resource_name=spec.resources.gpu_resource_name,
        dtype=spec.model.dtype, weights_bytes=weights,
        parameter_count=_parameter_count(merged) if merged else 0,
    ))  # fmt: skip
    quant = spec.method.quantization
    message.lineage.CopyFrom(pb.Lineage(
        base_model=spec.model.source, base_model_revision=sources.get("model", {}).get("revision") or "",
        dataset_fingerprint=sources.get("datasetFingerprint", ""), config_hash=lineage.get("configHash", ""),
        job=config.job, namespace=config.namespace, run=config.run,
        method=spec.method.type + (f"/{quant.bits}bit-{quant.type}" if quant else ""),
        objective=spec.training.objective,
    ))  # fmt: skip
    for key, value in evaluation.get("base", {}).items():
        message.base_metrics[key] = value
    for key, value in evaluation.get("tuned", {}).items():
        message.tuned_metrics[key] = value
    if serving:
        message.batching.CopyFrom(pb.Batching(
            max_batch_size=serving.batching.max_batch_size,
            preferred_batch_sizes=serving.batching.preferred_batch_sizes,
            max_queue_delay_microseconds=serving.batching.max_queue_delay_microseconds,
        ))  # fmt: skip
    text = text_format.MessageToString(message)
    (staging / "serving-config.pb").write_bytes(message.SerializeToString())
    (staging / "serving-config.pbtxt").write_text(text)
    sha, size = digest(staging / "serving-config.pb")
    binary_uri = publish(staging / "serving-config.pb", config, "serving-config.pb")
    publish(staging / "serving-config.pbtxt", config, "serving-config.pbtxt")
    serving_status: dict[str, Any] = {"uri": binary_uri, "sha256": sha}
    if len(text) <= SERVING_TEXT_IN_STATUS:
        serving_status["text"] = text
    artifacts.append({"name": "serving-config", "format": "protobuf", "uri": binary_uri, "sha256": sha,
                      "sizeBytes": size})  # fmt: skip
    if "merged" not in formats:
        shutil.rmtree(staging / "merged", ignore_errors=True)  # only an intermediate for onnx
    return {
        "ok": True,
        "message": f"exported {', '.join(a['name'] for a in artifacts)} to {spec.output.uri}",
        "artifacts": artifacts,
        "servingConfig": serving_status,
        "onnxCheck": details.get("onnx", {}).get("check"),
    }


def _parameter_count(merged: Path) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for file in merged.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return total
