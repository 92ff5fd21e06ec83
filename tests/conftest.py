"""Shared fixtures of the fastdni test suite: seeding, dtypes and the per-dtype tolerance table.

Tolerances are explicit and per dtype. fp64 is the dtype of the exactness tests: two
computations of the same quantity that differ only in the order of floating-point operations
agree there to a few ulps, so ``1e-12`` leaves room for rounding but catches any wrong term.
fp32 compares against torch's own fp32 kernels (different GEMM blocking, fused activations).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# tests/interpreted runs the Triton kernels under TRITON_INTERPRET=1, which must be set before torch and
# triton are imported: test_triton_interpreter.py runs that folder in a process of its own.
# On a GPU machine, FASTDNI_TEST_DEVICE=cuda runs the same folder on the compiled kernels (benchmarks/gpu.sh).
_TRITON_SUITE = os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("FASTDNI_TEST_DEVICE") == "cuda"
collect_ignore = [] if _TRITON_SUITE else ["interpreted"]

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
DTYPES = tuple(TOLERANCES)

# Hypothesis: reproducible runs (fixed seed, no example database), no per-example deadline
# (the first call into torch can be slow). Each test sets its own small max_examples.
settings.register_profile("fastdni", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("fastdni")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def tol(dtype) -> dict:
    """``assert_close`` keyword arguments for the parametrised ``dtype``."""
    return TOLERANCES[dtype]


def _assert_close(actual, expected, **overrides) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``expected``'s dtype (nested tuples too)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"expected {expected!r}, got {actual!r}"
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected):
            _assert_close(a, e, **overrides)
        return
    kwargs = dict(TOLERANCES.get(expected.dtype, {}))
    kwargs.update(overrides)
    torch.testing.assert_close(actual, expected, **kwargs)


@pytest.fixture
def check_close():
    """``check_close(actual, expected, **overrides)``: assert_close at the table's tolerance."""
    return _assert_close


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread. The tests' tensors are tiny, and on a loaded machine
    (2 cores shared with other jobs) OpenMP's barriers in small multi-threaded GEMMs can cost
    milliseconds each; one thread is both faster and as deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
