"""The CUDA backend's fused weight-gradient step, checked on the CPU through its twin (no GPU in CI).

``torch.ops.fastdni_twin.grad_step_`` (tests/cuda_twin.cpp) runs the per-element math of csrc/cuda/grad_step.cu
from the same header (csrc/common/grad_step_math.h): the gradient operand formed as it is loaded (the layer's
delta, the SG error, a relu-masked gradient, or stored), the one-hot label operand of cDNI's ``U``, and the
optimizer step in fp32 on fp32/bf16/fp16 storage, rounded once at the store. These tests drive it through the
same decomposition as csrc/cuda/dni_update.cpp and csrc/cuda/sg_regression.cpp (which operand is formed on the
fly, which is stored, with the GEMMs cuBLASLt does there done here by torch in fp32 and rounded to the dtype)
and compare the stepped parameters and optimizer state with the reference backend, in fp32, on the same
(already rounded) inputs. Tolerances: those of the Triton suite (tests/interpreted/test_triton_ops.py), whose
kernels round the same way.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import fastdni.ops as ops
from fastdni.ops import ForwardResult
from fastdni.ops.optim import state_per_param
from fastdni.reference import NEEDS_PRE, SGParams
from op_cases import (
    ACTIVATIONS, OPTIMIZERS, STEP_DTYPE_IDS, STEP_DTYPES, STEP_TOLERANCES, Case, assert_all_close, indexed_names, make_inputs,
    make_state,
)

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="the C++ extension fastdni._C is not built")
ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _twin_ops():
    """``torch.ops.fastdni_twin``: tests/cuda_twin.cpp, test-only and so not in the shipped extension, compiled on
    first use (a few seconds; rebuilt only when it or a header changes) with the extension's flags."""
    from torch.utils import cpp_extension

    build = ROOT / "build" / "cuda_twin"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="fastdni_twin", sources=[str(ROOT / "tests" / "cuda_twin.cpp")],
                       extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O3", "-fno-math-errno"],
                       build_directory=str(build), is_python_module=False)
    return torch.ops.fastdni_twin


class _Twin:
    def __getattr__(self, name):
        return getattr(_twin_ops(), name)


TWIN = _Twin()

TOLERANCES, DTYPES, DTYPE_IDS = STEP_TOLERANCES, STEP_DTYPES, STEP_DTYPE_IDS  # why these: op_cases.py
SHAPE = dict(batch=37, in_features=45, features=33, classes=5)
STEP_OPTIMIZERS = ("adam-l2-step3", "adamw-step7", "sgd", "sgd-nesterov")


def _cast(t, dtype):
    return t if t is None or not t.is_floating_point() else t.to(dtype)


def _up(t):
    return t if t is None or not t.is_floating_point() else t.to(torch.float32, copy=True)


def _floats(tensors):
    return [t.float() for t in tensors]


def _sg(sg, convert):
    return SGParams(tuple(map(convert, sg.weights)), tuple(map(convert, sg.biases)), convert(sg.context_weight))


def _inputs(dtype, activation="relu", sg="linear", context="none", hidden=None):
    """Seeded fp32 inputs rounded to ``dtype``, and the reference forward on them (its outputs rounded too, as the
    CUDA forward stores them)."""
    inp = make_inputs(Case(dtype=torch.float32, activation=activation, sg=sg, context=context, sg_hidden=hidden, **SHAPE))
    x, weight, bias, target = (_cast(t, dtype) for t in (inp.x, inp.weight, inp.bias, inp.target))
    sg_params = _sg(inp.sg, lambda t: _cast(t, dtype))
    context_t = _cast(inp.context, dtype)
    f = ops.dni_forward(_up(x), _up(weight), _up(bias), _sg(sg_params, _up), _up(context_t), activation=activation, backend="reference")
    forward = ForwardResult(f.h.to(dtype), f.pre.to(dtype), f.prediction.to(dtype), [z.to(dtype) for z in f.sg_hidden])
    return x, weight, bias, sg_params, context_t, target, forward


def _state(optimizer, hyper, params, dtype):
    return [s.to(dtype) for s in make_state(optimizer, hyper, [p.float() for p in params])]


@pytest.mark.parametrize("need_input_grad", [False, True], ids=["formed", "stored"])
@pytest.mark.parametrize("opt_name", STEP_OPTIMIZERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_update_matches_reference(dtype, activation, opt_name, need_input_grad):
    """dni_update_'s step on W and b: delta formed as the kernel loads it (no dx), or stored first (dx wanted)."""
    x, weight, bias, _, _, _, forward = _inputs(dtype, activation)
    optimizer, hyper = OPTIMIZERS[opt_name]
    grad_scale = 2.5
    state = _state(optimizer, hyper, [weight, bias], dtype)
    want_w, want_b, want_state = _up(weight), _up(bias), [_up(s) for s in state]
    up_forward = ForwardResult(_up(forward.h), _up(forward.pre), _up(forward.prediction), [])
    ops.dni_update_(_up(x), want_w, want_b, up_forward, optimizer, hyper, want_state, grad_scale=grad_scale, activation=activation,
                    backend="reference")

    per = state_per_param(optimizer, hyper)
    derivative_input = forward.pre if activation in NEEDS_PRE else forward.h
    if need_input_grad:  # the CUDA op stores delta for cuBLASLt's dx, and the step reads it back
        delta = _reference_delta(up_forward, activation, grad_scale).to(dtype)
        TWIN.grad_step_(delta, None, "stored", "identity", 1.0, 0.0, x, None, weight, state[:per], bias, state[per:], optimizer, hyper)
    else:
        TWIN.grad_step_(forward.prediction, derivative_input, "delta", activation, 1.0 / grad_scale, 0.0, x, None, weight, state[:per], bias,
                        state[per:], optimizer, hyper)
    names = ["weight", "bias", *indexed_names("state", len(state))]
    assert_all_close(_floats([weight, bias, *state]), [want_w, want_b, *want_state], names, **TOLERANCES[dtype])


def _reference_delta(forward, activation, grad_scale):
    from fastdni.reference import activation_derivative_from_output

    return forward.prediction / grad_scale * activation_derivative_from_output(forward.h, forward.pre, activation)


def _twin_regression(h, forward, target, sg, context, state, optimizer, hyper, target_scale, loss_weight):
    """sg_regression_ as csrc/cuda/sg_regression.cpp decomposes it, each fused step on the twin."""
    batch, layers, per = h.shape[0], len(sg.weights), state_per_param(optimizer, hyper)
    inputs = [h, *forward.sg_hidden]
    factor = 2.0 * loss_weight / batch
    grad = (factor * (forward.prediction.float() - target_scale * target.float())).to(h.dtype)  # the error pass's store
    # A linear SG forms the error's gradient as it loads it; deeper ones read the stored one.
    source = ("stored", grad, None, 1.0, 0.0) if layers > 1 else ("error", forward.prediction, target, factor, target_scale)
    for i in reversed(range(layers)):
        kind, first, second, scale, t_scale = source
        below = (grad.float() @ sg.weights[i].float()).to(h.dtype) if i > 0 else None  # cuBLASLt, pre-update weight
        TWIN.grad_step_(first, second, kind, "identity", scale, t_scale, inputs[i], None, sg.weights[i], state[2 * i * per:(2 * i + 1) * per],
                        sg.biases[i], state[(2 * i + 1) * per:(2 * i + 2) * per], optimizer, hyper)
        if i == 0 and sg.context_weight is not None:
            labelled = not context.is_floating_point()
            TWIN.grad_step_(first, second, kind, "identity", scale, t_scale, None if labelled else context, context if labelled else None,
                            sg.context_weight, state[2 * layers * per:], None, [], optimizer, hyper)
        if below is not None:
            masked = (below.float() * (inputs[i].float() > 0)).to(h.dtype)
            source = ("stored", masked, None, 1.0, 0.0) if i > 1 else ("relu_masked", below, inputs[i], 1.0, 0.0)
            grad = masked


SG_CASES = {
    "linear": ("linear", "none", None),
    "linear-labels32": ("linear", "labels32", None),
    "linear-float": ("linear", "float", None),
    "mlp1-labels64": ("mlp1", "labels64", (29,)),
    "mlp2": ("mlp2", "none", (29, 31)),
}


@pytest.mark.parametrize("opt_name", ("adam-l2-step3", "sgd-dampening"))
@pytest.mark.parametrize("sg_case", SG_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sg_regression_matches_reference(dtype, sg_case, opt_name):
    sg_kind, context_kind, hidden = SG_CASES[sg_case]
    _, _, _, sg, context, target, forward = _inputs(dtype, sg=sg_kind, context=context_kind, hidden=hidden)
    optimizer, hyper = OPTIMIZERS[opt_name]
    params = list(ops.ordered_params(sg))
    state = _state(optimizer, hyper, params, dtype)
    want_sg, want_state = _sg(sg, _up), [_up(s) for s in state]
    up_forward = ForwardResult(_up(forward.h), _up(forward.pre), _up(forward.prediction), [_up(z) for z in forward.sg_hidden])
    ops.sg_regression_(up_forward, _up(target), want_sg, optimizer, hyper, want_state, _up(context), target_scale=0.5,
                       loss_weight=2.0, backend="reference")

    _twin_regression(forward.h, forward, target, sg, context, state, optimizer, hyper, 0.5, 2.0)
    names = [*indexed_names("param", len(params)), *indexed_names("state", len(state))]
    assert_all_close(_floats([*params, *state]), [*ops.ordered_params(want_sg), *want_state], names, **TOLERANCES[dtype])


def test_twin_rejects_a_bad_kind():
    param = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="kind: expected one of stored, delta, error, relu_masked, got 'delta2'"):
        TWIN.grad_step_(torch.zeros(4, 2), None, "delta2", "identity", 1.0, 1.0, torch.zeros(4, 3), None, param, [], None, [], "sgd",
                        [0.1, 0.0, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("kind", ("stored", "delta", "error", "relu_masked"))
def test_grad_source_scale_is_a_multiplier(kind):
    """G = scale * raw for every kind, as fastdni/kernels/prologue.py's GradSource: a power-of-two scale (exact) on the
    source steps the parameter exactly as that scale applied to the stored operand beforehand."""
    gen = torch.Generator().manual_seed(3)
    first, second, x = torch.randn(5, 2, generator=gen), torch.randn(5, 2, generator=gen), torch.randn(5, 3, generator=gen)
    raw = {"stored": first, "delta": first * (second > 0), "error": first - 0.5 * second, "relu_masked": first * (second > 0)}[kind]
    sgd = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    scaled, prescaled = torch.zeros(2, 3), torch.zeros(2, 3)
    TWIN.grad_step_(first, None if kind == "stored" else second, kind, "relu", 0.25, 0.5, x, None, scaled, [], None, [], "sgd", sgd)
    TWIN.grad_step_(0.25 * raw, None, "stored", "identity", 1.0, 0.0, x, None, prescaled, [], None, [], "sgd", sgd)
    assert scaled.abs().sum() > 0 and torch.equal(scaled, prescaled)
