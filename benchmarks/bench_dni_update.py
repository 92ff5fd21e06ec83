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
from common import SG_KINDS, fused_args, make_problem

SHAPES = [(64, 256), (256, 512)]
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="fastdni._C (CPU kernels) did not load")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,width", SHAPES)
def test_dni_update(benchmark, batch, width, backend):
    problem = make_problem(batch, width, SG_KINDS[0])  # the update does not depend on the SG's shape
    args = fused_args(problem)
    with torch.no_grad():
        forward = ops.dni_forward(problem.x, args.weight, args.bias, args.sg, activation="relu", backend="reference")
    benchmark.group = f"dni_update_ B={batch} W={width}"
    benchmark.extra_info.update(batch=batch, width=width, backend=backend, dtype="float32")
    dx = benchmark(ops.dni_update_, problem.x, args.weight, args.bias, forward, "adam", args.hyper, args.layer_state,
                   activation="relu", need_input_grad=True, backend=backend)
    assert dx.shape == (batch, width) and torch.isfinite(args.weight).all()
