"""The project's own Evaluate metric modules, loaded by path so evaluation never reaches the Hub.

`evaluate.load("bleu")` downloads the metric's code from the Hub, which fails offline and in air-gapped
clusters. These modules are ordinary Evaluate metrics (same API: `.compute(predictions=..., references=...)`)
backed by sacrebleu and rouge-score from PyPI.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
MODULES = {"bleu": "bleu", "rouge1": "rouge", "rouge2": "rouge", "rougeL": "rouge", "exactMatch": "exact_match",
           "perplexity": "perplexity"}  # fmt: skip


@cache
def load_metric(name: str) -> Any:
    """The Evaluate module behind a metric name of spec.evaluation.metrics."""
    import evaluate

    module = MODULES[name]
    return evaluate.load(str(METRICS_DIR / module))
