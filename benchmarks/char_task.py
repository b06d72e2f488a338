"""A character-level task on an `--init-model` model: the BPE tokenizer against the char tokenizer.

The task: upper-case a made-up 4-6 letter word ("Upper-case: qzmfa" -> "QZMFA"). Every word also occurs in
"Repeat:" rows, as words recur in real data, so the BPE tokenizer makes each one a single token; the upper-case of
the 60 eval words is never shown, so a model only scores by learning letters. Both runs
use the same model size, steps and data; only `--init-tokenizer` differs (the model is built as `run --init-model`
builds it, then the prepare, train and evaluate stage programs run in this process). Run:

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


def task_data(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval rows over 240 made-up words, each also seen in a "Repeat:" row, as words recur in real data.

    So the BPE tokenizer learns every word as one token; the upper-case of the 60 eval words is never shown.
    """
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < 240:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 6)))
        if word not in words:
            words.append(word)
    repeat = [{"instruction": "Repeat:", "input": w, "output": w} for w in words for _ in range(3)]
    upper = [{"instruction": "Upper-case:", "input": w, "output": w.upper()} for w in words]
    train = repeat + upper[:180] * 2
    rng.shuffle(train)
    return train, upper[180:]


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
    """`--init-model PRESET --init-tokenizer TOKENIZER`, then prepare, train and evaluate (in this process)."""
    from finetune_operator.api.job import FineTuneJob
    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.local import init_model
    from finetune_operator.stages.contract import StageConfig
    from finetune_operator.stages.runner import run_stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, part in zip(("train.jsonl", "eval.jsonl"), data, strict=True):
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        path = manifest(root, steps)
        raw = yaml.safe_load(path.read_text())
        spec = FineTuneJobSpec.model_validate(raw["spec"])
        started = time.monotonic()
        init_model(preset, FineTuneJob(metadata=raw["metadata"], spec=spec), path, tokenizer)
        config = root / "stage.json"
        stage_config = StageConfig(job="upper", spec=spec, base_dir=str(root), termination_log=str(root / "t.log"))
        config.write_text(stage_config.model_dump_json(by_alias=True))
        for stage in ("prepare", "train", "evaluate"):
            code = run_stage(stage, config, root / "work")
            if code != 0:
                raise SystemExit(
                    f"{stage} failed ({code}): {(root / 'work' / 'summaries' / f'{stage}.json').read_text()}"
                )
        summary = json.loads((root / "work" / "summaries" / "evaluate.json").read_text())
        preflight = json.loads((root / "work" / "reports" / "preflight.json").read_text())
        return {"tokenizer": tokenizer, "eval": summary["metrics"]["tuned"]["exactMatch"],
                "train": summary["metrics"]["train"]["exactMatch"], "vocab": preflight["tokenizer"]["vocab"],
                "tokens": preflight["tokens"]["mean"], "seconds": round(time.monotonic() - started)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--preset", default="tiny-gpt2", choices=["micro", "tiny-gpt2"])
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "char"])
    args = parser.parse_args()
    data = task_data()
    results = [run(t, args.steps, args.preset, data) for t in args.tokenizers]
    print(
        "| --init-tokenizer | vocab | mean tokens/row | exact match, eval (unseen strings) | exact match, train rows |"
    )
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['tokenizer']} | {r['vocab']} | {r['tokens']} | {r['eval']:.2f} | {r['train']:.2f} |")


if __name__ == "__main__":
    main()
