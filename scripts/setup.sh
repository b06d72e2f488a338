#!/usr/bin/env bash
# Set up a fresh machine for development and CI: the package (editable), the ML stack and the test tools.
# torch is pinned in the `train` extra (torch==2.13.0) so pip takes the local CPU wheel, never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[train,playground,test]"
# The playground's browser tests drive Debian's Chromium through Selenium (no browser download at test time).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
# Bytecode for this checkout's own modules: where PYTHONDONTWRITEBYTECODE is set (as on this project's machines),
# every stage, operator and CLI process would otherwise compile them again (pip compiles site-packages itself).
python3 -m compileall -q -j 0 operator tests scripts benchmarks >/dev/null
