"""Shared fixtures: a minimal valid FineTuneJob and the repository's paths."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

# One math thread per process, set before anything imports torch: every stage process, CLI and operator the suite
# starts inherits it. The models here are tiny, so a second thread gains nothing on idle cores, and on busy ones
# two OpenMP threads spin-waiting for each other made the ML tests 3-15x slower (the search grid test: 248 s
# against 35 s, README "Running the tests"). A run of the suite can still say otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

MINIMAL_JOB: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "model": {"source": "hf://org/model", "revision": "abc123"},
        "dataset": {"source": "s3://bucket/data.jsonl", "format": "completion"},
        "training": {"epochs": 1},
        "output": {"uri": "s3://bucket/out"},
    },
}


@pytest.fixture
def job() -> dict[str, Any]:
    """A fresh copy of a minimal valid cluster FineTuneJob."""
    return copy.deepcopy(MINIMAL_JOB)


# ---------------------------------------------------------------- stage helpers

WORDS = ["red", "blue", "green", "black", "white", "amber", "cat", "dog", "fox", "owl", "bee", "cow"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_word_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """A learnable Alpaca-layout task: answer with the first of the given words."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, 3)
        rows.append({"instruction": "Give the first word.", "input": " ".join(words), "output": words[0]})
    return rows


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in first_word_rows(300, seed=99)]
    return [*texts, "Human: hello Assistant: hi", "say the word please yes no"]


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory, corpus) -> Path:
    """A ~0.1M-parameter GPT-2 with a BPE tokenizer trained on the test corpus."""
    from finetune_operator.stages.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "micro-bpe", corpus, preset="micro")


@pytest.fixture(scope="session")
def exported_lora_run(tmp_path_factory) -> Path:
    """The output folder of one local LoRA run of the micro model, exported as adapter, merged and ONNX (its
    evaluate samples are the oracle of the tests that use the exports). Shared: a test that writes copies it."""
    from finetune_operator.cli import main

    from .test_local_mode import make_job

    tmp = tmp_path_factory.mktemp("lora-run")
    manifest = make_job(
        tmp,
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "targetModules": ["all-linear"]}},
        training={"maxSteps": 60, "learningRate": 0.01, "checkpointEverySteps": 30},
        evaluation={"gates": [], "maxSamples": 10},
        export={"formats": ["adapter", "merged", "onnx"]},
    )
    assert main(["run", str(manifest), "--init-model", "micro", "-q"]) == 0
    return tmp / "out"


@pytest.fixture(scope="session")
def micro_sp_model(tmp_path_factory, corpus) -> Path:
    """The same model size with a SentencePiece tokenizer."""
    from finetune_operator.stages.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "micro-sp", corpus, preset="micro", tokenizer="sentencepiece"
    )


def stage_config(tmp: Path, spec: dict[str, Any], name: str = "t") -> Path:
    """Write a StageConfig for `spec` (validated like the operator would) and return its path."""
    tmp.mkdir(parents=True, exist_ok=True)
    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.stages.contract import StageConfig

    config = StageConfig(
        job=name, spec=FineTuneJobSpec.model_validate(spec), termination_log=str(tmp / "termination-log")
    )
    path = tmp / "config.json"
    path.write_text(config.model_dump_json(by_alias=True))
    return path


def run_stages(tmp: Path, spec: dict[str, Any], *stages: str) -> dict[str, Any]:
    """Run `stages` in order in one workspace (each must exit 0); the last stage's summary."""
    import json

    from finetune_operator.stages.runner import run_stage

    config = stage_config(tmp, spec)
    summary: dict[str, Any] = {}
    for stage in stages:
        code = run_stage(stage, config, tmp / "work")
        summary = json.loads((tmp / "work" / "summaries" / f"{stage}.json").read_text())
        assert code == 0, summary
    return summary


def local_spec(model: Path, data: Path, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": str(model)},
        "dataset": {"source": str(data), "format": "completion",
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"},
                    "maxSeqLength": 64},
        "training": {"maxSteps": 4, "batchSize": 8, "loggingSteps": 1, "checkpointEverySteps": 2},
        "resources": {"gpusPerWorker": 0},
        "output": {"uri": "/tmp/unused"},
    }  # fmt: skip
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


# ---------------------------------------------------------------- warm stage processes (prefork.py)


@pytest.fixture(scope="session", autouse=True)
def stage_caches(tmp_path_factory) -> Path:
    """The cache variables a pod's environment sets (HF_HOME & co.), set once for the session.

    Without them every stage process defaults its caches into its own workdir, so every run's processes have a
    different environment and need a prefork server of their own (~18 s of CPU importing the ML stack). With
    them, one warm server serves every local run and gang test of the session (`warm_launcher`)."""
    import os

    from finetune_operator.stages.runner import stage_environment

    root = tmp_path_factory.mktemp("stage-caches")
    saved = {name: os.environ.get(name) for name in stage_environment(root)}
    os.environ.update(stage_environment(root))
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def warm_launcher(stage_caches):
    """One prefork launcher for the session: stage processes forked from a server that imported the ML stack
    once. Fresh processes are tested where that is the point (test_prefork, the forked-vs-fresh run)."""
    from finetune_operator.prefork import Launcher

    class SessionLauncher(Launcher):
        def start(self, argv: list[str], env: dict[str, str], *args: Any, **kwargs: Any) -> Any:
            # pytest names the current test in the environment; a stage process has no use for it, and it would
            # make every test's processes differ from the server's (a fresh start each).
            env = {name: value for name, value in env.items() if not name.startswith("PYTEST_")}
            return super().start(argv, env, *args, **kwargs)

        def close(self) -> None:  # a run's `launcher.close()`: the server stays for the next run
            pass

    launcher = SessionLauncher(warm=True)
    yield launcher
    Launcher.close(launcher)


def output_of(process: Any, timeout: float) -> str:
    """What a started stage process (a Popen or a forked one, output on `.stdout`) prints until it ends."""
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"pid {process.pid} still running after {timeout} s: {''.join(lines)[-2000:]}"
    process.wait(timeout=30)
    return "".join(lines)


@pytest.fixture(autouse=True)
def shared_launcher(warm_launcher, monkeypatch):
    """`finetune-operator run` called in this process forks its stages from the session's warm server."""
    import finetune_operator.local as local
    from finetune_operator.prefork import Launcher

    def launcher(*args: Any, **kwargs: Any) -> Any:
        return Launcher(*args, **kwargs) if args or kwargs else warm_launcher

    monkeypatch.setattr(local, "Launcher", launcher)
    return warm_launcher


# ---------------------------------------------------------------- the real API server (tests/apiserver.py)
from tests.apiserver import apiserver, crd_installed, namespace  # noqa: E402,F401  (fixtures)
