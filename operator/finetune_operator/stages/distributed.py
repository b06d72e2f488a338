"""Rendezvous: read the standard environment and, when more than one process is asked for, launch torchrun.

The operator (Indexed Job) and the local mode set the same variables for every train worker:
  MASTER_ADDR, MASTER_PORT          worker 0's address and port
  NNODES, NODE_RANK                  workers and this worker's index (NODE_RANK falls back to JOB_COMPLETION_INDEX)
  NPROC_PER_NODE                     training processes in this worker (one per GPU)
  WORLD_SIZE                         NNODES * NPROC_PER_NODE
torchrun's own PET_* variables (PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_MASTER_ADDR, PET_MASTER_PORT)
take precedence when present, so a pod spec written for torchrun works unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rendezvous:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _env(*names: str, default: str) -> str:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return default


def rendezvous_from_env(default_port: int = 29500) -> Rendezvous:
    return Rendezvous(
        nnodes=int(_env("PET_NNODES", "NNODES", default="1")),
        node_rank=int(_env("PET_NODE_RANK", "NODE_RANK", "JOB_COMPLETION_INDEX", default="0")),
        nproc_per_node=int(_env("PET_NPROC_PER_NODE", "NPROC_PER_NODE", default="1")),
        master_addr=_env("PET_MASTER_ADDR", "MASTER_ADDR", default="127.0.0.1"),
        master_port=int(_env("PET_MASTER_PORT", "MASTER_PORT", default=str(default_port))),
    )


def inside_launcher() -> bool:
    """True in a process that torchrun (or another launcher) started with its rank assigned."""
    return "LOCAL_RANK" in os.environ


def launch(rdzv: Rendezvous, stage: str, config: Path, workdir: Path) -> int:
    """Re-run this stage under torchrun with the rendezvous, and wait for it."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={rdzv.nnodes}",
        f"--node_rank={rdzv.node_rank}",
        f"--nproc_per_node={rdzv.nproc_per_node}",
        f"--master_addr={rdzv.master_addr}",
        f"--master_port={rdzv.master_port}",
        "-m", "finetune_operator.stages", stage, "--config", str(config), "--workdir", str(workdir),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    return subprocess.call(command, env=env)
