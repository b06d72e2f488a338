"""Warm stage starts: a child forked from the prefork server is what a fresh `python -m ...` would have been."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.prefork import CORE, ForkedProcess, Launcher

from .cluster import wait_until
from .conftest import output_of

# One xdist worker runs the whole module, so its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_prefork")

# A program that reports what a process sees of itself, then does a little torch work on its intra-op threads
# (a fork must leave torch's native threads usable) and exits with the code it was given.
PROBE = """
import atexit, gc, json, os, random, sys
frozen = gc.get_freeze_count()  # before this program's own imports
import numpy, torch
atexit.register(lambda: print("atexit ran", flush=True))
print("to stderr", file=sys.stderr, flush=True)
x = torch.ones(256, 256)
report = {
    "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ), "session": os.getsid(0) == os.getpid(),
    "stdin": sys.stdin.read(), "numpy": float(numpy.random.random()), "random": random.random(),
    "matmul": float((x @ x).sum()), "path0": sys.path[0], "frozen": frozen,
}
print(json.dumps(report), flush=True)
if sys.argv[1] == "wait":
    import time
    time.sleep(60)
raise SystemExit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("program")
    (folder / "probe.py").write_text(PROBE)
    return folder


# What the probe imports; the stages' whole list is what the local-mode tests run under.
PRELOAD = {"core": ("numpy", "torch"), "later": ()}


@pytest.fixture(scope="module")
def launcher():
    with Launcher(warm=True, **PRELOAD) as launcher:
        yield launcher


def environment(**env: str) -> dict[str, str]:
    # Without pytest's per-test variable: the module's children share one server.
    return {**{k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}, **env}


def start(launcher: Launcher, program: Path, arg: str, **env: str) -> Any:
    return launcher.start([sys.executable, "-m", "probe", arg], environment(**env), cwd=str(program))


def finish(process: Any) -> tuple[int, dict[str, Any], list[str]]:
    lines = output_of(process, timeout=120).splitlines()
    process.stdout.close()
    code = process.returncode
    report = next(json.loads(line) for line in lines if line.startswith("{"))
    return code, report, [line for line in lines if not line.startswith("{")]


def test_a_forked_child_sees_what_a_fresh_process_would(launcher, program):
    forked = start(launcher, program, "0", MASTER_PORT="1234")
    assert isinstance(forked, ForkedProcess)
    fresh = subprocess.Popen([sys.executable, "-m", "probe", "0"], cwd=program, env=environment(MASTER_PORT="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    code, report, other = finish(forked)
    fresh_code, fresh_report, fresh_other = finish(fresh)
    assert code == fresh_code == 0
    assert report["argv"] == fresh_report["argv"] == ["0"]
    assert report["cwd"] == report["path0"] == str(program) == fresh_report["cwd"] == fresh_report["path0"]
    assert report["env"] == environment(MASTER_PORT="1234")  # exactly the environment asked for
    assert report["session"] and fresh_report["session"]
    assert report["stdin"] == "" and report["matmul"] == fresh_report["matmul"] == 256.0**3
    assert sorted(other) == sorted(fresh_other) == ["atexit ran", "to stderr"]
    # The one difference, on purpose: what the server imported is left out of the child's garbage collections.
    assert report["frozen"] > 10_000 and fresh_report["frozen"] == 0


def test_children_do_not_share_random_state(launcher, program):
    reports = [finish(start(launcher, program, "0"))[1] for _ in range(2)]
    assert reports[0]["numpy"] != reports[1]["numpy"]
    assert reports[0]["random"] != reports[1]["random"]


def test_exit_codes_and_signals_read_as_popen_reads_them(launcher, program):
    assert finish(start(launcher, program, "3"))[0] == 3
    code, _, other = finish(start(launcher, program, "a message"))
    assert code == 1 and "a message" in other
    waiting = start(launcher, program, "wait")
    assert isinstance(waiting, ForkedProcess), launcher.why_fresh
    wait_until(lambda: waiting.stdout.readline().startswith("{"), timeout=60, what="the child's report")
    assert waiting.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(timeout=0.2)
    os.killpg(waiting.pid, signal.SIGTERM)  # its own process group, as local mode stops a stage
    assert waiting.wait(timeout=30) == -signal.SIGTERM
    waiting.stdout.close()


def test_what_libraries_read_at_import_gets_a_fresh_process(launcher, program):
    before = launcher.fresh
    code, report, _ = finish(start(launcher, program, "0", HF_HOME=str(program / "elsewhere")))
    assert code == 0 and report["env"]["HF_HOME"] == str(program / "elsewhere")
    # A second server for that environment (at most two), so it was forked too, from a server that imported there.
    assert launcher.fresh == before and len(launcher._servers) == 2
    code, _, _ = finish(start(launcher, program, "0", HF_HOME=str(program / "third")))
    assert code == 0 and launcher.fresh == before + 1


def test_switched_off_or_without_a_server_it_starts_fresh_processes(program, monkeypatch):
    monkeypatch.setenv("FINETUNE_PREFORK", "0")
    with Launcher(**PRELOAD) as off:
        assert isinstance(start(off, program, "0"), subprocess.Popen)
    with Launcher(warm=True, **PRELOAD) as launcher:
        first = start(launcher, program, "wait")
        assert isinstance(first, ForkedProcess)
        server = next(iter(launcher._servers.values()))
        server._process.kill()
        # Its child cannot be reported any more: it is stopped and read as killed, and the next start has a new server.
        assert first.wait(timeout=30) == -signal.SIGKILL
        wait_until(lambda: not server.alive(), timeout=10, what="the server to be gone")
        code, _, _ = finish(start(launcher, program, "0"))
        assert code == 0 and launcher.forked == 2


def test_a_server_in_which_an_import_initialised_cuda_starts_fresh_processes(program, tmp_path):
    """A child forked from a process that has initialised CUDA cannot use the GPU: a server whose imports did so
    refuses to fork. A module that makes torch report CUDA initialised stands in for such an import (PEFT with
    bitsandbytes installed is one, on a GPU machine)."""
    (tmp_path / "initialises_cuda.py").write_text("import torch\ntorch.cuda.is_initialized = lambda: True\n")
    path = os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))
    with Launcher(warm=True, core=("numpy", "initialises_cuda"), later=()) as launcher:
        child = start(launcher, program, "0", PYTHONPATH=path)
        assert isinstance(child, subprocess.Popen) and "initialised CUDA" in launcher.why_fresh
        assert finish(child)[0] == 0 and (launcher.forked, launcher.fresh) == (0, 1)


GPU_PROBE = """
import json, torch
import peft  # initialises CUDA at import where bitsandbytes is installed: the child may, the server must not
x = torch.ones(1024, 1024, device="cuda")
print(json.dumps({"sum": float((x @ x).sum()), "device": torch.cuda.get_device_name()}), flush=True)
"""


@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA GPU")
def test_on_a_gpu_machine_a_child_forked_from_the_default_server_uses_the_gpu(program):
    """What the server imports on a GPU machine (CORE: torch, transformers, datasets) leaves CUDA alone, so local
    runs on a GPU workstation start their stages warm and the stages use the GPU."""
    (program / "gpu_probe.py").write_text(GPU_PROBE)
    with Launcher(warm=True) as launcher:
        assert launcher.preload == (CORE, ())
        child = launcher.start([sys.executable, "-m", "gpu_probe"], environment(), cwd=str(program))
        assert isinstance(child, ForkedProcess), launcher.why_fresh
        code, report, other = finish(child)
        assert code == 0, other
        assert report["sum"] == 1024.0**3
