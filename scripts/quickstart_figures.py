"""Run the README's quickstart once and write what it printed and measured into the README.

    python scripts/quickstart_figures.py            # runs in a scratch copy, then rewrites the README section
    python scripts/quickstart_figures.py --check    # exit 1 if the README differs from benchmarks/quickstart.json

The quickstart runs exactly as the README tells a user to (`finetune-operator run
examples/quickstart/finetunejob.yaml --init-model tiny-gpt2`, from the repository root), in a copy of
`examples/quickstart` under a scratch folder so the clone stays clean. The wall time is recorded with the load
average seen during the run and the CPU count: a run on a machine whose load stays above its core count is filed
as "busy", otherwise "idle", and the README states the latest of each. Everything the README shows comes from
`benchmarks/quickstart.json`, which this script writes: the sample output, the metrics, the step count, the times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RECORD = REPO / "benchmarks" / "quickstart.json"
COMMAND = ["finetune-operator", "run", "examples/quickstart/finetunejob.yaml", "--init-model", "tiny-gpt2"]
BEGIN, END = "<!-- quickstart-figures:begin (scripts/quickstart_figures.py) -->", "<!-- quickstart-figures:end -->"
SHOWN_ROOT = "/path/to/finetune-operator"


def run_quickstart() -> dict[str, Any]:
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5):
            loads.append(os.getloadavg()[0])

    with tempfile.TemporaryDirectory(prefix="quickstart-") as scratch:
        root = Path(scratch)
        shutil.copytree(
            REPO / "examples" / "quickstart",
            root / "examples" / "quickstart",
            ignore=shutil.ignore_patterns("out", "tiny-model", "__pycache__"),
        )
        # This checkout's code, whichever copy of the package is installed.
        path = os.pathsep.join(p for p in (str(REPO / "operator"), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": path}  # the README block is read at ~120
        sampler = threading.Thread(target=sample, daemon=True)
        loads.append(os.getloadavg()[0])
        started = time.monotonic()
        sampler.start()
        program = shutil.which("finetune-operator")
        command = COMMAND if program else [sys.executable, "-m", "finetune_operator", *COMMAND[1:]]
        done = run_stoppable(command, root, env)
        seconds = time.monotonic() - started
        stop.set()
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"the quickstart failed (exit {done.returncode})")
        status = yaml.safe_load((root / "examples" / "quickstart" / "out" / "status.yaml").read_text())
        output = done.stdout.replace(str(root.resolve()), SHOWN_ROOT).replace(str(root), SHOWN_ROOT)
    cpus = os.cpu_count() or 1
    mean_load = sum(loads) / len(loads)
    return {
        "measuredAt": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(seconds, 1),
        "cpus": cpus,
        "meanLoad": round(mean_load, 1),
        "machine": "busy" if mean_load > cpus else "idle",
        "steps": status["progress"]["step"],
        "metrics": status["metrics"],
        "prepare": status["stages"]["prepare"]["message"],
        "output": condense(output),
    }


def run_stoppable(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the quickstart; if this script is stopped, stop it the same way (it then stops its stage processes)."""

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, stop)
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def condense(output: str) -> list[str]:
    """The run's output as a reader should see it: events, the last training line, the result tables."""
    lines = output.rstrip().splitlines()
    progress = [line for line in lines if re.match(r"train step \d+/\d+", line)]
    kept = []
    for line in lines:
        if re.match(r"(prepare|train|evaluate|export)( started|: )", line):
            continue  # per-stage chatter of a non-terminal run
        if re.match(r"train step \d+/\d+", line):
            if line == progress[-1]:
                kept.append(line)
            continue
        kept.append(line)
    return kept


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def figures(record: dict[str, Any]) -> str:
    latest = record.get("latest")
    if latest is None:
        note = (
            "No measured run is recorded in benchmarks/quickstart.json yet: `python scripts/quickstart_figures.py` "
            "runs the quickstart and writes its output, figures and time here."
        )
        return f"```console\n$ {' '.join(COMMAND)}\n```\n\n" + textwrap.fill(note, width=115)
    base, tuned = latest["metrics"]["base"], latest["metrics"]["tuned"]
    times = []
    for kind in ("idle", "busy"):
        run = record["runs"].get(kind)
        if run:
            times.append(
                f"{duration(run['seconds'])} on {'an' if kind == 'idle' else 'a'} {kind} machine "
                f"({run['cpus']} cores, mean load {run['meanLoad']}, {run['measuredAt'][:10]})"
            )
    block = "\n".join(["```console", f"$ {' '.join(COMMAND)}", *latest["output"], "```"])
    return (
        block
        + "\n\n"
        + textwrap.fill(
            f"The figures above and below come from one run of `python scripts/quickstart_figures.py` "
            f"({latest['measuredAt']}), which runs the command in a scratch copy and writes this section. The run "
            f"(prepare, train {latest['steps']} steps, evaluate base and tuned, export merged + ONNX + Triton) took "
            f"{' and '.join(times)}; exact match went from {base['exactMatch']:g} (base) to {tuned['exactMatch']:g}, "
            f"loss from {base['loss']:.4g} to {tuned['loss']:.4g} and perplexity from {base['perplexity']:.4g} to "
            f"{tuned['perplexity']:.4g}. Data order and initialisation are seeded; the times depend on the machine.",
            width=115,
            break_long_words=False,
            break_on_hyphens=False,
        )
    )


def rewrite_readme(text: str, record: dict[str, Any]) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{figures(record)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the README matches the record")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README from the record, no run")
    args = parser.parse_args(argv)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"runs": {}}
    if args.check:
        if README.read_text() != rewrite_readme(README.read_text(), record):
            print("README.md's quickstart figures differ from benchmarks/quickstart.json: run "
                  "python scripts/quickstart_figures.py --readme-only", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if not args.readme_only:
        latest = run_quickstart()
        record["latest"] = latest
        record["runs"][latest["machine"]] = {k: latest[k] for k in ("measuredAt", "seconds", "cpus", "meanLoad")}
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
        print(f"quickstart: {duration(latest['seconds'])} ({latest['machine']}, mean load {latest['meanLoad']})")
    README.write_text(rewrite_readme(README.read_text(), record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
