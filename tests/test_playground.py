"""`finetune-operator playground`: the app over a real (tiny) run's output, driven in headless Chromium.

One LoRA run of the quickstart's sibling task exports merged, onnx and adapter; from it come the three outputs a
user can have: everything (the merged model is played), adapter only (base + PEFT) and ONNX only (onnxruntime).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.playground.target import FEEDBACK_FILE, TargetError, resolve

from .browser import chromium, click, compare, in_process_playground, playground, textarea, wait_for
from .test_local_mode import make_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, exported_lora_run) -> Path:
    tmp = tmp_path_factory.mktemp("playground-job")
    if os.environ.get("FT_PLAYGROUND_RUN"):  # iterate on the app: the folder of a finished run of this job, copied
        shutil.copytree(os.environ["FT_PLAYGROUND_RUN"], tmp, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(FEEDBACK_FILE))  # fmt: skip
        return tmp / "out"
    # conftest's LoRA run, copied: the playground writes its feedback file into the output it serves.
    shutil.copytree(exported_lora_run.parent, tmp, symlinks=True, dirs_exist_ok=True)
    return tmp / "out"


def _only(run_output: Path, tmp: Path, keep: str) -> Path:
    """The output of a run that exported only `keep` (what formats: [keep] leaves)."""
    out = tmp / f"{keep}-only"
    shutil.copytree(run_output, out, symlinks=True, ignore=shutil.ignore_patterns(FEEDBACK_FILE))
    for other in {"merged", "onnx", "adapter"} - {keep}:
        shutil.rmtree(out / other)
    status = yaml.safe_load((out / "status.yaml").read_text())
    status["artifacts"] = [a for a in status["artifacts"] if a["name"] in (keep, "serving-config")]
    (out / "status.yaml").write_text(yaml.safe_dump(status, sort_keys=False))
    return out


@functools.cache  # one load per model and prompt for the module, not one per test
def _expected(run_output: Path, prompt: str, which: str) -> str:
    """What the evaluate stage's own `generate` gives for this prompt with the serving-config settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_operator.stages.contract import StageConfig
    from finetune_operator.stages.evaluate import generate

    work = run_output / ".work" / "run-1"
    config = StageConfig.model_validate_json((work / "stage-evaluate.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    source = json.loads((work / "sources.json").read_text())["model"]["path"]
    model = AutoModelForCausalLM.from_pretrained(str(run_output / "merged") if which == "tuned" else source).eval()
    return generate(model, tokenizer, [prompt + "\n"], config, batch_size=1)[0]


def test_resolve_reads_what_the_output_holds(run_output, tmp_path):
    target = resolve(run_output)
    assert target.tuned_kind == "merged" and target.tuned_path == run_output / "merged"
    assert target.base_path.name == "model" and target.run == 1 and target.job == "words"
    assert (target.base_path / "config.json").is_file()  # the run's sources.json names the base model
    assert target.generation.max_new_tokens == 4 and target.generation.source == "serving-config.pb"
    assert len(target.samples()) == 10 and target.feedback_file == run_output / FEEDBACK_FILE
    assert target.tuned_artifact()["sha256"] == next(a for a in target.status["artifacts"]
                                                     if a["name"] == "merged")["sha256"]  # fmt: skip
    assert resolve(run_output.parent / "job.yaml").artifacts == run_output  # the manifest leads to its output
    assert resolve(run_output, tuned="adapter").tuned_kind == "adapter"
    assert resolve(_only(run_output, tmp_path, "onnx")).tuned_kind == "onnx"
    workdir = resolve(run_output / ".work" / "run-1")  # what the cluster's playground pod is given
    assert workdir.artifacts == run_output / ".work" / "run-1" / "export" / "run-1" and workdir.tuned_kind == "merged"


def test_bad_targets_are_refused_with_the_fix(run_output, tmp_path, capsys):
    with pytest.raises(TargetError, match="does not exist"):
        resolve(tmp_path / "nope")
    with pytest.raises(TargetError, match="neither a FineTuneJob manifest"):
        resolve(tmp_path)
    with pytest.raises(TargetError, match=r"--tuned onnx: .* has no onnx artifact \(found: adapter\)"):
        resolve(_only(run_output, tmp_path, "adapter"), tuned="onnx")
    manifest = make_job(tmp_path, model={"source": str(resolve(run_output).base_path)})  # valid, never run
    assert main(["playground", str(manifest)]) == 2
    assert "run `finetune-operator run" in capsys.readouterr().err
    assert main(["playground", str(run_output), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["tuned"]["kind"] == "merged"


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module's browser tests (each opens its own playground's page)."""
    with chromium() as browser:
        yield browser


def test_browser_compares_streams_and_records_a_judgement(run_output, driver):
    """The command as a user runs it (a new process), over the output with everything: the merged model is played."""
    with playground(run_output) as server:
        _compare_and_judge(driver, server.url, run_output, run_output, "merged")
        _samples_and_report(driver, run_output)
        assert server.models_loaded.wait(60) and server.loaded_after is not None
    lines = [line for line in server.output if line.startswith(("playground: http", "loaded base"))]
    # The page is served first; the models load behind it (a Compare pressed early waits for them).
    assert lines[0].startswith("playground: http") and lines[1].startswith("loaded base"), server.output


@pytest.mark.parametrize("keep", ["adapter", "onnx"])
def test_browser_over_an_adapter_only_and_an_onnx_only_output(run_output, tmp_path, driver, keep):
    """The same app over the other exports (base + PEFT adapter, ONNX through onnxruntime), served in-process."""
    out = _only(run_output, tmp_path, keep)
    with in_process_playground(out) as server:
        _compare_and_judge(driver, server.url, out, run_output, keep)
        assert server.engine.error is None


def _compare_and_judge(driver, url: str, out: Path, run_output: Path, keep: str) -> None:
    sample = resolve(out).samples()[0]
    prompt = sample["prompt"].rstrip("\n")  # "Give the first word.\n<three words>", as a person types it
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements("id", "compare-button"), 60)
    base, tuned, state = compare(driver, prompt)
    assert state.startswith("done"), state
    # Exactly what `generate` gives with the same settings (the evaluate stage's, one prompt at a time).
    assert tuned == _expected(run_output, prompt, "tuned")
    assert base == _expected(run_output, prompt, "base")
    assert textarea(driver, "rendered-prompt") == prompt + "\n"  # the job's completion template

    click(driver, "label-better")
    wait_for(driver, lambda d: "saved" in d.find_element("id", "feedback-state").text, 30)
    lines = (out / FEEDBACK_FILE).read_text().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == 1 and record["label"] == "better"
    assert (record["prompt"], record["base"], record["tuned"]) == (prompt, base, tuned)
    assert record["tunedModel"]["kind"] == keep
    assert record["generation"] == {"maxNewTokens": 4, "temperature": 0.0, "topP": 1.0}


def _samples_and_report(driver, out: Path) -> None:
    from selenium.webdriver.common.by import By

    samples = resolve(out).samples()
    differing = [s for s in samples if s["tuned"].strip() != s["reference"].strip()]
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Samples')]").click()

    def count(d):
        return d.find_element(By.ID, "samples-count").text

    wait_for(driver, lambda d: count(d).startswith(f"showing {len(samples)} of {len(samples)}"), 30)
    table = driver.find_element(By.ID, "samples-table").text
    assert all(s["reference"] in table for s in samples)
    driver.find_element(By.CSS_SELECTOR, "#only-differing input").click()
    wait_for(driver, lambda d: count(d).startswith(f"showing {len(differing)} of {len(samples)}"), 30)
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Report')]").click()
    report = wait_for(driver, lambda d: d.find_element(By.ID, "report").text, 30)
    status = yaml.safe_load((out / "status.yaml").read_text())
    merged = next(a for a in status["artifacts"] if a["name"] == "merged")
    assert "exactMatch" in report and "perplexity" in report and merged["sha256"] in report
    assert status["lineage"]["datasetFingerprint"] in report


def test_a_model_that_cannot_be_loaded_is_reported_and_the_app_keeps_serving(run_output, tmp_path):
    from finetune_operator.playground.app import models_loading
    from finetune_operator.playground.engine import Engine

    out = _only(run_output, tmp_path, "merged")
    (out / "merged" / "model.safetensors").write_bytes(b"not a model")
    engine = Engine(resolve(out))
    for _ in models_loading(engine):  # what a Compare pressed while loading shows, until loading has ended
        pass
    assert engine.wait_loaded(0) and engine.tuned is None
    assert engine.error.startswith(f"the tuned model (merged) {out / 'merged'}: "), engine.error


def test_the_command_imports_gradio_without_stub_regeneration_or_ipython():
    """What makes the page come up sooner must keep working across Gradio upgrades: in the command's process the
    components' .pyi regeneration is a no-op, event docs are filled in without Jinja and IPython is not imported;
    Gradio's components still build."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from finetune_operator.playground.app import lean_gradio_import, offline\n"
        "offline(); lean_gradio_import()\n"
        "import gradio as gr, gradio.component_meta as meta\n"
        "assert meta.create_or_modify_pyi(gr.Textbox, 'Textbox', []) is None\n"
        "assert meta.create_or_modify_pyi.__name__ == '<lambda>', meta.create_or_modify_pyi\n"
        "assert sys.modules['IPython'] is None\n"
        "assert 'the Button is clicked' in gr.Button.click.__doc__, gr.Button.click.__doc__\n"
        "with gr.Blocks() as app:\n"
        "    gr.Textbox(label='x')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
