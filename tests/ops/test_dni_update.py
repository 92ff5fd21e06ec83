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
    ACTIVATIONS, ADAM, ARG_ERRORS, BACKEND_PARAMS, DTYPE_IDS, OP_DTYPES, OPTIMIZERS, TORCH_OPTIMIZER_STEPS,
    TORCH_OPTIMIZERS, Case, assert_all_close, assert_states_match, at_thread_counts, case_id, clone_all,
    indexed_names, layer_params, make_inputs, make_state, noncontiguous, optimizer_pair, prepare_step,
    raw_op_pattern, reference_forward, requires_cpu, set_field, set_forward, update_op_args,
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
    """(inp, forward, optimizer, hyper, state) with a random state for the layer's weight and bias."""
    return prepare_step(case, optimizer_key, layer_params)


def _assert_results_close(actual, expected, **overrides):
    """Two :func:`_run` results agree tensor by tensor: weight, bias, state and dx (empty where none was asked)."""
    def flat(result):
        weight, bias, state, dx = result
        return [weight, bias, *state, dx]

    names = ["weight", "bias", *indexed_names("state", len(expected[2])), "dx"]
    assert_all_close(flat(actual), flat(expected), names, **overrides)


def _compare(case, optimizer_key, need_input_grad):
    inp, forward, optimizer, hyper, state = _prepare(case, optimizer_key)
    expected = _run(inp, forward, optimizer, hyper, state, "reference", need_input_grad=need_input_grad)
    actual = _run(inp, forward, optimizer, hyper, state, "cpu", need_input_grad=need_input_grad)
    if not need_input_grad:
        assert actual[3].shape == (0,) and expected[3].shape == (0,)  # the op's empty tensor, on both backends
    _assert_results_close(actual, expected)


@requires_cpu
@pytest.mark.parametrize("need_input_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("optimizer_key", OPTIMIZERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_cpu_matches_reference(dtype, activation, optimizer_key, need_input_grad):
    _compare(Case(dtype=dtype, activation=activation, sg="linear"), optimizer_key, need_input_grad)


# Wide weights: csrc/cpu/grad_step.cpp forms dW in panels of ~256 KiB of whole weight rows (at least one per thread)
# where dW would spill the last-level cache and B <= 128, else with one GEMM; N = 70 rows give a partial last panel.
# Checked on 1 thread (the suite's default here) and on 2 (test_tiled_result_does_not_depend_on_thread_count).
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
    expected, actual = at_thread_counts(lambda: _run(inp, forward, optimizer, hyper, state, "cpu"), 1, threads)
    _assert_results_close(actual, expected)


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


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_wrapper_returns_what_the_op_returns_without_input_grad(backend):
    """The wrapper and the op agree: without ``need_input_grad`` both return an empty tensor of ``x``'s dtype."""
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64), "adam-step1")
    *_, dx = _run(inp, forward, optimizer, hyper, state, backend, need_input_grad=False)
    assert isinstance(dx, torch.Tensor) and dx.shape == (0,) and dx.dtype == torch.float64 and dx.device == inp.x.device


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
    fused, (weight_t, bias_t), oracle = optimizer_pair(optimizer_name, [weight, bias])
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
        assert_states_match(fused, [weight, bias], oracle, [weight_t, bias_t], step)
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
    _assert_results_close(_run(inp, forward, optimizer, hyper, state, backend), expected)


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


def _state(index, value):
    """Replaces ``a.state[index]`` by ``value(a)``."""
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
    "x-1d": (set_field("x", lambda a: a.x[0]), r"^x\b", r"^x\b"),
    "x-int": (set_field("x", lambda a: a.x.to(torch.int32)), r"^x\b", r"^x\b"),
    "weight-shape": (set_field("weight", lambda a: torch.randn(a.weight.shape[0], a.weight.shape[1] + 1)), r"^weight\b",
                     r"^weight\b"),
    "bias-shape": (set_field("bias", lambda a: torch.randn(a.bias.shape[0] + 1)), r"^bias\b", r"^bias\b"),
    "weight-dtype": (set_field("weight", lambda a: a.weight.double()), r"^weight\b", r"^weight\b"),
    "weight-device": (set_field("weight", lambda a: a.weight.to("meta")), r"^weight\b", None),
    "h-shape": (set_forward("h", lambda a: a.forward.h[:, :-1]), r"^forward\.h\b", r"^h\b"),
    "h-dtype": (set_forward("h", lambda a: a.forward.h.double()), r"^forward\.h\b", r"^h\b"),
    "prediction-shape": (set_forward("prediction", lambda a: a.forward.prediction[:-1]), r"^forward\.prediction\b",
                         r"^prediction\b"),
    "prediction-missing": (set_forward("prediction", lambda a: a.x.new_empty(0)), r"^forward\.prediction\b", r"^prediction\b"),
    # The wrapper must check forward.pre where the activation needs it (gelu), as it checks h and prediction.
    "pre-missing": (set_forward("pre", lambda a: a.x.new_empty(0)), r"^(forward\.)?pre\b", r"^pre\b"),
    "pre-shape": (set_forward("pre", lambda a: a.forward.pre[:, :-1]), r"^(forward\.)?pre\b", r"^pre\b"),
    "weight-noncontiguous": (set_field("weight", lambda a: noncontiguous(a.weight)), r"^params\[0\]", r"^weight\b"),
    "bias-noncontiguous": (set_field("bias", lambda a: noncontiguous(a.bias)), r"^params\[1\]", r"^bias\b"),
    "state-noncontiguous": (_state(1, lambda a: noncontiguous(a.state[1])), r"^state\[1\]", r"^state\b"),
    "state-count": (set_field("state", lambda a: a.state[:-1]), r"^state\b", r"^state\b"),
    "state-count-sgd": (_sgd([0.1, 0.9, 0.0, 0.0, 0.0, 0.0]), r"^state\b", r"^state\b"),
    "state-shape": (_state(2, lambda a: torch.zeros(a.bias.shape[0] + 1)), r"^state\[2\]", r"^state\[2\]"),
    "state-dtype": (_state(0, lambda a: a.state[0].double()), r"^state\[0\]", r"^state\[0\]"),
    # An unknown name with Adam-shaped hyper and state: the error must name the optimizer, not the state count.
    "optimizer-name": (set_field("optimizer", "adamw"), r"^optimizer\b", r"^optimizer\b"),
    "optimizer-name-stateless": (_sgd([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], name="rmsprop"), r"^optimizer\b",
                                 r"^optimizer\b"),
    "hyper-length": (set_field("hyper", lambda a: a.hyper[:-1]), r"^hyper\b", r"^hyper\b"),
    "hyper-length-sgd": (_sgd([0.1]), r"^hyper\b", r"^hyper\b"),
    # A ValueError whichever backend runs (the reference's adam_update raises one; the kernel a RuntimeError).
    "adam-step-0": (lambda a: a.hyper.__setitem__(6, 0.0), r"^(hyper|step)\b", r"^hyper\b"),
    # fastdni.contract.check_hyper and the C++ parse_optimizer: the same checks, the same messages.
    "adam-step-fractional": (lambda a: a.hyper.__setitem__(6, 1.5), r"^hyper: Adam's step must be an integer",
                             r"^hyper: Adam's step must be an integer"),
    "lr-negative": (lambda a: a.hyper.__setitem__(0, -0.1), r"^hyper: lr must be >= 0", r"^hyper: lr must be >= 0"),
    "grad-scale": (set_field("grad_scale", 0.0), r"^grad_scale\b", r"^grad_scale\b"),
    "activation": (set_field("activation", "swish"), r"^activation\b", r"^activation\b"),
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
    pattern = raw_op_pattern(BAD_INPUTS[key][2])
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
    _assert_results_close(actual, expected, equal_nan=True)
