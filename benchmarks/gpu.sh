#!/usr/bin/env bash
# One command for a GPU machine: set up .venv, run the Triton and CUDA C++ suites on the GPU, then the
# step benchmark (Triton and, where fastdni._C has its CUDA kernels, the CUDA backend beside it), then the SG step of
# fastdni.nn.DNI on a user's activation (sg_predict + sg_regression_ against autograd DNI and torch.compile), then the
# copy-task LSTM's whole training step with TruncationDNI (benchmarks/bench_copy_lstm_step.py), then the whole training
# steps of the MNIST FCN with BatchNorm (benchmarks/fcn_bn_step.py) and of the MNIST CNN (benchmarks/bench_cnn_step.py).
#
#   benchmarks/gpu.sh                       # full grids -> docs/benchmarks/gpu_step.{json,md}, dni_sg_step_gpu.{json,md},
#                                           #   copy_lstm_step_gpu.{json,md}, fcn_bn_step_gpu.{json,md}, cnn_step_gpu.{json,md}
#   benchmarks/gpu.sh --dtype bf16 --sg mlp # extra arguments go to benchmarks/gpu_step.py
#   SKIP_TESTS=1 benchmarks/gpu.sh --quick  # benchmark only (SKIP_BENCH=1: tests only; SKIP_BUILD=1: use the install as is)
#   SKIP_DNI=1 benchmarks/gpu.sh            # without the DNI SG-step grid (DNI_ARGS: its own arguments, e.g. "--quick")
#   SKIP_LSTM=1 benchmarks/gpu.sh           # without the copy-task LSTM step (LSTM_ARGS: its own arguments, e.g. "--quick")
#   SKIP_FCN_BN=1 benchmarks/gpu.sh         # without the fcn-bn step (FCN_BN_ARGS: its own arguments, e.g. "--quick")
#   SKIP_CNN=1 benchmarks/gpu.sh            # without the CNN step (CNN_ARGS: its own arguments, e.g. "--quick")
#
# Tests: tests/interpreted with FASTDNI_TEST_DEVICE=cuda (the Triton kernels' suite, which CI runs under the
# interpreter, here on the compiled kernels; see tests/interpreted/conftest.py) and tests/gpu (the CUDA C++ backend
# against the reference: tests/gpu/test_cuda_ops.py).
# Exits non-zero when there is no CUDA device, when a test fails (after the benchmark has run), or when a benchmark row
# fails its equal-work check.
# The full grid (80 rows, torch.compile per row) takes tens of minutes; --skip compiled or a subset is faster.
#
# A machine with torch already installed and no package index (a lent GPU box): FASTDNI_PYTHON=python3 uses that
# interpreter and installs fastdni into it, editable, offline (CUDA_HOME from the nvcc on PATH when unset) instead of scripts/setup.sh;
# PYTEST_ARGS adds pytest options (e.g. "-n 8" with pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
tests_failed=0

if [ -n "${FASTDNI_PYTHON:-}" ]; then
  PY=$FASTDNI_PYTHON
fi
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python}
elif [ -n "${FASTDNI_PYTHON:-}" ]; then
  # The first CUDA root with a compiler and headers: CUDA_HOME as given, /usr/local/cuda, the nvcc on PATH's.
  nvcc_root=$(command -v nvcc >/dev/null && dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")" || true)
  for root in "${CUDA_HOME:-}" /usr/local/cuda "$nvcc_root"; do
    if [ -n "$root" ] && [ -x "$root/bin/nvcc" ] && [ -f "$root/include/cuda_runtime.h" ]; then
      export CUDA_HOME=$root
      break
    fi
  done
  # The host compiler: the g++ on PATH, not an inherited CXX. A lent H200 machine sets CXX=/opt/gcc/bin/g++, which
  # links libstdc++ statically: the library's own std::locale then crashes the first error message that formats a
  # number (setup.py now refuses such a build). FASTDNI_CXX / FASTDNI_CC choose another.
  export CXX=${FASTDNI_CXX:-$(command -v g++ || echo c++)} CC=${FASTDNI_CC:-$(command -v gcc || echo cc)}
  echo "== build: $PY -m pip install --no-index --no-deps -e . (CXX=$CXX, CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
  mkdir -p build
  # editable, as scripts/setup.sh installs it
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
    > build/gpu_build.out 2>&1 || { tail -50 build/gpu_build.out; exit 1; }
else
  scripts/setup.sh
  PY=.venv/bin/python
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "benchmarks/gpu.sh: torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'));" \
       "this script is for a GPU machine. On a CPU: TRITON_INTERPRET=1 "$PY" benchmarks/gpu_step.py --quick --device cpu" >&2
  exit 2
fi
"$PY" -c 'import torch, triton; print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")'
"$PY" -c 'import fastdni.ops as o; print(f"CUDA C++ backend built: {o.HAS_CUDA_KERNELS}" + ("" if o.HAS_CUDA_KERNELS else " (rows without cuda columns)"))'
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>/dev/null || true

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  suites=(tests/gpu tests/interpreted)  # the CUDA C++ suite first: it compiles nothing at run time
  echo "== tests: ${suites[*]} (FASTDNI_TEST_DEVICE=cuda)"
  # A failing test does not stop the benchmark (one call on a lent machine should bring back both); it sets the exit.
  FASTDNI_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${suites[@]}" || tests_failed=1
fi

[ "${SKIP_BENCH:-0}" = 1 ] && exit "$tests_failed"
echo "== benchmark: benchmarks/gpu_step.py $*"
mkdir -p docs/benchmarks
bench_failed=0
"$PY" benchmarks/gpu_step.py --device cuda \
  --json docs/benchmarks/gpu_step.json --markdown docs/benchmarks/gpu_step.md "$@" || bench_failed=1
# run_cuda_bench SKIP ARGS SCRIPT OUT: benchmarks/SCRIPT --device cuda $ARGS -> docs/benchmarks/OUT.{json,md}, unless
# $SKIP is 1 (SKIP and ARGS: the names of the variables); a failure (a row failing its equal-work check: exit 1) sets
# bench_failed.
run_cuda_bench() {
  local skip=$1 args=$2 script=benchmarks/$3 out=docs/benchmarks/$4
  [ "${!skip:-0}" = 1 ] && return 0
  echo "== benchmark: $script --device cuda ${!args:-}"
  "$PY" "$script" --device cuda ${!args:-} --json "$out.json" --markdown "$out.md" || bench_failed=1
}
# fastdni.nn.DNI's SG step: fused (auto: the CUDA C++ kernels where built, else Triton; fused_triton beside them)
# against autograd DNI and torch.compile.
run_cuda_bench SKIP_DNI DNI_ARGS dni_sg_step.py dni_sg_step_gpu
# The copy-task LSTM + TruncationDNI training step: TruncationDNI on the fused SG ops against autograd and
# torch.compile of the same step.
run_cuda_bench SKIP_LSTM LSTM_ARGS bench_copy_lstm_step.py copy_lstm_step_gpu
# The MNIST FCN with BatchNorm's whole DNI/cDNI training step: DecoupledMLP on the fused ops (auto: the CUDA C++
# kernels where built, Triton's for the BatchNorm ops and where not) against autograd and torch.compile; fp32 IEEE.
run_cuda_bench SKIP_FCN_BN FCN_BN_ARGS fcn_bn_step.py fcn_bn_step_gpu
# The MNIST CNN's whole training step: DecoupledCNN on the fused ops (ATen's conv weight step and the ops' GEMM one)
# against autograd and torch.compile; fp32 IEEE (cuDNN's TF32 off).
run_cuda_bench SKIP_CNN CNN_ARGS bench_cnn_step.py cnn_step_gpu
[ "$bench_failed" = 0 ] || exit 1
exit "$tests_failed"
