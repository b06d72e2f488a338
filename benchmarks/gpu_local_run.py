"""The whole local run on a GPU machine: the quickstart's four real stages, warm (forked) vs fresh stage starts.

    python benchmarks/gpu_local_run.py [--out DIR] [--init-model tiny-gpt2]

What it checks, which a CPU machine cannot:
- which of the libraries the stages import initialise CUDA at import (after that a forked child cannot use the GPU,
  so prefork.py's server imports only those that do not, and refuses to fork once CUDA is initialised);
- the quickstart as written (`gpusPerWorker: 0`) runs every stage on the CPU, as its pods would;
- with `gpusPerWorker: 1`, train and evaluate run on the GPU in bf16, warm and fresh, and give the same run.
Writes `gpu_local_run.json` under --out and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
# name: (spec.resources.gpusPerWorker, FINETUNE_PREFORK)
RUNS = {"gpu-warm": (1, "1"), "gpu-fresh": (1, "0"), "cpu-as-written-warm": (0, "1")}

STACK_PROBE = """
import json, sys, time
from finetune_operator import prefork
seen = {}
for module in (*prefork.CORE, *prefork.LATER, "bitsandbytes"):
    started = time.monotonic()
    try:
        __import__(module)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    seen[module] = {"seconds": round(time.monotonic() - started, 2), "cuda_initialised": prefork.cuda_initialised(),
                    "error": error}
print(json.dumps(seen))
"""


def probe_stack() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", STACK_PROBE], capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr[-3000:]}


ONE_RUN = """
import json, sys, time
import finetune_operator.local as local
from finetune_operator.cli import main
launchers = []
class Counted(local.Launcher):
    def close(self):
        launchers.append({"forked": self.forked, "fresh": self.fresh, "why_fresh": self.why_fresh})
        super().close()
local.Launcher = Counted
started = time.monotonic()
code = main(["run", sys.argv[1], "--init-model", sys.argv[2], "-q"])
print(json.dumps({"exit": code, "seconds": round(time.monotonic() - started, 1), "launchers": launchers}))
"""


def one_run(folder: Path, gpus: int, prefork: str, init_model: str, max_steps: int | None) -> dict[str, Any]:
    manifest = folder / "finetunejob.yaml"
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["resources"]["gpusPerWorker"] = gpus
    if max_steps:
        doc["spec"]["training"].pop("epochs", None)
        doc["spec"]["training"]["maxSteps"] = max_steps
        doc["spec"]["evaluation"]["gates"] = []  # a few steps learn nothing: the gate would stop the run
    manifest.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "FINETUNE_PREFORK": prefork}
    out = subprocess.run([sys.executable, "-c", ONE_RUN, str(manifest), init_model], capture_output=True, text=True,
                         env=env, timeout=1800)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"exit"')]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if result.get("exit") != 0:
        result["output"] = (out.stdout + out.stderr)[-4000:]
    status_file = folder / "out" / "status.yaml"
    if status_file.exists():
        status = yaml.safe_load(status_file.read_text())
        result["phase"] = status.get("phase")
        result["metrics"] = status.get("metrics")
        result["loss"] = (status.get("progress") or {}).get("loss")
        result["artifacts"] = {a["name"]: a.get("sha256") for a in status.get("artifacts", [])}
        result["stages"] = status.get("stages")
    result["summaries"] = {f"{path.parent.parent.name}/{path.stem}": _brief(json.loads(path.read_text()))
                           for path in sorted((folder / "out").rglob("summaries/*.json"))}  # fmt: skip
    return result


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("precision", "tokensPerSecond", "runtimeSeconds", "device", "steps", "finalLoss", "microBatch", "metrics")
    return {k: v for k, v in summary.items() if k in keep or "seconds" in k.lower()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--init-model", default="tiny-gpt2")
    parser.add_argument("--max-steps", type=int, help="a shorter run than the quickstart's 10 epochs (a smoke test)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    import torch

    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                              "torch": torch.__version__, "stack": probe_stack(), "runs": {}}  # fmt: skip
    print(json.dumps(report["stack"], indent=1), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-local-") as scratch:
        for name in args.runs:
            gpus, prefork = RUNS[name]
            folder = Path(scratch) / name
            shutil.copytree(REPO / "examples" / "quickstart", folder,
                            ignore=shutil.ignore_patterns("out", "tiny-model", "__pycache__"))  # fmt: skip
            started = time.monotonic()
            report["runs"][name] = one_run(folder, gpus, prefork, args.init_model, args.max_steps)
            shown = {k: v for k, v in report["runs"][name].items() if k != "stages"}
            print(name, round(time.monotonic() - started, 1), "s", json.dumps(shown)[:3000], flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_local_run.json").write_text(json.dumps(report, indent=2))  # after each run


if __name__ == "__main__":
    main()
