"""Entry point of the stage programs: `finetune-operator stage NAME --config FILE --workdir DIR`.

The same program runs in a pod (config from the mounted ConfigMap, workdir on the workspace PVC) and in the local
mode (config written by the planner, workdir under the output folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contract import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERNAL_ERROR,
    EXIT_OK,
    EXIT_PREEMPTED,
    StageConfig,
    StageError,
    Workdir,
    emit,
    exit_code_for,
    exit_reason,
    retryable,
    write_summary,
    write_termination,
)

STAGE_NAMES = ("prepare", "search", "train", "evaluate", "export")


def _stage_function(name: str) -> Callable[[StageConfig, Workdir], dict[str, Any]]:
    if name == "prepare":
        from .prepare import run_prepare

        return run_prepare
    if name == "search":
        from .search import run_search

        return run_search
    if name == "train":
        from .train import run_train

        return run_train
    if name == "evaluate":
        from .evaluate import run_evaluate

        return run_evaluate
    if name == "export":
        from .export import run_export

        return run_export
    raise ValueError(f"unknown stage {name!r}")


def stage_environment(workdir_root: Path) -> dict[str, str]:
    """What a stage sets in its environment, where not set already, before it imports a library."""
    # Pods run with a read-only root filesystem: every cache goes to the workspace.
    cache = workdir_root / ".cache"
    return {
        "HF_HOME": str(cache / "huggingface"),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }


def _quiet_libraries(workdir: Workdir) -> None:
    for name, value in stage_environment(workdir.root).items():
        os.environ.setdefault(name, value)


def limit_math_threads(processes: int = 1) -> int | None:
    """Give torch (OpenMP, MKL) the pod's CPUs shared among this node's stage processes: FINETUNE_CPUS, the pod's
    CPU request, rather than one thread per core of the node. An OMP_NUM_THREADS already set (the user's, through
    spec.env or the shell) wins; without either (local mode), torch's default: one per core this process may use."""
    if "OMP_NUM_THREADS" in os.environ or not os.environ.get("FINETUNE_CPUS", "").isdigit():
        return None
    threads = max(1, int(os.environ["FINETUNE_CPUS"]) // max(1, processes))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for a torch imported later, and torchrun's workers
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported (a process forked from the warm server): OpenMP read the variable then
        torch.set_num_threads(threads)
    return threads


def run_stage(name: str, config_path: Path, workdir_path: Path) -> int:
    workdir = Workdir(workdir_path)
    workdir.root.mkdir(parents=True, exist_ok=True)
    _quiet_libraries(workdir)
    try:
        config = StageConfig.load(config_path)
    except Exception as exc:
        print(f"cannot read the stage config {config_path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if name == "train":
        from .distributed import become_the_rank, inside_launcher, launch, rendezvous_from_env

        rdzv = rendezvous_from_env(config.spec.distributed.master_port)
        threads = limit_math_threads(rdzv.nproc_per_node)  # torchrun's workers inherit the share
        if rdzv.world_size > 1 and not inside_launcher():
            emit(
                "stage",
                name,
                state="Launching",
                nodes=rdzv.nnodes,
                nodeRank=rdzv.node_rank,
                processesPerNode=rdzv.nproc_per_node,
            )
            if rdzv.nproc_per_node > 1:
                return launch(rdzv, name, config_path, workdir_path, config.spec)
            become_the_rank(rdzv)
    else:
        threads = limit_math_threads()
    rank = int(os.environ.get("RANK", "0"))
    emit("stage", name, state="Running", rank=rank, **({"mathThreads": threads} if threads else {}))
    try:
        summary = _stage_function(name)(config, workdir)
    except Exception as exc:  # every failure leaves a summary and a classified exit code
        return _failed(name, config, workdir, exc, rank)
    code = int(summary.get("exitCode", EXIT_OK))
    if code == EXIT_PREEMPTED:
        # Not a result: the next attempt resumes from the checkpoint. Only the pod's termination message says why.
        write_termination(config.termination_log, {"stage": name, "run": config.run, **summary})
    elif rank == 0:
        write_summary(config, workdir, name, summary)
    state = "Preempted" if code == EXIT_PREEMPTED else ("Succeeded" if summary.get("ok", True) else "Failed")
    emit("stage", name, state=state, message=summary.get("message"))
    return code


def _failed(name: str, config: StageConfig, workdir: Workdir, exc: Exception, rank: int) -> int:
    """Log the failure (traceback for anything but a StageError), summarise it in one line, classify it."""
    code = exit_code_for(exc)
    if isinstance(exc, StageError):
        message = str(exc)
        print(f"{name} failed: {message}", file=sys.stderr)
    else:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}{_where(exc)}"
        if code == EXIT_INTERNAL_ERROR:
            message = f"internal error, not retried (a bug; traceback in the {name} log): {message}"
    summary = {"ok": False, "message": message, "exitCode": code, "reason": exit_reason(code)}
    if isinstance(exc, StageError):
        summary["configError"] = exc.config_error
    if not retryable(code) or (rank == 0 and not _cause_recorded(config, workdir, name)):
        # Rank 0's summary is the record, but a non-retryable error on any rank is the cause: it wins.
        write_summary(config, workdir, name, summary)
    else:
        write_termination(config.termination_log, {"stage": name, "run": config.run, **summary})
    emit("stage", name, state="Failed", message=message, exitCode=code, rank=rank)
    return code


def _cause_recorded(config: StageConfig, workdir: Workdir, name: str) -> bool:
    """Another rank of this run already recorded a non-retryable failure (its victims must not overwrite it)."""
    try:
        recorded = json.loads(workdir.summary_file(name).read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("run") == config.run and not retryable(int(recorded.get("exitCode", EXIT_OK)))


def _where(exc: BaseException) -> str:
    """at file.py:LINE in function, for the innermost frame of the traceback."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame.f_code
    return f" (at {Path(frame.co_filename).name}:{tb.tb_lineno} in {frame.co_name})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGE_NAMES)
    parser.add_argument("--config", required=True, type=Path, help="the stage config (JSON)")
    parser.add_argument("--workdir", required=True, type=Path, help="the shared workspace folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.stages")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_stage(args.stage, args.config, args.workdir)
