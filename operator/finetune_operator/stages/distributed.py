"""Rendezvous: read the standard environment; a worker of one process is the rank itself, a worker of several
(one per GPU) launches torchrun.

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
from dataclasses import dataclass
from pathlib import Path

from ..api.spec import FineTuneJobSpec
from .contract import EXIT_OK, EXIT_PREEMPTED, SIGKILL_EXIT_CODE, most_significant


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


def become_the_rank(rdzv: Rendezvous) -> None:
    """One training process per worker (one GPU per pod, or the CPU): this process is the rank, as in a Kubeflow
    PyTorchJob. It gets the variables torchrun would give its one child (env:// initialisation and the Trainer read
    them); rank 0 hosts the rendezvous store on MASTER_PORT, as torchrun's agent would. No second interpreter
    imports the ML stack on every worker, and local mode can fork the worker from its warm server (prefork.py).
    SIGTERM reaches the rank itself, whose handler checkpoints at the gang's next common step."""
    os.environ.update(
        RANK=str(rdzv.node_rank),
        GROUP_RANK=str(rdzv.node_rank),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        WORLD_SIZE=str(rdzv.world_size),
        MASTER_ADDR=rdzv.master_addr,
        MASTER_PORT=str(rdzv.master_port),
    )


def launch(rdzv: Rendezvous, stage: str, config: Path, workdir: Path, spec: FineTuneJobSpec) -> int:
    """Run this stage under torchrun (in this process), one training process per GPU of the worker, and return
    one classified exit code.

    torchrun itself exits 1 whenever a worker fails, which would turn a config error into a retry; here the
    workers' own exit codes decide (`most_significant`), so 3/4/5 reach the pod and the Job's podFailurePolicy.
    torchrun restarts nothing (--max-restarts=0): a restart is always the whole gang, from the newest complete
    checkpoint, made by the local supervisor or by the operator replacing the train Job.
    On SIGTERM torchrun forwards the signal to the workers and waits the grace period (less a margin) for them to
    save a checkpoint at the same step, before it would kill them.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in [k for k in os.environ if k.startswith("PET_")]:
        del os.environ[name]  # torchrun reads them as defaults over the arguments below
    args = parse_args(
        [
            f"--nnodes={rdzv.nnodes}",
            f"--node-rank={rdzv.node_rank}",
            f"--nproc-per-node={rdzv.nproc_per_node}",
            f"--master-addr={rdzv.master_addr}",
            f"--master-port={rdzv.master_port}",
            "--max-restarts=0",
            f"--shutdown-timeout={shutdown_timeout(spec)}",
            "--module", "finetune_operator.stages", stage, "--config", str(config), "--workdir", str(workdir),
        ]
    )  # fmt: skip
    try:
        run(args)
    except ChildFailedError as failed:
        codes = [f.exitcode for _, f in sorted(failed.failures.items(), key=lambda item: item[1].timestamp)]
        code = most_significant(codes)
        return SIGKILL_EXIT_CODE if code == -9 else (EXIT_PREEMPTED if code == -15 else code)
    except SignalException:
        return EXIT_PREEMPTED  # the workers were told to checkpoint and stop; the next attempt resumes
    return EXIT_OK


def shutdown_timeout(spec: FineTuneJobSpec) -> int:
    """Seconds the workers get to checkpoint after SIGTERM: the pod's grace period less a margin to exit."""
    grace = spec.run_policy.termination_grace_period_seconds
    return max(grace - min(10, grace // 4), 1)
