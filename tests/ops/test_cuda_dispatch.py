"""Who owns torch.ops.fastdni on CUDA tensors, and the ``backend="cuda"`` switch (no GPU needed).

Rule (fastdni/ops/_triton.py): when fastdni._C was built with csrc/cuda, its C++ kernels hold the CUDA dispatch key
of the ops they have (``backend="auto"`` and ``"cuda"``) and Triton runs those only for ``backend="triton"``;
Triton holds the key for the others (``schema.TRITON_ONLY_OPS``), and for every op in a build without them.
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
import fastdni.ops.api as api
from fastdni.ops import _triton
from fastdni.ops.schema import CUDA_CPP_OPS, GPU_OPS, NAMESPACE, TRITON_ONLY_OPS


@pytest.mark.parametrize("name", GPU_OPS)
def test_the_cuda_key_has_one_owner(name):
    """The C++ kernels for the ops they have (where built), Triton for the rest; one registration either way."""
    dump = torch._C._dispatch_dump(f"{NAMESPACE}::{name}")
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA")]
    if ops.HAS_CUDA_KERNELS and name in CUDA_CPP_OPS:
        assert len(cuda_lines) == 1 and "csrc/cuda/module.cpp" in cuda_lines[0], dump
    elif _triton.HAS_TRITON:
        assert _triton._CUDA_LIBRARY is not None
        assert len(cuda_lines) == 1 and "csrc/cuda" not in cuda_lines[0], dump
    else:  # no GPU kernel at all: CUDA tensors reach the CompositeExplicitAutograd reference
        assert not cuda_lines, dump


def test_the_ops_split_between_cuda_cpp_and_triton():
    assert set(GPU_OPS) == set(CUDA_CPP_OPS) | set(TRITON_ONLY_OPS)
    assert set(TRITON_ONLY_OPS) == {"batch_norm_act", "batch_norm_act_update_"}
    for name in GPU_OPS:  # the reference stays registered beneath every GPU kernel
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CompositeExplicitAutograd")


def test_backend_cuda_is_listed():
    assert "cuda" in ops.BACKENDS


def test_backend_cuda_rejects_cpu_tensors():
    if not ops.HAS_CUDA_KERNELS:
        pytest.skip("built without CUDA kernels: the missing build is reported first")
    with pytest.raises(ValueError, match="backend: 'cuda' runs on CUDA tensors, got tensors on cpu"):
        api.check_backend("cuda", torch.device("cpu"), torch.float32)


def test_backend_cuda_rejects_float64():
    if not ops.HAS_CUDA_KERNELS:
        pytest.skip("built without CUDA kernels: the missing build is reported first")
    with pytest.raises(TypeError, match="x: backend 'cuda' takes float32, bfloat16 or float16 tensors, got torch.float64"):
        api.check_backend("cuda", torch.device("cuda"), torch.float64)


def test_backend_cuda_without_the_kernels(monkeypatch):
    monkeypatch.setattr(api, "HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="backend: 'cuda' needs fastdni._C built with its CUDA kernels"):
        api.check_backend("cuda", torch.device("cuda"), torch.float32)


def test_backend_cuda_runs_the_compiled_op():
    if not ops.HAS_CUDA_KERNELS:
        pytest.skip("built without CUDA kernels")
    assert api.check_backend("cuda", torch.device("cuda"), torch.bfloat16) == "compiled"
