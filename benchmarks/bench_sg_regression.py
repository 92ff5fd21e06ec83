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
from common import BENCH_SHAPES, SG_KINDS, backend_params, bench_inputs, label_benchmark, reference_forward


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("sg", SG_KINDS)
@pytest.mark.parametrize("batch,width", BENCH_SHAPES)
def test_sg_regression(benchmark, batch, width, sg, backend):
    problem, args = bench_inputs(batch, width, sg)
    forward = reference_forward(problem, args)
    label_benchmark(benchmark, "sg_regression_", batch, width, backend, sg)
    loss = benchmark(ops.sg_regression_, forward, problem.target, args.sg, "adam", args.hyper, args.sg_state,
                     backend=backend)
    assert loss.dim() == 0 and torch.isfinite(loss)
