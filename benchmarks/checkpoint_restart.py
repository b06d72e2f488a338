"""What a checkpoint costs at the default interval, and how long a gang restart takes.

Checkpoint cost: the quickstart's ~3.4M-parameter GPT-2 on the quickstart rows (the model, rows and spec of
train_throughput.py), trained by the train stage for a few steps with a checkpoint every few; the figures are the
seconds one checkpoint takes (from the end of its step until every rank saved and the completion marker is
written), its size, the seconds per step, and from those the share of training time a checkpoint costs at the
default `checkpointEverySteps` (100; running 100 steps per figure would take most of an hour on busy cores).

Restart: 2 local workers (gloo, CPU), one SIGKILLed after the first checkpoint; the figure is the wall time from
the kill to the first training step of the next attempt, once for the local supervisor's gang restart (what local
mode does, and what the operator does when it replaces the train Job, less the pod scheduling) and once for
torchrun's own `--max-restarts` (its elastic agent restarts the ranks in place). Run:

    python benchmarks/checkpoint_restart.py [--steps 12] [--every 4] [--only checkpoint|restart|gang-restart]

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

from train_throughput import DATA, quickstart_spec  # the same model, rows and spec as the throughput figures


def _spec(model: Path, steps: int, every: int, method: str = "full", workers: int = 1) -> dict[str, Any]:
    spec = quickstart_spec(model, batch=16, steps=steps)
    spec["method"] = {"type": method}
    spec["training"].update(loggingSteps=1, checkpointEverySteps=every)
    spec["resources"]["workers"] = workers
    spec["storage"] = {"workspace": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}}
    return spec


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


def checkpoint_cost(root: Path, model: Path, steps: int, every: int, method: str) -> dict[str, Any]:
    """Train in a subprocess (as the pods do), saving a checkpoint every `every` steps; the stage reports what
    each checkpoint took (from the end of its step until every rank saved and the completion marker is written)
    and its progress lines time the steps. The cost at the default interval follows from the two."""
    from finetune_operator.local import stage_config

    job, run = _job(root / method, _spec(model, steps, every, method))
    work = run.workdir(1)
    config = stage_config(job, run, work, "train")
    command = [sys.executable, "-m", "finetune_operator.stages", "train", "--config", str(config)]
    done = subprocess.run([*command, "--workdir", str(work.root)], check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"finetune.dev/progress"')]
    logged = [r for r in records if r["finetune.dev/progress"] == "progress"]
    saves = [r for r in records if r["finetune.dev/progress"] == "checkpoint"]
    first, last = logged[0], logged[-1]
    # Step time from the progress lines (not the stage's runtime, which includes loading the model), less the
    # checkpoints saved in between.
    saved_between = sum(r["saveSeconds"] for r in saves if first["time"] < r["time"] <= last["time"])
    newest = max(work.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return {
        "save": sum(r["saveSeconds"] for r in saves) / len(saves),
        "saves": len(saves),
        "step": (last["time"] - first["time"] - saved_between) / (last["step"] - first["step"]),
        "size_mb": sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 1e6,
    }


def gang_restart(root: Path, model: Path) -> float:
    """Seconds from SIGKILL of one of 2 workers to the next attempt's first step (local supervisor)."""
    from finetune_operator.local import Reporter, kill_tree, run_stage_processes
    from finetune_operator.stages.train import latest_valid_checkpoint

    spec = _spec(model, 12, 4, workers=2)
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

    spec = _spec(model, 12, 4)
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
    parser.add_argument("--steps", type=int, default=12, help="steps per checkpoint-cost run")
    parser.add_argument("--every", type=int, default=4, help="a checkpoint every this many steps in those runs")
    parser.add_argument(
        "--only",
        choices=("checkpoint", "restart", "gang-restart"),
        help="measure one part (default all; gang-restart: the supervisor's restart alone)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from finetune_operator.stages.tiny import build_tiny_model, corpus_from_jsonl

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", corpus_from_jsonl(DATA), preset="tiny-gpt2")
        if args.only in (None, "checkpoint"):
            checkpoint_table(root, model, args.steps, args.every)
        if args.only != "checkpoint":
            restart_table(root, model, torchrun=args.only != "gang-restart")


def checkpoint_table(root: Path, model: Path, steps: int, every: int) -> None:
    from finetune_operator.api.spec import TrainingSpec

    default = TrainingSpec.model_fields["checkpoint_every_steps"].default
    print("| run | checkpoint size | seconds per checkpoint | seconds per step | cost at the default interval |")
    print("|---|---:|---:|---:|---:|")
    for method in ("full", "lora"):
        cost = checkpoint_cost(root, model, steps, every, method)
        share = cost["save"] / (default * cost["step"] + cost["save"])
        print(f"| {method} | {cost['size_mb']:.1f} MB | {cost['save']:.2f} ({cost['saves']} saves) | "
              f"{cost['step']:.2f} | {100 * share:.2f}% (one per {default} steps) |")  # fmt: skip


def restart_table(root: Path, model: Path, torchrun: bool = True) -> None:
    print()
    print("| restart after SIGKILL of one of 2 workers | kill -> first step of the next attempt |")
    print("|---|---:|")
    seconds = gang_restart(root, model)
    print(f"| gang restart by the local supervisor (new processes, resume) | {seconds:.1f} s |", flush=True)
    if torchrun:
        seconds = torchrun_restart(root, model)
        print(f"| torchrun --max-restarts (agent restarts the ranks in place) | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
