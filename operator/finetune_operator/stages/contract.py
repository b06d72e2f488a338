"""The contract between the planner (operator or local mode) and the stage programs.

A stage reads a `StageConfig` (JSON: the resolved spec plus the job's identity), works in a workdir with a fixed
layout, prints JSON progress lines on stdout, writes a short JSON summary to the termination-message path and
exits with a documented code. It needs no Kubernetes API access.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..api.spec import FineTuneJobSpec

# Exit codes: the one taxonomy every path honours (the stage program, the torchrun launcher, the local supervisor
# and the cluster Job's podFailurePolicy). Non-retryable codes fail the stage at once; retryable ones restart it
# (train: all workers together, from the newest complete checkpoint); EXIT_PREEMPTED does not count as a retry.
EXIT_OK = 0
EXIT_FAILURE = 1
"""Transient or unknown (I/O, network, a crashed process): retried, counts against spec.runPolicy.backoffLimit."""
EXIT_CONFIG_ERROR = 3
"""Bad configuration or data: never retried (the message names the field and the fix)."""
EXIT_GATE_FAILED = 4
"""A quality gate failed: never retried."""
EXIT_INTERNAL_ERROR = 5
"""A deterministic failure in our own code (KeyError, TypeError...): never retried; traceback in the stage log."""
EXIT_WORKER_LOST = 6
"""A peer worker died or a collective timed out: retried (all workers, from the last checkpoint)."""
EXIT_OUT_OF_MEMORY = 7
"""CUDA or host out of memory raised in Python: retried (the kernel's OOM kill shows as 137)."""
EXIT_PREEMPTED = 75
"""SIGTERM (eviction, preemption, spot reclaim): checkpoint saved at the current step; retried, not counted."""

NON_RETRYABLE_EXIT_CODES = (EXIT_CONFIG_ERROR, EXIT_GATE_FAILED, EXIT_INTERNAL_ERROR)
SIGKILL_EXIT_CODE = 137  # 128 + SIGKILL: the kernel's OOM killer, or a lost/killed worker

AttemptReason = str
"""WorkerLost, Preempted, OOM, Error, ConfigError, GateFailed, InternalError (see `exit_reason`)."""


def exit_reason(code: int) -> AttemptReason:
    """The reason an attempt ended with `code` (a pod's exit code, or a local process's return code)."""
    if code in (EXIT_PREEMPTED, -15, 143):
        return "Preempted"
    if code in (EXIT_WORKER_LOST, -9, SIGKILL_EXIT_CODE):
        return "WorkerLost"
    if code == EXIT_OUT_OF_MEMORY:
        return "OOM"
    return {EXIT_CONFIG_ERROR: "ConfigError", EXIT_GATE_FAILED: "GateFailed", EXIT_INTERNAL_ERROR: "InternalError"}.get(
        code, "Error"
    )


def retryable(code: int) -> bool:
    return code != EXIT_OK and code not in NON_RETRYABLE_EXIT_CODES


def counts_against_backoff(code: int) -> bool:
    """A disruption (SIGTERM: preemption, eviction, drain) is not the job's fault and costs no retry."""
    return retryable(code) and exit_reason(code) != "Preempted"


def most_significant(codes: list[int]) -> int:
    """One exit code for a group of processes (first failure first). A non-retryable code wins (a retry would
    fail the same way); then a root cause (OOM, a killed process, an error) over its victims: workers that saw a
    peer vanish (EXIT_WORKER_LOST) or were stopped (EXIT_PREEMPTED)."""
    failed = [c for c in codes if c != EXIT_OK]
    if not failed:
        return EXIT_OK

    def rank(code: int) -> int:
        if code in NON_RETRYABLE_EXIT_CODES:
            return 0
        if code in (EXIT_PREEMPTED, -15, 143):
            return 2
        return 3 if code == EXIT_WORKER_LOST else 1

    return min(failed, key=rank)  # min is stable: the earliest of the best rank


def exit_code_for(exc: BaseException) -> int:
    """Classify an exception a stage raised: only what can be transient is retried."""
    if isinstance(exc, StageError):
        return exc.exit_code
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc):
        return EXIT_OUT_OF_MEMORY
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return EXIT_WORKER_LOST
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _TRANSIENT_RUNTIME_MARKERS):
        return EXIT_WORKER_LOST if _peer_failure(str(exc)) else EXIT_FAILURE
    if isinstance(exc, OSError | TimeoutError | ConnectionError | EOFError):
        return EXIT_FAILURE  # I/O and network (requests/huggingface_hub errors are OSErrors too)
    return EXIT_INTERNAL_ERROR


# RuntimeErrors torch raises for hardware and peer trouble, which a retry (maybe on another node) can fix.
_TRANSIENT_RUNTIME_MARKERS = (
    "NCCL", "Gloo", "gloo", "Connection closed", "Connection reset", "Broken pipe", "timed out", "Timed out",
    "CUDA error", "ECC", "cuDNN error", "CUBLAS_STATUS", "unspecified launch failure", "Socket",
)  # fmt: skip


def _peer_failure(text: str) -> bool:
    return any(m in text for m in ("NCCL", "Gloo", "gloo", "Connection", "Broken pipe", "timed out", "Timed out"))


# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LIMIT = 4096
PROGRESS_KEY = "finetune.dev/progress"


class StageConfig(BaseModel):
    """What a stage program is given: which job, which run, the resolved spec, where local paths are relative to."""

    job: str
    namespace: str = "default"
    run: int = 1
    spec: FineTuneJobSpec
    base_dir: str | None = None
    """Folder that relative paths in the spec are relative to (local mode: the manifest's folder)."""
    pvc_root: str = "/mnt/pvc"
    """Where the pod mounts the PVCs named by pvc:// URIs (pvc://CLAIM/path -> {pvc_root}/CLAIM/path)."""
    termination_log: str = "/dev/termination-log"
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> StageConfig:
        return cls.model_validate_json(path.read_text())


class StageError(Exception):
    """A failure with a message for a person. `config_error` ones are not worth retrying."""

    def __init__(self, message: str, *, config_error: bool = False, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.config_error = config_error
        self.exit_code = exit_code if exit_code is not None else (EXIT_CONFIG_ERROR if config_error else EXIT_FAILURE)


class DataError(StageError):
    """Bad input data: names the field, the row and what was expected. Never retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, config_error=True)


@dataclass(frozen=True)
class Workdir:
    """The layout of the workspace the stages share."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def reward_model(self) -> Path:
        return self.root / "reward-model"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_data(self) -> Path:
        return self.data / "train"

    @property
    def eval_data(self) -> Path:
        return self.data / "eval"

    @property
    def train_sample(self) -> Path:
        """Training rows shaped like the eval split: evaluate scores them to show memorisation."""
        return self.data / "train-sample"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def checkpoints(self) -> Path:
        return self.root / "train" / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "train" / "final"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluate"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def summaries(self) -> Path:
        return self.root / "summaries"

    def summary_file(self, stage: str) -> Path:
        return self.summaries / f"{stage}.json"

    def sources_file(self) -> Path:
        return self.root / "sources.json"

    def read_sources(self) -> dict[str, Any]:
        path = self.sources_file()
        return json.loads(path.read_text()) if path.exists() else {}


def emit(kind: str, stage: str, **fields: Any) -> None:
    """One JSON line on stdout: the operator reads progress from the pod log tail, the local mode from the pipe."""
    record = {PROGRESS_KEY: kind, "stage": stage, "time": round(time.time(), 3), **fields}
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def parse_line(line: str) -> dict[str, Any] | None:
    """The record of a progress line, or None for any other output."""
    line = line.strip()
    if not line.startswith("{") or PROGRESS_KEY not in line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and PROGRESS_KEY in record else None


def write_summary(config: StageConfig, workdir: Workdir, stage: str, summary: dict[str, Any]) -> None:
    """Persist the stage's summary in the workdir (the full one) and the termination log (a compact one)."""
    workdir.summaries.mkdir(parents=True, exist_ok=True)
    full = {"stage": stage, "run": config.run, **summary}
    tmp = workdir.summary_file(stage).with_suffix(".tmp")
    tmp.write_text(json.dumps(full, indent=2, default=str))
    os.replace(tmp, workdir.summary_file(stage))
    write_termination(config.termination_log, full)


def write_termination(path: str, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, separators=(",", ":"), default=str)
    if len(text.encode()) > TERMINATION_LIMIT:
        # Keep what the operator needs for status; the rest stays in the workdir summary.
        keep = {
            k: payload[k]
            for k in ("stage", "run", "ok", "message", "metrics", "gates", "artifacts", "search")
            if k in payload
        }
        text = json.dumps(keep, separators=(",", ":"), default=str)
        if len(text.encode()) > TERMINATION_LIMIT:
            text = json.dumps({k: keep[k] for k in ("stage", "run", "ok", "message") if k in keep})[:TERMINATION_LIMIT]
    target = Path(path)
    if target.parent.exists():
        # Not writable outside a pod: the workdir summary is the record there.
        with contextlib.suppress(OSError):
            target.write_text(text)


def freeze_what_is_loaded() -> None:
    """Leave what the stage has loaded so far (the ML stack: half a million objects) out of every later garbage
    collection. The Trainer runs a full collection at each training's end and a search trial two; each would
    walk all of it again (~0.5 s on a small machine). Garbage is collected first, so none is kept for good."""
    gc.collect()
    gc.freeze()
