"""The search stage against a grid, and the multi-parameter optimisers against each other, on real trials.

    python benchmarks/search.py [--preset tiny-gpt2] [--trials 8] [--steps 30]

Data: the quickstart's rows (`examples/quickstart/data`), a random-init model built offline. Part 1 searches
learningRate over [1e-5, 0.3] (log) with the stage's optimiser and scores the same trials on a 16-point grid. Part 2
searches learningRate x warmupRatio with the same budget three ways: DIRECT (what the stage uses), Nelder-Mead with
bounds, and a scrambled Sobol sample (no optimiser). Prints Markdown tables (the README's come from them).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "quickstart" / "data"


def _config(root: Path, model: Path, search: dict[str, Any]) -> Any:
    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.stages.contract import StageConfig

    spec = FineTuneJobSpec.model_validate({
        "model": {"source": str(model)},
        "dataset": {"source": str(DATA / "train.jsonl"), "evalSource": str(DATA / "eval.jsonl"),
                    "format": "completion", "maxSeqLength": 64,
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"}},
        "method": {"type": "full"},
        "training": {"maxSteps": 100, "batchSize": 16},
        "resources": {"gpusPerWorker": 0},
        "search": search,
        "output": {"uri": str(root / "out")},
    })  # fmt: skip
    return StageConfig(job="bench", spec=spec, termination_log=str(root / "term"))


def _grid(config: Any, trial_work: Any, steps: int, points: int) -> list[tuple[float, float | None]]:
    from finetune_operator.stages.search import run_one_trial

    grid = [10 ** (-5 + i * (math.log10(0.3) + 5) / (points - 1)) for i in range(points)]
    return [(lr, run_one_trial(config, trial_work, {"learningRate": float(f"{lr:.6g}")}, steps).objective)
            for lr in grid]  # fmt: skip


def _two_parameter_runs(config: Any, trial_work: Any, steps: int, budget: int) -> list[tuple[str, float, float]]:
    """Best objective and wall time of three strategies with the same trial budget."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.stats import qmc

    from finetune_operator.stages.search import BudgetSpent, SearchSpace, TrialBook, optimise, run_one_trial

    space = SearchSpace.of(config.spec.search)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        book = TrialBook(Path(scratch) / "direct.json")
        optimise(space, book, budget, "minimize",
                 lambda n, v: _numbered(run_one_trial(config, trial_work, v, steps), n))  # fmt: skip
        rows.append(("DIRECT (the stage's choice)", _best(book.trials), time.perf_counter() - started))

    seen: list[float] = []

    def loss(point: Any) -> float:
        if len(seen) >= budget:
            raise BudgetSpent
        value = run_one_trial(config, trial_work, space.values(point), steps).objective
        seen.append(value if value is not None else math.inf)
        return seen[-1] if math.isfinite(seen[-1]) else 1e12

    started = time.perf_counter()
    centre = [(low + high) / 2 for low, high in space.bounds]
    with contextlib.suppress(BudgetSpent):
        minimize(loss, centre, method="Nelder-Mead", bounds=space.bounds, options={"maxfev": budget})
    rows.append(("Nelder-Mead with bounds, from the centre", min(seen), time.perf_counter() - started))

    started = time.perf_counter()
    sample = qmc.scale(qmc.Sobol(len(space.bounds), seed=0).random(budget), *np.array(space.bounds).T)
    scores = [run_one_trial(config, trial_work, space.values(p), steps).objective for p in sample]
    rows.append(("Sobol sample, no optimiser", min(s for s in scores if s is not None), time.perf_counter() - started))
    return rows


def _numbered(trial: Any, number: int) -> Any:
    trial.trial = number
    return trial


def _best(trials: list[Any]) -> float:
    return min(t.objective for t in trials if t.objective is not None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-gpt2")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from finetune_operator.stages.contract import Workdir
    from finetune_operator.stages.prepare import run_prepare
    from finetune_operator.stages.search import run_search
    from finetune_operator.stages.tiny import build_tiny_model, corpus_from_jsonl

    lr = {"name": "learningRate", "min": 1e-5, "max": 0.3}
    one = {"parameters": [lr], "trials": args.trials, "trialSteps": args.steps, "maxTrainRows": 1000}
    two = {**one, "parameters": [lr, {"name": "warmupRatio", "min": 0.0, "max": 0.5, "scale": "linear"}]}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", corpus_from_jsonl(DATA / "train.jsonl"), preset=args.preset)
        config = _config(root, model, one)
        work = Workdir(root / "work")
        run_prepare(config, work)
        started = time.perf_counter()
        found = run_search(config, work)["search"]
        search_seconds = time.perf_counter() - started
        trial_work = Workdir(work.root / "search" / "workspace")
        started = time.perf_counter()
        grid = _grid(config, trial_work, args.steps, 16)
        grid_seconds = time.perf_counter() - started
        multi = _two_parameter_runs(_config(root, model, two), trial_work, args.steps, args.trials)

    best_grid = min((s, lr) for lr, s in grid if s is not None)
    print(f"\n{args.preset}, trials of {args.steps} steps x batch 16 on the quickstart rows; objective eval loss\n")
    print("| learningRate in [1e-5, 0.3], log | trials | best learningRate | eval loss | time |")
    print("|---|---:|---:|---:|---:|")
    print(f"| search stage ({found['method']}) | {len(found['trials'])} | {found['best']['learningRate']:.3g} | "
          f"{found['bestObjective']:.4f} | {search_seconds:.0f} s |")  # fmt: skip
    print(f"| 16-point grid | 16 | {best_grid[1]:.3g} | {best_grid[0]:.4f} | {grid_seconds:.0f} s |")
    print(f"| low end of the range (1e-5) | 1 | 1e-05 | {grid[0][1]:.4f} | |")
    print(f"\n| learningRate x warmupRatio, {args.trials} trials each | best eval loss | time |")
    print("|---|---:|---:|")
    for name, value, seconds in multi:
        print(f"| {name} | {value:.4f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
