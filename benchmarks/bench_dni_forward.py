"""pytest-benchmark of :func:`fastdni.ops.dni_forward` (layer forward + SG prediction), reference vs cpu backend.

The problem (fp32, relu, no context, ``K = N = width``, linear or MLP SG with one hidden layer of
``width``) is :func:`common.make_problem` (``benchmarks/common.py``), the one ``dni_step.py`` times.
Not part of the test suite (``testpaths = ["tests"]``); run it explicitly::

    pytest benchmarks/bench_dni_forward.py --benchmark-only -q
    pytest benchmarks/bench_dni_forward.py --benchmark-only --benchmark-columns=median,iqr,ops

Each group (``dni_forward <sg> B=.. W=..``) holds the two backends of one shape.
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from common import SG_KINDS, fused_args, make_problem

SHAPES = [(64, 256), (256, 512)]
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="fastdni._C (CPU kernels) did not load")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sg", SG_KINDS)
@pytest.mark.parametrize("batch,width", SHAPES)
def test_dni_forward(benchmark, batch, width, sg, backend):
    problem = make_problem(batch, width, sg)
    args = fused_args(problem)
    benchmark.group = f"dni_forward {sg} B={batch} W={width}"
    benchmark.extra_info.update(batch=batch, width=width, sg=sg, backend=backend, dtype="float32")
    with torch.no_grad():
        out = benchmark(ops.dni_forward, problem.x, args.weight, args.bias, args.sg, activation="relu", backend=backend)
    assert out.h.shape == (batch, width) and out.prediction.shape == (batch, width)
