"""pytest-benchmark of :func:`fastdni.ops.dni_update_` (delta, ``dx = delta W``, the layer's Adam step in
place), reference vs cpu backend.

The problem is :func:`common.make_problem` (``benchmarks/common.py``): fp32, relu, ``K = N = width``,
Adam, ``need_input_grad=True``; the synthetic gradient comes from the SG's forward (computed once, by
the reference). Every call steps the weights again (with the same Adam ``step``), which changes
nothing about the work. Not part of the test suite; run it explicitly::

    pytest benchmarks/bench_dni_update.py --benchmark-only -q
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from common import BENCH_SHAPES, SG_KINDS, backend_params, bench_inputs, label_benchmark, reference_forward


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("batch,width", BENCH_SHAPES)
def test_dni_update(benchmark, batch, width, backend):
    problem, args = bench_inputs(batch, width, SG_KINDS[0])  # the update does not depend on the SG's shape
    forward = reference_forward(problem, args)
    label_benchmark(benchmark, "dni_update_", batch, width, backend)
    dx = benchmark(ops.dni_update_, problem.x, args.weight, args.bias, forward, "adam", args.hyper, args.layer_state,
                   activation="relu", need_input_grad=True, backend=backend)
    assert dx.shape == (batch, width) and torch.isfinite(args.weight).all()
