"""The Triton suite: fastdni/kernels/ against fastdni.reference, on the device given by ``FASTDNI_TEST_DEVICE``.

* CI (no GPU): ``cpu``, run by tests/ops/test_triton_interpreter.py in a process of its own with TRITON_INTERPRET=1
  (it must be set before torch and triton are imported), so the kernels run on CPU tensors through Triton's
  interpreter.
* A GPU machine (``benchmarks/gpu.sh``): ``FASTDNI_TEST_DEVICE=cuda``, no interpreter: the same tests on the
  compiled kernels.

Tests make their tensors on the CPU (seeded, the same values on either device) and move them with :func:`on_device`;
modules that build tensors with plain ``torch.randn`` get the device as torch's default device.
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("FASTDNI_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("FASTDNI_TEST_DEVICE=cuda, but torch sees no CUDA device")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/interpreted on the CPU needs TRITON_INTERPRET=1 set before torch is imported")


def on_device(t):
    return t if t is None else t.to(DEVICE)


@pytest.fixture(autouse=True)
def _default_device(request):
    if getattr(request.module, "BUILDS_ON_CPU", False):
        yield
        return
    with torch.device(DEVICE):
        yield
