"""pytest-benchmark of the reference :func:`fastdni.reference.dni_layer_step`: the baseline the
fused ops are measured against.

Not part of the test suite (``testpaths = ["tests"]``, and ``bench_*.py`` does not match pytest's
default ``python_files``); run it explicitly, e.g.::

    pytest benchmarks/bench_dni_layer_step.py
    pytest benchmarks/bench_dni_layer_step.py --benchmark-group-by=param:sg --benchmark-columns=mean,stddev,ops

On a machine shared with other jobs, pin the threads (``OMP_NUM_THREADS=1`` or a dedicated
core set): otherwise small multi-threaded GEMMs mostly time OpenMP barrier waits.

One step = layer forward, SG prediction, the layer's gradients from it (with the input gradient
for bootstrapping the layer below) and the SG regression onto a target, fp32.
"""
from __future__ import annotations

import pytest
import torch

from fastdni.reference import SGParams, dni_layer_step, init_sg_params

SG_HIDDEN = {"linear": (), "mlp": None}  # mlp: one hidden layer as wide as the layer


def _inputs(batch: int, width: int, sg: str, context: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=gen, dtype=dtype)
    weight = torch.randn(width, width, generator=gen, dtype=dtype) / width**0.5
    bias = torch.zeros(width, dtype=dtype)
    hidden = (width,) if SG_HIDDEN[sg] is None else SG_HIDDEN[sg]
    classes = 10 if context else 0
    params = init_sg_params(width, hidden, classes, dtype=dtype, generator=gen)
    # A trained-looking SG: the zero-initialised output layer would make the step trivially sparse.
    params = SGParams(
        params.weights[:-1] + (torch.randn(params.weights[-1].shape, generator=gen, dtype=dtype) * 0.01,),
        params.biases,
        params.context_weight,
    )
    labels = torch.randint(0, classes, (batch,), generator=gen) if context else None
    target = torch.randn(batch, width, generator=gen, dtype=dtype) * 0.01
    return x, weight, bias, params, labels, target


@pytest.mark.parametrize("context", [False, True], ids=["dni", "cdni"])
@pytest.mark.parametrize("sg", list(SG_HIDDEN))
@pytest.mark.parametrize("width", [256, 512])
@pytest.mark.parametrize("batch", [64, 256])
def test_dni_layer_step(benchmark, batch, width, sg, context):
    x, weight, bias, params, labels, target = _inputs(batch, width, sg, context)
    benchmark.group = f"dni_layer_step B={batch} N={width}"
    benchmark.extra_info.update(batch=batch, width=width, sg=sg, context=context, dtype="float32")
    result = benchmark(
        dni_layer_step, x, weight, bias, params, activation="relu", context=labels, target=target, need_input_grad=True
    )
    assert result.h.shape == (batch, width) and result.layer_grads.input.shape == (batch, width)
    assert torch.isfinite(result.sg.loss)
