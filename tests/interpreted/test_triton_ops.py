"""The ops on the Triton backend (``backend="triton"``, fastdni/kernels/ops.py) against the reference, interpreted.

Oracle: the reference backend in fp32 on the same (already rounded) inputs and state, upcast. The Triton ops
take every tensor in one dtype (fp32, bf16 or fp16) and compute in fp32; their results are rounded once to
that dtype at the store, so the tolerance of a dtype is a few of its ulps on O(1) values, plus, for params,
the rounding of the updated value. Shapes are odd and larger than the interpreter's 32-wide tiles, so every
kernel sees ragged edges and several tiles in each dimension.
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from fastdni.kernels import launch_counter
from fastdni.reference import SGParams

from conftest import DEVICE
from op_cases import (
    ACTIVATIONS, CONTEXTS, OPTIMIZERS, STEP_DTYPE_IDS, STEP_DTYPES, STEP_SGS, assert_step_close,
    check_forward_matches_reference, check_predict_matches_reference, check_regression_matches_reference,
    check_update_matches_reference, clone_all, clone_sg, gpu_inputs, step_state, upcast_inputs,
)

BUILDS_ON_CPU = True  # seeded CPU generators (op_cases), then moved: see conftest.py

DTYPES, DTYPE_IDS = STEP_DTYPES, STEP_DTYPE_IDS  # tolerances: op_cases.STEP_TOLERANCES


def _inputs(dtype, activation="relu", sg="linear", context="none", seed=0, device=DEVICE):
    return gpu_inputs(dtype, device, activation, sg, context, seed=seed)


def _state(optimizer, hyper, params, dtype=torch.float32):
    return step_state(optimizer, hyper, params, dtype, DEVICE)


def _forward(inp, backend):
    return ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend=backend)


def _forward_cases():
    for dtype in DTYPES:
        for activation in ACTIVATIONS:
            for sg in STEP_SGS:
                for context in CONTEXTS if sg != "nosg" else ("none",):
                    if dtype != torch.float32 and (activation in ("identity", "tanh") or context == "labels32"):
                        continue  # low precision: the activations and contexts that differ in kind
                    yield pytest.param(dtype, activation, sg, context,
                                       id=f"{str(dtype)[6:]}-{activation}-{sg}-{context}")


@pytest.mark.parametrize("dtype, activation, sg, context", list(_forward_cases()))
def test_forward_matches_reference(dtype, activation, sg, context):
    check_forward_matches_reference(_inputs(dtype, activation, sg, context), dtype, "triton")


def _predict_cases():
    for dtype in DTYPES:
        for sg in ("linear", "mlp", "mlp2"):
            for context in CONTEXTS:
                if dtype != torch.float32 and (context == "labels32" or sg == "mlp2"):
                    continue
                yield pytest.param(dtype, sg, context, id=f"{str(dtype)[6:]}-{sg}-{context}")


@pytest.mark.parametrize("dtype, sg, context", list(_predict_cases()))
def test_sg_predict_matches_reference(dtype, sg, context):
    check_predict_matches_reference(_inputs(dtype, "relu", sg, context), dtype, "triton")


@pytest.mark.parametrize("sg, context", [("linear", "float"), ("mlp", "labels64")])
def test_sg_predict_on_a_strided_h(sg, context):
    check_predict_matches_reference(_inputs(torch.float32, "relu", sg, context), torch.float32, "triton", strided=True)


def test_sg_predict_backward_is_the_references():
    """``backend="triton"`` is differentiable (its autograd wrapper, fastdni/ops/_triton.py): dh and every SG
    parameter's gradient, against the reference's autograd in fp32."""
    inp = _inputs(torch.float32, "relu", "mlp", "labels64")
    grad_out = torch.randn(inp.target.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (inp.target, *inp.sg.weights, *inp.sg.biases,
                                                                inp.sg.context_weight)]
        sg = SGParams(tuple(leaves[1:3]), tuple(leaves[3:5]), leaves[5])
        ops.sg_predict(leaves[0], sg, inp.context, backend=backend).prediction.backward(grad_out)
        grads.append([t.grad for t in leaves])
    for i, (g, w) in enumerate(zip(*grads)):
        assert_step_close(g, w, torch.float32, f"grad {i}")


UPDATE_OPTIMIZERS = ("adam-step1", "adam-l2-step3", "adamw-step7", "sgd-wd-first", "sgd-dampening", "sgd-nesterov")


def _update(inp, forward, optimizer_key, backend, *, state, grad_scale, need_input_grad):
    optimizer, hyper = OPTIMIZERS[optimizer_key]
    return ops.dni_update_(inp.x, inp.weight, inp.bias, forward, optimizer, hyper, state, grad_scale=grad_scale,
                           activation=inp.activation, need_input_grad=need_input_grad, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "identity"])  # identity: act' = 1, in the forward cases
@pytest.mark.parametrize("optimizer_key", UPDATE_OPTIMIZERS)
@pytest.mark.parametrize("need_input_grad", [True, False], ids=["dx", "nodx"])
def test_update_matches_reference(dtype, activation, optimizer_key, need_input_grad):
    check_update_matches_reference(_inputs(dtype, activation, "mlp"), dtype, optimizer_key, "triton",
                                   need_input_grad=need_input_grad)


def _regress(inp, forward, optimizer_key, backend, state):
    optimizer, hyper = OPTIMIZERS[optimizer_key]
    return ops.sg_regression_(forward, inp.target, inp.sg, optimizer, hyper, state, inp.context,
                              target_scale=0.75, loss_weight=1.5, backend=backend)


def _regression_cases():
    for dtype in DTYPES:
        for sg in ("linear", "mlp", "mlp2"):
            for context in CONTEXTS:
                for optimizer_key in ("adam-l2-step3", "sgd-dampening"):
                    if dtype != torch.float32 and (context == "labels32" or sg == "mlp2"):
                        continue
                    yield pytest.param(dtype, sg, context, optimizer_key,
                                       id=f"{str(dtype)[6:]}-{sg}-{context}-{optimizer_key}")


@pytest.mark.parametrize("dtype, sg, context, optimizer_key", list(_regression_cases()))
def test_sg_regression_matches_reference(dtype, sg, context, optimizer_key):
    check_regression_matches_reference(_inputs(dtype, "relu", sg, context), dtype, optimizer_key, "triton",
                                       target_scale=0.75, loss_weight=1.5)


def test_regression_changes_every_sg_parameter():
    """Guards the comparison above against a step that was skipped on both sides."""
    inp = _inputs(torch.float32, "relu", "mlp2", "labels64")
    before = ops.ordered_params(clone_sg(inp.sg))
    optimizer, hyper = OPTIMIZERS["adam-step1"]
    state = _state(optimizer, hyper, ops.ordered_params(inp.sg))
    _regress(inp, _forward(inp, "triton"), "adam-step1", "triton", state)
    for i, (b, a) in enumerate(zip(before, ops.ordered_params(inp.sg))):
        assert not torch.equal(a, b), f"SG parameter {i} was not stepped"


# --- launches: the counts of fastdni/kernels/ops.py's docstring ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sg, context, want", [
    ("linear", "none", (2, 2, 1)), ("mlp", "none", (3, 2, 3)), ("mlp2", "none", (4, 2, 5)),
    ("linear", "labels64", (2, 2, 2)), ("linear", "float", (3, 2, 2)),
])
def test_launches_per_layer_step(sg, context, want, dtype):
    inp = _inputs(dtype, "relu", sg, context)
    optimizer, hyper = OPTIMIZERS["adam-step1"]
    counts = []
    with launch_counter() as count:
        forward = _forward(inp, "triton")
    counts.append(count.total)
    state = _state(optimizer, hyper, [inp.weight, inp.bias], dtype)
    with launch_counter() as count:
        _update(inp, forward, "adam-step1", "triton", state=state, grad_scale=1.0, need_input_grad=True)
    counts.append(count.total)
    with launch_counter() as count:
        _regress(inp, forward, "adam-step1", "triton", _state(optimizer, hyper, ops.ordered_params(inp.sg), dtype))
    counts.append(count.total)
    assert tuple(counts) == want
    with launch_counter() as count:  # the SG part of the forward alone: its launches less the layer's one
        ops.sg_predict(forward.h, inp.sg, inp.context, backend="triton")
    assert count.total == want[0] - 1


# --- bad input: a clear error naming the argument, and nothing launched or written ----------------------

def _layer_step(inp, state, backend="triton"):
    forward = _forward(inp, backend)
    optimizer, hyper = OPTIMIZERS["adam-step1"]
    ops.dni_update_(inp.x, inp.weight, inp.bias, forward, optimizer, hyper, state, need_input_grad=True,
                    activation=inp.activation, backend=backend)


def _bad(field, value):
    def mutate(inp, state):
        if field == "state":
            state[0] = value(state[0])
        else:
            setattr(inp, field, value(getattr(inp, field)))
    return mutate


def _all_float64(inp, state):
    for field in ("x", "weight", "bias"):
        setattr(inp, field, getattr(inp, field).double())
    inp.sg = SGParams(tuple(w.double() for w in inp.sg.weights), tuple(b.double() for b in inp.sg.biases))
    state[:] = [s.double() for s in state]


BAD_INPUTS = {
    "float64": (_all_float64, TypeError, "x: backend 'triton' takes float32, bfloat16 or float16 tensors"),
    "weight-dtype": (_bad("weight", lambda t: t.half()), TypeError, "weight"),
    "x-shape": (_bad("x", lambda t: t[:, :-1]), ValueError, "weight|x"),
    "bias-shape": (_bad("bias", lambda t: t[:-1]), ValueError, "bias"),
    "weight-device": (_bad("weight", lambda t: t.to("meta")), ValueError, "weight"),  # a device other than x's
    "state-noncontiguous": (_bad("state", lambda t: t.T.contiguous().T), ValueError, r"state\[0\]"),
    "state-shape": (_bad("state", lambda t: t[:-1]), ValueError, r"state"),
    "state-dtype": (_bad("state", lambda t: t.half()), (TypeError, ValueError), r"state"),
    "no-rows": (_bad("x", lambda t: t[:0]), ValueError, r"^x: expected a batch of at least 1 row"),
}


@pytest.mark.parametrize("name", ["dni_forward", "sg_predict", "dni_update_", "sg_regression_"])
def test_the_kernels_reject_a_batch_of_no_rows(name):
    """The Triton implementations themselves (what torch.ops.fastdni runs on CUDA), not only the wrappers."""
    from fastdni.kernels import ops as kernel_ops

    inp = _inputs(torch.float32, "relu", "linear")
    x, h = inp.x[:0], inp.x.new_zeros(0, inp.weight.shape[0])
    sg = inp.sg
    optimizer, hyper = OPTIMIZERS["adam-step1"]
    arg = "h" if name in ("sg_predict", "sg_regression_") else "x"
    with launch_counter() as count, pytest.raises(ValueError, match=rf"^{arg}: expected a batch of at least 1 row"):
        if name == "dni_forward":
            kernel_ops.dni_forward(x, inp.weight, inp.bias, list(sg.weights), list(sg.biases), None, None, "relu")
        elif name == "sg_predict":
            kernel_ops.sg_predict(h, list(sg.weights), list(sg.biases), None, None)
        elif name == "dni_update_":
            state = _state(optimizer, hyper, [inp.weight, inp.bias])
            kernel_ops.dni_update_(x, inp.weight, inp.bias, h, h.new_empty(0), h, state, optimizer, hyper, 1.0,
                                   "relu", True)
        else:
            state = _state(optimizer, hyper, [*sg.weights, *sg.biases])
            kernel_ops.sg_regression_(h, [], h, h, list(sg.weights), list(sg.biases), None, None, state, optimizer,
                                      hyper, 1.0, 1.0)
    assert count.total == 0


@pytest.mark.parametrize("key", list(BAD_INPUTS))
def test_bad_input_raises_before_any_launch(key):
    inp = _inputs(torch.float32, "relu", "linear")
    optimizer, hyper = OPTIMIZERS["adam-step1"]
    state = _state(optimizer, hyper, [inp.weight, inp.bias])
    mutate, error, pattern = BAD_INPUTS[key]
    mutate(inp, state)
    before = clone_all([inp.weight, inp.bias])
    with launch_counter() as count, pytest.raises(error, match=pattern):
        _layer_step(inp, state)
    if not key.startswith("state"):  # state is checked by dni_update_, after dni_forward ran
        assert count.total == 0, f"launched {dict(count.by_name)} before rejecting {key}"
    if inp.weight.device.type != "meta":
        assert torch.equal(inp.weight, before[0]) and torch.equal(inp.bias, before[1]), "params written before the error"


def test_triton_backend_rejects_a_cpu_tensor_when_not_interpreted(monkeypatch):
    from fastdni.ops import _triton
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    inp = _inputs(torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="backend: 'triton' runs on CUDA tensors"):
        _forward(inp, "triton")


# --- NaN and inf propagate, as in the reference ----------------------------------------------------------

def test_nan_and_inf_propagate():
    inp = _inputs(torch.float32, "relu", "linear")
    inp.x[3, 5] = float("nan")
    inp.weight[7, 2] = float("inf")
    got, want = _forward(inp, "triton"), _forward(upcast_inputs(inp), "reference")
    for name in ("h", "prediction"):
        g, w = getattr(got, name), getattr(want, name)
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN pattern differs"
        assert torch.equal(g.isinf(), w.isinf()), f"{name}: inf pattern differs"
    assert got.h[3].isnan().all()
    state = _state("adam", OPTIMIZERS["adam-step1"][1], [inp.weight, inp.bias])
    _update(inp, got, "adam-step1", "triton", state=state, grad_scale=1.0, need_input_grad=True)
    assert not inp.weight.isfinite().all()
