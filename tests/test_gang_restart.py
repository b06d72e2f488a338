"""Training that survives a lost worker and a preemption: 2 and 3 local workers (gloo, CPU, micro model).

A worker SIGKILLed at a random step -> every worker restarts from the newest complete checkpoint and the losses
equal an uninterrupted run's; SIGTERM -> one checkpoint at the same step on every rank, a retryable exit code, and
the same command resumes at exactly that step; a config error on rank 1 -> exit 3 from its launcher, no retry; a
bug (KeyError) -> exit 5, no retry, its traceback in the stage log and one line in the summary.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.job import FineTuneJob
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.local import (
    LocalRun,
    Reporter,
    _free_port,
    _train_env,
    kill_tree,
    run_stage_processes,
    stage_config,
)
from finetune_operator.prefork import Launcher
from finetune_operator.stages.contract import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERNAL_ERROR,
    EXIT_PREEMPTED,
    EXIT_WORKER_LOST,
    exit_code_for,
    most_significant,
    parse_line,
)
from finetune_operator.stages.runner import run_stage, stage_environment
from finetune_operator.stages.train import CHECKPOINT_MARKER, latest_valid_checkpoint

from .conftest import first_word_rows, local_spec, output_of, write_jsonl

STEPS = 12
EVERY = 3
# Each test starts several multi-process runs (every process imports torch and transformers); on 2 busy cores that
# can take longer than the suite's default per-test timeout.
SLOW_TIMEOUT = pytest.mark.timeout(1800)


class Recorder(Reporter):
    """Collects what the local supervisor reports; `on_progress` may act on a progress record (e.g. kill)."""

    def __init__(self) -> None:
        self.pids: dict[int, list[int]] = {}
        self.records: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def workers_started(self, stage: str, attempt: int, pids: list[int]) -> None:
        self.pids[attempt] = pids

    def record(self, stage: str, record: dict[str, Any]) -> None:
        self.records.append(record)
        if record.get("finetune.dev/progress") == "progress":
            self.on_progress(record)

    def on_progress(self, record: dict[str, Any]) -> None: ...

    def losses(self) -> dict[int, float]:
        """Loss by step; a step logged again after a restart overwrites the first attempt's."""
        return {r["step"]: r["loss"] for r in self.records if r.get("finetune.dev/progress") == "progress"}


def make_job(tmp: Path, model: Path, workers: int, **training: Any) -> tuple[FineTuneJob, LocalRun]:
    data = write_jsonl(tmp / "d.jsonl", first_word_rows(200))
    spec = local_spec(
        model,
        data,
        method={"type": "full"},
        resources={"workers": workers, "gpusPerWorker": 0},
        storage={"workspace": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}},
        training={"maxSteps": STEPS, "learningRate": 0.005, "batchSize": 4, "loggingSteps": 1,
                  "checkpointEverySteps": EVERY, **training},
        runPolicy={"backoffLimit": 2, "terminationGracePeriodSeconds": 60},
    )  # fmt: skip
    job = FineTuneJob(metadata={"name": "gang"}, spec=FineTuneJobSpec.model_validate(spec))
    return job, LocalRun(manifest=tmp / "job.yaml", output=tmp / "out")


def prepared(tmp: Path, model: Path, workers: int, **training: Any) -> tuple[FineTuneJob, LocalRun]:
    job, run = make_job(tmp, model, workers, **training)
    work = run.workdir(job.status.run)
    assert run_stage("prepare", stage_config(job, run, work, "prepare"), work.root) == 0
    return job, run


_REFERENCES: dict[int, dict[int, float]] = {}


def reference_losses(tmp_factory: Any, model: Path, workers: int, launcher: Launcher) -> dict[int, float]:
    """The losses of an uninterrupted run with `workers` workers (once per module and worker count)."""
    if workers not in _REFERENCES:
        job, run = prepared(tmp_factory.mktemp(f"reference-{workers}"), model, workers)
        recorder = Recorder()
        assert run_stage_processes(job, run, "train", recorder, launcher) == 0
        _REFERENCES[workers] = recorder.losses()
        assert sorted(_REFERENCES[workers]) == list(range(1, STEPS + 1))
    return _REFERENCES[workers]


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-4), (step, loss, want[step])


def summary_of(run: LocalRun, stage: str = "train") -> dict[str, Any]:
    return json.loads(run.workdir(1).summary_file(stage).read_text())


# ---------------------------------------------------------------- classification (no processes)


def test_exceptions_are_classified_transient_or_not():
    import torch

    from finetune_operator.stages.contract import DataError

    assert exit_code_for(DataError("spec.dataset: bad")) == EXIT_CONFIG_ERROR
    assert exit_code_for(KeyError("input_ids")) == EXIT_INTERNAL_ERROR
    assert exit_code_for(TypeError("x")) == EXIT_INTERNAL_ERROR
    assert exit_code_for(torch.distributed.DistBackendError("NCCL watchdog")) == EXIT_WORKER_LOST
    assert exit_code_for(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234")) == EXIT_WORKER_LOST
    assert exit_code_for(torch.OutOfMemoryError("CUDA out of memory")) == 7
    assert exit_code_for(ConnectionResetError("reset")) == 1 and exit_code_for(OSError("disk")) == 1
    # The cause beats its victims; a config error beats everything.
    assert most_significant([0, EXIT_WORKER_LOST, -9, EXIT_PREEMPTED]) == -9
    assert most_significant([EXIT_WORKER_LOST, EXIT_CONFIG_ERROR]) == EXIT_CONFIG_ERROR
    assert most_significant([EXIT_WORKER_LOST, EXIT_PREEMPTED]) == EXIT_PREEMPTED


# ---------------------------------------------------------------- a lost worker


@pytest.mark.slow
@SLOW_TIMEOUT
@pytest.mark.parametrize("workers", [2, 3])
def test_a_killed_worker_restarts_the_gang_from_the_last_checkpoint(
    tmp_path, tmp_path_factory, micro_model, warm_launcher, workers
):
    want = reference_losses(tmp_path_factory, micro_model, workers, warm_launcher)
    job, run = prepared(tmp_path, micro_model, workers)
    checkpoints = run.workdir(1).checkpoints
    rng = random.Random()
    kill_at, victim = rng.randint(EVERY + 1, STEPS - EVERY), rng.randrange(workers)
    seen: dict[str, Any] = {}

    class Killer(Recorder):
        def on_progress(self, record: dict[str, Any]) -> None:
            if "killed" not in seen and record["step"] >= kill_at and latest_valid_checkpoint(checkpoints):
                seen.update(killed=record["step"], resume=latest_valid_checkpoint(checkpoints).name)
                kill_tree(self.pids[1][victim])  # the whole worker, as when its pod or node dies

    killer, fresh = Killer(), warm_launcher.fresh
    assert run_stage_processes(job, run, "train", killer, warm_launcher) == 0, (kill_at, victim, killer.events)
    assert warm_launcher.fresh == fresh, warm_launcher.why_fresh  # every worker of both attempts forked warm

    summary = summary_of(run)
    assert "killed" in seen, (kill_at, victim)
    assert summary["steps"] == STEPS and summary["worldSize"] == workers
    assert summary["attempts"] == 2 and len(killer.pids) == 2, killer.events
    [restart] = summary["restarts"]
    assert restart["reason"] == "WorkerLost" and restart["countsAgainstBackoffLimit"] is True
    # The newest complete checkpoint when the gang restarted (the one seen at the kill, or one saved just after).
    assert summary["resumedFrom"] == restart["resumeFrom"], (seen, restart)
    assert int(seen["resume"].split("-")[1]) <= int(restart["resumeFrom"].split("-")[1]) <= seen["killed"] + EVERY
    assert summary["lastCheckpoint"]["step"] == STEPS - STEPS % EVERY
    assert_same_losses(killer.losses(), want)  # before the kill and after the resume, step for step
    assert any(r == "StageRestart" and f"all {workers} workers" in m for _, r, m in killer.events)


# ---------------------------------------------------------------- preemption


def start_workers(job: FineTuneJob, run: LocalRun, port: int, launcher: Launcher) -> list[Any]:
    """The train stage as the pods run it: one stage program per worker with the rendezvous environment."""
    work = run.workdir(1)
    config = stage_config(job, run, work, "train")
    command = [sys.executable, "-m", "finetune_operator.stages", "train", "--config", str(config)]
    return [
        launcher.start(
            [*command, "--workdir", str(work.root)],
            {**os.environ, "PYTHONUNBUFFERED": "1", **_train_env(job, index, port)},
            stage_environment(work.root),
        )
        for index in range(job.spec.resources.workers)
    ]


@pytest.mark.slow
@SLOW_TIMEOUT
def test_sigterm_checkpoints_every_rank_at_the_same_step_and_the_same_command_resumes_there(
    tmp_path, tmp_path_factory, micro_model, warm_launcher
):
    want = reference_losses(tmp_path_factory, micro_model, 2, warm_launcher)
    job, run = prepared(tmp_path, micro_model, 2)
    checkpoints = run.workdir(1).checkpoints
    procs = start_workers(job, run, _free_port(), warm_launcher)
    lines: list[str] = []
    try:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            lines.append(line)
            record = parse_line(line)
            if record and record.get("finetune.dev/progress") == "progress" and record["step"] >= 4:
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)  # what the kubelet sends a pod's main process
                break
        lines += output_of(procs[0], timeout=120).splitlines(keepends=True)
        output_of(procs[1], timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED, EXIT_PREEMPTED], "".join(lines)[-3000:]

    newest = latest_valid_checkpoint(checkpoints)
    assert newest is not None
    stopped = int(newest.name.split("-")[1])
    assert stopped >= 4
    marker = json.loads((newest / CHECKPOINT_MARKER).read_text())
    assert marker["step"] == stopped and marker["worldSize"] == 2
    assert (newest / "rng_state_0.pth").exists() and (newest / "rng_state_1.pth").exists()
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == newest.name  # nothing past it
    losses_before = {s: v for s, v in _losses(lines).items()}
    assert max(losses_before) == stopped

    again = start_workers(job, run, _free_port(), warm_launcher)
    out = output_of(again[0], timeout=600)
    output_of(again[1], timeout=60)
    assert [p.returncode for p in again] == [0, 0], out[-3000:]
    after = _losses(out.splitlines())
    assert min(after) == stopped + 1 and max(after) == STEPS
    assert summary_of(run)["resumedFrom"] == newest.name
    assert_same_losses({**losses_before, **after}, want)


def _losses(lines: list[str]) -> dict[int, float]:
    records = [parse_line(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r and r.get("finetune.dev/progress") == "progress"}


# ---------------------------------------------------------------- what a retry cannot fix


def inject(tmp: Path, rank: str, raise_line: str) -> None:
    """Make the train stage of one rank raise (a sitecustomize module on PYTHONPATH, loaded by every process)."""
    folder = tmp / "inject"
    folder.mkdir()
    # The rank is known only once the stage has read the rendezvous, so the check is made at the call.
    (folder / "sitecustomize.py").write_text(
        "import os\n"
        "import finetune_operator.stages.train as train\n"
        "from finetune_operator.stages.contract import StageError\n"
        "original = train.run_train\n"
        "def broken(config, workdir):\n"
        f"    if os.environ.get('RANK', '0') != {rank!r}:\n"
        "        return original(config, workdir)\n"
        f"    {raise_line}\n"
        "train.run_train = broken\n"
    )
    os.environ["PYTHONPATH"] = f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


@pytest.fixture
def restore_pythonpath():
    saved = os.environ.get("PYTHONPATH")
    yield
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.mark.slow
@SLOW_TIMEOUT
def test_a_config_error_on_rank_1_exits_3_without_a_retry(tmp_path, micro_model, restore_pythonpath):
    job, run = prepared(tmp_path, micro_model, 2)
    inject(tmp_path, "1", "raise StageError('spec.training.learningRate: too high (injected)', config_error=True)")
    recorder = Recorder()
    assert run_stage_processes(job, run, "train", recorder) == EXIT_CONFIG_ERROR
    assert len(recorder.pids) == 1 and not [e for e in recorder.events if e[1] == "StageRestart"]
    summary = summary_of(run)
    assert summary["exitCode"] == EXIT_CONFIG_ERROR and summary["attempts"] == 1 and summary["restarts"] == []
    assert summary["message"] == "spec.training.learningRate: too high (injected)"


@pytest.mark.slow
@SLOW_TIMEOUT
def test_a_bug_fails_fast_with_its_traceback_in_the_log_and_one_line_in_the_summary(
    tmp_path, micro_model, restore_pythonpath
):
    job, run = prepared(tmp_path, micro_model, 1)
    inject(tmp_path, "0", "return {}['input_ids']")
    recorder = Recorder()
    assert run_stage_processes(job, run, "train", recorder) == EXIT_INTERNAL_ERROR
    assert len(recorder.pids) == 1  # not retried
    summary = summary_of(run)
    assert summary["reason"] == "InternalError" and "\n" not in summary["message"]
    assert summary["message"].startswith("internal error, not retried (a bug; traceback in the train log)")
    assert "KeyError: 'input_ids'" in summary["message"] and "sitecustomize.py" in summary["message"]
    log = (run.workdir(1).root / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "KeyError: 'input_ids'" in log
