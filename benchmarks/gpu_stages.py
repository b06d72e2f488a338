"""The real prepare and train stages on a CUDA GPU: QLoRA NF4, LoRA bf16 and full bf16, packed 1,024-token blocks.

What it checks (CPU runs cannot): the base model is really 4-bit NF4 on the GPU (bitsandbytes `Linear4bit`), the
compute dtype is bf16, the attention kernel is the one the stage picks (flash-attention 2 when installed, else
PyTorch SDPA), the loss falls, and what it costs: real tokens/s, model FLOP utilisation (MFU) and peak GPU memory.

    python benchmarks/gpu_stages.py [--steps 60] [--layers 12] [--hidden 768] [--out DIR]

Model: a random-init GPT-2 of the given size with a BPE tokenizer trained on the quickstart data (no Hub). Writes
`gpu_stages.json` and prints a Markdown table (the README's GPU table comes from it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "quickstart" / "data" / "train.jsonl"
H100_BF16_DENSE = 989e12  # NVIDIA's dense bf16 peak for the H100 SXM; MFU is reported against the card's own peak


def _spec(model: Path, method: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
    methods = {
        "full": {"type": "full"},
        "lora": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
        "qlora": {"type": "qlora", "lora": {"r": 16, "alpha": 32},
                  "quantization": {"bits": 4, "type": "nf4", "computeDtype": "bfloat16"}},
    }  # fmt: skip
    return {
        "model": {"source": str(model)},
        "dataset": {"source": str(DATA), "format": "completion", "maxSeqLength": seq, "packing": True,
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"}},
        "method": methods[method],
        "training": {"maxSteps": steps, "batchSize": batch, "learningRate": 1e-3 if method == "full" else 2e-3,
                     "loggingSteps": 10, "checkpointEverySteps": 100_000, "precision": "bf16"},
        "resources": {"gpusPerWorker": 1},
        "output": {"uri": "/tmp/unused"},
    }  # fmt: skip


def run_method(
    root: Path, model: Path, method: str, steps: int, batch: int, seq: int, base_params: int
) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.stages.contract import StageConfig, Workdir
    from finetune_operator.stages.prepare import run_prepare
    from finetune_operator.stages.train import build_trainer, resolve_precision

    spec = FineTuneJobSpec.model_validate(_spec(model, method, steps, batch, seq))
    config = StageConfig(job=f"gpu-{method}", spec=spec, termination_log=str(root / f"term-{method}"))
    work = Workdir(root / method)
    run_prepare(config, work)
    tok = AutoTokenizer.from_pretrained(work.tokenizer)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(config, work, tok, resolve_precision("bf16" if cuda else "fp32"))
    model_obj = trainer.model
    kinds = sorted({type(m).__name__ for m in model_obj.modules() if "4bit" in type(m).__name__ or "Linear8" in
                    type(m).__name__})  # fmt: skip
    quant_types = sorted({str(getattr(getattr(m, "weight", None), "quant_type", "")) for m in model_obj.modules()
                          if type(m).__name__ == "Linear4bit"})  # fmt: skip
    attn = getattr(getattr(model_obj, "config", None), "_attn_implementation", None)
    params = base_params  # a 4-bit model's packed storage would undercount the parameters
    trainable = sum(p.numel() for p in model_obj.parameters() if p.requires_grad)
    _sync = torch.cuda.synchronize if cuda else (lambda: None)
    _sync()
    start = time.perf_counter()
    result = trainer.train()
    _sync()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen or steps * batch * seq
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # Forward 2N + backward 4N per token for full; with frozen base weights the weight-gradient half goes (4N).
    flops_per_token = 6 * params if method == "full" else 4 * params
    rate = flops_per_token * tokens / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    trainable_dtype = next(p for p in model_obj.parameters() if p.requires_grad).dtype
    return {
        "method": method, "params": params, "trainable": trainable, "steps": steps, "batch": batch, "seq": seq,
        "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds), "tflops": round(rate / 1e12, 1),
        "mfu": round(rate / H100_BF16_DENSE, 3), "peak_gib": round(peak, 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss, "quant_modules": kinds, "quant_types": quant_types,
        "attention": attn, "dtype": str(trainable_dtype),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--methods", default="qlora,lora,full")
    parser.add_argument("--cpu-smoke", action="store_true", help="run tiny sizes on a CPU to check the script")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch

    from finetune_operator.stages import tiny

    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (--cpu-smoke checks the script on a CPU)")
    tiny.PRESETS["gpu"] = {"n_layer": args.layers, "n_head": max(args.hidden // 64, 1), "n_embd": args.hidden,
                           "vocab_size": 4096}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = tiny.build_tiny_model(root / "model", tiny.corpus_from_jsonl(DATA), preset="gpu", n_positions=args.seq)
        from transformers import AutoModelForCausalLM

        base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        for method in args.methods.split(","):
            try:
                rows.append(run_method(root, model, method, args.steps, args.batch, args.seq, base_params))
            except Exception as exc:  # report every method even when one breaks
                rows.append({"method": method, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    (out / "gpu_stages.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(f"\n{device['gpu']}, torch {device['torch']} (CUDA {device['cuda']})\n")
    header = (
        "| method | params | trainable | tokens/s | TFLOP/s | MFU | peak GiB | loss first -> last | 4-bit | attention |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error'][:120]} |")
            continue
        print(f"| {r['method']} | {r['params'] / 1e6:.0f}M | {r['trainable'] / 1e6:.1f}M | {r['tokens_per_s']:,} | "
              f"{r['tflops']} | {r['mfu']:.1%} | {r['peak_gib']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{','.join(r['quant_types']) or '-'} | {r['attention']} |")  # fmt: skip


if __name__ == "__main__":
    main()
