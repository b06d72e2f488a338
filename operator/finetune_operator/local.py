"""The embedded local mode: run a FineTuneJob manifest on this machine with the operator's planner.

Only the executor differs from the cluster: each stage the planner starts runs as a local process of the same
stage program (a train stage with `workers: N` as N processes wired with the same rendezvous environment), and
what the planner observes is read from the stage summaries in the workdir. Status is kept in
<output>/status.yaml in the CR's status schema, so running the same command again resumes: finished stages are
not rerun, train continues from its last checkpoint, and a run that failed retries the failed stage and the
ones after it (the fix is usually outside the spec: the data, an installed package). SIGINT, SIGTERM and SIGHUP
stop the stage processes and leave the run Suspended, ready to resume.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .api.job import FineTuneJob
from .api.spec import STAGES
from .api.status import FINISHED_PHASES, FineTuneJobStatus
from .api.validation import InvalidJobError, Problem, load_job, local_path
from .cluster.context import GPU_STAGES
from .planner import Observed, ObservedStage, Plan, config_hash, plan, stages_for
from .prefork import Launcher, gpu_present
from .stages.contract import (
    StageConfig,
    Workdir,
    counts_against_backoff,
    exit_reason,
    most_significant,
    parse_line,
    retryable,
)
from .stages.runner import stage_environment

STATUS_FILE = "status.yaml"
WORK_DIR = ".work"
# What the stage programs import; the operator-only install (`pip install .`) has none of them.
ML_STACK = ("torch", "transformers", "datasets", "peft", "trl")
INSTALL_ML_STACK = "pip install 'finetune-operator[train]' (from a clone: pip install -e '.[train]')"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LocalRunError(Exception):
    """A problem that stops a local run before any stage starts; its message is the one line a person sees."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (Ctrl-C, `timeout`, `kill`, systemd, a CI runner, a closed terminal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Any:
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` so all three stop the stages the same way.

    Only the first signal interrupts: the ones that follow arrive while the stage process groups are being
    stopped (bounded by a timeout), and interrupting that would orphan them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_ml_stack() -> None:
    missing = [name for name in ML_STACK if importlib.util.find_spec(name) is None]
    if missing:
        raise LocalRunError(
            f"the local mode runs the training stages on this machine and needs the ML stack "
            f"({', '.join(missing)} not installed): {INSTALL_ML_STACK}"
        )


@dataclass
class LocalRun:
    """Paths of one local job."""

    manifest: Path
    output: Path

    @property
    def status_file(self) -> Path:
        return self.output / STATUS_FILE

    def workdir(self, run: int) -> Workdir:
        return Workdir(self.output / WORK_DIR / f"run-{run}")


class Reporter:
    """What a person sees; the rich implementation lives in `live.py`, tests use this quiet one."""

    def event(self, kind: str, reason: str, message: str) -> None:
        print(f"[{kind}] {reason}: {message}", flush=True)

    def stage_started(self, stage: str) -> None: ...

    def workers_started(self, stage: str, attempt: int, pids: list[int]) -> None:
        """An attempt of `stage` started these worker processes (each leads its own process group)."""

    def record(self, stage: str, record: dict[str, Any]) -> None: ...

    def stage_finished(self, stage: str) -> None: ...

    def finished(self, status: FineTuneJobStatus) -> None: ...


@dataclass
class StageProcess:
    stage: str
    processes: list[subprocess.Popen] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def observe(run: LocalRun, job: FineTuneJob) -> Observed:
    """The local equivalent of listing a run's stage Jobs: the stage summaries in its workdir."""
    work = run.workdir(job.status.run)
    stages: dict[str, ObservedStage] = {}
    for stage in STAGES:
        file = work.summary_file(stage)
        if not file.exists():
            continue
        summary = json.loads(file.read_text())
        if summary.get("run") != job.status.run:
            continue
        ok = bool(summary.get("ok"))
        stamp = dt.datetime.fromtimestamp(file.stat().st_mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stages[stage] = ObservedStage(
            exists=True,
            succeeded=ok,
            failed=not ok,
            summary=summary,
            attempts=int(summary.get("attempts", 1)),
            completion_time=stamp,
        )
    others = [p for p in (run.output / WORK_DIR).glob("run-*") if p.name != f"run-{job.status.run}"]
    return Observed(stages=stages, other_runs=bool(others))


def stage_config(job: FineTuneJob, run: LocalRun, work: Workdir, stage: str) -> Path:
    config = StageConfig(
        job=job.name,
        namespace=job.metadata.get("namespace", "local"),
        run=job.status.run,
        spec=job.spec,
        base_dir=str(run.manifest.parent.resolve()),
        termination_log=str(work.root / f"termination-{stage}.log"),
        extra={"lineage": {"configHash": job.status.lineage.config_hash if job.status.lineage else None}},
    )
    path = work.root / f"stage-{stage}.json"
    work.root.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(by_alias=True, indent=2))
    return path


def _train_env(job: FineTuneJob, index: int, port: int) -> dict[str, str]:
    """The same rendezvous variables the operator puts on the train pods."""
    import torch

    workers = job.spec.resources.workers
    gpus = torch.cuda.device_count()
    per_node = max(1, min(job.spec.resources.gpus_per_worker, gpus // max(workers, 1))) if gpus else 1
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "NNODES": str(workers),
        "NODE_RANK": str(index),
        "NPROC_PER_NODE": str(per_node),
        "WORLD_SIZE": str(workers * per_node),
    }
    if gpus and workers > 1:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * per_node + i) for i in range(per_node))
    return env


def stage_process_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def gpu_visibility(job: FineTuneJob, stage: str) -> dict[str, str]:
    """The GPUs a stage's pod would get, on this machine: none for prepare and export, none for any stage when
    spec.resources.gpusPerWorker is 0. So a manifest runs on a GPU workstation as it runs on the cluster."""
    gets_gpus = stage in GPU_STAGES and job.spec.resources.gpus_per_worker > 0
    return {} if gets_gpus or not gpu_present() else {"CUDA_VISIBLE_DEVICES": ""}


def _pump(proc: subprocess.Popen, stage: str, reporter: Reporter, log: Any) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        record = parse_line(line)
        if record is not None:
            reporter.record(stage, record)


def run_stage_processes(
    job: FineTuneJob, run: LocalRun, stage: str, reporter: Reporter, launcher: Launcher | None = None
) -> int:
    """Run one stage to completion; returns the last exit code.

    Each attempt runs every worker of the stage; when one fails the others are stopped at once (a gang: no
    survivor waits on a dead peer) and a retryable failure starts all of them again, train resuming from the
    newest complete checkpoint. Non-retryable codes (config error, gate, bug) end the stage on the first attempt;
    a SIGTERM'd attempt (EXIT_PREEMPTED) is retried without costing one of spec.runPolicy.backoffLimit's retries.
    `launcher` starts the processes (warm, forked from a server that has the ML stack imported); none: fresh ones.
    """
    launcher = launcher or Launcher(warm=False)
    work = run.workdir(job.status.run)
    config = stage_config(job, run, work, stage)
    limit = job.spec.run_policy.backoff_limit
    restarts: list[dict[str, Any]] = []
    counted = attempt = 0
    while True:
        attempt += 1
        work.summary_file(stage).unlink(missing_ok=True)  # this attempt's result replaces the last one's
        codes = _run_attempt(job, work, config, stage, attempt, reporter, launcher)
        code = most_significant(codes)
        if not retryable(code):
            break
        counted += counts_against_backoff(code)
        restarts.append(_attempt_record(work, stage, attempt, code, counts_against_backoff(code)))
        if counted > limit or len(restarts) > MAX_ATTEMPTS:
            break
        resume = _resume_point(work) if stage == "train" else None
        reporter.event(
            "Warning",
            "StageRestart",
            f"{stage} attempt {attempt} ended: {restarts[-1]['reason']} (exit {code}); restarting"
            + (f" all {len(codes)} workers" if len(codes) > 1 else "")
            + (f" from {resume}" if resume else "")
            + (f" (retry {counted}/{limit})" if counts_against_backoff(code) else " (a disruption: no retry used)"),
        )
    _record_attempts(job, work, stage, code, attempt, restarts)
    return code


MAX_ATTEMPTS = 50
"""A bound on attempts that do not count (preemptions), so no loop runs forever."""


def _run_attempt(
    job: FineTuneJob, work: Workdir, config: Path, stage: str, attempt: int, reporter: Reporter, launcher: Launcher
) -> list[int]:
    """Start every worker of the stage and supervise them; returns the exit codes in the order they ended."""
    workers = job.spec.resources.workers if stage == "train" else 1
    port = _free_port()
    log = (work.root / f"{stage}.log").open("a", buffering=1)
    log.write(f"--- attempt {attempt} ({workers} worker(s)) ---\n")
    procs, pumps = [], []
    for index in range(workers):
        env = {**stage_process_env(), **gpu_visibility(job, stage)}
        if stage == "train" and workers > 1:
            env.update(_train_env(job, index, port))
        command = [sys.executable, "-m", "finetune_operator.stages", stage, "--config", str(config)]
        proc = launcher.start([*command, "--workdir", str(work.root)], env, stage_environment(work.root))
        procs.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(proc, stage, reporter, log), daemon=True))
        pumps[-1].start()
    reporter.workers_started(stage, attempt, [p.pid for p in procs])
    try:
        return supervise(procs, job.spec.run_policy.termination_grace_period_seconds)
    except BaseException:
        stop_all(procs, grace=30)
        raise
    finally:
        for t in pumps:
            t.join(timeout=5)
        log.close()


def supervise(procs: list[subprocess.Popen], grace: float, poll: float = 0.2) -> list[int]:
    """Wait for a group of processes that only make sense together: the first failure stops the rest
    (SIGTERM to each process group, SIGKILL after `grace` seconds). Exit codes in the order they ended."""
    ended: dict[int, int] = {}
    stopping_since: float | None = None
    while len(ended) < len(procs):
        for index, proc in enumerate(procs):
            if index not in ended and proc.poll() is not None:
                ended[index] = proc.returncode
        if stopping_since is None and any(code != 0 for code in ended.values()):
            stopping_since = time.monotonic()
            for index, proc in enumerate(procs):
                if index not in ended:
                    with_suppressed(lambda p=proc: os.killpg(p.pid, signal.SIGTERM))
        if stopping_since is not None and time.monotonic() - stopping_since > grace:
            for index, proc in enumerate(procs):
                if index not in ended:
                    kill_tree(proc.pid)
        time.sleep(poll)
    return list(ended.values())


def stop_all(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process group, SIGKILL what is left after `grace` seconds."""
    for p in procs:
        with_suppressed(lambda p=p: os.killpg(p.pid, signal.SIGTERM))
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            p.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a worker as a container dies: the process, its group, and every descendant (torchrun starts each
    rank in a session of its own, so its group alone would leave the ranks running)."""
    import psutil

    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with_suppressed(lambda: os.killpg(pid, signal.SIGKILL))
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _resume_point(work: Workdir) -> str | None:
    from .stages.train import latest_valid_checkpoint

    found = latest_valid_checkpoint(work.checkpoints)
    return found.name if found else None


def _attempt_record(work: Workdir, stage: str, attempt: int, code: int, counted: bool) -> dict[str, Any]:
    message = None
    if work.summary_file(stage).exists():
        message = json.loads(work.summary_file(stage).read_text()).get("message")
    resume = _resume_point(work) if stage == "train" else None
    return {
        "attempt": attempt,
        "reason": exit_reason(code),
        "exitCode": code,
        "message": message,
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "countsAgainstBackoffLimit": counted,
        "resumeFrom": resume,
    }


def _record_attempts(
    job: FineTuneJob, work: Workdir, stage: str, code: int, attempts: int, restarts: list[dict[str, Any]]
) -> None:
    """Attempts and restarts go into the stage summary, which the planner copies into status."""
    file = work.summary_file(stage)
    if code != 0 and not file.exists():
        # A crash before the stage wrote its summary still has to reach the planner as a failure.
        summary: dict[str, Any] = {
            "stage": stage,
            "run": job.status.run,
            "ok": False,
            "message": crash_message(code, (work.root / f"{stage}.log").read_text()[-20_000:]),
            "exitCode": code,
        }
    elif file.exists():
        summary = json.loads(file.read_text())
    else:
        return
    summary.update(attempts=attempts, restarts=restarts)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(summary, indent=2))


EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)|[A-Za-z_][\w.]*Error)\b.*")


def crash_message(code: int, log_tail: str) -> str:
    """One line for a stage that died without a summary: how it ended and the exception it printed last."""
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    if code == -signal.SIGKILL:
        how += " (out of memory?)"
    lines = [line.strip() for line in log_tail.splitlines() if line.strip() and parse_line(line) is None]
    cause = next((line for line in reversed(lines) if EXCEPTION_LINE.match(line)), lines[-1] if lines else "")
    return f"{how}: {cause[:400]}" if cause else how


def with_suppressed(action: Any) -> None:
    """Signal a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        action()


def save_status(run: LocalRun, status: FineTuneJobStatus) -> None:
    run.output.mkdir(parents=True, exist_ok=True)
    tmp = run.status_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(status.wire(), sort_keys=False))
    os.replace(tmp, run.status_file)


def load_status(run: LocalRun) -> FineTuneJobStatus | None:
    if not run.status_file.exists():
        return None
    return FineTuneJobStatus.model_validate(yaml.safe_load(run.status_file.read_text()) or {})


def _mark_interrupted(run: LocalRun, job: FineTuneJob, stage: str | None, reason: str) -> None:
    """Leave the run Suspended: the interrupted stage starts again (train from its checkpoint) on the next run."""
    status = job.status
    if status.phase in FINISHED_PHASES:
        return
    if stage:
        summary = run.workdir(status.run).summary_file(stage)
        # A stage killed by us may have reported its own death as a failure: that is not a result to keep.
        if summary.exists() and not json.loads(summary.read_text()).get("ok"):
            summary.unlink()
        record = getattr(status.stages, stage)
        if record is not None:
            record.state, record.message = "Pending", f"stopped by {reason}; resumes on the next run"
    status.phase = "Suspended"
    status.message = f"interrupted by {reason}: run the same command again to resume (--fresh starts over)"
    for condition in status.conditions:
        if condition.type == "Suspended":
            condition.status, condition.reason, condition.message = "True", "Interrupted", status.message
        elif condition.type == "Reconciling":
            condition.status, condition.reason, condition.message = "False", "Interrupted", ""
    save_status(run, status)


def _retry_failed_run(run: LocalRun, job: FineTuneJob, reporter: Reporter) -> None:
    """A failed run of an unchanged spec retries its failed stage and what follows (a changed spec is a new run)."""
    status = job.status
    if status.phase != "Failed" or not status.lineage or status.lineage.config_hash != config_hash(job.spec):
        return
    sequence = stages_for(job.spec)
    failed = next((s for s in sequence if (r := getattr(status.stages, s)) is not None and r.state == "Failed"), None)
    if failed is None:
        return  # e.g. the active deadline ran out: retrying would fail the same way; --fresh starts over
    work = run.workdir(status.run)
    for stage in sequence[sequence.index(failed) :]:
        work.summary_file(stage).unlink(missing_ok=True)
        setattr(status.stages, stage, None)
    if failed in ("evaluate", "export"):
        status.artifacts, status.serving_config = [], None
    if failed == "evaluate":
        status.metrics = None
    status.phase, status.current_stage, status.completion_time = "Pending", failed, None
    status.message = f"retrying {failed} after the failure"
    reporter.event(
        "Normal",
        "Retrying",
        f"run {status.run} failed at {failed}: retrying {failed} and what follows (--fresh starts over)",
    )


def failure_line(job: FineTuneJob, run: LocalRun) -> str:
    """The one line that ends a failed run: what failed, the fix when known, where the stage log is."""
    status = job.status
    stage = status.current_stage
    record = getattr(status.stages, stage) if stage else None
    what = " ".join((record.message if record and record.message else status.message or "failed").split())
    if len(what) > 600:
        what = what[:600] + "..."
    line = f"error: {stage} failed: {what}" if record else f"error: {what}"
    fix = known_fix(what)
    if fix:
        line += f"; fix: {fix}"
    if record:
        log = run.workdir(status.run).root / f"{stage}.log"
        line += f" (log: {_shown(log)}; after the fix, the same command retries {stage})"
    return line


def known_fix(message: str) -> str | None:
    if "No module named" in message:
        return INSTALL_ML_STACK
    if "out of memory" in message.lower():
        return (
            "lower spec.training.batchSize (raise gradientAccumulationSteps to keep the effective batch) "
            "or spec.dataset.maxSeqLength"
        )
    if "No space left on device" in message:
        return "free disk space where spec.output.uri points"
    return None


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is below it (what a person would type)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def init_model(preset: str, job: FineTuneJob, manifest: Path, tokenizer: str = "bpe") -> Path | None:
    """Build a tiny random-init model at spec.model.source (a local path) unless something is already there.

    Its tokenizer learns the dataset's mapped columns as prepare reads them (no JSON keys or quotes), so a
    malformed file fails here with prepare's one-line message.
    """
    import tempfile

    from .stages.contract import StageError
    from .stages.formats import NullValue, canonicalize, check_columns, corpus_texts
    from .stages.sources import read_local_rows
    from .stages.tiny import build_tiny_model

    target = local_path(job.spec.model.source, manifest.parent.resolve())
    if target.exists() and any(target.iterdir()):
        return None
    ds_spec = job.spec.dataset
    field = "spec.dataset.source"
    if "://" in ds_spec.source and not ds_spec.source.startswith("file://"):
        problem = f"'{ds_spec.source}': --init-model trains its tokenizer on local data; use a path or file:// URI"
        raise InvalidJobError([Problem(field, problem)], str(manifest))
    data = local_path(ds_spec.source, manifest.parent.resolve())
    if not data.exists():
        problem = f"'{data}' does not exist: fix the path (relative paths are relative to the manifest's folder)"
        raise InvalidJobError([Problem(field, problem)], str(manifest))
    texts: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as cache:
            rows = read_local_rows(data, field, cache)
            check_columns(ds_spec, list(rows.dataset.column_names), field)
            for index, record in enumerate(rows.dataset):
                try:
                    canonical = canonicalize(ds_spec, record, index + 1, field)
                except NullValue as exc:
                    raise rows.explain_null(exc) from None
                texts += corpus_texts(ds_spec.format, canonical)
    except StageError as exc:
        path, _, message = str(exc).partition(": ")
        raise InvalidJobError([Problem(path, message)], str(manifest)) from None
    build_tiny_model(target, texts, preset=preset, tokenizer=tokenizer)  # type: ignore[arg-type]
    return target


def execute(
    manifest: Path,
    *,
    fresh: bool = False,
    init: str | None = None,
    init_tokenizer: str = "bpe",
    reporter: Reporter | None = None,
    now: Any = None,
) -> tuple[FineTuneJob, LocalRun]:
    """Run (or resume, or retry) the FineTuneJob in `manifest` until it succeeds, fails or is interrupted."""
    reporter = reporter or Reporter()
    clock = now or (lambda: dt.datetime.now(dt.UTC))
    check_ml_stack()
    if init:
        _, early_spec, _ = load_job(manifest, target="local", model_to_build=True)
        built = init_model(init, FineTuneJob(metadata={}, spec=early_spec), manifest, init_tokenizer)
        if built:
            reporter.event(
                "Normal",
                "ModelInitialised",
                f"built a random-init {init} model ({init_tokenizer} tokenizer) at {_shown(built)}",
            )
    raw, spec, problems = load_job(manifest, target="local")
    for problem in problems:
        reporter.event("Warning", "Validation", problem.format())
    run = LocalRun(manifest=manifest, output=local_path(spec.output.uri, manifest.parent.resolve()))
    if fresh:
        shutil.rmtree(run.output / WORK_DIR, ignore_errors=True)
        run.status_file.unlink(missing_ok=True)
    status = load_status(run) or FineTuneJobStatus()
    metadata = {**(raw.get("metadata") or {}), "generation": _generation(status, spec)}
    job = FineTuneJob(metadata=metadata, spec=spec, status=status)
    _retry_failed_run(run, job, reporter)
    previous = (job.status.phase, job.status.run)
    stage: str | None = None
    launcher = Launcher()
    try:
        while True:
            result: Plan = plan(job, observe(run, job), clock())
            if result.delete_other_runs or result.cleanup:
                _clean(run, job, result)
            if result.status.playground is not None:
                # spec.playground is a cluster Deployment; here the same app is one command away.
                result.status.playground = None
                if result.playground == "create":
                    reporter.event(
                        "Normal", "Playground", f"compare the models: finetune-operator playground {manifest}"
                    )
            job.status = result.status
            save_status(run, job.status)
            for event in result.events:
                reporter.event(event.type, event.reason, event.message)
            if result.start:
                stage = result.start
                reporter.stage_started(stage)
                try:
                    run_stage_processes(job, run, stage, reporter, launcher)
                finally:
                    reporter.stage_finished(stage)
                stage = None
                continue
            if job.status.phase in FINISHED_PHASES:
                break
            if result.delete_other_runs:
                continue
            raise RuntimeError(f"the planner made no progress in phase {job.status.phase}: {job.status.message}")
    except KeyboardInterrupt as exc:
        reason = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
        _mark_interrupted(run, job, stage or job.status.current_stage, reason)
        raise
    finally:
        launcher.close()
    if previous == ("Succeeded", job.status.run) and job.status.phase == "Succeeded":
        reporter.event(
            "Normal",
            "AlreadySucceeded",
            f"{job.name} run {job.status.run} already succeeded ({job.status.completion_time}); nothing to do: "
            "--fresh starts over, a changed spec starts a new run",
        )
    if previous[0] not in FINISHED_PHASES or job.status.phase != previous[0] or previous[1] != job.status.run:
        reporter.finished(job.status)
    return job, run


def _generation(status: FineTuneJobStatus, spec: Any) -> int:
    """What metadata.generation is on a cluster: one more than the last run's when the manifest's spec changed."""
    generation = status.observed_generation or 1
    if status.lineage and status.lineage.config_hash and status.lineage.config_hash != config_hash(spec):
        generation += 1
    return generation


def _clean(run: LocalRun, job: FineTuneJob, result: Plan) -> None:
    current = result.status.run
    for path in (run.output / WORK_DIR).glob("run-*"):
        if result.cleanup or path.name != f"run-{current}":
            shutil.rmtree(path, ignore_errors=True)
