#!/usr/bin/env bash
# Creates (or reuses) .venv with torch 2.14.1 and fastdni installed editable with its test extras.
# Idempotent: a second run only checks what is there. PYTHON picks the interpreter (default python3).
# --no-cache-dir: torch and its CUDA wheels are several GB; no second copy of them in pip's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null; then
  .venv/bin/pip install -q --no-cache-dir --disable-pip-version-check torch==2.14.1
fi
# Asks the installed metadata, not `import fastdni`, which would find the source tree in the cwd.
if ! .venv/bin/python -c 'import importlib.metadata as m; [m.version(p) for p in ("fastdni", "pytest", "pytest-benchmark", "hypothesis", "nvidia-cutlass")]' 2>/dev/null; then
  .venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-build-isolation -e ".[test]"
fi
