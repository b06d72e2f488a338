"""Batch sizes that do not end in CUDA out-of-memory, on a real GPU: `batchSize: auto` and the OOM recovery.

The CPU tests can only inject an out-of-memory error; this runs the real prepare and train stages (`run_stage`, as
in a pod) on a CUDA GPU with a full bf16 fine-tune of a random-init GPT-2 (default ~350M parameters, 1,024-token
packed blocks) twice:

- `auto`: `training.batchSize: auto` + `effectiveBatchSize`, the GPU named by its node label
  (`nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`): the micro-batch the estimate picks, whether it ran without an
  out-of-memory error, and the measured peak (`torch.cuda.max_memory_allocated`) against the card.
- `oom`: a fixed micro-batch far too large for the card (default 256 x 1,024 tokens): the stage must hit a real CUDA
  out-of-memory error, halve the micro-batch (raising accumulation, same effective batch) until it fits, finish
  its steps and record every recovery in its summary.

    PYTHONPATH=operator python benchmarks/gpu_batch.py                # on a CUDA GPU (~2 minutes on an H100)
    PYTHONPATH=operator python benchmarks/gpu_batch.py --cpu-smoke    # tiny sizes on a CPU: checks the script

Writes gpu_batch.json to $OUT (default ./out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

H100_LABEL = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "tree", "river", "stone", "cloud", "light", "dark", "fast",
         "slow", "high", "low", "open", "close", "warm", "cold"]  # fmt: skip


def write_rows(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Unique completion rows of random words (prepare drops duplicates, so every row must differ)."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            out.write(json.dumps({"instruction": f"Continue {i}.", "input": text[:40], "output": text}) + "\n")
    return path


def spec(model: Path, data: Path, batch: int | str, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    return {
        "model": {"source": str(model)},
        "dataset": {"source": str(data), "format": "completion", "maxSeqLength": args.seq, "packing": True,
                    "validationFraction": 0.01,
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"}},
        "method": {"type": "full"},
        "training": {"maxSteps": args.steps, "batchSize": batch, "effectiveBatchSize": args.effective,
                     "learningRate": 1e-4, "loggingSteps": 1, "checkpointEverySteps": 100_000,
                     "precision": "bf16" if cuda else "fp32"},
        "resources": {"gpusPerWorker": 1 if cuda else 0},
        "scheduling": {"nodeSelector": H100_LABEL} if cuda else {},
        "evaluation": {"enabled": False, "gates": []},
        "output": {"uri": "/tmp/unused"},
    }  # fmt: skip


def run_case(root: Path, name: str, job_spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.stages.contract import StageConfig
    from finetune_operator.stages.runner import run_stage

    work = root / name
    work.mkdir(parents=True)
    config = StageConfig(job=f"gpu-{name}", spec=FineTuneJobSpec.model_validate(job_spec),
                         termination_log=str(work / "termination-log"))  # fmt: skip
    config_path = work / "config.json"
    config_path.write_text(config.model_dump_json(by_alias=True))
    codes = {"prepare": run_stage("prepare", config_path, work / "w")}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    codes["train"] = run_stage("train", config_path, work / "w")
    seconds = time.perf_counter() - started
    summary = json.loads((work / "w" / "summaries" / "train.json").read_text())
    estimate = work / "w" / "reports" / "estimate.json"
    return {
        "case": name, "exitCodes": codes, "seconds": round(seconds, 1),
        "peakGiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "cardGiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2) if cuda else None,
        "summary": {k: summary.get(k) for k in ("ok", "message", "steps", "microBatch", "gradientAccumulationSteps",
                                                "oomRecoveries", "finalLoss", "batch")},
        "estimateInputs": json.loads(estimate.read_text()) if estimate.exists() else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--effective", type=int, default=256, help="effectiveBatchSize (sequences per step)")
    parser.add_argument("--too-large", type=int, default=256, help="the fixed micro-batch of the oom case")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.layers, args.hidden, args.seq, args.effective, args.too_large, args.rows = 2, 64, 64, 8, 8, 400
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch

    from finetune_operator.stages import tiny

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (--cpu-smoke checks the script on a CPU)")
    tiny.PRESETS["gpu"] = {"n_layer": args.layers, "n_head": max(args.hidden // 64, 1), "n_embd": args.hidden,
                           "vocab_size": 4096}  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = write_rows(root / "rows.jsonl", args.rows, words=60)
        model = tiny.build_tiny_model(root / "model", tiny.corpus_from_jsonl(data), preset="gpu", n_positions=args.seq)
        for name, batch in (("auto", "auto"), ("oom", args.too_large)):
            try:
                rows.append(run_case(root, name, spec(model, data, batch, args, cuda)))
            except Exception as exc:  # report both cases even when one breaks
                rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:800]})
            print(json.dumps(rows[-1], default=str), flush=True)
    device = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_batch.json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))
    print(f"\n{device['gpu']}, torch {device['torch']}\n")
    print("| case | exit (prepare, train) | steps | micro-batch x accumulation | OOM recoveries | peak GiB / card |")
    print("|---|---|---:|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | error: {r['error'][:150]} |")
            continue
        s = r["summary"]
        recoveries = " -> ".join(str(x["microBatch"]) for x in s["oomRecoveries"] or []) or "none"
        batch = f"{s['microBatch']} x {s['gradientAccumulationSteps']}"
        print(f"| {r['case']} | {r['exitCodes']['prepare']}, {r['exitCodes']['train']} | {s['steps']} | {batch} | "
              f"{recoveries} | {r['peakGiB']} / {r['cardGiB']} |")  # fmt: skip


if __name__ == "__main__":
    main()
