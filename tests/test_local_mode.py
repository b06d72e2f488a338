"""`finetune-operator run`: a whole FineTuneJob on this machine, through the same planner and stage programs."""

from __future__ import annotations

import json
import os
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
    manifest = make_job(tmp_path, export={"formats": ["merged", "onnx"], "serving": {"runtime": "triton"}})
    assert main(["run", str(manifest), "--init-model", "micro"]) == 0
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
    assert status.metrics.tuned["exactMatch"] >= 0.5 > status.metrics.base["exactMatch"]
    assert status.metrics.tuned["perplexity"] < status.metrics.base["perplexity"]
    assert status.metrics.gates_passed and status.progress.step == 600
    assert {c.type: c.status for c in status.conditions}["Ready"] == "True"
    names = [a.name for a in status.artifacts]
    assert names == ["merged", "onnx", "triton-repository", "serving-config"]
    for artifact in status.artifacts:
        assert digest(Path(artifact.uri)) == (artifact.sha256, artifact.size_bytes)
    assert (tmp_path / "out" / "serving-config.pbtxt").exists()
    assert (tmp_path / "out" / "triton" / "words" / "config.pbtxt").exists()
    assert status.lineage.dataset_fingerprint and status.lineage.config_hash

    # Running it again changes nothing: finished stages are not rerun.
    before = (tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").stat().st_mtime
    assert main(["run", str(manifest), "-q"]) == 0
    assert (tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").stat().st_mtime == before

    # A spec change after completion starts run 2 and keeps run 1 in the history.
    manifest.write_text(manifest.read_text().replace("maxSteps: 600", "maxSteps: 599"))
    assert main(["run", str(manifest), "-q"]) == 0
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.run == 2 and status.runs[0].run == 1 and status.runs[0].phase == "Succeeded"
    assert not (tmp_path / "out" / ".work" / "run-1").exists()


def test_a_failed_gate_ends_failed_without_export(tmp_path):
    manifest = make_job(tmp_path, training={"maxSteps": 5}, evaluation={"compareBase": False})
    assert main(["run", str(manifest), "--init-model", "micro", "-q"]) == 1
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.phase == "Failed" and status.stages.evaluate.state == "Failed" and status.stages.export is None
    assert next(c for c in status.conditions if c.type == "Ready").reason == "GateFailed"
    assert status.metrics.gates[0].passed is False and not (tmp_path / "out" / "merged").exists()


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    manifest = make_job(tmp_path, training={"maxSteps": 1500, "loggingSteps": 10}, evaluation={"gates": []})
    command = [sys.executable, "-m", "finetune_operator", "run", str(manifest), "--init-model", "micro", "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "out" / ".work" / "run-1" / "train" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-200").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out
    status = FineTuneJobStatus.model_validate(status_of(tmp_path))
    assert status.phase == "Training" and status.stages.prepare.state == "Succeeded"
    assert not any(p.name == "python" for p in _children(proc.pid))  # no orphaned stage processes

    assert main(["run", str(manifest), "-q"]) == 0
    summary = json.loads((tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").read_text())
    assert summary["resumedFrom"].startswith("checkpoint-") and summary["steps"] == 1500
    assert FineTuneJobStatus.model_validate(status_of(tmp_path)).phase == "Succeeded"

    assert main(["run", str(manifest), "--fresh", "-q", "--init-model", "micro"]) == 0
    summary = json.loads((tmp_path / "out" / ".work" / "run-1" / "summaries" / "train.json").read_text())
    assert summary["resumedFrom"] is None  # --fresh started over


def _children(pid: int) -> list[Path]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().split()
            except OSError:
                continue
            if int(stat[3]) == pid:
                found.append(proc)
    return found


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
