"""Shared fixtures: a minimal valid FineTuneJob and the repository's paths."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

MINIMAL_JOB: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "model": {"source": "hf://org/model", "revision": "abc123"},
        "dataset": {"source": "s3://bucket/data.jsonl", "format": "completion"},
        "training": {"epochs": 1},
        "output": {"uri": "s3://bucket/out"},
    },
}


@pytest.fixture
def job() -> dict[str, Any]:
    """A fresh copy of a minimal valid cluster FineTuneJob."""
    return copy.deepcopy(MINIMAL_JOB)
