#!/usr/bin/env bash
# Set up a fresh machine for development and CI: the package (editable), the ML stack and the test tools.
# torch is pinned in the `train` extra (torch==2.13.0) so pip takes the local CPU wheel, never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[train,test]"
