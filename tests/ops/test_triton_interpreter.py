"""The Triton kernels (fastdni/kernels/) checked on the CPU: tests/interpreted runs in a
process of its own with TRITON_INTERPRET=1, which has to be set before torch and triton are imported."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETED = Path(__file__).resolve().parents[1] / "interpreted"


@pytest.mark.skipif(not any(INTERPRETED.glob("test_*.py")), reason="no interpreted Triton tests yet")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INTERPRETED)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
