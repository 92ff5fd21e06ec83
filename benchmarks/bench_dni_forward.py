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
from common import BENCH_SHAPES, SG_KINDS, backend_params, bench_inputs, label_benchmark


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("sg", SG_KINDS)
@pytest.mark.parametrize("batch,width", BENCH_SHAPES)
def test_dni_forward(benchmark, batch, width, sg, backend):
    problem, args = bench_inputs(batch, width, sg)
    label_benchmark(benchmark, "dni_forward", batch, width, backend, sg)
    with torch.no_grad():
        out = benchmark(ops.dni_forward, problem.x, args.weight, args.bias, args.sg, activation="relu", backend=backend)
    assert out.h.shape == (batch, width) and out.prediction.shape == (batch, width)
