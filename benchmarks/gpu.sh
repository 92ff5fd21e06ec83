#!/usr/bin/env bash
# One command for a GPU machine (issues 7, 8): set up .venv, run the Triton and CUDA C++ suites on the GPU, then the
# step benchmark (Triton and, where fastdni._C has its CUDA kernels, the CUDA backend beside it).
#
#   benchmarks/gpu.sh                       # full grid -> docs/benchmarks/triton_step_gpu.{json,md}
#   benchmarks/gpu.sh --dtype bf16 --sg mlp # extra arguments go to benchmarks/triton_step.py
#   SKIP_TESTS=1 benchmarks/gpu.sh --quick  # benchmark only
#
# Tests: tests/interpreted with FASTDNI_TEST_DEVICE=cuda (the Triton kernels' suite, which CI runs under the
# interpreter, here on the compiled kernels; see tests/interpreted/conftest.py) and tests/gpu (the CUDA C++ backend
# against the reference: tests/gpu/test_cuda_ops.py).
# Exits non-zero when there is no CUDA device, when a test fails, or when a benchmark row fails its equal-work check.
# The full grid (80 rows, torch.compile per row) takes tens of minutes; --skip compiled or a subset is faster.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "benchmarks/gpu.sh: torch sees no CUDA device (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'));" \
       "this script is for a GPU machine. On a CPU: TRITON_INTERPRET=1 .venv/bin/python benchmarks/triton_step.py --quick --device cpu" >&2
  exit 2
fi
.venv/bin/python -c 'import torch, triton; print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")'
.venv/bin/python -c 'import fastdni.ops as o; print(f"CUDA C++ backend built: {o.HAS_CUDA_KERNELS}" + ("" if o.HAS_CUDA_KERNELS else " (rows without cuda columns)"))'
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>/dev/null || true

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  suites=(tests/interpreted)
  if [ -d tests/gpu ]; then suites+=(tests/gpu); fi
  echo "== tests: ${suites[*]} (FASTDNI_TEST_DEVICE=cuda)"
  FASTDNI_TEST_DEVICE=cuda .venv/bin/python -m pytest -q -p no:cacheprovider "${suites[@]}"
fi

echo "== benchmark: benchmarks/triton_step.py $*"
mkdir -p docs/benchmarks
.venv/bin/python benchmarks/triton_step.py --device cuda \
  --json docs/benchmarks/triton_step_gpu.json --markdown docs/benchmarks/triton_step_gpu.md "$@"
