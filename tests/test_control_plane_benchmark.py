"""benchmarks/control_plane.py runs and counts what it says, at N=2 with short fake stages (no timings asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .apiserver import REPO, ApiServer


def load_benchmark():
    spec = importlib.util.spec_from_file_location("control_plane", REPO / "benchmarks" / "control_plane.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_control_plane_benchmark_counts_every_transition_of_two_jobs(crd_installed: ApiServer, tmp_path: Path):
    benchmark = load_benchmark()
    result = benchmark.run_once(crd_installed.kubeconfig, tmp_path, jobs=2, stage_seconds=0.2, timeout=120,
                                poll_seconds=1.0)  # fmt: skip

    assert result["phases"] == {"Succeeded": 2}
    assert result["stageJobsCreated"] == result["stageJobsExpected"] == 8
    assert result["stageJobsCreatedTwice"] == []
    assert result["events"]["repeated"] == {} and result["events"]["countAboveOne"] == []
    assert result["firstStage"]["n"] == 2 and result["handoff"]["n"] == 6 and result["finish"]["n"] == 2
    assert result["transitions"] == 10  # 4 stage Jobs and the finish, per job
    assert result["callsPerTransition"]["create jobs"] == 0.8
    assert result["writesPerTransition"] >= 1 and result["reconcilesPerJob"] >= 5
    assert result["rssPeakMB"] >= result["rssIdleMB"] > 0
    assert "| 2 (2) |" in benchmark.table([result]) and "| yes (8 Jobs) |" in benchmark.table([result])
