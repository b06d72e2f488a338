"""Entry point of the stage programs: `finetune-operator stage NAME --config FILE --workdir DIR`.

The same program runs in a pod (config from the mounted ConfigMap, workdir on the workspace PVC) and in the local
mode (config written by the planner, workdir under the output folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contract import EXIT_FAILURE, EXIT_OK, StageConfig, StageError, Workdir, emit, write_summary

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


def _quiet_libraries(workdir: Workdir) -> None:
    # Pods run with a read-only root filesystem: every cache goes to the workspace.
    cache = workdir.root / ".cache"
    os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache / "datasets"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def run_stage(name: str, config_path: Path, workdir_path: Path) -> int:
    workdir = Workdir(workdir_path)
    workdir.root.mkdir(parents=True, exist_ok=True)
    _quiet_libraries(workdir)
    try:
        config = StageConfig.load(config_path)
    except Exception as exc:
        print(f"cannot read the stage config {config_path}: {exc}", file=sys.stderr)
        return 3
    if name == "train":
        from .distributed import inside_launcher, launch, rendezvous_from_env

        rdzv = rendezvous_from_env(config.spec.distributed.master_port)
        if rdzv.world_size > 1 and not inside_launcher():
            emit(
                "stage",
                name,
                state="Launching",
                nodes=rdzv.nnodes,
                nodeRank=rdzv.node_rank,
                processesPerNode=rdzv.nproc_per_node,
            )
            return launch(rdzv, name, config_path, workdir_path)
    emit("stage", name, state="Running", rank=int(os.environ.get("RANK", "0")))
    try:
        summary = _stage_function(name)(config, workdir)
    except StageError as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        if int(os.environ.get("RANK", "0")) == 0:
            write_summary(config, workdir, name, {"ok": False, "message": str(exc), "configError": exc.config_error})
        emit("stage", name, state="Failed", message=str(exc))
        return exc.exit_code
    except Exception as exc:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        if int(os.environ.get("RANK", "0")) == 0:
            write_summary(config, workdir, name, {"ok": False, "message": message})
        emit("stage", name, state="Failed", message=message)
        return EXIT_FAILURE
    if int(os.environ.get("RANK", "0")) == 0:
        write_summary(config, workdir, name, summary)
    emit("stage", name, state="Succeeded" if summary.get("ok", True) else "Failed", message=summary.get("message"))
    return int(summary.get("exitCode", EXIT_OK))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGE_NAMES)
    parser.add_argument("--config", required=True, type=Path, help="the stage config (JSON)")
    parser.add_argument("--workdir", required=True, type=Path, help="the shared workspace folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.stages")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_stage(args.stage, args.config, args.workdir)
