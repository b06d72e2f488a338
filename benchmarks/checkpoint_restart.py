"""What a checkpoint costs at the default interval, and how long a gang restart takes.

Checkpoint cost: the quickstart's ~3.4M-parameter GPT-2 on the quickstart rows, trained by the train stage with
checkpoints at the default `checkpointEverySteps` (100); the figures are the seconds one checkpoint takes (from
the end of its step until every rank saved and the completion marker is written), its size, and the share of
training time it costs at that interval.

Restart: 2 local workers (gloo, CPU), one SIGKILLed after the first checkpoint; the figure is the wall time from
the kill to the first training step of the next attempt, once for the local supervisor's gang restart (what local
mode does, and what the operator does when it replaces the train Job, less the pod scheduling) and once for
torchrun's own `--max-restarts` (its elastic agent restarts the ranks in place). Run:

    python benchmarks/checkpoint_restart.py [--steps 100]

Prints Markdown rows for the README's benchmark tables.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "quickstart" / "data" / "train.jsonl"


def _spec(model: Path, steps: int, every: int, method: str = "full", workers: int = 1) -> dict[str, Any]:
    return {
        "model": {"source": str(model)},
        "dataset": {"source": str(DATA), "format": "completion", "maxSeqLength": 64,
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"}},
        "method": {"type": method},
        "training": {"maxSteps": steps, "batchSize": 16, "learningRate": 1e-3, "loggingSteps": 10,
                     "checkpointEverySteps": every},
        "resources": {"gpusPerWorker": 0, "workers": workers},
        "storage": {"workspace": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}},
        "output": {"uri": "/tmp/unused"},
    }  # fmt: skip


def _job(root: Path, spec: dict[str, Any]) -> tuple[Any, Any]:
    from finetune_operator.api.job import FineTuneJob
    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.local import LocalRun, stage_config
    from finetune_operator.stages.runner import run_stage

    job = FineTuneJob(metadata={"name": "bench"}, spec=FineTuneJobSpec.model_validate(spec))
    run = LocalRun(manifest=root / "job.yaml", output=root / "out")
    work = run.workdir(1)
    assert run_stage("prepare", stage_config(job, run, work, "prepare"), work.root) == 0
    return job, run


def checkpoint_cost(root: Path, model: Path, steps: int, method: str) -> dict[str, Any]:
    """Train in a subprocess (as the pods do) with checkpoints at the default interval; the stage reports what
    each checkpoint took (from the end of the step to the completion marker)."""
    from finetune_operator.api.spec import TrainingSpec
    from finetune_operator.local import stage_config

    every = TrainingSpec.model_fields["checkpoint_every_steps"].default
    job, run = _job(root / method, _spec(model, steps, every, method))
    work = run.workdir(1)
    config = stage_config(job, run, work, "train")
    command = [sys.executable, "-m", "finetune_operator.stages", "train", "--config", str(config)]
    subprocess.run([*command, "--workdir", str(work.root)], check=True, capture_output=True)
    summary = json.loads(work.summary_file("train").read_text())
    saves = steps // every
    newest = max(work.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    train_seconds = summary["runtimeSeconds"] - saves * summary["checkpointSeconds"]
    return {
        "every": every,
        "save": summary["checkpointSeconds"],
        "step": train_seconds / steps,
        "size_mb": sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 1e6,
    }


def gang_restart(root: Path, model: Path) -> float:
    """Seconds from SIGKILL of one of 2 workers to the next attempt's first step (local supervisor)."""
    from finetune_operator.local import Reporter, kill_tree, run_stage_processes
    from finetune_operator.stages.train import latest_valid_checkpoint

    spec = _spec(model, 30, 10, workers=2)
    spec["training"].update(loggingSteps=1)
    job, run = _job(root / "gang", spec)
    marks: dict[str, float] = {}

    class Killer(Reporter):
        pids: dict[int, list[int]] = {}

        def event(self, kind: str, reason: str, message: str) -> None: ...

        def workers_started(self, stage: str, attempt: int, pids: list[int]) -> None:
            self.pids[attempt] = pids

        def record(self, stage: str, record: dict[str, Any]) -> None:
            if record.get("finetune.dev/progress") != "progress":
                return
            if "killed" not in marks and latest_valid_checkpoint(run.workdir(1).checkpoints):
                marks["killed"] = time.monotonic()
                kill_tree(self.pids[1][1])
            elif "killed" in marks and 2 in self.pids and "resumed" not in marks:
                marks["resumed"] = time.monotonic()

    assert run_stage_processes(job, run, "train", Killer()) == 0
    return marks["resumed"] - marks["killed"]


def torchrun_restart(root: Path, model: Path) -> float:
    """The same with torchrun --max-restarts=1 (one agent, 2 ranks): its agent restarts the ranks in place."""
    from finetune_operator.local import stage_config
    from finetune_operator.stages.train import latest_valid_checkpoint

    spec = _spec(model, 30, 10)
    spec["training"].update(loggingSteps=1)
    job, run = _job(root / "elastic", spec)
    work = run.workdir(1)
    config = stage_config(job, run, work, "train")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         "-m", "finetune_operator.stages", "train", "--config", str(config), "--workdir", str(work.root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    marks: dict[str, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"progress", "stage": "train"' not in line:
            continue
        if "killed" not in marks and latest_valid_checkpoint(work.checkpoints):
            marks["killed"] = time.monotonic()
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            os.kill(int(ranks[-1]), signal.SIGKILL)
        elif "killed" in marks and "resumed" not in marks and time.monotonic() - marks["killed"] > 0.5:
            marks["resumed"] = time.monotonic()
    proc.wait()
    return marks["resumed"] - marks["killed"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from finetune_operator.stages.tiny import build_tiny_model, corpus_from_jsonl

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", corpus_from_jsonl(DATA), preset="tiny-gpt2")
        print("| run | checkpoint size | seconds per checkpoint | seconds per step | cost at the default interval |")
        print("|---|---:|---:|---:|---:|")
        for method in ("full", "lora"):
            cost = checkpoint_cost(root, model, args.steps, method)
            share = cost["save"] / (cost["every"] * cost["step"] + cost["save"])
            print(f"| {method} | {cost['size_mb']:.1f} MB | {cost['save']:.2f} | {cost['step']:.3f} | "
                  f"{100 * share:.1f}% (one per {cost['every']} steps) |")  # fmt: skip
        results: dict[str, float] = {}
        results["supervisor"] = gang_restart(root, model)
        results["torchrun"] = torchrun_restart(root, model)
        print()
        print("| restart after SIGKILL of one of 2 workers | kill -> first step of the next attempt |")
        print("|---|---:|")
        print(f"| gang restart by the local supervisor (new processes, resume) | {results['supervisor']:.1f} s |")
        print(f"| torchrun --max-restarts (agent restarts the ranks in place) | {results['torchrun']:.1f} s |")


if __name__ == "__main__":
    main()
