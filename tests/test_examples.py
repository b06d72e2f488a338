"""Every shipped example validates, offline, with the same rules as the cluster (test_api_server.py sends them to
the real API server)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune_operator.cli import main

from .conftest import EXAMPLES

CLUSTER_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))


def test_the_promised_examples_exist():
    names = {p.stem for p in CLUSTER_EXAMPLES}
    assert {"lora-sft-llama-8b-kueue", "qlora-mistral-7b", "dpo-preference-pairs", "multinode-full-finetune"} <= names
    assert (EXAMPLES / "quickstart" / "finetunejob.yaml").exists()


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_cluster_example_validates(path: Path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().out
    assert "error" not in capsys.readouterr().out


def test_quickstart_validates_for_local_mode(tmp_path, capsys):
    quickstart = shutil.copytree(EXAMPLES / "quickstart", tmp_path / "quickstart")
    (quickstart / "tiny-model").mkdir(exist_ok=True)  # what `run --init-model` creates
    assert main(["validate", "--target", "local", str(quickstart / "finetunejob.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "", out


def test_quickstart_is_refused_on_a_cluster(capsys):
    assert main(["validate", str(EXAMPLES / "quickstart" / "finetunejob.yaml")]) == 1
    out = capsys.readouterr().out
    assert "spec.model.source: './tiny-model' is a local path" in out
    assert "spec.dataset.source" in out and "spec.output.uri" in out


def test_validate_takes_folders_and_counts(capsys):
    assert main(["validate", str(EXAMPLES)]) == 1  # the quickstart (local paths) is in there
    err = capsys.readouterr().err
    assert "5 FineTuneJob(s) checked" in err
