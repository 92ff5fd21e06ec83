"""pytest-benchmark of :func:`fastdni.ops.batch_norm_act` (batch statistics, ``h = relu(gamma xhat + beta)``, the new
running statistics) and :func:`fastdni.ops.batch_norm_act_update_` (the BatchNorm backward from a synthetic gradient
and Adam on gamma and beta), reference vs cpu backend, fp32, on ``[B, W]`` with ``(B, W)`` from
``common.BENCH_SHAPES``. Every update call steps gamma and beta again (with the same Adam ``step``), which changes
nothing about the work. Not part of the test suite; run it explicitly::

    pytest benchmarks/bench_batch_norm_act.py --benchmark-only -q
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from common import BENCH_SHAPES, backend_params, label_benchmark

ADAM = [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]


def _inputs(batch: int, width: int):
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(batch, width, generator=gen) * 2 + 0.5
    gamma, beta = 1 + 0.1 * torch.randn(width, generator=gen), 0.1 * torch.randn(width, generator=gen)
    return pre, gamma, beta, torch.zeros(width), torch.ones(width), torch.randn(batch, width, generator=gen)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("batch,width", BENCH_SHAPES)
def test_batch_norm_act(benchmark, batch, width, backend):
    pre, gamma, beta, mean, var, _ = _inputs(batch, width)
    label_benchmark(benchmark, "batch_norm_act", batch, width, backend)
    out = benchmark(ops.batch_norm_act, pre, gamma, beta, mean, var, activation="relu", backend=backend)
    assert out.h.shape == (batch, width) and torch.isfinite(out.running_var).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("batch,width", BENCH_SHAPES)
def test_batch_norm_act_update(benchmark, batch, width, backend):
    pre, gamma, beta, mean, var, prediction = _inputs(batch, width)
    forward = ops.batch_norm_act(pre, gamma, beta, mean, var, activation="relu", backend="reference")
    state = [torch.zeros(width) for _ in range(4)]
    label_benchmark(benchmark, "batch_norm_act_update_", batch, width, backend)
    grad_pre = benchmark(ops.batch_norm_act_update_, gamma, beta, forward, prediction, "adam", ADAM, state,
                         activation="relu", backend=backend)
    assert grad_pre.shape == (batch, width) and torch.isfinite(gamma).all()
