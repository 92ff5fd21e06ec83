"""batch_norm_act and batch_norm_act_update_ on the Triton backend (fastdni/kernels/batch_norm.py) against the reference.

Oracle: the reference backend in fp32 on the same (already rounded) inputs and state, upcast, at
``op_cases.STEP_TOLERANCES``. Shapes are odd; the larger ones span several of the interpreter's 32-row slabs and
32-feature strips, so the reductions cross slabs and every strip has a ragged edge.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdni.ops as ops
from fastdni.kernels import launch_counter
from fastdni.ops import BatchNormResult

from conftest import DEVICE
from op_cases import (
    ACTIVATIONS, ADAM, OPTIMIZERS, SGD_MOMENTUM, STEP_DTYPE_IDS, STEP_DTYPES, assert_adam_step_close, assert_step_close,
    make_bn_inputs, noncontiguous, step_state, upcast,
)

BUILDS_ON_CPU = True  # seeded CPU generators (op_cases), then moved: see conftest.py
SHAPES = [(3, 7), (37, 70), (2, 33)]  #: (B, N): odd; several slabs and strips; the smallest batch
SHAPE_IDS = [f"B{b}N{n}" for b, n in SHAPES]
UPDATE_OPTIMIZERS = {"adam": ADAM, "sgd-m": SGD_MOMENTUM, "adamw-step7": OPTIMIZERS["adamw-step7"],
                     "sgd-nesterov-first": OPTIMIZERS["sgd-nesterov-first"], "sgd": OPTIMIZERS["sgd"]}


def _inputs(dtype, shape=(37, 70)):
    return make_bn_inputs(dtype, *shape, device=DEVICE)


def _forward(inp, activation, backend):
    return ops.batch_norm_act(inp.pre, inp.weight, inp.bias, inp.running_mean, inp.running_var, momentum=0.3, eps=1e-3,
                              activation=activation, backend=backend)


def _upcast_inputs(inp):
    return type(inp)(*(upcast(t) for t in (inp.pre, inp.weight, inp.bias, inp.running_mean, inp.running_var, inp.prediction)))


@pytest.mark.parametrize("dtype", STEP_DTYPES, ids=STEP_DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_reference(dtype, activation, shape):
    inp = _inputs(dtype, shape)
    got = _forward(inp, activation, "triton")
    want = _forward(_upcast_inputs(inp), activation, "reference")
    for name, g, w in zip(BatchNormResult._fields, got, want):
        assert g.device == inp.pre.device
        assert_step_close(g, w, dtype, name)


def test_forward_reads_strided_inputs():
    inp = _inputs(torch.float32)
    strided = dataclasses.replace(inp, pre=noncontiguous(inp.pre))
    for g, w in zip(_forward(strided, "gelu", "triton"), _forward(inp, "gelu", "reference")):
        assert_step_close(g, w, torch.float32, "strided")


def _update(inp, forward, activation, optimizer, backend, dtype):
    weight, bias = inp.weight.clone(), inp.bias.clone()
    state = step_state(*optimizer, [weight, bias], dtype, DEVICE)
    grad_pre = ops.batch_norm_act_update_(weight, bias, forward, inp.prediction, *optimizer, state, grad_scale=3.0,
                                          activation=activation, backend=backend)
    return [grad_pre, weight, bias, *state]


@pytest.mark.parametrize("dtype", STEP_DTYPES, ids=STEP_DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("opt_name", list(UPDATE_OPTIMIZERS))
def test_update_matches_reference(dtype, activation, opt_name):
    """From the Triton forward's own results (rounded to ``dtype``), upcast for the oracle."""
    optimizer = UPDATE_OPTIMIZERS[opt_name]
    inp = _inputs(dtype)
    forward = _forward(inp, activation, "triton")
    got = _update(inp, forward, activation, optimizer, "triton", dtype)
    want = _update(_upcast_inputs(inp), BatchNormResult(*(upcast(t) for t in forward)), activation, optimizer, "reference",
                   torch.float32)
    names = ["grad_pre", "weight", "bias", *[f"state{i}" for i in range(len(got) - 3)]]
    for name, g, w in zip(names, got, want):
        if optimizer[0] == "adam" and dtype != torch.float32 and name in ("weight", "bias"):
            assert_adam_step_close(g, w, dtype, name, lr=optimizer[1][0])
        else:
            assert_step_close(g, w, dtype, name)


def test_update_reads_strided_inputs():
    inp = _inputs(torch.float32)
    forward = _forward(inp, "tanh", "reference")
    strided = forward._replace(h=noncontiguous(forward.h), xhat=noncontiguous(forward.xhat),
                               invstd=noncontiguous(forward.invstd))
    strided_inp = dataclasses.replace(inp, prediction=noncontiguous(inp.prediction))
    got = _update(strided_inp, strided, "tanh", ADAM, "triton", torch.float32)
    want = _update(inp, forward, "tanh", ADAM, "reference", torch.float32)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_step_close(g, w, torch.float32, f"result {i}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_backward_matches_reference(activation):
    """backend="triton" is differentiable w.r.t. pre, weight and bias (backprop mode), with the reference's formula."""
    inp = _inputs(torch.float32, (9, 40))
    grads = []
    for backend in ("triton", "reference"):
        pre, weight, bias = (t.clone().requires_grad_() for t in (inp.pre, inp.weight, inp.bias))
        h = ops.batch_norm_act(pre, weight, bias, inp.running_mean, inp.running_var, activation=activation,
                               backend=backend).h
        grads.append(torch.autograd.grad(h, (pre, weight, bias), inp.prediction))
    for name, g, w in zip(("pre", "weight", "bias"), *grads):
        assert_step_close(g, w, torch.float32, name)


def test_one_launch_each():
    inp = _inputs(torch.float32)
    with launch_counter() as count:
        forward = _forward(inp, "relu", "triton")
    assert dict(count.by_name) == {"batch_norm_act": 1, "running_stats": 1}
    with launch_counter() as count:
        _update(inp, forward, "relu", ADAM, "triton", torch.float32)
    assert dict(count.by_name) == {"batch_norm_act_update": 1}


@pytest.mark.parametrize("rows", [0, 1])
def test_fewer_than_two_rows_are_rejected(rows):
    """The reference's message, from the kernels' own checks too (what torch.ops.fastdni reaches on CUDA)."""
    from fastdni.kernels import ops as kernel_ops

    inp = _inputs(torch.float32)
    message = rf"expected a batch of at least 2 rows \(batch statistics\), got shape \({rows}, 70\)"
    with pytest.raises(ValueError, match="^pre: " + message):
        kernel_ops.batch_norm_act(inp.pre[:rows], inp.weight, inp.bias, inp.running_mean, inp.running_var, 0.1, 1e-5,
                                  "relu")
    forward = _forward(inp, "relu", "reference")
    state = step_state(*ADAM, [inp.weight, inp.bias], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="^h: " + message):
        kernel_ops.batch_norm_act_update_(forward.h[:rows], forward.xhat[:rows], forward.invstd, inp.prediction[:rows],
                                          inp.weight.clone(), inp.bias.clone(), state, *ADAM, 1.0, "relu")


def test_bad_update_arguments_name_the_argument():
    from fastdni.kernels import ops as kernel_ops

    inp = _inputs(torch.float32)
    forward = _forward(inp, "relu", "reference")
    state = step_state(*ADAM, [inp.weight, inp.bias], torch.float32, DEVICE)
    args = [forward.h, forward.xhat, forward.invstd, inp.prediction, inp.weight.clone(), inp.bias.clone(), state, *ADAM,
            1.0, "relu"]
    cases = {3: (inp.prediction[:, :-1], r"^prediction: expected shape \(37, 70\)"),
             2: (forward.invstd.double(), r"^invstd: expected dtype float32, bfloat16 or float16"),
             6: (state[:3], r"^state: expected 4 tensors"),
             9: (0.0, r"^grad_scale: expected a positive value")}
    for index, (value, message) in cases.items():
        bad = list(args)
        bad[index] = value
        with pytest.raises((ValueError, TypeError), match=message):
            kernel_ops.batch_norm_act_update_(*bad)
