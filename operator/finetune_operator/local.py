"""The embedded local mode: run a FineTuneJob manifest on this machine with the operator's planner.

Only the executor differs from the cluster: each stage the planner starts runs as a local process of the same
stage program (a train stage with `workers: N` as N processes wired with the same rendezvous environment), and
what the planner observes is read from the stage summaries in the workdir. Status is kept in
<output>/status.yaml in the CR's status schema, so running the same command again resumes: finished stages are
not rerun and train continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
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
from .api.status import FINISHED_PHASES, FineTuneJobStatus
from .api.validation import load_job, local_path
from .planner import Observed, ObservedStage, Plan, config_hash, plan
from .stages.contract import (
    StageConfig,
    Workdir,
    counts_against_backoff,
    exit_reason,
    most_significant,
    parse_line,
    retryable,
)

STATUS_FILE = "status.yaml"
WORK_DIR = ".work"


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
    for stage in ("prepare", "train", "evaluate", "export"):
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


def _pump(proc: subprocess.Popen, stage: str, reporter: Reporter, log: Any) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        record = parse_line(line)
        if record is not None:
            reporter.record(stage, record)


def run_stage_processes(job: FineTuneJob, run: LocalRun, stage: str, reporter: Reporter) -> int:
    """Run one stage to completion; returns the last exit code.

    Each attempt runs every worker of the stage; when one fails the others are stopped at once (a gang: no
    survivor waits on a dead peer) and a retryable failure starts all of them again, train resuming from the
    newest complete checkpoint. Non-retryable codes (config error, gate, bug) end the stage on the first attempt;
    a SIGTERM'd attempt (EXIT_PREEMPTED) is retried without costing one of spec.runPolicy.backoffLimit's retries.
    """
    work = run.workdir(job.status.run)
    config = stage_config(job, run, work, stage)
    limit = job.spec.run_policy.backoff_limit
    restarts: list[dict[str, Any]] = []
    counted = attempt = 0
    while True:
        attempt += 1
        work.summary_file(stage).unlink(missing_ok=True)  # this attempt's result replaces the last one's
        codes = _run_attempt(job, work, config, stage, attempt, reporter)
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
    job: FineTuneJob, work: Workdir, config: Path, stage: str, attempt: int, reporter: Reporter
) -> list[int]:
    """Start every worker of the stage and supervise them; returns the exit codes in the order they ended."""
    workers = job.spec.resources.workers if stage == "train" else 1
    port = _free_port()
    log = (work.root / f"{stage}.log").open("a", buffering=1)
    log.write(f"--- attempt {attempt} ({workers} worker(s)) ---\n")
    procs, pumps = [], []
    for index in range(workers):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if stage == "train" and workers > 1:
            env.update(_train_env(job, index, port))
        command = [sys.executable, "-m", "finetune_operator.stages", stage, "--config", str(config)]
        proc = subprocess.Popen(
            [*command, "--workdir", str(work.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
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
        tail = (work.root / f"{stage}.log").read_text()[-1500:]
        summary: dict[str, Any] = {
            "stage": stage,
            "run": job.status.run,
            "ok": False,
            "message": f"exit code {code} ({exit_reason(code)}): {tail.strip()[-500:]}",
            "exitCode": code,
        }
    elif file.exists():
        summary = json.loads(file.read_text())
    else:
        return
    summary.update(attempts=attempts, restarts=restarts)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(summary, indent=2))


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


def init_model(preset: str, job: FineTuneJob, manifest: Path, tokenizer: str = "bpe") -> Path | None:
    """Build a tiny random-init model at spec.model.source (a local path) unless something is already there."""
    from .stages.tiny import build_tiny_model, corpus_from_jsonl

    target = local_path(job.spec.model.source, manifest.parent.resolve())
    if target.exists() and any(target.iterdir()):
        return None
    data = local_path(job.spec.dataset.source, manifest.parent.resolve())
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.is_file())
    texts: list[str] = []
    for file in files:
        texts += corpus_from_jsonl(file) if file.suffix == ".jsonl" else file.read_text().splitlines()
    build_tiny_model(target, texts, preset=preset, tokenizer=tokenizer)  # type: ignore[arg-type]
    return target


def execute(
    manifest: Path,
    *,
    fresh: bool = False,
    init: str | None = None,
    reporter: Reporter | None = None,
    now: Any = None,
) -> tuple[FineTuneJob, LocalRun]:
    """Run (or resume) the FineTuneJob in `manifest` until it succeeds or fails."""
    reporter = reporter or Reporter()
    clock = now or (lambda: dt.datetime.now(dt.UTC))
    if init:
        raw = yaml.safe_load(manifest.read_text())
        from .api.spec import FineTuneJobSpec

        early = FineTuneJob(metadata=raw.get("metadata") or {}, spec=FineTuneJobSpec.model_validate(raw["spec"]))
        built = init_model(init, early, manifest)
        if built:
            reporter.event("Normal", "ModelInitialised", f"built a random-init {init} model at {built}")
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
    previous_phase = job.status.phase
    while True:
        result: Plan = plan(job, observe(run, job), clock())
        if result.delete_other_runs or result.cleanup:
            _clean(run, job, result)
        job.status = result.status
        save_status(run, job.status)
        for event in result.events:
            reporter.event(event.type, event.reason, event.message)
        if result.start:
            reporter.stage_started(result.start)
            try:
                run_stage_processes(job, run, result.start, reporter)
            finally:
                reporter.stage_finished(result.start)
            continue
        if job.status.phase in FINISHED_PHASES:
            break
        if result.delete_other_runs:
            continue
        raise RuntimeError(f"the planner made no progress in phase {job.status.phase}: {job.status.message}")
    if previous_phase not in FINISHED_PHASES or job.status.phase != previous_phase:
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
