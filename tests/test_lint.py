"""The code base stays ruff clean (lint and format), as a test so CI enforces it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import REPO


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_clean(args):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is installed by scripts/setup.sh (the test extra)"
    result = subprocess.run(
        [ruff, *args, "operator", "tests", "examples", "benchmarks", "scripts"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
