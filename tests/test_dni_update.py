"""torch.ops.fastdni.dni_update_: the C++ CPU backend against the reference (every optimizer variant,
tiled shapes), against torch.optim over several steps, argument checks (wrapper and raw op), strided
inputs and NaN propagation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdni.ops as ops
from fastdni.ops import ForwardResult
from fastdni.reference import layer_backward
from op_cases import (
    ACTIVATIONS,
    ADAM,
    ARG_ERRORS,
    BACKEND_PARAMS,
    DTYPE_IDS,
    OP_DTYPES,
    OPTIMIZERS,
    TORCH_OPTIMIZER_STEPS,
    TORCH_OPTIMIZERS,
    Case,
    assert_all_close,
    case_id,
    clone_all,
    make_inputs,
    make_state,
    make_torch_optimizer,
    noncontiguous,
    num_threads,
    optimizer_states,
    reference_forward,
    requires_cpu,
    update_op_args,
)

OPS = torch.ops.fastdni
pytestmark = pytest.mark.usefixtures("single_thread")
GRAD_SCALE = 4.0


def _run(inp, forward, optimizer, hyper, state, backend, *, need_input_grad=True, grad_scale=GRAD_SCALE):
    """The wrapper on copies of the parameters and state; returns (weight, bias, state, dx)."""
    weight, bias, state = inp.weight.clone(), inp.bias.clone(), clone_all(state)
    dx = ops.dni_update_(inp.x, weight, bias, forward, optimizer, hyper, state, grad_scale=grad_scale,
                         activation=inp.activation, need_input_grad=need_input_grad, backend=backend)
    return weight, bias, state, dx


def _prepare(case, optimizer_key):
    inp = make_inputs(case)
    optimizer, hyper = OPTIMIZERS[optimizer_key]
    return inp, reference_forward(inp), optimizer, hyper, make_state(optimizer, hyper, [inp.weight, inp.bias])


def _compare(case, optimizer_key, need_input_grad):
    inp, forward, optimizer, hyper, state = _prepare(case, optimizer_key)
    expected = _run(inp, forward, optimizer, hyper, state, "reference", need_input_grad=need_input_grad)
    actual = _run(inp, forward, optimizer, hyper, state, "cpu", need_input_grad=need_input_grad)
    names = ["weight", "bias", *(f"state[{i}]" for i in range(len(state)))]
    assert_all_close([actual[0], actual[1], *actual[2]], [expected[0], expected[1], *expected[2]], names)
    if need_input_grad:
        assert_all_close([actual[3]], [expected[3]], ["dx"])
    else:
        assert actual[3] is None and expected[3] is None


@requires_cpu
@pytest.mark.parametrize("need_input_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("optimizer_key", OPTIMIZERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_cpu_matches_reference(dtype, activation, optimizer_key, need_input_grad):
    _compare(Case(dtype=dtype, activation=activation, sg="linear"), optimizer_key, need_input_grad)


# dW is formed tile by tile of ~64 KiB of whole weight rows, at least one tile per thread
# (csrc/cpu/fused_step.cpp): fp32 with K = 1030 gives tiles of 15 rows, fp64 with K = 600 of 13, so
# N = 70 rows make 5 or 6 tiles, the last one partial: several per thread on 1 thread (the suite's
# default here) and on 2 (test_tiled_result_does_not_depend_on_thread_count).
TILED_CASES = [
    Case(dtype=torch.float32, activation="gelu", sg="linear", batch=8, in_features=1030, features=70),
    Case(dtype=torch.float64, activation="relu", sg="linear", batch=8, in_features=600, features=70),
]


@requires_cpu
@pytest.mark.parametrize("optimizer_key", ["adam-l2-step3", "adamw-step7", "sgd-wd-first", "sgd-nesterov"])
@pytest.mark.parametrize("case", TILED_CASES, ids=case_id)
def test_cpu_matches_reference_tiled(case, optimizer_key):
    _compare(case, optimizer_key, need_input_grad=True)


@requires_cpu
@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_result_does_not_depend_on_thread_count(threads):
    """The tiles split across threads (each with its own scratch tile) give the single-threaded result."""
    inp, forward, optimizer, hyper, state = _prepare(TILED_CASES[0], "adam-l2-step3")
    with num_threads(1):
        expected = _run(inp, forward, optimizer, hyper, state, "cpu")
    with num_threads(threads):
        actual = _run(inp, forward, optimizer, hyper, state, "cpu")
    names = ["weight", "bias", *(f"state[{i}]" for i in range(len(state))), "dx"]
    assert_all_close([actual[0], actual[1], *actual[2], actual[3]], [expected[0], expected[1], *expected[2], expected[3]],
                     names)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_updates_in_place_and_dx_uses_the_pre_update_weight(backend):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, activation="tanh", sg="mlp1"),
                                                     "sgd-momentum")
    weight, bias, state = inp.weight.clone(), inp.bias.clone(), clone_all(state)
    pointers = [t.data_ptr() for t in (weight, bias, *state)]
    dx = ops.dni_update_(inp.x, weight, bias, forward, optimizer, hyper, state, grad_scale=GRAD_SCALE,
                         activation="tanh", need_input_grad=True, backend=backend)
    assert [t.data_ptr() for t in (weight, bias, *state)] == pointers
    assert not torch.equal(weight, inp.weight) and not torch.equal(bias, inp.bias)
    delta = forward.prediction / GRAD_SCALE * (1 - forward.h ** 2)
    assert_all_close([dx], [delta @ inp.weight], ["dx"])


@requires_cpu
def test_raw_op_returns_empty_without_input_grad():
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float32), "adam-step1")
    out = OPS.dni_update_(*update_op_args(inp, forward, optimizer, hyper, clone_all(state), need_input_grad=False))
    assert out.numel() == 0 and out.dtype == torch.float32


# --- against torch.optim, several steps ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("optimizer_name", TORCH_OPTIMIZERS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_matches_torch_optim_over_steps(dtype, optimizer_name, activation, backend):
    """fused_optimizer_args + dni_update_ + advance == layer_backward + torch.optim's step, step by step."""
    case = Case(dtype=dtype, activation=activation, sg="linear", batch=7, in_features=9, features=6)
    inp = make_inputs(case)
    weight, bias = inp.weight.clone(), inp.bias.clone()
    fused = make_torch_optimizer(optimizer_name, [weight, bias])
    weight_t, bias_t = inp.weight.clone().requires_grad_(), inp.bias.clone().requires_grad_()
    oracle = make_torch_optimizer(optimizer_name, [weight_t, bias_t])
    gen = torch.Generator().manual_seed(11)
    for step in range(TORCH_OPTIMIZER_STEPS):
        x = torch.randn(case.batch, case.in_features, generator=gen, dtype=dtype)
        forward = ops.dni_forward(x, weight, bias, inp.sg, activation=activation, backend=backend)
        optimizer, hyper, state = ops.fused_optimizer_args(fused, [weight, bias])
        dx = ops.dni_update_(x, weight, bias, forward, optimizer, hyper, state, grad_scale=GRAD_SCALE,
                             activation=activation, need_input_grad=True, backend=backend)
        ops.advance(fused, [weight, bias])

        with torch.no_grad():
            pre = x @ weight_t.T + bias_t
        grads = layer_backward(x, weight_t.detach(), pre, forward.prediction / GRAD_SCALE, activation)
        weight_t.grad, bias_t.grad = grads.weight, grads.bias
        oracle.step()

        names = [f"step {step}: {n}" for n in ("weight", "bias", "dx")]
        assert_all_close([weight, bias, dx], [weight_t.detach(), bias_t.detach(), grads.input], names)
        expected_state = optimizer_states(oracle, [weight_t, bias_t])
        assert_all_close(optimizer_states(fused, [weight, bias]), expected_state,
                         [f"step {step}: state[{i}]" for i in range(len(expected_state))])
    if isinstance(fused, torch.optim.Adam):
        assert fused.state[weight]["step"] == oracle.state[weight_t]["step"] == TORCH_OPTIMIZER_STEPS


# --- strided inputs: read-only arguments may be views, updated ones may not -------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("which", ["x", "x-transposed", "h", "pre", "prediction", "all"])
def test_noncontiguous_inputs_give_the_contiguous_result(backend, which):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, activation="gelu", sg="mlp1"), "adam-l2-step3")
    expected = _run(inp, forward, optimizer, hyper, state, backend)
    if which in ("x", "all"):
        inp.x = noncontiguous(inp.x)
    if which == "x-transposed":
        inp.x = inp.x.t().contiguous().t()
    for field in ("h", "pre", "prediction"):
        if which in (field, "all"):
            forward = forward._replace(**{field: noncontiguous(getattr(forward, field))})
    actual = _run(inp, forward, optimizer, hyper, state, backend)
    names = ["weight", "bias", *(f"state[{i}]" for i in range(len(state)))]
    assert_all_close([actual[0], actual[1], *actual[2], actual[3]], [expected[0], expected[1], *expected[2], expected[3]],
                     names + ["dx"])


# --- bad arguments -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Args:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    forward: ForwardResult
    optimizer: str
    hyper: list
    state: list
    grad_scale: float = GRAD_SCALE
    activation: str = "gelu"


def _base_args():
    inp = make_inputs(Case(dtype=torch.float32, activation="gelu", sg="linear"))
    optimizer, hyper = ADAM
    return Args(inp.x, inp.weight, inp.bias, reference_forward(inp), optimizer, list(hyper),
                make_state(optimizer, hyper, [inp.weight, inp.bias]))


def _fwd(field, value):
    def mutate(a):
        a.forward = a.forward._replace(**{field: value(a)})
    return mutate


def _set(name, value):
    def mutate(a):
        setattr(a, name, value(a) if callable(value) else value)
    return mutate


def _state(index, value):
    def mutate(a):
        a.state[index] = value(a)
    return mutate


def _sgd(hyper, name="sgd"):
    """SGD (or another optimizer name) with ``hyper`` and no state tensors."""
    def mutate(a):
        a.optimizer, a.hyper, a.state = name, list(hyper), []
    return mutate


# id: (mutation, wrapper message pattern, raw-op message pattern); None: not applicable there.
BAD_INPUTS = {
    "x-1d": (_set("x", lambda a: a.x[0]), r"^x\b", r"^x\b"),
    "x-int": (_set("x", lambda a: a.x.to(torch.int32)), r"^x\b", r"^x\b"),
    "weight-shape": (_set("weight", lambda a: torch.randn(a.weight.shape[0], a.weight.shape[1] + 1)), r"^weight\b",
                     r"^weight\b"),
    "bias-shape": (_set("bias", lambda a: torch.randn(a.bias.shape[0] + 1)), r"^bias\b", r"^bias\b"),
    "weight-dtype": (_set("weight", lambda a: a.weight.double()), r"^weight\b", r"^weight\b"),
    "weight-device": (_set("weight", lambda a: a.weight.to("meta")), r"^weight\b", None),
    "h-shape": (_fwd("h", lambda a: a.forward.h[:, :-1]), r"^forward\.h\b", r"^h\b"),
    "h-dtype": (_fwd("h", lambda a: a.forward.h.double()), r"^forward\.h\b", r"^h\b"),
    "prediction-shape": (_fwd("prediction", lambda a: a.forward.prediction[:-1]), r"^forward\.prediction\b",
                         r"^prediction\b"),
    "prediction-missing": (_fwd("prediction", lambda a: a.x.new_empty(0)), r"^forward\.prediction\b", r"^prediction\b"),
    # The wrapper must check forward.pre where the activation needs it (gelu), as it checks h and prediction.
    "pre-missing": (_fwd("pre", lambda a: a.x.new_empty(0)), r"^(forward\.)?pre\b", r"^pre\b"),
    "pre-shape": (_fwd("pre", lambda a: a.forward.pre[:, :-1]), r"^(forward\.)?pre\b", r"^pre\b"),
    "weight-noncontiguous": (_set("weight", lambda a: noncontiguous(a.weight)), r"^params\[0\]", r"^weight\b"),
    "bias-noncontiguous": (_set("bias", lambda a: noncontiguous(a.bias)), r"^params\[1\]", r"^bias\b"),
    "state-noncontiguous": (_state(1, lambda a: noncontiguous(a.state[1])), r"^state\[1\]", r"^state\b"),
    "state-count": (_set("state", lambda a: a.state[:-1]), r"^state\b", r"^state\b"),
    "state-count-sgd": (_sgd([0.1, 0.9, 0.0, 0.0, 0.0, 0.0]), r"^state\b", r"^state\b"),
    "state-shape": (_state(2, lambda a: torch.zeros(a.bias.shape[0] + 1)), r"^state\[2\]", r"^state\[2\]"),
    "state-dtype": (_state(0, lambda a: a.state[0].double()), r"^state\[0\]", r"^state\[0\]"),
    # An unknown name with Adam-shaped hyper and state: the error must name the optimizer, not the state count.
    "optimizer-name": (_set("optimizer", "adamw"), r"^optimizer\b", r"^optimizer\b"),
    "optimizer-name-stateless": (_sgd([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], name="rmsprop"), r"^optimizer\b",
                                 r"^optimizer\b"),
    "hyper-length": (_set("hyper", lambda a: a.hyper[:-1]), r"^hyper\b", r"^hyper\b"),
    "hyper-length-sgd": (_sgd([0.1]), r"^hyper\b", r"^hyper\b"),
    # A ValueError whichever backend runs (the reference's adam_update raises one; the kernel a RuntimeError).
    "adam-step-0": (lambda a: a.hyper.__setitem__(6, 0.0), r"^(hyper|step)\b", r"^hyper\b"),
    "grad-scale": (_set("grad_scale", 0.0), r"^grad_scale\b", r"^grad_scale\b"),
    "activation": (_set("activation", "swish"), r"^activation\b", r"^activation\b"),
}


def _bad_args(key):
    args = _base_args()
    BAD_INPUTS[key][0](args)
    return args


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_wrapper_rejects_bad_argument(key, backend):
    a = _bad_args(key)
    with pytest.raises(ARG_ERRORS, match=BAD_INPUTS[key][1]):
        ops.dni_update_(a.x, a.weight, a.bias, a.forward, a.optimizer, a.hyper, a.state, grad_scale=a.grad_scale,
                        activation=a.activation, need_input_grad=True, backend=backend)


@requires_cpu
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_raw_op_rejects_bad_argument(key):
    pattern = BAD_INPUTS[key][2]
    if pattern is None:
        pytest.skip("a CPU/meta mix is dispatched to the Meta (fake) kernel, as for torch's own ops (torch.mm "
                    "included), so the kernel's device check is not reachable on a CPU-only machine")
    a = _bad_args(key)
    with pytest.raises(RuntimeError, match=pattern):
        OPS.dni_update_(a.x, a.weight, a.bias, a.forward.h, a.forward.pre, a.forward.prediction, a.state, a.optimizer,
                        [float(v) for v in a.hyper], a.grad_scale, a.activation, True)


# --- non-finite inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("optimizer_key", ["adam-l2-step3", "sgd-momentum"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_in_x_reaches_every_weight(backend, activation, optimizer_key):
    """NaN in x[0, 0]: row 0 of h, of the prediction and so of delta is NaN, so every entry of
    dW = delta^T x and db is; no exception. (The forward is the reference's, to test this op alone;
    test_ops_registration chains the backends' own forward.)"""
    inp, _, optimizer, hyper, state = _prepare(Case(dtype=torch.float32, activation=activation, sg="linear"), optimizer_key)
    inp.x[0, 0] = float("nan")
    forward = reference_forward(inp)
    weight, bias, state, dx = _run(inp, forward, optimizer, hyper, state, backend)
    assert torch.isnan(weight).all(), f"{int(torch.isnan(weight).sum())} of {weight.numel()} weights are NaN"
    assert torch.isnan(bias).all() and torch.isnan(state[0]).all()
    assert torch.isnan(dx[0]).all() and torch.isfinite(dx[1:]).all()


@requires_cpu
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_prediction_matches_reference(value):
    """A non-finite synthetic gradient: both backends give the same NaN/inf pattern (equal_nan)."""
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, activation="tanh", sg="linear"),
                                                     "sgd-momentum")
    prediction = forward.prediction.clone()
    prediction[1, 2] = value
    forward = forward._replace(prediction=prediction)
    expected = _run(inp, forward, optimizer, hyper, state, "reference")
    actual = _run(inp, forward, optimizer, hyper, state, "cpu")
    assert not torch.isfinite(actual[0]).all()
    assert_all_close([actual[0], actual[1], *actual[2], actual[3]], [expected[0], expected[1], *expected[2], expected[3]],
                     ["weight", "bias", "state[0]", "state[1]", "dx"], equal_nan=True)
