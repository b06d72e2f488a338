"""Train-stage throughput against a plain PyTorch loop and against TRL's defaults.

Same model (the quickstart's ~3M-parameter GPT-2), same rows (the quickstart's Alpaca-layout data), same batch
size; the figure is real (non-padding) tokens per second. Run:

    python benchmarks/train_throughput.py [--steps 40] [--batch 16]

Prints a Markdown table (the README's benchmark table comes from it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "quickstart" / "data" / "train.jsonl"


def quickstart_spec(model: Path, batch: int, steps: int, packing: bool = False) -> dict[str, Any]:
    """The benchmarks' FineTuneJob spec: the quickstart rows, full fine-tuning on the CPU, no checkpoints."""
    return {
        "model": {"source": str(model)},
        "dataset": {"source": str(DATA), "format": "completion", "maxSeqLength": 256 if packing else 64,
                    "packing": packing, "columns": {"prompt": "instruction", "input": "input", "completion": "output"}},
        "method": {"type": "full"},
        "training": {"maxSteps": steps, "batchSize": batch, "learningRate": 1e-3, "loggingSteps": 10_000,
                     "checkpointEverySteps": 100_000},
        "resources": {"gpusPerWorker": 0},
        "output": {"uri": "/tmp/unused"},
    }  # fmt: skip


def _prepared(root: Path, model: Path, batch: int, steps: int, packing: bool = False) -> tuple[Any, Any]:
    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.stages.contract import StageConfig, Workdir
    from finetune_operator.stages.prepare import run_prepare

    spec = FineTuneJobSpec.model_validate(quickstart_spec(model, batch, steps, packing))
    config = StageConfig(job="bench", spec=spec, termination_log=str(root / "term"))
    work = Workdir(root / ("packed" if packing else "plain"))
    run_prepare(config, work)
    return config, work


def plain_loop(work: Any, batch: int, steps: int) -> float:
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(work.read_sources()["model"]["path"])
    rows = load_from_disk(str(work.train_data))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    real = 0
    start = time.perf_counter()
    for step in range(steps):
        chunk = rows.select([(step * batch + i) % len(rows) for i in range(batch)])
        longest = max(len(x) for x in chunk["input_ids"])
        ids = torch.full((batch, longest), tok.pad_token_id)
        labels = torch.full((batch, longest), -100)
        mask = torch.zeros((batch, longest), dtype=torch.long)
        for i, (x, y) in enumerate(zip(chunk["input_ids"], chunk["labels"], strict=True)):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        real += int(mask.sum())
    return real / (time.perf_counter() - start)


def train_stage(config: Any, work: Any) -> float:
    from transformers import AutoTokenizer

    from finetune_operator.stages.train import build_trainer, resolve_precision

    tok = AutoTokenizer.from_pretrained(work.tokenizer)
    trainer = build_trainer(config, work, tok, resolve_precision("auto"))
    start = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen / (time.perf_counter() - start)


def trl_defaults(model: Path, batch: int, steps: int, **overrides: Any) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    ds = Dataset.from_dict({
        "prompt": [f"{r['instruction']}\n{r['input']}\n" for r in rows],
        "completion": [r["output"] + tok.eos_token for r in rows],
    })  # fmt: skip
    # use_cpu: without it transformers refuses TRL's bf16 default on a machine without a GPU.
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                     logging_steps=10_000, include_num_input_tokens_seen="non_padding", **overrides)  # fmt: skip
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, train_dataset=ds,
                         processing_class=tok)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import os

    import torch

    from finetune_operator.stages.tiny import build_tiny_model, corpus_from_jsonl

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", corpus_from_jsonl(DATA), preset="tiny-gpt2")
        params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model)
                     .parameters())  # fmt: skip
        config, work = _prepared(root, model, args.batch, args.steps)
        packed_config, packed_work = _prepared(root, model, max(args.batch // 4, 1), args.steps // 4, packing=True)
        results = [
            ("plain PyTorch loop (dynamic padding, AdamW, clipping)", plain_loop(work, args.batch, args.steps)),
            ("train stage (SFTTrainer as configured here)", train_stage(config, work)),
            ("train stage, packing on (wrapped, 256-token blocks)", train_stage(packed_config, packed_work)),
            ("TRL SFTTrainer defaults (bf16 autocast + gradient checkpointing)",
             trl_defaults(model, args.batch, args.steps)),
            ("TRL defaults, gradient checkpointing off", trl_defaults(model, args.batch, args.steps,
                                                                      gradient_checkpointing=False)),
            ("TRL defaults + packing=True (bfd, padding-free, no flash-attention)",
             trl_defaults(model, args.batch, max(args.steps // 20, 2), packing=True, max_length=256)),
        ]  # fmt: skip
    print(f"\n{params / 1e6:.1f}M-parameter GPT-2, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")  # fmt: skip
    print("| run | real tokens/s | vs plain loop |")
    print("|---|---:|---:|")
    base = results[0][1]
    for name, rate in results:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
