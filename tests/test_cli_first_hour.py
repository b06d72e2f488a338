"""What a newcomer meets in the first hour, without running a stage: one-line errors, help, version, validate."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from finetune_operator.api.status import Artifact, FineTuneJobStatus
from finetune_operator.cli import main
from finetune_operator.live import RichReporter
from finetune_operator.local import crash_message, known_fix

from .conftest import EXAMPLES, REPO


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path = REPO) -> Done:
    """The command line in this process (a subprocess costs seconds of imports on a busy machine)."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help, --version
                code = int(exc.code or 0)
    finally:
        os.chdir(previous)
    return Done(code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("command", ["run", "render"])
@pytest.mark.parametrize("target", ["missing.yaml", "examples"])
def test_a_missing_file_or_a_folder_is_one_line_not_a_traceback(command, target):
    done = cli(command, target)
    assert done.returncode in (1, 2)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    expected = "does not exist" if target == "missing.yaml" else "is a folder: give a manifest file, e.g. examples/"
    assert lines[0].startswith(f"{target}: ") and expected in lines[0]


def test_run_without_the_ml_stack_says_which_extra_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    assert main(["run", str(EXAMPLES / "quickstart" / "finetunejob.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers not installed" in err and "pip install -e '.[train]'" in err


def test_a_stage_crash_is_one_line_with_the_fix_when_known():
    log = (
        '{"finetune.dev/progress": "stage", "stage": "train", "state": "Running"}\n'
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    import peft\n'
        "ModuleNotFoundError: No module named 'peft'\n"
    )
    message = crash_message(1, log)
    assert message == "exited with code 1: ModuleNotFoundError: No module named 'peft'"
    assert "[train]" in known_fix(message)
    assert crash_message(-9, "") == "killed by SIGKILL (out of memory?)"


def test_version_and_the_init_model_presets_in_help():
    assert cli("--version").stdout.strip() == "finetune-operator 0.1.0"
    helptext = " ".join(cli("run", "--help").stdout.split())
    assert "micro: ~0.1M parameters" in helptext and "tiny-gpt2: ~3M parameters" in helptext
    assert "-o {yaml}, --output {yaml}" in helptext


def test_validate_says_when_a_folder_holds_nothing_to_check(tmp_path):
    done = cli("validate", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path}: the folder holds no .yaml or .yml files" in done.stdout
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    done = cli("validate", str(tmp_path))
    assert done.returncode == 1 and "no FineTuneJob found" in done.stderr


def test_validate_local_and_run_init_model_agree_on_a_model_to_build(tmp_path):
    shutil.copytree(EXAMPLES / "quickstart", tmp_path / "qs", ignore=shutil.ignore_patterns("out", "tiny-model"))
    manifest = str(tmp_path / "qs" / "finetunejob.yaml")
    refused = cli("validate", "--target", "local", manifest)
    assert refused.returncode == 1
    assert "spec.model.source:" in refused.stdout and "--init-model" in refused.stdout
    accepted = cli("validate", "--target", "local", "--init-model", "tiny-gpt2", manifest)
    assert accepted.returncode == 0, accepted.stdout
    assert "1 FineTuneJob(s) checked: 0 error(s)" in accepted.stderr
    # A missing dataset is still an error: --init-model builds only the model.
    (tmp_path / "qs" / "data" / "eval.jsonl").unlink()
    missing = cli("validate", "--target", "local", "--init-model", "tiny-gpt2", manifest)
    assert missing.returncode == 1 and "spec.dataset.evalSource:" in missing.stdout


def test_render_namespace_fills_in_but_never_overrides(tmp_path):
    named = tmp_path / "named.yaml"  # the example, with a namespace of its own
    raw = yaml.safe_load((EXAMPLES / "lora-sft-llama-8b-kueue.yaml").read_text())
    raw["metadata"]["namespace"] = "ml-team"
    named.write_text(yaml.safe_dump(raw))
    clash = cli("render", str(named), "--namespace", "ml")
    assert clash.returncode == 1 and "metadata.namespace is 'ml-team' but --namespace says 'ml'" in clash.stderr
    same = cli("render", str(named), "--namespace", "ml-team", "--stage", "train")
    assert {o["metadata"].get("namespace") for o in yaml.safe_load_all(same.stdout)} == {"ml-team"}
    unnamed = tmp_path / "job.yaml"
    del raw["metadata"]["namespace"]
    unnamed.write_text(yaml.safe_dump(raw))
    filled = cli("render", str(unnamed), "--namespace", "ml", "--stage", "train")
    assert {o["metadata"].get("namespace") for o in yaml.safe_load_all(filled.stdout)} == {"ml"}


def test_a_log_gets_whole_artifact_uris_not_a_cut_table():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, width=60, force_terminal=False))
    uri = "/home/someone/projects/finetune/examples/quickstart/out/triton-repository/quickstart"
    status = FineTuneJobStatus(
        phase="Succeeded",
        message="all stages succeeded",
        artifacts=[Artifact(name="triton-repository", format="triton", uri=uri, sha256="ab" * 32, size_bytes=10**6)],
    )
    reporter.finished(status)
    assert f"  triton-repository: {uri} (sha256 abababababababab, 1.0 MB)" in out.getvalue().splitlines()
