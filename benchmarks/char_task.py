"""A character-level task on an `--init-model` model: the BPE tokenizer against the char tokenizer.

The task: upper-case a random 4-6 letter string ("Upper-case: qzmfa" -> "QZMFA"). The eval strings never occur in
the training rows, so a model only scores by learning the letters, not by recalling whole-string tokens. Both runs
go through `finetune-operator run` (the local mode: prepare, train, evaluate, export) with the same model size,
steps and data; only `--init-tokenizer` differs. Run:

    python benchmarks/char_task.py [--steps 400] [--preset tiny-gpt2]

Prints a Markdown table: exact match on the eval rows and on as many training rows (the train-set score).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def rows(count: int, rng: random.Random, exclude: set[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    while len(out) < count:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 6)))
        if word in exclude:
            continue
        exclude.add(word)
        out.append({"instruction": "Upper-case:", "input": word, "output": word.upper()})
    return out


def manifest(root: Path, steps: int) -> Path:
    spec: dict[str, Any] = {
        "model": {"source": "./model"},
        "dataset": {"source": "./train.jsonl", "evalSource": "./eval.jsonl", "format": "completion",
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"},
                    "maxSeqLength": 64},
        "method": {"type": "full"},
        "training": {"maxSteps": steps, "learningRate": 0.003, "batchSize": 16, "loggingSteps": 50,
                     "checkpointEverySteps": 100_000},
        "resources": {"gpusPerWorker": 0},
        "evaluation": {"metrics": ["exactMatch"], "compareBase": False, "maxSamples": 100,
                       "generation": {"maxNewTokens": 8}},
        "export": {"formats": ["merged"]},
        "output": {"uri": "./out"},
    }  # fmt: skip
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "upper"}, "spec": spec}))  # fmt: skip
    return path


def run(tokenizer: str, steps: int, preset: str, data: tuple[list, list]) -> dict[str, Any]:
    from finetune_operator.local import Reporter, execute

    class Quiet(Reporter):
        def event(self, kind: str, reason: str, message: str) -> None: ...

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, part in zip(("train.jsonl", "eval.jsonl"), data, strict=True):
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        started = time.monotonic()
        job, _ = execute(manifest(root, steps), init=preset, init_tokenizer=tokenizer, reporter=Quiet())
        elapsed = time.monotonic() - started
        metrics = job.status.metrics
        assert metrics is not None, job.status.message
        return {"tokenizer": tokenizer, "eval": metrics.tuned["exactMatch"], "train": metrics.train["exactMatch"],
                "seconds": round(elapsed), "phase": job.status.phase}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--preset", default="tiny-gpt2", choices=["micro", "tiny-gpt2"])
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "char"])
    args = parser.parse_args()
    rng = random.Random(0)
    seen: set[str] = set()
    data = (rows(800, rng, seen), rows(100, rng, seen))
    results = [run(t, args.steps, args.preset, data) for t in args.tokenizers]
    print("| --init-tokenizer | exact match, eval (unseen strings) | exact match, train rows | run time |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['tokenizer']} | {r['eval']:.2f} | {r['train']:.2f} | {r['seconds']} s |")


if __name__ == "__main__":
    main()
