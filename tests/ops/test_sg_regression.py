"""torch.ops.fastdni.sg_regression_: the C++ CPU backend against the reference (SG shapes, contexts,
optimizers, tiled shapes), against autograd + torch.optim over several steps, determinism of the label
path, argument checks (wrapper and raw op), strided inputs and non-finite values."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdni.ops as ops
from fastdni.ops import ForwardResult
from fastdni.reference import SGParams, sg_forward
from op_cases import (
    ADAM, ARG_ERRORS, CONTEXT_BAD_INPUTS, BACKEND_PARAMS, CONTEXTS, DTYPE_IDS, META_DEVICE_SKIP, OP_DTYPES, SG_SHAPES,
    TORCH_OPTIMIZER_STEPS, TORCH_OPTIMIZERS, Case, assert_all_close, assert_states_match, at_thread_counts, case_id,
    clone_all, clone_sg, indexed_names, make_inputs, make_state, noncontiguous, num_threads, optimizer_pair,
    prepare_step, raw_op_pattern, reference_forward, requires_cpu, set_field, set_first_label, set_forward, set_sg, sg_names,
    sg_params,
)

OPS = torch.ops.fastdni
pytestmark = pytest.mark.usefixtures("single_thread")
TARGET_SCALE, LOSS_WEIGHT = 2.0, 0.5


def _run(inp, forward, optimizer, hyper, state, backend, *, target_scale=TARGET_SCALE, loss_weight=LOSS_WEIGHT):
    """The wrapper on copies of the SG parameters and state; returns (loss, sg, state)."""
    sg, state = clone_sg(inp.sg), clone_all(state)
    loss = ops.sg_regression_(forward, inp.target, sg, optimizer, hyper, state, inp.context,
                              target_scale=target_scale, loss_weight=loss_weight, backend=backend)
    return loss, sg, state


def _prepare(case, optimizer_key):
    """(inp, forward, optimizer, hyper, state) with a random state for the SG's parameters."""
    return prepare_step(case, optimizer_key, sg_params)


def _assert_results_close(actual, expected, **overrides):
    """Two :func:`_run` results agree tensor by tensor: loss, SG parameters and state."""
    (loss_a, sg_a, state_a), (loss_e, sg_e, state_e) = actual, expected
    names = ["loss", *sg_names(sg_e), *indexed_names("state", len(state_e))]
    assert_all_close([loss_a, *ops.ordered_params(sg_a), *state_a], [loss_e, *ops.ordered_params(sg_e), *state_e], names,
                     **overrides)


def _compare(case, optimizer_key):
    inp, forward, optimizer, hyper, state = _prepare(case, optimizer_key)
    expected = _run(inp, forward, optimizer, hyper, state, "reference")
    actual = _run(inp, forward, optimizer, hyper, state, "cpu")
    assert actual[0].shape == () and actual[0].dtype == case.dtype
    _assert_results_close(actual, expected)


COMPARE_OPTIMIZERS = ["adam-step1", "adam-l2-step3", "adamw-step7", "sgd", "sgd-momentum-first", "sgd-dampening",
                      "sgd-nesterov"]


@requires_cpu
@pytest.mark.parametrize("optimizer_key", COMPARE_OPTIMIZERS)
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("sg", SG_SHAPES)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_cpu_matches_reference(dtype, sg, context, optimizer_key):
    _compare(Case(dtype=dtype, activation="tanh", sg=sg, context=context), optimizer_key)


# Wide SG weights (csrc/cpu/grad_step.cpp forms a weight gradient in panels of ~256 KiB of whole rows, at least one
# per thread, where it would spill the last-level cache and B <= 128): N = 520 features and a 72-wide hidden layer
# give W_1 [72, 520], W_2 [520, 72] and, with 600 float context features, U [72, 600].
TILED_CASES = [
    Case(dtype=dtype, activation="relu", sg="mlp1", context=context, batch=8, in_features=12, features=520, classes=600,
         sg_hidden=(72,))
    for dtype in OP_DTYPES
    for context in ("float", "labels64")
]


@requires_cpu
@pytest.mark.parametrize("optimizer_key", ["adam-l2-step3", "sgd-nesterov"])
@pytest.mark.parametrize("case", TILED_CASES, ids=case_id)
def test_cpu_matches_reference_tiled(case, optimizer_key):
    _compare(case, optimizer_key)


@requires_cpu
@pytest.mark.parametrize("case", TILED_CASES[:2], ids=case_id)
def test_tiles_split_across_threads(case):
    """Two threads share the tiles (each with its own scratch tile): the single-threaded result."""
    inp, forward, optimizer, hyper, state = _prepare(case, "adam-l2-step3")
    expected, actual = at_thread_counts(lambda: _run(inp, forward, optimizer, hyper, state, "cpu"), 1, 2)
    _assert_results_close(actual, expected)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_labels_equal_one_hot_context(backend):
    """Stepping U on the label scatter == stepping it on the one-hot GEMM gradient."""
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, sg="mlp2", context="labels32"),
                                                     "adam-l2-step3")
    by_labels = _run(inp, forward, optimizer, hyper, state, backend)
    inp.context = torch.nn.functional.one_hot(inp.context.long(), inp.sg.context_weight.shape[1]).double()
    by_one_hot = _run(inp, forward, optimizer, hyper, state, backend)
    _assert_results_close(by_labels, by_one_hot)


@requires_cpu
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_label_path_is_bitwise_deterministic(dtype):
    """Many rows per class and a U wide enough to be split across threads: still the same bits every run."""
    inp, forward, optimizer, hyper, state = _prepare(
        Case(dtype=dtype, sg="mlp1", context="labels64", batch=256, features=20, classes=10, sg_hidden=(130,)),
        "adam-l2-step3")
    with num_threads(2):
        first = _run(inp, forward, optimizer, hyper, state, "cpu")
        runs = [_run(inp, forward, optimizer, hyper, state, "cpu") for _ in range(2)]
    for again in runs:
        assert torch.equal(again[0], first[0])
        for a, b, name in zip(ops.ordered_params(again[1]) + again[2], ops.ordered_params(first[1]) + first[2],
                              sg_names(first[1]) + indexed_names("state", len(first[2]))):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_value_and_zero_target_scale(backend):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, sg="linear"), "sgd")
    loss, _, _ = _run(inp, forward, optimizer, hyper, state, backend, target_scale=0.0, loss_weight=3.0)
    expected = 3.0 * (forward.prediction ** 2).sum() / inp.x.shape[0]
    assert_all_close([loss], [expected], ["loss"])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_updates_in_place(backend):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float32, sg="mlp2", context="float"), "adam-step1")
    sg, state = clone_sg(inp.sg), clone_all(state)
    tensors = ops.ordered_params(sg) + state
    pointers = [t.data_ptr() for t in tensors]
    ops.sg_regression_(forward, inp.target, sg, optimizer, hyper, state, inp.context, backend=backend)
    assert [t.data_ptr() for t in tensors] == pointers
    for new, old, name in zip(ops.ordered_params(sg), ops.ordered_params(inp.sg), sg_names(sg)):
        assert not torch.equal(new, old), f"{name} was not updated"


# --- against autograd + torch.optim, several steps ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("context", ["labels64", "float"])
@pytest.mark.parametrize("optimizer_name", TORCH_OPTIMIZERS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=DTYPE_IDS.get)
def test_matches_torch_optim_over_steps(dtype, optimizer_name, context, backend):
    """fused_optimizer_args + sg_regression_ + advance == autograd on the SG loss + torch.optim's step."""
    case = Case(dtype=dtype, activation="relu", sg="mlp1", context=context, batch=7, in_features=9, features=6)
    inp = make_inputs(case)
    sg = clone_sg(inp.sg)
    params = ops.ordered_params(sg)
    fused, leaves, oracle = optimizer_pair(optimizer_name, params)
    n = len(sg.weights)
    sg_t = SGParams(tuple(leaves[0:2 * n:2]), tuple(leaves[1:2 * n:2]), leaves[2 * n])
    gen = torch.Generator().manual_seed(13)
    for step in range(TORCH_OPTIMIZER_STEPS):
        x = torch.randn(case.batch, case.in_features, generator=gen, dtype=dtype)
        target = torch.randn(case.batch, case.features, generator=gen, dtype=dtype)
        forward = ops.dni_forward(x, inp.weight, inp.bias, sg, inp.context, activation="relu", backend=backend)
        optimizer, hyper, state = ops.fused_optimizer_args(fused, params)
        loss = ops.sg_regression_(forward, target, sg, optimizer, hyper, state, inp.context,
                                  target_scale=TARGET_SCALE, loss_weight=LOSS_WEIGHT, backend=backend)
        ops.advance(fused, params)

        oracle.zero_grad()
        prediction = sg_forward(forward.h, sg_t, inp.context)[-1]
        loss_t = LOSS_WEIGHT * ((prediction - TARGET_SCALE * target) ** 2).sum() / case.batch
        loss_t.backward()
        oracle.step()

        names = [f"step {step}: {n}" for n in ["loss", *sg_names(sg)]]
        assert_all_close([loss, *params], [loss_t.detach(), *(t.detach() for t in leaves)], names)
        assert_states_match(fused, params, oracle, leaves, step)


# --- strided inputs: read-only arguments may be views, updated ones may not ---------------------------------

STRIDED = ["h", "sg_hidden", "prediction", "target", "context", "all"]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("context", ["labels64", "float"])
@pytest.mark.parametrize("which", STRIDED)
def test_noncontiguous_inputs_give_the_contiguous_result(backend, context, which):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, sg="mlp2", context=context), "adam-l2-step3")
    expected = _run(inp, forward, optimizer, hyper, state, backend)
    if which in ("h", "all"):
        forward = forward._replace(h=noncontiguous(forward.h))
    if which in ("sg_hidden", "all"):
        forward = forward._replace(sg_hidden=[noncontiguous(z) for z in forward.sg_hidden])
    if which in ("prediction", "all"):
        forward = forward._replace(prediction=noncontiguous(forward.prediction))
    if which in ("target", "all"):
        inp.target = noncontiguous(inp.target)
    if which in ("context", "all"):
        inp.context = noncontiguous(inp.context)
    _assert_results_close(_run(inp, forward, optimizer, hyper, state, backend), expected)


# --- bad arguments -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Args:
    h: torch.Tensor  #: the raw op's h; the wrapper gets it as forward.h
    forward: ForwardResult
    target: torch.Tensor
    sg: SGParams
    context: object
    optimizer: str
    hyper: list
    state: object = None  #: None: a valid state for the (mutated) SG, built after the mutation
    target_scale: float = TARGET_SCALE
    loss_weight: float = LOSS_WEIGHT


def _base_args(context="labels64"):
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1", context=context))
    forward = reference_forward(inp)
    optimizer, hyper = ADAM
    return Args(forward.h, forward, inp.target, inp.sg, inp.context, optimizer, list(hyper))


def _finish(args):
    if args.state is None:
        args.state = make_state(args.optimizer, args.hyper, ops.ordered_params(args.sg))
    return args


def _state(change):
    """Builds the state, then applies ``change`` to the list in place."""
    def mutate(a):
        _finish(a)
        change(a.state)
    return mutate


# id: (base context, mutation, wrapper message pattern, raw-op message pattern); None: not applicable there.
BAD_INPUTS = {
    "h-1d": ("labels64", set_field("h", lambda a: a.h[0]), r"^h\b", r"^h\b"),
    "h-int": ("labels64", set_field("h", lambda a: a.h.to(torch.int64)), r"^h\b", r"^h\b"),
    "prediction-shape": ("labels64", set_forward("prediction", lambda a: a.forward.prediction[:, :-1]),
                         r"^forward\.prediction\b", r"^prediction\b"),
    "target-shape": ("labels64", set_field("target", lambda a: a.target[:-1]), r"^target\b", r"^target\b"),
    "target-dtype": ("labels64", set_field("target", lambda a: a.target.double()), r"^target\b", r"^target\b"),
    "target-device": ("labels64", set_field("target", lambda a: a.target.to("meta")), r"^target\b", None),
    "sg-weight-shape": ("labels64", set_sg("weights", 0, lambda a: torch.randn(7, a.h.shape[1] + 1)),
                        r"^params\.weights\[0\]", r"^sg_weights\b"),
    "sg-bias-shape": ("labels64", set_sg("biases", 1, lambda a: torch.randn(a.h.shape[1] + 1)), r"^params\.biases\[1\]",
                      r"^sg_biases\b"),
    "sg-weight-dtype": ("labels64", set_sg("weights", 1, lambda a: a.sg.weights[1].double()), r"^params\.weights\[1\]",
                        r"^sg_weights\b"),
    "sg-hidden-count": ("labels64", set_forward("sg_hidden", lambda a: []), r"^forward\.sg_hidden\b", r"^sg_hidden\b"),
    # The wrapper counts forward.sg_hidden but does not check their shapes.
    "sg-hidden-shape": ("labels64", set_forward("sg_hidden", lambda a: [torch.rand(a.h.shape[0], 8)]),
                        r"^forward\.sg_hidden\b", r"^sg_hidden\b"),
    # The raw op must validate integer labels (dtype and range) as dni_forward's kernel does.
    "labels-dtype": ("labels64", set_field("context", lambda a: a.context.to(torch.uint8)), r"^context\b", r"^context\b"),
    "labels-shape": ("labels64", set_field("context", lambda a: a.context[:-1]), r"^context\b", r"^context\b"),
    # Raw op: out-of-range labels index outside dU; tested in a subprocess (test_raw_op_rejects_out_of_range_labels).
    "labels-out-of-range": ("labels64", set_first_label(Case().classes), r"^context\b", None),
    "labels-negative": ("labels32", set_first_label(-1), r"^context\b", None),
    **CONTEXT_BAD_INPUTS,
    "sg-weight-noncontiguous": ("labels64", set_sg("weights", 0, lambda a: noncontiguous(a.sg.weights[0])),
                                r"^sg params\[0\]", r"^sg_weights\b"),
    "sg-bias-noncontiguous": ("labels64", set_sg("biases", 0, lambda a: noncontiguous(a.sg.biases[0])),
                              r"^sg params\[1\]", r"^sg_biases\b"),
    "context-weight-noncontiguous": ("float", set_sg("context_weight", None, lambda a: noncontiguous(a.sg.context_weight)),
                                     r"^sg params\[4\]", r"^context_weight\b"),
    "state-noncontiguous": ("labels64", _state(lambda s: s.__setitem__(3, noncontiguous(s[3]))), r"^state\[3\]",
                            r"^state\b"),
    "state-count": ("labels64", _state(lambda s: s.pop()), r"^state\b", r"^state\b"),
    "state-shape": ("labels64", _state(lambda s: s.__setitem__(0, s[2])), r"^state\[0\]", r"^state\[0\]"),
    "optimizer-name": ("labels64", set_field("optimizer", "adamw"), r"^optimizer\b", r"^optimizer\b"),
    "hyper-length": ("labels64", set_field("hyper", lambda a: a.hyper[:-1]), r"^hyper\b", r"^hyper\b"),
    "loss-weight": ("labels64", set_field("loss_weight", 0.0), r"^loss_weight\b", r"^loss_weight\b"),
    "target-scale": ("labels64", set_field("target_scale", -1.0), r"^target_scale\b", None),
}


def _bad_args(key):
    context, mutate, _, _ = BAD_INPUTS[key]
    args = _base_args(context)
    mutate(args)
    return _finish(args)


def _call_wrapper(a, backend):
    # The wrapper reads h from forward; a mutated a.h (the raw op's own argument) goes there.
    return ops.sg_regression_(a.forward._replace(h=a.h), a.target, a.sg, a.optimizer, a.hyper, a.state, a.context,
                              target_scale=a.target_scale, loss_weight=a.loss_weight, backend=backend)


def _call_raw(a):
    return OPS.sg_regression_(a.h, list(a.forward.sg_hidden), a.forward.prediction, a.target, list(a.sg.weights),
                              list(a.sg.biases), a.sg.context_weight, a.context, a.state, a.optimizer,
                              [float(v) for v in a.hyper], a.target_scale, a.loss_weight)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_wrapper_rejects_bad_argument(key, backend):
    a = _bad_args(key)
    with pytest.raises(ARG_ERRORS, match=BAD_INPUTS[key][2]):
        _call_wrapper(a, backend)


@requires_cpu
@pytest.mark.parametrize("key", BAD_INPUTS)
def test_raw_op_rejects_bad_argument(key):
    pattern = raw_op_pattern(BAD_INPUTS[key][3], {
        "target-device": META_DEVICE_SKIP,
        "target-scale": "the raw op takes any target_scale; only the wrapper restricts it to >= 0",
    }.get(key, "tested in a subprocess: test_raw_op_rejects_out_of_range_labels"))
    a = _bad_args(key)
    with pytest.raises(RuntimeError, match=pattern):
        _call_raw(a)


_OUT_OF_RANGE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from op_cases import ADAM, Case, make_inputs, make_state, reference_forward, regression_op_args
    import fastdni.ops as ops
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1", context="labels64"))
    forward = reference_forward(inp)
    inp.context[0] = {label}
    state = make_state(*ADAM, ops.ordered_params(inp.sg))
    try:
        torch.ops.fastdni.sg_regression_(*regression_op_args(inp, forward, *ADAM, state))
    except ValueError as error:
        print("RAISED", str(error).splitlines()[0])
    else:
        print("ACCEPTED")
""")


@requires_cpu
@pytest.mark.parametrize("label", [Case().classes, -1])
def test_raw_op_rejects_out_of_range_labels(label):
    """In a subprocess: a label outside [0, classes) makes dU[:, y] index outside U's gradient buffer."""
    script = _OUT_OF_RANGE_SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)), label=label)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    out = run.stdout.strip().splitlines()
    assert run.returncode == 0 and out, f"the subprocess died (rc {run.returncode}): {run.stderr[-2000:]}"
    assert out[-1].startswith("RAISED context"), (
        f"torch.ops.fastdni.sg_regression_ with label {label} (classes: {Case().classes}): {out[-1]}; expected a "
        "ValueError naming context (the CPU kernel scatters into dU[:, label] without a range check)")


# --- non-finite inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("context", ["labels64", "float"])
def test_inf_target_gives_non_finite_loss(backend, context):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float32, sg="mlp1", context=context), "adam-step1")
    inp.target[2, 1] = float("inf")
    loss, sg, state = _run(inp, forward, optimizer, hyper, state, backend)
    assert not torch.isfinite(loss)
    assert not torch.isfinite(sg.weights[-1]).all()


@requires_cpu
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("field", ["h", "target"])
def test_non_finite_input_matches_reference(field, value):
    inp, forward, optimizer, hyper, state = _prepare(Case(dtype=torch.float64, sg="mlp1", context="labels64"),
                                                     "sgd-momentum")
    if field == "h":
        h = forward.h.clone()
        h[1, 0] = value
        forward = forward._replace(h=h)
    else:
        inp.target[1, 0] = value
    expected = _run(inp, forward, optimizer, hyper, state, "reference")
    actual = _run(inp, forward, optimizer, hyper, state, "cpu")
    if field == "target":
        assert not torch.isfinite(actual[0])
    else:  # the prediction was formed before h went bad: a finite loss, non-finite dW_1 = g_1^T h
        assert torch.isfinite(actual[0]) and not torch.isfinite(actual[1].weights[0]).all()
    _assert_results_close(actual, expected, equal_nan=True)
