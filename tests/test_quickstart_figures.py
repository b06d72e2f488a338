"""The README's quickstart figures are written by scripts/quickstart_figures.py from a recorded run."""

from __future__ import annotations

import importlib.util

from .conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("quickstart_figures", REPO / "scripts" / "quickstart_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_shows_what_the_record_holds():
    assert load_script().main(["--check"]) == 0, "run: python scripts/quickstart_figures.py --readme-only"


def test_the_section_is_written_from_a_run_record():
    script = load_script()
    output = "\n".join([
        "ModelInitialised built a random-init tiny-gpt2 model at examples/quickstart/tiny-model",
        "prepare started", "prepare: fetching the model", "StageSucceeded prepare succeeded: 10 train / 2 eval rows",
        "train step 10/20 loss 2.0000 90 tok/s ETA 9s", "train step 20/20 loss 1.0000 90 tok/s ETA 0s",
        "StageSucceeded train succeeded",
    ])  # fmt: skip
    latest = {
        "measuredAt": "2026-11-27T10:00:00Z", "seconds": 96.4, "cpus": 2, "meanLoad": 1.1, "machine": "idle",
        "steps": 20, "prepare": "", "output": script.condense(output),
        "metrics": {"base": {"exactMatch": 0, "loss": 5.853, "perplexity": 348.1},
                    "tuned": {"exactMatch": 0.64, "loss": 0.3028, "perplexity": 1.354}},
    }  # fmt: skip
    record = {"latest": latest, "runs": {"idle": latest, "busy": {**latest, "seconds": 540, "meanLoad": 9.0}}}
    text = script.rewrite_readme(f"intro\n{script.BEGIN}\nold\n{script.END}\nrest\n", record)
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{script.END}\nrest\n")
    assert "prepare started" not in text and "train step 10/20" not in text and "train step 20/20" in text
    prose = " ".join(text.split())
    assert "took 1 min 36 s on an idle machine (2 cores, mean load 1.1, 2026-11-27)" in prose
    assert "and 9 min 0 s on a busy machine (2 cores, mean load 9.0" in prose
    assert "exact match went from 0 (base) to 0.64, loss from 5.853 to 0.3028 and perplexity from 348.1 to 1.354" in (
        prose
    )
