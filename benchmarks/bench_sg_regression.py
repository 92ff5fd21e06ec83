"""pytest-benchmark of :func:`fastdni.ops.sg_regression_` (the SG's regression onto a target and its Adam
step in place), reference vs cpu backend, linear and MLP SG.

The problem is :func:`common.make_problem` (``benchmarks/common.py``): fp32, ``width``-wide layer
output, a linear SG or an MLP SG with one hidden layer of ``width``, a random target. The prediction
comes from one forward (by the reference) before timing; every call steps the SG again from it
(with the same Adam ``step``), which changes nothing about the work. Not part of the test suite::

    pytest benchmarks/bench_sg_regression.py --benchmark-only -q
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
def test_sg_regression(benchmark, batch, width, sg, backend):
    problem = make_problem(batch, width, sg)
    args = fused_args(problem)
    with torch.no_grad():
        forward = ops.dni_forward(problem.x, args.weight, args.bias, args.sg, activation="relu", backend="reference")
    benchmark.group = f"sg_regression_ {sg} B={batch} W={width}"
    benchmark.extra_info.update(batch=batch, width=width, sg=sg, backend=backend, dtype="float32")
    loss = benchmark(ops.sg_regression_, forward.h, forward, problem.target, args.sg, "adam", args.hyper, args.sg_state,
                     backend=backend)
    assert loss.dim() == 0 and torch.isfinite(loss)
