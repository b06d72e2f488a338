"""The contract between the planner (operator or local mode) and the stage programs.

A stage reads a `StageConfig` (JSON: the resolved spec plus the job's identity), works in a workdir with a fixed
layout, prints JSON progress lines on stdout, writes a short JSON summary to the termination-message path and
exits with a documented code. It needs no Kubernetes API access.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..api.spec import FineTuneJobSpec

# Exit codes. The operator's podFailurePolicy fails a stage at once on EXIT_CONFIG_ERROR (retrying cannot help);
# any other non-zero code is retried up to spec.runPolicy.backoffLimit times.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 3
EXIT_GATE_FAILED = 4

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
