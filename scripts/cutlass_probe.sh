#!/usr/bin/env bash
# Compile-only probe of CUTLASS for the CUDA backend: do the headers of the nvidia-cutlass wheel (pinned in
# setup.py's test extras) build with this machine's nvcc, and what does one weight-gradient GEMM instantiation cost
# to compile? Not part of the build; tests/packaging/test_cutlass_probe.py runs it, docs/performance.md records what it printed.
# Needs nvcc, no GPU.
#
#   bash scripts/cutlass_probe.sh                       # every probe -> build/cutlass_probe/{*.o, log}
#   bash scripts/cutlass_probe.sh sm90_wgrad.cu:90a     # one probe (source in scripts/cutlass_probe, arch)
#   PYTHON: the interpreter with nvidia-cutlass installed (default .venv/bin/python); CUTLASS_PROBE_OUT: output folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
OUT=${CUTLASS_PROBE_OUT:-build/cutlass_probe}
# Located without importing cutlass_library (its Python part needs more than the headers do).
SOURCE_ROOT=$("$PY" -c 'import importlib.util as u, sys
spec = u.find_spec("cutlass_library")
sys.exit("nvidia-cutlass is not installed: pip install -e \".[test]\" (its test extras pin it)") if spec is None else None
print(spec.submodule_search_locations[0] + "/source")')
VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("nvidia-cutlass"))')
mkdir -p "$OUT"
LOG=$OUT/log
: > "$LOG"
echo "nvidia-cutlass $VERSION, $("$NVCC" --version | tail -1), $(nproc) cores" | tee -a "$LOG"

failed=0
probe() {  # probe SOURCE ARCH: compile one translation unit for one architecture; wall time, registers, spills
  local source=$1 arch=$2 start seconds
  start=$(date +%s.%N)
  if "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas=-v -gencode "arch=compute_${arch},code=sm_${arch}" \
       -I"$SOURCE_ROOT/include" -I"$SOURCE_ROOT/tools/util/include" -c "scripts/cutlass_probe/$source" \
       -o "$OUT/${source%.cu}_sm${arch}.o" >> "$LOG" 2>&1; then
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    printf '%-14s sm_%-4s ok     %6.1f s   %s; %s\n' "$source" "$arch" "$seconds" \
      "$(grep -E "Used [0-9]+ registers" "$LOG" | tail -1 | sed 's/^ptxas info *: //')" \
      "$(grep -E "bytes spill" "$LOG" | tail -1 | sed 's/^ *//')" | tee -a "$LOG"
  else
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    printf '%-14s sm_%-4s FAILED %6.1f s (errors in %s)\n' "$source" "$arch" "$seconds" "$LOG" | tee -a "$LOG"
    failed=1
  fi
}

probes=("$@")
[ ${#probes[@]} -eq 0 ] && probes=(sm80_wgrad.cu:80 sm80_wgrad.cu:90 sm90_wgrad.cu:90a)
for p in "${probes[@]}"; do probe "${p%%:*}" "${p##*:}"; done
exit "$failed"
