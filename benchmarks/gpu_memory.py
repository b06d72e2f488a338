"""The memory estimate (finetune_operator.estimate) against torch.cuda.max_memory_allocated on a real GPU.

A ~0.5B-parameter Llama-style model is built from a config (random init, nothing downloaded) and trained for a few
real steps in full (fp32 master weights + bf16 autocast + AdamW, as the train stage does), LoRA (bf16 base, fp32
adapters) and QLoRA (bitsandbytes NF4, double quantization) at a few micro-batch x sequence-length points. For each
point: the estimate's allocated peak, the measured peak, their ratio, step time and MFU. Writes gpu_memory.json and
gpu_memory.md to $OUT (default ./out).

Needs only torch, transformers, peft (and bitsandbytes for QLoRA, skipped with a note when missing) and this
repository's operator/ on PYTHONPATH:

    PYTHONPATH=operator python benchmarks/gpu_memory.py            # on a GPU, < 4 minutes on an H100
    PYTHONPATH=operator python benchmarks/gpu_memory.py --cpu-smoke  # a tiny model on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

import torch

from finetune_operator import estimate as E

MODEL_05B = {  # ~0.5B parameters, Llama-style with GQA (like Qwen2.5-0.5B / Llama-3.2-1B in shape)
    "model_type": "llama", "hidden_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 12,
    "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 32768, "tie_word_embeddings": False,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}  # fmt: skip
MODEL_TINY = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 512, "tie_word_embeddings": False,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
}  # fmt: skip
# (method, micro-batch, sequence length, gradient checkpointing)
GPU_POINTS = [
    ("full", 1, 1024, False), ("full", 4, 1024, False), ("full", 4, 2048, True),
    ("lora", 1, 1024, False), ("lora", 4, 2048, False), ("lora", 8, 2048, True),
    ("qlora", 1, 1024, False), ("qlora", 4, 2048, False), ("qlora", 8, 2048, True),
]  # fmt: skip
SMOKE_POINTS = [("full", 2, 64, False), ("full", 2, 64, True), ("lora", 2, 64, False), ("qlora", 2, 64, False)]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def _llama_config(values: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    kwargs = {k: v for k, v in values.items() if k != "model_type"}
    try:
        config = LlamaConfig(**kwargs, attn_implementation="sdpa")
    except TypeError:
        config = LlamaConfig(**kwargs)
        config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def _from_pretrained(path: str, **kwargs: Any) -> Any:
    """transformers 5 takes dtype=, 4.x before 4.56 torch_dtype=."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=kwargs.pop("dtype"), **kwargs)
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=kwargs.pop("dtype", None), **kwargs)


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def build_model(method: str, values: dict[str, Any], device: str, checkpoint_dir: Path) -> Any:
    """The model as stages/train.py loads it for the method."""
    from transformers import LlamaForCausalLM

    config = _llama_config(values)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        )  # fmt: skip
        model = _from_pretrained(
            str(checkpoint_dir), dtype=torch.bfloat16, quantization_config=quant,
            device_map={"": 0 if device == "cuda" else "cpu"}, attn_implementation="sdpa",
        )  # fmt: skip
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return _lora(model)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if method == "lora":
        return _lora(model.to(torch.bfloat16))
    return model  # full: fp32 master weights


def save_checkpoint(values: dict[str, Any], target: Path, device: str) -> None:
    """A random-init bf16 checkpoint for QLoRA to load (bitsandbytes quantizes while loading)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(_llama_config(values)).to(torch.bfloat16)
    model.save_pretrained(str(target))
    del model


def _estimate(values: dict[str, Any], method: str, batch: int, seq: int, checkpointing: bool, device: str) -> Any:
    arch = E.Architecture.from_config(values)
    plan = E.Plan(
        method=method, micro_batch=batch, seq_len=seq, gradient_checkpointing=checkpointing, compute="bf16",
        optimizer="adamw_torch", lora_r=LORA["r"], lora_dropout=LORA["dropout"], quant_bits=4, double_quant=True,
        attention_mask=False, device=device,
    )  # fmt: skip
    return E.estimate(arch, plan)


def run_point(
    values: dict[str, Any], point: tuple[str, int, int, bool], device: str, steps: int, checkpoint_dir: Path
) -> dict[str, Any]:
    method, batch, seq, checkpointing = point
    est = _estimate(values, method, batch, seq, checkpointing, device)
    row: dict[str, Any] = {
        "method": method, "microBatch": batch, "seqLen": seq, "gradientCheckpointing": checkpointing,
        "estimatedPeakGiB": round(est.memory.allocated_peak / E.GIB, 3),
        "estimatedTotalGiB": round(est.memory.total / E.GIB, 3),
        "estimatedTermsGiB": {k: round(v / E.GIB, 3) for k, v in est.memory.terms().items()},
    }  # fmt: skip
    cuda = device == "cuda"
    if cuda:
        free = torch.cuda.mem_get_info()[0]
        if est.memory.total > free:
            row["skipped"] = f"the estimate ({est.memory.total / E.GIB:.1f} GiB) exceeds free memory"
            return row
    baseline = torch.cuda.memory_allocated() if cuda else 0  # anything a previous point left behind
    torch.manual_seed(0)
    model = build_model(method, values, device, checkpoint_dir)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # foreach on CUDA: what the Trainer builds
    vocab = values["vocab_size"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss  # outputs dropped before backward, as in the Trainer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del ids, loss
    step_time = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first step
    tokens_per_s = batch * seq / step_time
    flops = E.training_flops_per_token(est.architecture, est.plan, seq) * tokens_per_s
    row.update(
        stepSeconds=round(step_time, 4),
        tokensPerSecond=round(tokens_per_s, 1),
        mfuH100=round(flops / E.GPU_PEAK_BF16["H100"], 4) if cuda else None,
        trainableParameters=sum(p.numel() for p in params),
        estimatedTrainableParameters=est.trainable_parameters,
    )
    if cuda:
        measured = torch.cuda.max_memory_allocated() - baseline
        row["measuredPeakGiB"] = round(measured / E.GIB, 3)
        row["measuredReservedGiB"] = round(torch.cuda.max_memory_reserved() / E.GIB, 3)
        row["ratio"] = round(est.memory.allocated_peak / measured, 3)
    del model, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [
        f"Device: {header['device']}; torch {header['torch']}, transformers {header['transformers']}, "
        f"peft {header['peft']}, bitsandbytes {header['bitsandbytes']}; model {header['parameters'] / 1e9:.2f}B "
        f"parameters, {header['steps']} steps per point.",
        "",
        "| method | micro-batch x seq | checkpointing | estimate (GiB) | measured max_memory_allocated (GiB) "
        "| estimate / measured | step (s) | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("skipped") or r.get("error")
        measured = r.get("measuredPeakGiB", "-")
        mfu = f"{r['mfuH100']:.1%}" if r.get("mfuH100") is not None else "-"
        lines.append(
            f"| {r['method']} | {r['microBatch']} x {r['seqLen']} | {'on' if r['gradientCheckpointing'] else 'off'} "
            f"| {r['estimatedPeakGiB']} | {note or measured} | {r.get('ratio', '-')} "
            f"| {r.get('stepSeconds', '-')} | {mfu} |"
        )
    lines += [f"\nNote: {n}" for n in header["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU, to check the script runs")
    parser.add_argument("--steps", type=int, default=None, help="training steps per point (default 4, smoke 2)")
    parser.add_argument("--only", default=None, help="comma-separated methods to run (full,lora,qlora)")
    parser.add_argument("--budget", type=float, default=210.0, help="seconds after which remaining points are skipped")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    values = MODEL_TINY if smoke else MODEL_05B
    points = SMOKE_POINTS if smoke else GPU_POINTS
    if args.only:
        points = [p for p in points if p[0] in args.only.split(",")]
    steps = args.steps or (2 if smoke else 4)
    notes: list[str] = []
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not has_bnb:
        notes.append("bitsandbytes is not installed: the QLoRA points were skipped")
        points = [p for p in points if p[0] != "qlora"]
    if smoke:
        notes.append("CPU smoke run: memory is not measured on CPU (tests/test_estimate.py measures it there)")
    import peft
    import transformers

    header = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__ if has_bnb else None,
        "parameters": E.Architecture.from_config(values).parameters(), "steps": steps, "notes": notes,
        "config": values,
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model"
        if any(p[0] == "qlora" for p in points):
            save_checkpoint(values, checkpoint, device)
        for point in points:
            t0 = time.perf_counter()
            if t0 - started > args.budget:
                notes.append(f"time budget of {args.budget:.0f} s spent: skipped {point}")
                continue
            try:
                row = run_point(values, point, device, steps, checkpoint)
            except Exception as exc:  # one point failing (e.g. an OOM) must not lose the others
                oom = "out of memory" in str(exc).lower()
                row = {
                    "method": point[0], "microBatch": point[1], "seqLen": point[2], "gradientCheckpointing": point[3],
                    "estimatedPeakGiB": round(
                        _estimate(values, *point, device).memory.allocated_peak / E.GIB, 3  # type: ignore[misc]
                    ),
                    "error": "CUDA out of memory" if oom else f"{type(exc).__name__}: {exc}"[:300],
                }  # fmt: skip
                traceback.print_exc()
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_memory.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    table = markdown(rows, header)
    (out / "gpu_memory.md").write_text(table)
    print(table)
    failed = [r for r in rows if "error" in r]
    return 1 if failed and smoke else 0


if __name__ == "__main__":
    raise SystemExit(main())
