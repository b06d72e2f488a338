"""spec.search: the SciPy-driven hyper-parameter search stage between prepare and train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_operator.api.job import FineTuneJob
from finetune_operator.api.spec import FineTuneJobSpec, SearchSpec
from finetune_operator.api.validation import validate_object
from finetune_operator.cluster.build import build_stage
from finetune_operator.planner import Observed, ObservedStage, plan, stages_for
from finetune_operator.stages.runner import run_stage
from finetune_operator.stages.search import (
    SearchSpace,
    Trial,
    TrialBook,
    best_trial,
    optimise,
    run_one_trial,
    trial_steps,
)

from .conftest import MINIMAL_JOB, first_word_rows, local_spec, stage_config, write_jsonl
from .test_planner import DONE, T0, make_job, step

LR_SEARCH = {"parameters": [{"name": "learningRate", "min": 1e-5, "max": 0.3}], "trials": 8, "trialSteps": 30}


# ------------------------------------------------------------------------------ the optimiser, on known functions


def _book(tmp_path: Path) -> TrialBook:
    return TrialBook.load(tmp_path / "trials.json")


def _fake_trials(objective, calls: list[dict[str, float]]):
    def run_trial(number: int, values: dict[str, float]) -> Trial:
        calls.append(values)
        return Trial(number, values, objective(values), steps=1, seconds=0.0)

    return run_trial


def test_one_parameter_uses_bounded_brent_in_log_space_within_the_budget(tmp_path):
    search = SearchSpec.model_validate(LR_SEARCH)
    space = SearchSpace.of(search)
    calls: list[dict[str, float]] = []
    # A loss whose best learning rate is 3e-3: quadratic in the exponent, as learning-rate curves roughly are.
    objective = lambda v: (math.log10(v["learningRate"]) - math.log10(3e-3)) ** 2 + 1.0  # noqa: E731
    book = _book(tmp_path)
    method = optimise(space, book, 8, "minimize", _fake_trials(objective, calls))
    assert method == "minimize_scalar(bounded)"
    assert 2 <= len(calls) <= 8 and len(book.trials) == len(calls)
    assert all(1e-5 <= c["learningRate"] <= 0.3 for c in calls)
    best = best_trial(book.trials, "minimize")
    assert best is not None and abs(math.log10(best.values["learningRate"] / 3e-3)) < 0.25


def test_several_parameters_use_direct_and_respect_bounds_and_integers(tmp_path):
    search = SearchSpec.model_validate({"parameters": [
        {"name": "learningRate", "min": 1e-4, "max": 1e-1},
        {"name": "lora.r", "min": 2, "max": 64},
        {"name": "warmupRatio", "min": 0.0, "max": 0.3, "scale": "linear"},
    ], "trials": 12})  # fmt: skip
    calls: list[dict[str, float]] = []
    objective = lambda v: abs(math.log10(v["learningRate"]) + 2) + abs(math.log2(v["lora.r"]) - 4) + v["warmupRatio"]  # noqa: E731
    book = _book(tmp_path)
    method = optimise(SearchSpace.of(search), book, 12, "minimize", _fake_trials(objective, calls))
    assert method == "direct" and len(book.trials) == 12
    for values in calls:
        assert 1e-4 <= values["learningRate"] <= 1e-1 and 0 <= values["warmupRatio"] <= 0.3
        assert values["lora.r"] == int(values["lora.r"]) and 2 <= values["lora.r"] <= 64
    best = best_trial(book.trials, "minimize")
    assert best is not None and best.objective < objective({"learningRate": 1e-4, "lora.r": 2, "warmupRatio": 0.3})


def test_an_interrupted_search_resumes_at_the_next_trial(tmp_path):
    search = SearchSpec.model_validate({**LR_SEARCH, "trials": 6})
    objective = lambda v: (math.log10(v["learningRate"]) + 2.5) ** 2  # noqa: E731
    calls: list[dict[str, float]] = []
    run = _fake_trials(objective, calls)

    def dies_at_trial_4(number: int, values: dict[str, float]) -> Trial:
        if number == 4:
            raise KeyboardInterrupt  # the pod is killed while trial 4 trains
        return run(number, values)

    with pytest.raises(KeyboardInterrupt):
        optimise(SearchSpace.of(search), _book(tmp_path), 6, "minimize", dies_at_trial_4)
    assert [t["trial"] for t in json.loads((tmp_path / "trials.json").read_text())] == [1, 2, 3]

    numbers: list[int] = []

    def counting(number: int, values: dict[str, float]) -> Trial:
        numbers.append(number)
        return run(number, values)

    book = _book(tmp_path)
    optimise(SearchSpace.of(search), book, 6, "minimize", counting)
    assert numbers[0] == 4, "trials 1-3 were answered from disk, not trained again"
    assert [t.trial for t in book.trials] == list(range(1, len(book.trials) + 1)) and len(book.trials) <= 6
    uninterrupted = _book(tmp_path / "fresh")
    optimise(SearchSpace.of(search), uninterrupted, 6, "minimize", _fake_trials(objective, []))
    assert [t.values for t in uninterrupted.trials] == [t.values for t in book.trials]


def test_a_diverged_trial_scores_worst_and_never_wins(tmp_path):
    search = SearchSpec.model_validate({**LR_SEARCH, "trials": 5})
    objective = lambda v: math.nan if v["learningRate"] > 0.01 else -math.log10(v["learningRate"])  # noqa: E731
    book = _book(tmp_path)
    optimise(SearchSpace.of(search), book, 5, "minimize", _fake_trials(objective, []))
    best = best_trial(book.trials, "minimize")
    assert best is not None and best.values["learningRate"] <= 0.01


# ---------------------------------------------------------------------------------- API: validate and the planner


def _manifest(search: dict, **spec_changes) -> dict:
    raw = json.loads(json.dumps(MINIMAL_JOB))
    raw["spec"]["search"] = search
    for key, value in spec_changes.items():
        raw["spec"][key] = {**raw["spec"].get(key, {}), **value}
    return raw


@pytest.mark.parametrize(
    ("search", "changes", "field", "text"),
    [
        ({"parameters": [{"name": "learningRate", "min": 0.1, "max": 0.01}]}, {}, "spec.search.parameters[0].max",
         "min must be below max"),
        ({"parameters": [{"name": "learningRate", "min": 0, "max": 0.01}]}, {}, "spec.search.parameters[0].min",
         "log-scale range must start above 0"),
        ({"parameters": [{"name": "lora.r", "min": 1, "max": 5000}]}, {}, "spec.search.parameters[0].max",
         "outside what the parameter allows"),
        ({"parameters": [{"name": "learningRate", "min": 1e-5, "max": 1e-3},
                         {"name": "learningRate", "min": 1e-4, "max": 1e-2}]}, {}, "spec.search.parameters",
         "listed once"),
        ({"parameters": [{"name": "lora.r", "min": 4, "max": 64}]}, {"method": {"type": "full"}},
         "spec.search.parameters", "only for method types lora and qlora"),
        ({"parameters": [{"name": "learningRate", "min": 1e-5, "max": 1e-3}], "objective": {
            "metric": "rewardAccuracy"}}, {}, "spec.search.objective.metric", "rewardAccuracy scores reward models"),
        ({"parameters": [{"name": "learningRate", "min": 1e-5, "max": 1e-3}], "trials": 1}, {},
         "spec.search.trials", "greater than or equal to 2"),
        ({"parameters": [{"name": "momentum", "min": 0.1, "max": 0.9}]}, {}, "spec.search.parameters[0].name", ""),
        ({"parameters": [{"name": "learningRate", "min": 1e-5, "max": 1e-3}], "trialSteps": 10, "trialEpochs": 0.5},
         {}, "spec.search.trialEpochs", "not both"),
    ],
)  # fmt: skip
def test_validate_refuses_a_broken_search_block_naming_the_field(search, changes, field, text):
    _, problems = validate_object(_manifest(search, **changes), target="cluster")
    errors = [p for p in problems if p.severity == "error"]
    assert any(p.path == field and text in p.message for p in errors), [p.format() for p in errors]


def test_validate_accepts_a_search_block():
    _, problems = validate_object(_manifest({**LR_SEARCH, "objective": {"metric": "exactMatch"}}), target="cluster")
    assert not [p for p in problems if p.severity == "error"], [p.format() for p in problems]


def test_the_search_stage_runs_between_prepare_and_train_and_its_winner_lands_in_status():
    job = make_job(search=LR_SEARCH)
    assert stages_for(job.spec) == ["prepare", "search", "train", "evaluate", "export"]
    assert "search" not in stages_for(make_job().spec)
    step(job)
    prepared = ObservedStage(**{**DONE.__dict__, "summary": {"ok": True, "message": "ok"}})
    result = step(job, {"prepare": prepared})
    assert result.start == "search" and result.status.phase == "Searching"
    found = {"metric": "evalLoss", "direction": "minimize", "method": "minimize_scalar(bounded)",
             "best": {"learningRate": 0.003}, "bestObjective": 0.41, "bestTrial": 5,
             "trials": [{"trial": n, "values": {"learningRate": 10 ** -n}, "objective": 1 / n, "steps": 30,
                         "seconds": 2.0} for n in range(1, 9)]}  # fmt: skip
    searched = ObservedStage(**{**DONE.__dict__, "summary": {
        "ok": True, "message": "best learningRate=0.003 (evalLoss 0.41, trial 5 of 8, minimize_scalar(bounded))",
        "search": found}})  # fmt: skip
    result = step(job, {"prepare": prepared, "search": searched})
    assert result.start == "train"
    status = result.status
    assert status.search is not None and status.search.best == {"learningRate": 0.003}
    assert len(status.search.trials) == 8 and status.search.trials[0].objective == 1.0
    assert any(e.reason == "StageSucceeded" and "best learningRate=0.003" in e.message for e in result.events)
    assert {c.type for c in status.conditions} >= {"SearchComplete", "TrainComplete"}
    plain = plan(make_job(), Observed(), T0).status
    assert "SearchComplete" not in {c.type for c in plain.conditions}


def test_the_search_job_requests_gpus_like_train_and_joins_the_queues():
    raw = _manifest(LR_SEARCH, resources={"gpusPerWorker": 2},
                    scheduling={"queueName": "gpu-queue", "gang": {"queue": "research"}})  # fmt: skip
    job = FineTuneJob.model_validate(raw)
    objects = build_stage(job, "search")
    container = objects.job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["finetune-operator", "stage", "search"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert objects.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert objects.job["spec"]["suspend"] is True
    assert objects.pod["schedulerName"] == "volcano"
    group = next(o for o in objects.extra if o["kind"] == "PodGroup")
    assert group["spec"] == {"minMember": 1, "queue": "research"}


def test_trial_length_from_a_fraction_of_an_epoch():
    spec = FineTuneJobSpec.model_validate(
        {**MINIMAL_JOB["spec"], "search": {**LR_SEARCH, "trialSteps": None, "trialEpochs": 0.5}}
    )
    assert spec.search is not None
    assert trial_steps(spec.search, spec, train_rows=400) == 50  # 0.5 x 400 rows / batch 4


# ------------------------------------------------------------------------------- real trials on the micro model


@pytest.mark.slow
def test_search_finds_a_learning_rate_close_to_the_grid_optimum_and_train_uses_it(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(260, seed=5))
    search = {**LR_SEARCH, "trialSteps": 20, "maxTrainRows": 200, "maxEvalRows": 40}
    spec = local_spec(micro_model, data, method={"type": "full"}, search=search,
                      training={"batchSize": 16, "maxSteps": 40, "loggingSteps": 10, "checkpointEverySteps": 100},
                      dataset={"validationFraction": 0.2})  # fmt: skip
    config_path = stage_config(tmp_path, spec)
    work = tmp_path / "work"
    assert run_stage("prepare", config_path, work) == 0
    assert run_stage("search", config_path, work) == 0
    summary = json.loads((work / "summaries" / "search.json").read_text())
    found = summary["search"]
    assert found["method"] == "minimize_scalar(bounded)" and 2 <= len(found["trials"]) <= 8
    assert [t["trial"] for t in found["trials"]] == list(range(1, len(found["trials"]) + 1))

    # The same trial on a 16-point log grid over the same range.
    from finetune_operator.stages.contract import StageConfig, Workdir

    config = StageConfig.load(config_path)
    trial_work = Workdir(work / "search" / "workspace")
    grid = [10 ** (-5 + i * (math.log10(0.3) + 5) / 15) for i in range(16)]
    scores = [run_one_trial(config, trial_work, {"learningRate": float(f"{lr:.6g}")}, 20).objective for lr in grid]
    finite = [s for s in scores if s is not None]
    best_grid, low_end = min(finite), scores[0]
    assert found["bestObjective"] <= 1.10 * best_grid, (found, list(zip(grid, scores, strict=True)))
    assert low_end is not None and found["bestObjective"] < 0.8 * low_end

    assert run_stage("train", config_path, work) == 0
    trained = json.loads((work / "summaries" / "train.json").read_text())
    assert trained["searched"] == found["best"]
    assert trained["learningRate"] == pytest.approx(found["best"]["learningRate"])


@pytest.mark.slow
def test_two_parameters_at_once_and_every_trial_in_the_summary(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(160, seed=6))
    search = {"parameters": [{"name": "learningRate", "min": 1e-4, "max": 0.1},
                             {"name": "warmupRatio", "min": 0.0, "max": 0.5, "scale": "linear"}],
              "trials": 5, "trialSteps": 10, "maxTrainRows": 96, "maxEvalRows": 24}  # fmt: skip
    spec = local_spec(micro_model, data, method={"type": "full"}, search=search,
                      dataset={"validationFraction": 0.2}, training={"batchSize": 8})  # fmt: skip
    config_path = stage_config(tmp_path, spec)
    work = tmp_path / "work"
    assert run_stage("prepare", config_path, work) == 0
    assert run_stage("search", config_path, work) == 0
    found = json.loads((work / "summaries" / "search.json").read_text())["search"]
    assert found["method"] == "direct" and len(found["trials"]) == 5
    assert all(set(t["values"]) == {"learningRate", "warmupRatio"} and t["steps"] == 10 for t in found["trials"])
    assert found["best"] == min(found["trials"], key=lambda t: t["objective"])["values"]
    # The search's data subset: the first maxTrainRows / maxEvalRows prepared rows.
    from datasets import load_from_disk

    assert len(load_from_disk(str(work / "search" / "workspace" / "data" / "train"))) == 96
    assert len(load_from_disk(str(work / "search" / "workspace" / "data" / "eval"))) == 24
    # A second run of the stage (a retried pod) trains nothing again: all 5 trials come from disk.
    assert run_stage("search", config_path, work) == 0
    again = json.loads((work / "summaries" / "search.json").read_text())["search"]
    assert again["trials"] == found["trials"]


@pytest.mark.slow
def test_local_mode_runs_the_search_then_trains_with_the_winner(tmp_path, capsys):
    from finetune_operator.cli import main

    from .test_local_mode import make_job as make_local_job
    from .test_local_mode import status_of

    manifest = make_local_job(
        tmp_path,
        training={"maxSteps": 60, "loggingSteps": 20},
        evaluation={"metrics": ["perplexity"], "gates": []},
        search={"parameters": [{"name": "learningRate", "min": 1e-4, "max": 0.05}], "trials": 3, "trialSteps": 15,
                "maxTrainRows": 128, "maxEvalRows": 32},
    )  # fmt: skip
    assert main(["run", str(manifest), "--init-model", "micro"]) == 0
    printed = capsys.readouterr().out
    assert "Hyper-parameter search" in printed
    status = status_of(tmp_path)
    assert status["phase"] == "Succeeded" and status["stages"]["search"]["state"] == "Succeeded"
    search = status["search"]
    assert len(search["trials"]) == 3 and search["method"] == "minimize_scalar(bounded)"
    assert search["best"] == next(t for t in search["trials"] if t["trial"] == search["bestTrial"])["values"]
    train = json.loads(next((tmp_path / "out" / ".work").glob("run-1/summaries/train.json")).read_text())
    assert train["learningRate"] == pytest.approx(search["best"]["learningRate"])
