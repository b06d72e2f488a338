"""`finetune-operator run`: a whole FineTuneJob on this machine, through the same planner and stage programs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from finetune_operator.api.crd import open_api_schema
from finetune_operator.api.status import FineTuneJobStatus
from finetune_operator.cli import main
from finetune_operator.stages.export import digest

from .conftest import first_word_rows, write_jsonl

pytestmark = pytest.mark.slow


def make_job(tmp: Path, **spec_changes) -> Path:
    """A small sibling of the quickstart: micro model built by --init-model, the first-word task."""
    rows = first_word_rows(440)
    (tmp / "data").mkdir(exist_ok=True)
    write_jsonl(tmp / "data" / "train.jsonl", rows[:400])
    write_jsonl(tmp / "data" / "eval.jsonl", rows[400:])
    spec = {
        "model": {"source": "./model"},
        "dataset": {
            "source": "./data/train.jsonl",
            "evalSource": "./data/eval.jsonl",
            "format": "completion",
            "columns": {"prompt": "instruction", "input": "input", "completion": "output"},
            "maxSeqLength": 64,
        },
        "method": {"type": "full"},
        "training": {
            "maxSteps": 600,
            "learningRate": 0.005,
            "batchSize": 16,
            "loggingSteps": 50,
            "checkpointEverySteps": 100,
        },
        "resources": {"gpusPerWorker": 0},
        "evaluation": {
            "metrics": ["perplexity", "exactMatch"],
            "generation": {"maxNewTokens": 4},
            "gates": [{"metric": "exactMatch", "min": 0.5}],
        },
        "export": {"formats": ["merged"]},
        "output": {"uri": "./out"},
    }
    for key, value in spec_changes.items():
        spec[key] = {**spec.get(key, {}), **value}
    manifest = tmp / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "words"}, "spec": spec}
        )
    )
    return manifest


def status_of(tmp: Path) -> dict:
    return yaml.safe_load((tmp / "out" / "status.yaml").read_text())


def test_quickstart_sibling_runs_end_to_end(tmp_path, capsys):
    # 60 steps: enough to move perplexity; that the model learns the task (exact match) is proven once, in
    # test_stage_evaluate_export.py::test_tuned_model_beats_the_base_model, and by the quickstart's figures.
    manifest = make_job(
        tmp_path,
        training={"maxSteps": 60, "loggingSteps": 10, "checkpointEverySteps": 30},
        evaluation={"gates": [{"metric": "perplexity", "max": 100}]},
        export={"formats": ["merged", "onnx"], "serving": {"runtime": "triton"}},
    )
    assert main(["run", str(manifest), "--init-model", "micro", "-o", "yaml"]) == 0
    printed = capsys.readouterr().out
    assert "status:" in printed and "phase: Succeeded" in printed
    raw = status_of(tmp_path)
    # Exactly the CR's status schema.
    jsonschema.Draft4Validator(open_api_schema()["properties"]["status"]).validate(raw)
    status = FineTuneJobStatus.model_validate(raw)
    assert (
        status.phase == "Succeeded"
        and [getattr(status.stages, s).state for s in ("prepare", "train", "evaluate", "export")] == ["Succeeded"] * 4
    )
    assert status.metrics.tuned["perplexity"] < status.metrics.base["perplexity"] / 2
    assert status.metrics.gates_passed and status.progress.step == 60
    assert {c.type: c.status for c in status.conditions}["Ready"] == "True"
    names = [a.name for a in status.artifacts]
    assert names == ["merged", "onnx", "triton-repository", "serving-config"]
    for artifact in status.artifacts:
        assert digest(Path(artifact.uri)) == (artifact.sha256, artifact.size_bytes)
    assert (tmp_path / "out" / "serving-config.pbtxt").exists()
    assert (tmp_path / "out" / "triton" / "words" / "config.pbtxt").exists()
    assert status.lineage.dataset_fingerprint and status.lineage.config_hash

    # Running it again changes nothing and says so: finished stages are not rerun, no status YAML by default.
    before = (tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").stat().st_mtime
    assert main(["run", str(manifest)]) == 0
    printed = capsys.readouterr().out
    assert "words run 1 already succeeded" in printed and "phase:" not in printed
    assert (tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").stat().st_mtime == before

    # A spec change after completion starts run 2 and keeps run 1 in the history.
    make_job(tmp_path, training={"maxSteps": 5}, evaluation={"enabled": False, "gates": []})
    assert main(["run", str(manifest), "-q"]) == 0
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.run == 2 and status.runs[0].run == 1 and status.runs[0].phase == "Succeeded"
    assert not (tmp_path / "out" / ".work" / "run-1").exists()


def test_a_failed_gate_ends_failed_without_export_in_one_line(tmp_path, capsys):
    manifest = make_job(tmp_path, training={"maxSteps": 5}, evaluation={"compareBase": False})
    assert main(["run", str(manifest), "--init-model", "micro", "-q"]) == 1
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.phase == "Failed" and status.stages.evaluate.state == "Failed" and status.stages.export is None
    assert next(c for c in status.conditions if c.type == "Ready").reason == "GateFailed"
    assert status.metrics.gates[0].passed is False and not (tmp_path / "out" / "merged").exists()
    printed = capsys.readouterr()
    assert "phase:" not in printed.out  # the status YAML stays in status.yaml (`-o yaml` prints it)
    log = tmp_path / "out" / ".work" / "run-1" / "evaluate.log"
    assert printed.err.splitlines()[-1] == (
        f"error: evaluate failed: quality gate failed: exactMatch = {status.metrics.gates[0].value} "
        f"(needs min 0.5) (log: {log}; after the fix, the same command retries evaluate)"
    )


@pytest.mark.timeout(1800)  # three tiny runs; at a load of 38 on 2 cores the third began after 900 s
def test_a_failed_run_is_retried_by_the_same_command_after_the_fix(tmp_path, capsys):
    """Fixing the data (not the spec) and running the same command retries the failed stage, not `phase: Failed`."""
    manifest = make_job(tmp_path, training={"maxSteps": 3}, evaluation={"enabled": False, "gates": []})
    data = tmp_path / "data" / "train.jsonl"
    good = data.read_text()
    # The model first: --init-model reads the data too, and would refuse the bad row before any stage runs.
    from finetune_operator.stages.tiny import build_tiny_model, corpus_from_jsonl

    build_tiny_model(tmp_path / "model", corpus_from_jsonl(data), preset="micro")
    rows = good.splitlines()
    rows[6] = json.dumps({"instruction": "Give the first word.", "input": "red cat", "output": 7})
    data.write_text("\n".join(rows) + "\n")
    assert main(["run", str(manifest)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: prepare failed: spec.dataset.source: row 7: column 'output'")
    assert last.endswith(f"(log: {tmp_path / 'out' / '.work' / 'run-1' / 'prepare.log'}; after the fix, "
                         "the same command retries prepare)")  # fmt: skip
    assert status_of(tmp_path)["phase"] == "Failed"  # the whole status is kept in status.yaml

    data.write_text(good)
    assert main(["run", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "run 1 failed at prepare: retrying prepare and what follows" in out
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.phase == "Succeeded" and status.run == 1 and status.stages.prepare.state == "Succeeded"
    assert [a.name for a in status.artifacts] == ["merged", "serving-config"]

    prepared = (tmp_path / "out" / ".work" / "run-1" / "summaries" / "prepare.json").stat().st_mtime
    assert main(["run", str(manifest), "--fresh", "-q"]) == 0  # --fresh starts over: every stage runs again
    assert (tmp_path / "out" / ".work" / "run-1" / "summaries" / "prepare.json").stat().st_mtime > prepared
    assert "already succeeded" not in capsys.readouterr().out


@pytest.fixture
def start(tmp_path):
    """Start `finetune-operator run` as a user would; whatever the test's outcome, stop it and its stages."""
    started: list[subprocess.Popen] = []

    def launch(manifest: Path, *extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "finetune_operator", "run", str(manifest), *extra]
        started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return started[-1]

    yield launch
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    for line in _stage_processes(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 1200) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.1)


def _stage_processes(tmp: Path) -> list[str]:
    """Processes still running a stage of this test's job (their command line names its workdir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "finetune_operator.stages" in cmdline and str(tmp) in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.timeout(1800)  # two runs (prepare, train, export); 900 s was not enough at a load of 30 on 2 cores
def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path, start, micro_model):
    """What `timeout`, systemd, a CI runner or `kill` send: the stages stop, the run is Suspended, and resumes."""
    manifest = make_job(
        tmp_path,
        training={"maxSteps": 100, "loggingSteps": 10, "checkpointEverySteps": 10},
        evaluation={"enabled": False, "gates": []},
    )
    shutil.copytree(micro_model, tmp_path / "model")  # what --init-model builds, without importing torch for it
    proc = start(manifest, "-q")
    _wait_for(tmp_path / "out" / ".work" / "run-1" / "train" / "checkpoints" / "checkpoint-10", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "run the same command again to resume" in out
    assert _stage_processes(tmp_path) == []  # the stage's process group went with it
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.phase == "Suspended" and status.stages.prepare.state == "Succeeded"
    assert status.stages.train.state == "Pending" and "SIGTERM" in status.message

    assert main(["run", str(manifest), "-q"]) == 0
    summary = json.loads((tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").read_text())
    assert summary["resumedFrom"].startswith("checkpoint-") and summary["steps"] == 100
    assert FineTuneJobStatus.model_validate(status_of(tmp_path)).phase == "Succeeded"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_and_a_closed_terminal_stop_like_sigterm(tmp_path, start, micro_model, signum):
    manifest = make_job(tmp_path, training={"maxSteps": 100000}, evaluation={"enabled": False, "gates": []})
    shutil.copytree(micro_model, tmp_path / "model")
    proc = start(manifest, "-q")
    _wait_for(tmp_path / "out" / ".work" / "run-1" / "train.log", proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out
    assert f"stopped by {signal.Signals(signum).name}" in out
    assert _stage_processes(tmp_path) == []
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.phase == "Suspended" and status.stages.train.state == "Pending"


def test_two_workers_train_as_two_rendezvous_processes(tmp_path):
    manifest = make_job(
        tmp_path,
        resources={"workers": 2},
        storage={"workspace": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}},
        training={"maxSteps": 20},
        evaluation={"enabled": False, "gates": []},
    )
    os.environ.pop("LOCAL_RANK", None)
    assert main(["run", str(manifest), "--init-model", "micro", "-q"]) == 0
    summary = json.loads((tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").read_text())
    assert summary["worldSize"] == 2 and summary["steps"] == 20


def test_an_invalid_manifest_is_refused_before_anything_runs(tmp_path, capsys):
    manifest = make_job(tmp_path, model={"source": "pvc://models/x"})
    assert main(["run", str(manifest)]) == 2
    assert "spec.model.source: 'pvc://models/x' names a PersistentVolumeClaim" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_forked_and_fresh_stage_processes_give_the_same_run(tmp_path, monkeypatch, warm_launcher):
    """Local mode forks each stage from a server that imported the ML stack once (prefork.py); the run it gives
    is the one fresh processes give: the same metrics, the same losses, the same exported weights."""
    import finetune_operator.local as local
    from finetune_operator.prefork import Launcher

    session_server = local.Launcher  # conftest.py's shared_launcher: the session's warm server
    switched_off: list[Launcher] = []

    class Counted(Launcher):
        def close(self) -> None:
            switched_off.append(self)
            super().close()

    results = {}
    for mode in ("fresh", "forked"):
        if mode == "fresh":  # FINETUNE_PREFORK=0, read by the run's own Launcher
            monkeypatch.setenv("FINETUNE_PREFORK", "0")
            monkeypatch.setattr(local, "Launcher", Counted)
        else:  # forked from a warm server, as every other local run of the suite
            monkeypatch.delenv("FINETUNE_PREFORK")
            monkeypatch.setattr(local, "Launcher", session_server)
            forked, fresh = warm_launcher.forked, warm_launcher.fresh
        folder = tmp_path / mode
        folder.mkdir()
        manifest = make_job(folder, training={"maxSteps": 12, "loggingSteps": 4, "checkpointEverySteps": 6},
                            evaluation={"gates": []})  # fmt: skip
        assert main(["run", str(manifest), "--init-model", "micro", "-q"]) == 0
        status = FineTuneJobStatus.model_validate(status_of(folder))
        merged = next(a for a in status.artifacts if a.name == "merged")
        results[mode] = (status.metrics.tuned, status.metrics.base, status.progress.loss, merged.sha256)
    assert [(c.forked, c.fresh) for c in switched_off] == [(0, 4)]
    assert (warm_launcher.forked - forked, warm_launcher.fresh - fresh) == (4, 0), warm_launcher.why_fresh
    assert results["fresh"] == results["forked"]


@pytest.mark.parametrize("gpus_per_worker", [0, 1])
def test_on_a_gpu_machine_each_stage_sees_the_gpus_its_pod_would_get(tmp_path, monkeypatch, gpus_per_worker):
    """prepare and export pods request no GPU, nor does any pod when gpusPerWorker is 0: local mode hides the
    machine's GPUs from those stages, so the quickstart's `gpusPerWorker: 0` trains on the CPU there too."""
    import finetune_operator.local as local

    manifest = make_job(tmp_path, resources={"gpusPerWorker": gpus_per_worker})
    job = local.FineTuneJob.model_validate(yaml.safe_load(manifest.read_text()))
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.setattr(local, "gpu_present", lambda: True)
    seen = {stage: local.gpu_visibility(job, stage) for stage in ("prepare", "search", "train", "evaluate", "export")}
    gpu_stage = {} if gpus_per_worker else hidden
    assert seen == {"prepare": hidden, "search": gpu_stage, "train": gpu_stage, "evaluate": gpu_stage, "export": hidden}
    monkeypatch.setattr(local, "gpu_present", lambda: False)
    assert all(local.gpu_visibility(job, stage) == {} for stage in seen)  # no GPU: nothing to hide
