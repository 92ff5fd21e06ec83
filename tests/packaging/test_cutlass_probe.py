"""CUTLASS, checked: the pinned nvidia-cutlass wheel's headers build the step's weight-gradient GEMM with
this machine's nvcc, as CUTLASS 2.x's Ampere kernel and as CUTLASS 3.x's Hopper (TMA + wgmma) kernel, without
spilling. docs/performance.md records the compile times and why the backend does not use CUTLASS; this keeps the
"headers serve" part of that true for the version the test extras pin. Needs nvcc, no GPU (about a minute on 2 cores).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cuda_build import requires_cuda_build

ROOT = Path(__file__).resolve().parents[2]
PROBES = ("sm80_wgrad.cu:80", "sm90_wgrad.cu:90a")

pytestmark = [
    requires_cuda_build,
    pytest.mark.skipif(importlib.util.find_spec("cutlass_library") is None, reason="nvidia-cutlass is not installed (test extras)"),
]


def test_the_installed_cutlass_is_the_pinned_one():
    pin = re.search(r'"nvidia-cutlass==([\d.]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert importlib.metadata.version("nvidia-cutlass") == pin


def test_the_headers_build_the_weight_gradient_gemm(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "cutlass_probe.sh"), *PROBES], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable, "CUTLASS_PROBE_OUT": str(tmp_path)})
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "log").read_text()
    lines = [line for line in run.stdout.splitlines() if " ok " in line]
    assert len(lines) == len(PROBES), run.stdout
    for line in lines:
        assert "0 bytes spill stores, 0 bytes spill loads" in line, line
    assert sorted(p.name for p in tmp_path.glob("*.o")) == ["sm80_wgrad_sm80.o", "sm90_wgrad_sm90a.o"]
