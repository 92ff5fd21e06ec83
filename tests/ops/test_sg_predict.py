"""torch.ops.fastdni.sg_predict: the C++ CPU backend against the reference (SG shapes, contexts, odd and tiled
shapes, strided inputs), the same prediction as dni_forward's SG part, its autograd formula (fp64 gradcheck),
opcheck, its result as sg_regression_'s input, and the argument checks (wrapper and raw op). The batch of no
rows: tests/ops/test_ops_registration.py, with the other ops."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdni.ops as ops
from fastdni.reference import SGParams
from op_cases import (
    ADAM, ARG_ERRORS, CONTEXT_BAD_INPUTS, BACKEND_PARAMS, CONTEXTS, DTYPE_IDS, OP_DTYPES, SG_SHAPES, Case, assert_all_close, case_id,
    clone_all, clone_sg, indexed_names, make_inputs, make_state, noncontiguous, reference_forward, requires_cpu,
    set_field, set_first_label, set_sg, sg_names,
)

OPS = torch.ops.fastdni
pytestmark = pytest.mark.usefixtures("single_thread")


def _h(inp):
    """An activation for the SG to sit on: the layer's output of the case (any [B, N] would do)."""
    return reference_forward(inp).h


def _predict(h, inp, backend):
    """The wrapper's results as a list: prediction, then the hidden activations."""
    out = ops.sg_predict(h, inp.sg, inp.context, backend=backend)
    assert out.h is h
    return [out.prediction, *out.sg_hidden]


def _names(inp):
    return ["prediction", *indexed_names("sg_hidden", len(inp.sg.weights) - 1)]


def _compare(case):
    inp = make_inputs(case)
    h = _h(inp)
    expected = _predict(h, inp, "reference")
    actual = _predict(h, inp, "cpu")
    assert [t.shape for t in actual] == [t.shape for t in expected]
    assert all(t.dtype == case.dtype for t in actual)
    assert_all_close(actual, expected, _names(inp))


# Odd sizes: B, N and the hidden widths prime, none equal.
ODD = dict(batch=7, in_features=5, features=11, classes=3)


@requires_cpu
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("sg", SG_SHAPES)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_cpu_matches_reference(dtype, sg, context):
    _compare(Case(dtype=dtype, sg=sg, context=context, **ODD))


@requires_cpu
@pytest.mark.parametrize("case", [
    Case(dtype=dtype, sg="mlp1", context=context, batch=130, in_features=3, features=97, classes=600, sg_hidden=(67,))
    for dtype in OP_DTYPES for context in ("float", "labels64")
], ids=case_id)
def test_cpu_matches_reference_large(case):
    _compare(case)


@requires_cpu
def test_a_single_row():
    _compare(Case(dtype=torch.float64, sg="mlp2", context="labels32", batch=1))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("sg", SG_SHAPES)
def test_equals_dni_forwards_sg_part(sg, context, backend):
    """On the layer's own output, the prediction and hidden activations of dni_forward, to the bit (the same code)."""
    inp = make_inputs(Case(dtype=torch.float32, activation="tanh", sg=sg, context=context, **ODD))
    forward = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation="tanh", backend=backend)
    got = ops.sg_predict(forward.h, inp.sg, inp.context, backend=backend)
    for a, b, name in zip([got.prediction, *got.sg_hidden], [forward.prediction, *forward.sg_hidden], _names(inp),
                          strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("which", ["h", "h-transposed", "context", "weights", "all"])
@pytest.mark.parametrize("context", ["labels64", "float"])
def test_noncontiguous_inputs_give_the_contiguous_result(backend, context, which):
    inp = make_inputs(Case(dtype=torch.float64, sg="mlp2", context=context, **ODD))
    h = _h(inp)
    expected = _predict(h, inp, backend)
    if which in ("h", "all"):
        h = noncontiguous(h)
    if which == "h-transposed":
        h = h.T.contiguous().T
        assert not h.is_contiguous()
    if which in ("context", "all"):
        inp.context = noncontiguous(inp.context)
    if which in ("weights", "all"):  # read-only here: views are fine (the regression needs them contiguous)
        inp.sg = SGParams(tuple(noncontiguous(w) for w in inp.sg.weights), tuple(noncontiguous(b) for b in inp.sg.biases),
                          noncontiguous(inp.sg.context_weight))
    assert_all_close(_predict(h, inp, backend), expected, _names(inp))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("sg, context", [("linear", "none"), ("mlp1", "labels64"), ("mlp2", "float")])
def test_the_prediction_is_what_sg_regression_takes(backend, sg, context):
    """sg_predict then sg_regression_ on its result: the loss and the stepped parameters of the reference's chain."""
    inp = make_inputs(Case(dtype=torch.float64, sg=sg, context=context, **ODD))
    h = _h(inp)
    results = {}
    for run in ("reference", backend):
        sg_params, state = clone_sg(inp.sg), make_state(*ADAM, ops.ordered_params(inp.sg))
        predicted = ops.sg_predict(h, sg_params, inp.context, backend=run)
        loss = ops.sg_regression_(predicted, inp.target, sg_params, *ADAM, state, inp.context, target_scale=2.0,
                                  loss_weight=0.5, backend=run)
        results[run] = [loss, *ops.ordered_params(sg_params), *state]
    names = ["loss", *sg_names(inp.sg), *indexed_names("state", len(results["reference"]) - 1 - len(sg_names(inp.sg)))]
    assert_all_close(results[backend], results["reference"], names)


# --- autograd: the op's formula (registration.py), fp64 gradcheck ----------------------------------------------

def _differentiable(inp):
    """(h, weights..., biases..., U) as leaves, and a function of them giving the raw op's prediction and hidden."""
    sg = inp.sg
    leaves = [_h(inp).detach().clone(), *sg.weights, *sg.biases] + ([sg.context_weight] if sg.context_weight is not None else [])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    n = len(sg.weights)

    def fn(h, *params):
        u = params[2 * n] if len(params) > 2 * n else None
        prediction, hidden = OPS.sg_predict(h, list(params[:n]), list(params[n:2 * n]), u, inp.context)
        return prediction

    return fn, leaves


@pytest.mark.parametrize("sg, context", [("linear", "none"), ("linear", "labels64"), ("mlp1", "float"),
                                         ("mlp2", "labels32")])
def test_gradcheck(sg, context):
    """The registered backward against finite differences of the forward, in fp64: dh, dW_l, db_l, dU. The raw op
    runs the C++ kernel where it is built, else the reference (CompositeExplicitAutograd); the formula is the same."""
    inp = make_inputs(Case(dtype=torch.float64, sg=sg, context=context, batch=5, features=4, classes=3))
    fn, leaves = _differentiable(inp)
    assert torch.autograd.gradcheck(fn, leaves)


def test_the_gradient_through_the_sg_is_the_reference_backward():
    """The op's dh is sg_backward's (the formula the fused regression uses), on a float context and an MLP."""
    from fastdni.reference import sg_backward, sg_forward

    inp = make_inputs(Case(dtype=torch.float64, sg="mlp2", context="float", **ODD))
    fn, leaves = _differentiable(inp)
    grad_out = torch.randn(ODD["batch"], ODD["features"], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fn(*leaves).backward(grad_out)
    h = leaves[0].detach()
    z = sg_forward(h, inp.sg, inp.context)
    grads, dh = sg_backward(grad_out, z[:-1], inp.sg, inp.context, need_input_grad=True)
    assert_all_close([leaves[0].grad, *[t.grad for t in leaves[1:]]],
                     [dh, *grads.weights, *grads.biases, grads.context_weight], ["h", *sg_names(inp.sg)])


# --- opcheck ----------------------------------------------------------------------------------------------

OPCHECK = [(Case(dtype=dtype, sg=sg, context=context, **ODD), grad)
           for dtype in OP_DTYPES
           for sg, context in [("linear", "none"), ("mlp2", "labels32"), ("mlp1", "float")]
           for grad in (True, False)]


@pytest.mark.parametrize("case,requires_grad", OPCHECK, ids=[f"{case_id(c)}-{'grad' if g else 'nograd'}" for c, g in OPCHECK])
def test_opcheck(case, requires_grad):
    inp = make_inputs(case)
    sg = inp.sg
    args = [_h(inp), list(sg.weights), list(sg.biases), sg.context_weight, inp.context]
    if requires_grad:
        grad = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
        args = [grad(args[0]), [grad(w) for w in args[1]], [grad(b) for b in args[2]], grad(args[3]), args[4]]
    torch.library.opcheck(OPS.sg_predict.default, tuple(args))


# --- bad arguments -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Args:
    h: torch.Tensor
    sg: SGParams
    context: object


def _base_args(context):
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1", context=context, **ODD))
    return Args(_h(inp), inp.sg, inp.context)


# id: (base context, mutation, wrapper message pattern, raw-op message pattern)
BAD_INPUTS = {
    "h-1d": ("labels64", set_field("h", lambda a: a.h[0]), r"^h\b", r"^h\b"),
    "h-3d": ("labels64", set_field("h", lambda a: a.h[:, :, None]), r"^h\b", r"^h\b"),
    "h-int": ("labels64", set_field("h", lambda a: a.h.to(torch.int64)), r"^h\b", r"^h\b"),
    "no-sg-layers": ("none", set_sg("weights", None, lambda a: ()), r"^params\b", r"^sg_weights\b"),
    "bias-count": ("none", set_sg("biases", None, lambda a: a.sg.biases[:1]), r"^params\b", r"^sg_biases\b"),
    "sg-weight-shape": ("labels64", set_sg("weights", 0, lambda a: torch.randn(7, a.h.shape[1] + 1)),
                        r"^params\.weights\[0\]", r"^sg_weights\b"),
    "sg-output-width": ("labels64", set_sg("weights", 1, lambda a: torch.randn(a.h.shape[1] + 1, 7)),
                        r"^params\.weights\[1\]", r"^sg_weights\b"),
    "sg-bias-shape": ("labels64", set_sg("biases", 1, lambda a: torch.randn(a.h.shape[1] + 1)), r"^params\.biases\[1\]",
                      r"^sg_biases\b"),
    "sg-weight-dtype": ("labels64", set_sg("weights", 1, lambda a: a.sg.weights[1].double()), r"^params\.weights\[1\]",
                        r"^sg_weights\b"),
    "labels-dtype": ("labels64", set_field("context", lambda a: a.context.to(torch.uint8)), r"^context\b", r"^context\b"),
    "labels-shape": ("labels64", set_field("context", lambda a: a.context[:-1]), r"^context\b", r"^context\b"),
    "labels-out-of-range": ("labels64", set_first_label(Case().classes), r"^context\b", r"^context\b"),
    "labels-negative": ("labels32", set_first_label(-1), r"^context\b", r"^context\b"),
    **CONTEXT_BAD_INPUTS,
}


def _bad_args(key):
    context, mutate, _, _ = BAD_INPUTS[key]
    args = _base_args(context)
    mutate(args)
    return args


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_wrapper_rejects_bad_argument(key, backend):
    a = _bad_args(key)
    with pytest.raises(ARG_ERRORS, match=BAD_INPUTS[key][2]):
        ops.sg_predict(a.h, a.sg, a.context, backend=backend)


@requires_cpu
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_raw_op_rejects_bad_argument(key):
    a = _bad_args(key)
    # A label outside [0, classes) is a ValueError (TORCH_CHECK_VALUE, as the reference's); the rest RuntimeError.
    with pytest.raises((RuntimeError, ValueError), match=BAD_INPUTS[key][3]):
        OPS.sg_predict(a.h, list(a.sg.weights), list(a.sg.biases), a.sg.context_weight, a.context)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nan_in_h_reaches_its_row_only(backend):
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1", context="labels64", **ODD))
    h = _h(inp).clone()
    h[2, 3] = float("nan")
    prediction = ops.sg_predict(h, inp.sg, inp.context, backend=backend).prediction
    assert torch.isnan(prediction[2]).all()
    assert torch.isfinite(torch.cat([prediction[:2], prediction[3:]])).all()


def test_does_not_write_its_inputs():
    inp = make_inputs(Case(dtype=torch.float64, sg="mlp2", context="float", **ODD))
    h = _h(inp)
    before = clone_all([h, *ops.ordered_params(inp.sg), inp.context])
    for backend in ("reference", *(("cpu",) if ops.HAS_CPU_KERNELS else ())):
        ops.sg_predict(h, inp.sg, inp.context, backend=backend)
    for a, b in zip([h, *ops.ordered_params(inp.sg), inp.context], before):
        assert torch.equal(a, b)
