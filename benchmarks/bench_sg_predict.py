"""pytest-benchmark of :func:`fastdni.ops.sg_predict` (the SG prediction of a given activation), reference vs cpu
backend, linear and MLP SG.

The problem is :func:`common.make_problem` (``benchmarks/common.py``): fp32, a ``width``-wide activation (the
problem's ``x``, ``K = N``), a linear SG or an MLP SG with one hidden layer of ``width``. Not part of the test
suite; the SG step of a whole :class:`fastdni.nn.DNI` against autograd and torch.compile is ``dni_sg_step.py``::

    pytest benchmarks/bench_sg_predict.py --benchmark-only -q
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from common import BENCH_SHAPES, SG_KINDS, backend_params, bench_inputs, label_benchmark


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("sg", SG_KINDS)
@pytest.mark.parametrize("batch,width", BENCH_SHAPES)
def test_sg_predict(benchmark, batch, width, sg, backend):
    problem, args = bench_inputs(batch, width, sg)
    label_benchmark(benchmark, "sg_predict", batch, width, backend, sg)
    with torch.no_grad():
        out = benchmark(ops.sg_predict, problem.x, args.sg, backend=backend)
    assert out.prediction.shape == (batch, width) and len(out.sg_hidden) == len(args.sg.weights) - 1
