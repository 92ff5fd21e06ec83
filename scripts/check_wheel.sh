#!/usr/bin/env bash
# Builds the fastdni wheel (C++ extension included) and installs it into a fresh venv beside torch
# 2.14.1, then runs a smoke test from outside the source tree. Usage: bash scripts/check_wheel.sh [WORKDIR]
# Needs .venv from scripts/setup.sh (the wheel builds against its torch: --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
.venv/bin/pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/fastdni-*.whl)
echo "built $wheel"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check torch==2.14.1 "$wheel"
cd "$work"  # away from the source tree, so `import fastdni` can only find the installed wheel
"$work/venv/bin/python" -m fastdni.smoke_test
