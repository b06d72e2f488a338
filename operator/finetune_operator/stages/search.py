"""The search stage: short trials of the real train code on the prepared data, steered by `scipy.optimize`.

Each trial trains the job's own trainer (same objective, method, precision) for `trialSteps` on the first
`maxTrainRows` prepared rows, then scores the model on `maxEvalRows` eval rows. The optimiser sees each parameter in
the space the user chose (the exponent for `scale: log`):

- one parameter: `minimize_scalar(method="bounded")`, Brent's bounded method (golden-section steps refined by
  parabolic fits): it never leaves the range and needs no starting point;
- several: `scipy.optimize.direct` (DIRECT): it divides the box into thirds around the best cells, so with a small
  budget it samples the whole range before it refines (a local method from one start point can sit in a bad basin),
  and it respects bounds by construction.

Both are deterministic. A restarted search replays the optimiser and answers the trials already in
`search/trials.json` from disk, so an interrupted search goes on at trial k+1, not at 1.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..api.spec import LOWER_IS_BETTER, FineTuneJobSpec, SearchSpec
from .contract import StageConfig, StageError, Workdir, emit, freeze_what_is_loaded

DEFAULT_TRIAL_STEPS = 50
RESULT_FILE = "result.json"
TRIALS_FILE = "trials.json"
INTEGER_PARAMETERS = ("lora.r", "lora.alpha")


@dataclass
class Trial:
    trial: int
    values: dict[str, float]
    objective: float | None
    steps: int = 0
    seconds: float = 0.0
    message: str | None = None


class BudgetSpent(Exception):
    """Raised inside the optimiser's objective once every trial of the budget has run."""


@dataclass
class SearchSpace:
    """The searched parameters as the optimiser sees them: bounds in the user's scale, values back in spec units."""

    names: list[str]
    bounds: list[tuple[float, float]]
    log: list[bool]

    @classmethod
    def of(cls, search: SearchSpec) -> SearchSpace:
        names, bounds, log = [], [], []
        for p in search.parameters:
            is_log = p.scale == "log"
            names.append(p.name)
            bounds.append((math.log10(p.min), math.log10(p.max)) if is_log else (p.min, p.max))
            log.append(is_log)
        return cls(names, bounds, log)

    def values(self, point: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, x, is_log, (low, high) in zip(self.names, list(point), self.log, self.bounds, strict=True):
            x = min(max(float(x), low), high)
            value = 10**x if is_log else x
            # 6 significant digits: a replayed optimiser point maps to the same trial key.
            out[name] = float(round(value)) if name in INTEGER_PARAMETERS else float(f"{value:.6g}")
        return out


@dataclass
class TrialBook:
    """Every finished trial, persisted after each one, keyed by its values."""

    path: Path
    trials: list[Trial] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> TrialBook:
        if not path.exists():
            return cls(path)
        rows = json.loads(path.read_text())
        return cls(path, [Trial(**row) for row in rows])

    def lookup(self, values: dict[str, float]) -> Trial | None:
        return next((t for t in self.trials if t.values == values), None)

    def add(self, trial: Trial) -> None:
        self.trials.append(trial)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(t) for t in self.trials], indent=2))
        os.replace(tmp, self.path)


def direction_of(search: SearchSpec) -> str:
    metric = search.objective.metric
    return search.objective.direction or ("minimize" if metric in LOWER_IS_BETTER else "maximize")


def optimise(
    space: SearchSpace,
    book: TrialBook,
    budget: int,
    direction: str,
    run_trial: Callable[[int, dict[str, float]], Trial],
) -> str:
    """Drive the optimiser until the budget is spent or it converges; returns the method's name."""
    from scipy.optimize import direct, minimize_scalar

    sign = 1.0 if direction == "minimize" else -1.0

    def loss(point: Any) -> float:
        values = space.values(point)
        trial = book.lookup(values)
        if trial is None:
            if len(book.trials) >= budget:
                raise BudgetSpent
            trial = run_trial(len(book.trials) + 1, values)
            book.add(trial)
        if trial.objective is None or not math.isfinite(trial.objective):
            return 1e12  # a diverged or failed trial: the worst possible score
        return sign * trial.objective

    try:
        if len(space.names) == 1:
            low, high = space.bounds[0]
            minimize_scalar(
                lambda x: loss([x]),
                bounds=(low, high),
                method="bounded",
                options={"xatol": 0.01 * (high - low), "maxiter": 4 * budget},
            )
            return "minimize_scalar(bounded)"
        direct(loss, space.bounds, maxfun=20 * budget, locally_biased=True)
        return "direct"
    except BudgetSpent:
        return "minimize_scalar(bounded)" if len(space.names) == 1 else "direct"


def best_trial(trials: list[Trial], direction: str) -> Trial | None:
    scored = [t for t in trials if t.objective is not None and math.isfinite(t.objective)]
    if not scored:
        return None
    pick = min if direction == "minimize" else max
    return pick(scored, key=lambda t: t.objective)  # type: ignore[arg-type,return-value]


def apply_values(spec: FineTuneJobSpec, values: dict[str, float]) -> FineTuneJobSpec:
    """The spec with the searched fields set to `values`."""
    data = spec.wire()
    for name, value in values.items():
        if name.startswith("lora."):
            data.setdefault("method", {}).setdefault("lora", {})[name.split(".", 1)[1]] = int(value)
        else:
            data.setdefault("training", {})[name] = value
    return FineTuneJobSpec.model_validate(data)


def searched_config(config: StageConfig, workdir: Workdir) -> tuple[StageConfig, dict[str, float] | None]:
    """For the train stage: the config with the search's winning values applied (unchanged without spec.search)."""
    if config.spec.search is None:
        return config, None
    result = workdir.search / RESULT_FILE
    if not result.exists():
        raise StageError(
            "spec.search is set but the search stage has not finished in this workspace (no search/result.json)",
            config_error=True,
        )
    best = json.loads(result.read_text()).get("best") or {}
    if not best:
        return config, None
    return config.model_copy(update={"spec": apply_values(config.spec, best)}), best


# ------------------------------------------------------------------------------------------------ real trials


def _trial_workspace(workdir: Workdir, search: SearchSpec) -> Workdir:
    """A workspace holding the first rows of the prepared splits, the tokenizer and the sources of the job's."""
    from datasets import load_from_disk

    trial = Workdir(workdir.search / "workspace")
    if not trial.train_data.exists():
        train = load_from_disk(str(workdir.train_data))
        evaluation = load_from_disk(str(workdir.eval_data)) if workdir.eval_data.exists() else None
        if evaluation is None or len(evaluation) == 0:
            raise StageError(
                "spec.search scores trials on the eval split, which is empty: set spec.dataset.validationFraction "
                "or spec.dataset.evalSource",
                config_error=True,
            )
        train.select(range(min(search.max_train_rows, len(train)))).save_to_disk(str(trial.train_data))
        evaluation.select(range(min(search.max_eval_rows, len(evaluation)))).save_to_disk(str(trial.eval_data))
        shutil.copy(workdir.sources_file(), trial.sources_file())
        if not trial.tokenizer.exists():
            trial.tokenizer.symlink_to(workdir.tokenizer.resolve(), target_is_directory=True)
    return trial


def trial_steps(search: SearchSpec, spec: FineTuneJobSpec, train_rows: int) -> int:
    if search.trial_epochs is None:
        return search.trial_steps or DEFAULT_TRIAL_STEPS
    per_step = spec.training.batch_size * spec.training.gradient_accumulation_steps
    return max(1, math.ceil(search.trial_epochs * train_rows / per_step))


def _trial_spec(spec: FineTuneJobSpec, values: dict[str, float], steps: int) -> FineTuneJobSpec:
    data = apply_values(spec, values).wire()
    training = data["training"]
    training.pop("epochs", None)
    training.update(maxSteps=steps, checkpointEverySteps=1_000_000, loggingSteps=max(1, steps))
    data.pop("search", None)
    return FineTuneJobSpec.model_validate(data)


def score(config: StageConfig, trainer: Any, tokenizer: Any, eval_rows: Any, metric: str) -> float:
    """The trial's objective on the eval rows, measured the way the evaluate stage measures it."""
    from .evaluate import evaluate_model

    objective = config.spec.training.objective
    if objective == "sft" or metric == "rewardAccuracy":
        wanted = "perplexity" if metric == "evalLoss" else metric
        spec = config.spec.model_copy(deep=True)
        spec.evaluation.metrics = [wanted] if wanted != "rewardAccuracy" else ["perplexity"]
        scoring = config.model_copy(update={"spec": spec})
        metrics, _ = evaluate_model(scoring, trainer.model.eval(), tokenizer, eval_rows)
        return float(metrics["loss" if metric == "evalLoss" else metric])
    pairs = eval_rows.select_columns(["prompt", "chosen", "rejected"])
    return float(trainer.evaluate(eval_dataset=pairs)["eval_loss"])


def run_one_trial(config: StageConfig, trial_work: Workdir, values: dict[str, float], steps: int) -> Trial:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    from .train import build_trainer, resolve_precision

    assert config.spec.search is not None
    metric = config.spec.search.objective.metric
    spec = _trial_spec(config.spec, values, steps)
    trial_config = config.model_copy(update={"spec": spec})
    started = time.monotonic()
    torch.manual_seed(spec.training.seed)  # every trial starts from the same state: only the values differ
    tokenizer = AutoTokenizer.from_pretrained(str(trial_work.tokenizer))
    trainer = build_trainer(trial_config, trial_work, tokenizer, resolve_precision(spec.training.precision))
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
        value = score(trial_config, trainer, tokenizer, load_from_disk(str(trial_work.eval_data)), metric)
        message = None if math.isfinite(value) else "the objective is not finite (the loss diverged)"
    finally:
        steps_done = trainer.state.global_step
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(trial_work.checkpoints, ignore_errors=True)
    return Trial(0, values, value if math.isfinite(value) else None, steps_done,
                 round(time.monotonic() - started, 2), message)  # fmt: skip


def run_search(config: StageConfig, workdir: Workdir) -> dict[str, Any]:
    search = config.spec.search
    if search is None:
        raise StageError("the search stage runs only with spec.search", config_error=True)
    direction = direction_of(search)
    trial_work = _trial_workspace(workdir, search)
    from datasets import load_from_disk

    steps = trial_steps(search, config.spec, len(load_from_disk(str(trial_work.train_data))))
    book = TrialBook.load(workdir.search / TRIALS_FILE)
    if book.trials:
        emit("step", "search", message=f"resuming after trial {len(book.trials)} of {search.trials}")
    space = SearchSpace.of(search)
    metric = search.objective.metric

    def run_trial(number: int, values: dict[str, float]) -> Trial:
        emit("trial", "search", trial=number, trials=search.trials, message=f"trial {number}: {_values_text(values)}")
        trial = run_one_trial(config, trial_work, values, steps)
        trial.trial = number
        shown = "failed" if trial.objective is None else f"{trial.objective:.4g}"
        emit("step", "search", message=f"trial {number}/{search.trials}: {_values_text(values)} -> {metric} {shown}")
        return trial

    freeze_what_is_loaded()  # before any trial's model exists: those are collected after their trial
    method = optimise(space, book, search.trials, direction, run_trial)
    winner = best_trial(book.trials, direction)
    if winner is None:
        raise StageError(f"every search trial failed to give a finite {metric}: lower the ranges' upper ends")
    result = {
        "metric": metric,
        "direction": direction,
        "method": method,
        "best": winner.values,
        "bestObjective": round(winner.objective, 6),  # type: ignore[arg-type]
        "bestTrial": winner.trial,
        "trials": [_trial_record(t) for t in book.trials],
    }
    (workdir.search / RESULT_FILE).write_text(json.dumps(result, indent=2))
    message = (
        f"best {_values_text(winner.values)} ({metric} {winner.objective:.4g}, trial {winner.trial} of "
        f"{len(book.trials)}, {method})"
    )
    return {"ok": True, "message": message, "search": result}


def _trial_record(trial: Trial) -> dict[str, Any]:
    record: dict[str, Any] = {"trial": trial.trial, "values": trial.values, "steps": trial.steps,
                              "seconds": trial.seconds}  # fmt: skip
    if trial.objective is not None:
        record["objective"] = round(trial.objective, 6)
    if trial.message:
        record["message"] = trial.message[:200]
    return record


def _values_text(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())
