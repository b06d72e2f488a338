"""Every command of the README's console blocks that needs no cluster and no GPU runs here, as written.

Commands run through bash from a scratch copy of `examples/` (so the clone stays clean and relative paths are
the README's). `[--flag value]` means optional: the command runs without and with each optional part. A block's
sample output is compared with what the command prints where the output is deterministic.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import EXAMPLES, REPO

README = REPO / "README.md"

# Commands the tests cannot run here, and why.
NOT_HERE = {
    "kubectl": "needs a cluster",
    "helm": "needs a cluster",
    "docker": "needs a Docker engine",
    "bash scripts/setup.sh": "installs packages: CI runs it as its set-up step",
    "python -m pytest": "is this test suite",
    "python3.11 -m venv": "creates a virtual environment: CI's machine is set up by scripts/setup.sh",
    "finetune-operator playground": "serves a web app over a finished run until stopped: tests/test_playground.py "
    "drives it in a real browser",
}
QUICKSTART = "finetune-operator run examples/quickstart/finetunejob.yaml --init-model tiny-gpt2"


def console_commands() -> list[tuple[str, list[str]]]:
    """(command, sample output lines) for every `$ ` line of every ```console block."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", README.read_text(), flags=re.S):
        command: str | None = None
        for line in block.splitlines():
            if command is not None and command.endswith("\\"):
                command = command[:-1] + " " + line.strip()
                found[-1] = (command, [])
            elif line.startswith("$ "):
                command = line[2:].split("  #")[0].strip()
                found.append((command, []))
            elif found:
                found[-1][1].append(line)
    return found


def runnable() -> list[tuple[str, list[str]]]:
    return [(c, out) for c, out in console_commands() if not any(c.startswith(p) for p in NOT_HERE)]


def expand(command: str) -> list[str]:
    """`cmd [--a x] [--b]` -> cmd, cmd --a x, cmd --b, cmd --a x --b."""
    parts = re.findall(r"\[([^\]]+)\]", command)
    bare = re.sub(r"\s*\[[^\]]+\]", "", command)
    out = []
    for n in range(len(parts) + 1):
        for chosen in itertools.combinations(parts, n):
            out.append(" ".join([bare, *chosen]))
    return out


@pytest.fixture
def scratch(tmp_path) -> Path:
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("out", "tiny-model"))
    return tmp_path


def sh(command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one README command through bash; on a timeout or a failed test, stop it as a user would (SIGTERM:
    `finetune-operator run` then stops its stage processes), then kill whatever is left of its group."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd),
           "PYTHONPATH": str(REPO / "operator"), "COLUMNS": "100"}  # fmt: skip
    if "OMP_NUM_THREADS" in os.environ:  # the suite's one math thread (conftest): 150 s against 40 s on busy cores
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    proc = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=wait)
                break
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_the_readme_has_the_commands_this_test_expects():
    commands = [c for c, _ in console_commands()]
    assert QUICKSTART in commands
    assert any(c.startswith("finetune-operator validate") for c in commands)
    assert any(c.startswith("finetune-operator render") for c in commands)
    for command in commands:  # every command is either run here or skipped for a stated reason
        assert command.startswith(("finetune-operator", *NOT_HERE)), f"unknown README command: {command}"


@pytest.mark.parametrize(
    "command",
    [v for c, _ in runnable() if c != QUICKSTART for v in expand(c)],
)
def test_a_readme_command_runs_as_written(command, scratch):
    done = sh(command, scratch)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    if " validate " in f" {command} ":
        assert re.search(r"[1-9]\d* FineTuneJob\(s\) checked: 0 error\(s\)", done.stderr), done.stderr
    if command.startswith("finetune-operator render"):
        objects = list(yaml.safe_load_all(done.stdout))
        manifest = yaml.safe_load((scratch / command.split()[2]).read_text())
        namespace = manifest["metadata"].get("namespace", "default")
        assert objects and all(o["metadata"].get("namespace", namespace) == namespace for o in objects)


def test_the_cluster_walkthrough_names_the_example_it_applies():
    """`kubectl apply -n NS -f FILE` then `kubectl get/describe ... JOB`: the namespace and name are FILE's."""
    commands = [c for c, _ in console_commands() if c.startswith("kubectl")]
    for command in commands:
        applied = re.match(r"kubectl apply -n (\S+) -f (examples/\S+)", command)
        if not applied:
            continue
        manifest = yaml.safe_load((REPO / applied.group(2)).read_text())
        namespace, name = manifest["metadata"].get("namespace"), manifest["metadata"]["name"]
        assert namespace in (None, applied.group(1)), f"{command}: the manifest says namespace {namespace}"
        outputs = [out for c, out in console_commands() if c.startswith("kubectl get ftj")]
        for line in (line for out in outputs for line in out[1:] if line.strip()):
            assert line.split()[0] == name, f"sample output names {line.split()[0]}, the manifest {name}"
        for other in commands:
            if other.startswith(("kubectl describe ftj", "kubectl get ftj", "kubectl wait")):
                assert f"-n {applied.group(1)}" in other and (name in other or "-w" in other), other


@pytest.mark.slow
@pytest.mark.timeout(1800)  # one whole quickstart (4 stage processes, 3M-parameter model) and the snippet
def test_the_quickstart_and_use_your_model_run_as_written(scratch):
    """The quickstart command as written, on a shortened copy of its manifest (the full run is what
    scripts/quickstart_figures.py measures), then the README's "use your model" snippet on what it exported."""
    manifest = scratch / "examples" / "quickstart" / "finetunejob.yaml"
    raw = yaml.safe_load(manifest.read_text())
    raw["spec"]["training"] = {**raw["spec"]["training"], "maxSteps": 20}
    raw["spec"]["training"].pop("epochs")
    raw["spec"]["evaluation"].update(gates=[], maxSamples=4, compareBase=False)
    manifest.write_text(yaml.safe_dump(raw))
    done = sh(QUICKSTART, scratch, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr

    def events(lines: list[str]) -> list[str]:
        return [" ".join(line.split()[:2]) for line in lines if re.match(r"(ModelInitialised|Stage\w+) ", line)]

    stages = [f"Stage{what} {stage}" for stage in ("prepare", "train", "evaluate", "export")
              for what in ("Started", "Succeeded")]  # fmt: skip
    assert events(done.stdout.splitlines()) == ["ModelInitialised built", *stages]
    # The README's sample output (written by scripts/quickstart_figures.py from a full run), where recorded.
    sample = next((out for c, out in console_commands() if c == QUICKSTART and out), [])
    if sample:
        assert events(sample) == events(done.stdout.splitlines())
        prepare = next(line for line in sample if line.startswith("StageSucceeded prepare"))
        assert prepare in done.stdout.splitlines()  # deterministic: the same rows are read, cleaned and split

    snippet = re.search(r"### Use your model\n.*?```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    ran = sh(f"python - <<'EOF'\n{snippet}EOF", scratch)
    assert ran.returncode == 0, ran.stderr
    # Three prints: generate() on the merged model, pipeline(), ONNX Runtime: the same greedy completion.
    # (The shortened run's completions may be empty: the figures' full run is the one that learns.)
    lines = ran.stdout.split("\n")
    assert lines[-1] == "" and len(lines) >= 4, ran.stdout
    merged, piped, onnx = lines[-4:-1]
    assert merged.strip() == piped.strip() == onnx.strip()
