"""torch.ops.fastdni.dni_forward: the C++ CPU backend against the reference, its autograd formula
(fp64 gradcheck), argument checks (Python wrapper and raw op), strided inputs and NaN propagation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdni.ops as ops
from fastdni.reference import NEEDS_PRE, context_term
from op_cases import (
    ACTIVATIONS, ARG_ERRORS, BACKEND_PARAMS, CONTEXTS, DTYPE_IDS, OP_DTYPES, SG_SHAPES, Case, assert_all_close,
    case_id, forward_op_args, indexed_names, make_inputs, noncontiguous, num_threads, raw_op_pattern, requires_cpu,
    set_field, set_sg,
)

OPS = torch.ops.fastdni
pytestmark = pytest.mark.usefixtures("single_thread")


def _run(inp, backend):
    return ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend=backend)


def _flat(result):
    return [result.h, result.pre, result.prediction, *result.sg_hidden]


def _names(result):
    return ["h", "pre", "prediction", *indexed_names("sg_hidden", len(result.sg_hidden))]


COMPARE_CASES = [
    Case(dtype=dtype, activation=act, sg=sg, context=ctx)
    for dtype in OP_DTYPES
    for act in ACTIVATIONS
    for sg, ctx in [(None, "none")] + [(sg, ctx) for sg in SG_SHAPES for ctx in CONTEXTS]
]
# Wide layers (K > 512, N > 64) and a wide SG with labels: several GEMM blocks and parallel chunks.
LARGE_CASES = [
    Case(dtype=dtype, activation=act, sg="mlp1", context="labels64", batch=8, in_features=1030, features=70,
         classes=11, sg_hidden=(130,))
    for dtype in OP_DTYPES
    for act in ("relu", "gelu")
]


@requires_cpu
@pytest.mark.parametrize("case", COMPARE_CASES + LARGE_CASES, ids=case_id)
def test_cpu_matches_reference(case):
    inp = make_inputs(case)
    expected = _run(inp, "reference")
    actual = _run(inp, "cpu")
    B, N = case.batch, case.features
    assert actual.h.shape == (B, N)
    assert actual.pre.shape == ((B, N) if case.activation in NEEDS_PRE else (0,))
    assert actual.prediction.shape == ((B, N) if case.sg else (0,))
    assert [t.shape for t in actual.sg_hidden] == [(B, w) for w in (case.hidden if case.sg else ())]
    assert all(t.dtype == case.dtype for t in _flat(actual))
    assert_all_close(_flat(actual), _flat(expected), _names(expected))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("labels", ["labels64", "labels32"])
def test_labels_equal_one_hot_context(backend, dtype, labels):
    """The label gather is the one-hot GEMM: ``U[:, y]^T == onehot(y) U^T``."""
    inp = make_inputs(Case(dtype=dtype, sg="mlp1", context=labels))
    by_labels = _run(inp, backend)
    inp.context = torch.nn.functional.one_hot(inp.context.long(), inp.sg.context_weight.shape[1]).to(dtype)
    by_one_hot = _run(inp, backend)
    assert_all_close(_flat(by_labels), _flat(by_one_hot), _names(by_one_hot))


@requires_cpu
def test_labels_forward_is_deterministic():
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1", context="labels64", batch=256, features=20, classes=10,
                           sg_hidden=(130,)))
    with num_threads(2):
        first, second = _run(inp, "cpu"), _run(inp, "cpu")
    for a, b, name in zip(_flat(first), _flat(second), _names(first)):
        assert torch.equal(a, b), name


# --- strided inputs: nothing is updated in place, so every input may be a view ----------------------------

def _make_strided(inp, which):
    if which == "x":
        inp.x = noncontiguous(inp.x)
    elif which == "x-transposed":
        inp.x = inp.x.t().contiguous().t()
    elif which == "weight":
        inp.weight = inp.weight.t().contiguous().t()
    elif which == "bias":
        inp.bias = noncontiguous(inp.bias)
    elif which == "sg_weights":
        inp.sg = inp.sg._replace(weights=tuple(noncontiguous(w) for w in inp.sg.weights))
    elif which == "sg_biases":
        inp.sg = inp.sg._replace(biases=tuple(noncontiguous(b) for b in inp.sg.biases))
    elif which == "context_weight":
        inp.sg = inp.sg._replace(context_weight=noncontiguous(inp.sg.context_weight))
    elif which == "context":
        inp.context = noncontiguous(inp.context)
    return inp


STRIDED = ["x", "x-transposed", "weight", "bias", "sg_weights", "sg_biases", "context_weight", "context"]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("context", ["labels64", "float"])
@pytest.mark.parametrize("which", STRIDED)
def test_noncontiguous_inputs_give_the_contiguous_result(backend, context, which):
    case = Case(dtype=torch.float64, activation="gelu", sg="mlp2", context=context)
    expected = _run(make_inputs(case), backend)
    actual = _run(_make_strided(make_inputs(case), which), backend)
    assert_all_close(_flat(actual), _flat(expected), _names(expected))


# --- autograd --------------------------------------------------------------------------------------------

GRAD_CASES = [
    Case(dtype=torch.float64, activation=act, sg=sg, context=ctx, batch=4, in_features=3, features=5, classes=2)
    for act in ("relu", "tanh", "gelu", "identity")
    for sg, ctx in [(None, "none"), ("linear", "float"), ("mlp1", "labels64"), ("mlp2", "none")]
]


def _kink_margin(inp):
    """The smallest |pre-activation| at a relu (the layer's, if relu, and the SG's hidden layers):
    gradcheck's finite differences are only valid away from relu's kink."""
    pre = inp.x @ inp.weight.T + inp.bias
    margins = [pre.abs().min()] if inp.activation == "relu" else []
    if inp.sg is not None:
        z = torch.tanh(pre) if inp.activation == "tanh" else _run(inp, "reference").h
        for i, (w, b) in enumerate(zip(inp.sg.weights[:-1], inp.sg.biases[:-1])):
            a = z @ w.T + b
            if i == 0 and inp.context is not None:
                a = a + context_term(inp.context, inp.sg.context_weight)
            margins.append(a.abs().min())
            z = torch.relu(a)
    return min(margins, default=torch.tensor(float("inf"))).item()


@requires_cpu
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradcheck(case):
    # The first seed (deterministically) whose inputs keep every relu input 1e-3 away from 0.
    inp = next((i for seed in range(20) if _kink_margin(i := make_inputs(dataclasses.replace(case, seed=seed))) > 1e-3),
               None)
    assert inp is not None, "no seed keeps the relu inputs away from the kink"
    sg = inp.sg
    n = len(sg.weights) if sg else 0
    leaves = [inp.x, inp.weight, inp.bias]
    if sg:
        leaves += [*sg.weights, *sg.biases] + ([sg.context_weight] if sg.context_weight is not None else [])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]

    def forward(*args):
        x, weight, bias = args[:3]
        sg_w, sg_b = list(args[3:3 + n]), list(args[3 + n:3 + 2 * n])
        u = args[3 + 2 * n] if len(args) > 3 + 2 * n else None
        h, _pre, prediction, _hidden = OPS.dni_forward(x, weight, bias, sg_w, sg_b, u, inp.context, inp.activation)
        return (h, prediction) if n else h

    assert torch.autograd.gradcheck(forward, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_cpu
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_saved_outputs_are_not_differentiable(activation):
    inp = make_inputs(Case(dtype=torch.float64, activation=activation, sg="mlp2", context="labels64"))
    for t in (inp.x, inp.weight, inp.bias, *inp.sg.weights, *inp.sg.biases, inp.sg.context_weight):
        t.requires_grad_()
    h, pre, prediction, hidden = OPS.dni_forward(*forward_op_args(inp))
    assert h.requires_grad and prediction.requires_grad
    assert not pre.requires_grad and not any(z.requires_grad for z in hidden)


@requires_cpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_reference_autograd(activation):
    """fp32: the registered backward (on the CPU kernel's outputs) against autograd through the reference."""
    case = Case(dtype=torch.float32, activation=activation, sg="mlp1", context="float", batch=9, in_features=33,
                features=17)
    grads = {}
    for backend in ("reference", "cpu"):
        inp = make_inputs(case)
        leaves = [inp.x, inp.weight, inp.bias, *inp.sg.weights, *inp.sg.biases, inp.sg.context_weight]
        for t in leaves:
            t.requires_grad_()
        out = _run(inp, backend)
        gen = torch.Generator().manual_seed(5)
        loss = (out.h * torch.randn(out.h.shape, generator=gen)).sum() + (out.prediction * torch.randn(
            out.prediction.shape, generator=gen)).sum()
        grads[backend] = torch.autograd.grad(loss, leaves)
    names = ["x", "weight", "bias", "sg.weights[0]", "sg.weights[1]", "sg.biases[0]", "sg.biases[1]", "context_weight"]
    assert_all_close(grads["cpu"], grads["reference"], names)


# --- bad arguments -----------------------------------------------------------------------------------------

FEATURES_, IN_, CLASSES_ = Case().features, Case().in_features, Case().classes

# id: (base context, mutation, wrapper message pattern, raw-op message pattern). A pattern of None: not
# applicable to that entry point. Each error must name its argument first.
BAD_INPUTS = {
    "x-1d": ("labels64", set_field("x", lambda i: i.x[0]), r"^x\b", r"^x\b"),
    "x-int": ("labels64", set_field("x", lambda i: i.x.to(torch.int64)), r"^x\b", r"^x\b"),
    "weight-shape": ("labels64", set_field("weight", lambda i: torch.randn(FEATURES_, IN_ + 1)), r"^weight\b", r"^weight\b"),
    "bias-shape": ("labels64", set_field("bias", lambda i: torch.randn(FEATURES_ + 1)), r"^bias\b", r"^bias\b"),
    "weight-dtype": ("labels64", set_field("weight", lambda i: i.weight.double()), r"^weight\b", r"^weight\b"),
    "bias-dtype": ("labels64", set_field("bias", lambda i: i.bias.double()), r"^bias\b", r"^bias\b"),
    "weight-device": ("labels64", set_field("weight", lambda i: i.weight.to("meta")), r"^weight\b", None),
    "sg-weight-shape": ("labels64", set_sg("weights", 0, lambda i: torch.randn(7, FEATURES_ + 1)),
                        r"^params\.weights\[0\]", r"^sg_weights\b"),
    "sg-output-shape": ("labels64", set_sg("weights", 1, lambda i: torch.randn(FEATURES_ + 1, 7)),
                        r"^params\.weights\[1\]", r"^sg_weights\b"),
    "sg-bias-shape": ("labels64", set_sg("biases", 0, lambda i: torch.randn(8)), r"^params\.biases\[0\]",
                      r"^sg_biases\b"),
    "sg-weight-dtype": ("labels64", set_sg("weights", 0, lambda i: i.sg.weights[0].double()),
                        r"^params\.weights\[0\]", r"^sg_weights\b"),
    "sg-bias-count": ("labels64", set_sg("biases", None, lambda i: i.sg.biases[:1]), r"^params\b", r"^sg_biases\b"),
    "activation": ("labels64", set_field("activation", "softplus"), r"^activation\b", r"^activation\b"),
    "labels-out-of-range": ("labels64", lambda i: i.context.__setitem__(0, CLASSES_), r"^context\b", r"^context\b"),
    "labels-negative": ("labels32", lambda i: i.context.__setitem__(0, -1), r"^context\b", r"^context\b"),
    "labels-dtype": ("labels64", set_field("context", lambda i: i.context.to(torch.uint8)), r"^context\b", r"^context\b"),
    "labels-shape": ("labels64", set_field("context", lambda i: i.context[:-1]), r"^context\b", r"^context\b"),
    "float-context-shape": ("float", set_field("context", lambda i: torch.randn(i.x.shape[0], CLASSES_ + 1)),
                            r"^context\b", r"^context\b"),
    "float-context-dtype": ("float", set_field("context", lambda i: i.context.double()), r"^context\b", r"^context\b"),
    "context-without-context-weight": ("float", set_sg("context_weight", None, lambda i: None), r"^context\b",
                                       r"^context\b"),
    "context-weight-without-context": ("float", set_field("context", None), r"^context\b", r"^context\b"),
    "context-weight-shape": ("float", set_sg("context_weight", None, lambda i: torch.randn(8, CLASSES_)),
                             r"^params\.context_weight\b", r"^context_weight\b"),
    # Without an SG model there is nothing to condition: the wrapper must say so for every backend (the
    # CPU kernel does, as a RuntimeError; the reference would silently ignore the context).
    "context-without-sg": ("float", set_field("sg", None), r"^context\b", r"^context\b"),
}


def _bad_inputs(key):
    context, mutate, _, _ = BAD_INPUTS[key]
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1", context=context))
    mutate(inp)
    return inp


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_wrapper_rejects_bad_argument(key, backend):
    pattern = BAD_INPUTS[key][2]
    inp = _bad_inputs(key)
    with pytest.raises(ARG_ERRORS, match=pattern):
        _run(inp, backend)


@requires_cpu
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_raw_op_rejects_bad_argument(key):
    pattern = raw_op_pattern(BAD_INPUTS[key][3])
    args = forward_op_args(_bad_inputs(key))
    # A label out of range is a ValueError on every backend (fastdni.contract.check_label_range; TORCH_CHECK_VALUE)
    with pytest.raises(ValueError if key in ("labels-out-of-range", "labels-negative") else RuntimeError, match=pattern):
        OPS.dni_forward(*args)


# --- non-finite inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_in_x_propagates(backend, activation):
    """NaN in one row of x: NaN in that row of h (torch.relu(nan) is nan) and of the prediction, no exception."""
    inp = make_inputs(Case(dtype=torch.float32, activation=activation, sg="mlp1", context="labels64"))
    inp.x[0, 0] = float("nan")
    out = _run(inp, backend)
    assert torch.isnan(out.h[0]).all(), f"h[0] = {out.h[0].tolist()}: NaN in x did not reach h"
    assert torch.isnan(out.prediction[0]).all(), f"prediction[0] = {out.prediction[0].tolist()}"
    assert torch.isfinite(out.h[1:]).all() and torch.isfinite(out.prediction[1:]).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_inf_in_weight_gives_non_finite_h(backend):
    inp = make_inputs(Case(dtype=torch.float64, activation="identity", sg="linear"))
    inp.weight[1, 0] = float("inf")
    out = _run(inp, backend)
    assert not torch.isfinite(out.h[:, 1]).any()
    assert torch.isfinite(out.h[:, [0, 2, 3]]).all()
