"""Cross-op concerns of torch.ops.fastdni: registration (schemas, kernels, torch.library.opcheck), the
backend switch of the Python wrappers, the torch.optim bridge, a whole layer step chained through the
three layer ops on each backend, and the batch of no rows (every op, sg_predict included)."""
from __future__ import annotations

import pytest
import torch

from fastdni import contract
import fastdni.ops as ops
import fastdni.ops.api as api
from fastdni.ops.schema import NAMESPACE, SCHEMAS
from op_cases import (
    ACTIVATIONS, ADAM, BACKEND_PARAMS, OP_DTYPES, SGD_MOMENTUM, Case, assert_all_close, case_id, clone_sg,
    forward_op_args, indexed_names, make_bn_inputs, make_inputs, make_state, reference_forward, regression_op_args, requires_cpu,
    sg_names, update_op_args,
)

OPS = torch.ops.fastdni
pytestmark = pytest.mark.usefixtures("single_thread")
OP_NAMES = tuple(SCHEMAS)


# --- registration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OP_NAMES)
def test_schema_is_registered(name):
    op = getattr(OPS, name).default
    assert str(op._schema) == f"{NAMESPACE}::{SCHEMAS[name]}"
    # The ops ending in _ mutate their parameters and state, and say so in the schema.
    assert op._schema.is_mutable == name.endswith("_")


@pytest.mark.parametrize("name", OP_NAMES)
def test_kernels_are_registered(name):
    qualified = f"{NAMESPACE}::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeExplicitAutograd")  # the reference
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU") == ops.HAS_CPU_KERNELS


# --- the op contract (fastdni/contract.py) and its C++ mirror ------------------------------------------------

def test_sg_parameter_layout_joins_and_splits():
    sg = make_inputs(Case(sg="mlp2", context="labels64")).sg
    joined = contract.join_sg_params(sg.weights, sg.biases, sg.context_weight)
    assert [t.shape for t in joined] == [t.shape for t in ops.ordered_params(sg)]
    weights, biases, context_weight = contract.split_sg_params(joined, len(sg.weights))
    assert list(weights) == list(sg.weights) and list(biases) == list(sg.biases) and context_weight is sg.context_weight
    assert contract.split_sg_params(joined[:-1], len(sg.weights))[2] is None
    with pytest.raises(ValueError, match="^params: expected 6 or 7 entries, got 8"):
        contract.split_sg_params([*joined, joined[0]], len(sg.weights))


def test_state_splits_per_parameter_and_checks_its_count():
    assert contract.split_state(list(range(6)), 3, 2) == [[0, 1], [2, 3], [4, 5]]
    assert contract.split_state([], 2, 0) == [[], []]
    with pytest.raises(ValueError, match="^state: expected 4 tensors for 2 parameters, got 3"):
        contract.split_state([0, 1, 2], 2, 2)


@requires_cpu
def test_the_cpp_activations_are_the_contracts():
    """op_args.h's parse_activation lists the names of contract.ACTIVATIONS, in their order (their codes)."""
    inp = make_inputs(Case(dtype=torch.float32, sg=None))
    with pytest.raises(RuntimeError, match=r"activation: expected one of (.*), got 'swish'") as error:
        OPS.dni_forward(inp.x, inp.weight, inp.bias, [], [], None, None, "swish")
    listed = str(error.value).split("expected one of ")[1].split(", got")[0]
    assert tuple(listed.split(", ")) == contract.ACTIVATIONS


def _forward_args(case, requires_grad):
    inp = make_inputs(case)
    args = forward_op_args(inp)
    if requires_grad:
        grad = lambda t: None if t is None else t.requires_grad_()  # noqa: E731
        args = (grad(args[0]), grad(args[1]), grad(args[2]), [grad(w) for w in args[3]], [grad(b) for b in args[4]],
                grad(args[5]), *args[6:])
    return args


OPCHECK_FORWARD = [
    (Case(dtype=dtype, activation="gelu", sg="mlp2", context="labels32"), True) for dtype in OP_DTYPES
] + [
    (Case(dtype=dtype, activation="relu", sg="linear", context="float"), False) for dtype in OP_DTYPES
] + [
    (Case(dtype=dtype, activation="tanh", sg=None), True) for dtype in OP_DTYPES
]


@requires_cpu
@pytest.mark.parametrize("case,requires_grad", OPCHECK_FORWARD,
                         ids=[f"{case_id(c)}-{'grad' if g else 'nograd'}" for c, g in OPCHECK_FORWARD])
def test_opcheck_dni_forward(case, requires_grad):
    torch.library.opcheck(OPS.dni_forward.default, _forward_args(case, requires_grad))


OPCHECK_UPDATE = [
    (Case(dtype=dtype, activation="gelu", sg="linear"), ADAM, True) for dtype in OP_DTYPES
] + [
    (Case(dtype=dtype, activation="relu", sg="mlp1"), SGD_MOMENTUM, False) for dtype in OP_DTYPES
]


@requires_cpu
@pytest.mark.parametrize("case,optimizer,need_input_grad", OPCHECK_UPDATE,
                         ids=[f"{case_id(c)}-{o[0]}" for c, o, _ in OPCHECK_UPDATE])
def test_opcheck_dni_update(case, optimizer, need_input_grad):
    inp = make_inputs(case)
    state = make_state(*optimizer, [inp.weight, inp.bias])  # fresh tensors: opcheck runs the op several times
    args = update_op_args(inp, reference_forward(inp), *optimizer, state, grad_scale=2.0, need_input_grad=need_input_grad)
    torch.library.opcheck(OPS.dni_update_.default, args)


OPCHECK_REGRESSION = [
    (Case(dtype=dtype, sg="mlp2", context="labels64"), ADAM) for dtype in OP_DTYPES
] + [
    (Case(dtype=dtype, sg="linear", context="float"), SGD_MOMENTUM) for dtype in OP_DTYPES
]


@requires_cpu
@pytest.mark.parametrize("case,optimizer", OPCHECK_REGRESSION, ids=[f"{case_id(c)}-{o[0]}" for c, o in OPCHECK_REGRESSION])
def test_opcheck_sg_regression(case, optimizer):
    inp = make_inputs(case)
    state = make_state(*optimizer, ops.ordered_params(inp.sg))
    args = regression_op_args(inp, reference_forward(inp), *optimizer, state, target_scale=2.0, loss_weight=0.5)
    torch.library.opcheck(OPS.sg_regression_.default, args)


# --- the backend switch ------------------------------------------------------------------------------------

def _state_like(params):
    """Adam state for ``params``, on their device (meta included)."""
    cpu = [torch.zeros(p.shape, dtype=p.dtype) for p in params]
    return [s.to(params[0].device) for s in make_state(*ADAM, cpu)]


def _bn_inputs(inp):
    """BatchNorm inputs on ``inp``'s device and dtype, shaped by its layer: ``(pre, gamma, beta, mean, var, prediction)``."""
    bn = make_bn_inputs(inp.x.dtype, inp.x.shape[0], inp.weight.shape[0])
    return [t.to(inp.x.device) for t in (bn.pre, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.prediction)]


def _call(name, inp, backend):
    """One wrapper call on copies; returns every tensor it produced or updated."""
    if name == "batch_norm_act":
        pre, weight, bias, mean, var, _ = _bn_inputs(inp)
        return list(ops.batch_norm_act(pre, weight, bias, mean, var, activation=inp.activation, backend=backend))
    if name == "batch_norm_act_update_":
        pre, weight, bias, mean, var, prediction = _bn_inputs(inp)
        forward = ops.BatchNormResult(pre, pre, mean, mean, var)  # any [B, N], [N] of the right kinds will do
        state = _state_like([weight, bias])
        grad_pre = ops.batch_norm_act_update_(weight, bias, forward, prediction, *ADAM, state, activation=inp.activation,
                                              backend=backend)
        return [grad_pre, weight, bias, *state]
    if name == "dni_forward":
        f = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend=backend)
        return [f.h, f.pre, f.prediction, *f.sg_hidden]
    if name == "sg_predict":  # on the layer's input as the SG's h (any [B, N] will do): x is [B, K], K != N
        h = inp.x.new_ones(inp.x.shape[0], inp.weight.shape[0]) if inp.x.device.type == "meta" else reference_forward(inp).h
        p = ops.sg_predict(h, inp.sg, inp.context, backend=backend)
        return [p.prediction, *p.sg_hidden]
    forward = reference_forward(inp) if inp.x.device.type == "cpu" else ops.ForwardResult(
        inp.x.new_empty(inp.x.shape[0], inp.weight.shape[0]), inp.x.new_empty(0),
        inp.x.new_empty(inp.x.shape[0], inp.weight.shape[0]), [inp.x.new_empty(inp.x.shape[0], w.shape[0])
                                                               for w in inp.sg.weights[:-1]])
    if name == "dni_update_":
        weight, bias = inp.weight.clone(), inp.bias.clone()
        state = _state_like([weight, bias])
        dx = ops.dni_update_(inp.x, weight, bias, forward, *ADAM, state, activation=inp.activation,
                             need_input_grad=True, backend=backend)
        return [weight, bias, *state, dx]
    sg = clone_sg(inp.sg)
    state = _state_like(ops.ordered_params(sg))
    loss = ops.sg_regression_(forward, inp.target, sg, *ADAM, state, inp.context, backend=backend)
    return [loss, *ops.ordered_params(sg), *state]


def _meta(inp):
    for field in ("x", "weight", "bias", "target"):
        setattr(inp, field, getattr(inp, field).to("meta"))
    inp.sg = inp.sg._replace(weights=tuple(w.to("meta") for w in inp.sg.weights),
                             biases=tuple(b.to("meta") for b in inp.sg.biases))
    return inp


@pytest.mark.parametrize("name", OP_NAMES)
def test_unknown_backend_is_rejected(name):
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1"))
    with pytest.raises(ValueError, match=r"^backend: expected one of .*, got 'vulkan'"):  # "cuda" is one now
        _call(name, inp, "vulkan")


@requires_cpu
@pytest.mark.parametrize("name", OP_NAMES)
def test_cpu_backend_rejects_tensors_on_another_device(name):
    inp = _meta(make_inputs(Case(dtype=torch.float32, sg="mlp1")))
    with pytest.raises(ValueError, match=r"^backend\b.*meta"):
        _call(name, inp, "cpu")


@pytest.mark.parametrize("name", OP_NAMES)
def test_cpu_backend_without_the_extension_is_an_error(name, monkeypatch):
    monkeypatch.setattr(api, "HAS_CPU_KERNELS", False)
    inp = make_inputs(Case(dtype=torch.float32, sg="mlp1"))
    with pytest.raises(RuntimeError, match=r"^backend\b.*fastdni\._C"):
        _call(name, inp, "cpu")


@pytest.mark.parametrize("name", OP_NAMES)
def test_auto_backend_on_cpu_tensors(name):
    """"auto" is torch.ops.fastdni: the C++ kernel where it is built (bitwise), else the reference."""
    case = Case(dtype=torch.float32, activation="gelu", sg="mlp1", context="labels64")
    auto = _call(name, make_inputs(case), "auto")
    explicit = _call(name, make_inputs(case), "cpu" if ops.HAS_CPU_KERNELS else "reference")
    assert len(auto) == len(explicit)
    for a, e in zip(auto, explicit):
        assert torch.equal(a, e)


# --- the torch.optim bridge --------------------------------------------------------------------------------------

def test_fused_optimizer_args_rejects_unsupported_optimizers():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"^optimizer\b.*amsgrad"):
        ops.fused_optimizer_args(torch.optim.Adam(params, amsgrad=True), params)
    with pytest.raises(TypeError, match=r"^optimizer\b.*RMSprop"):
        ops.fused_optimizer_args(torch.optim.RMSprop(params), params)
    other = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"^optimizer\b"):
        ops.fused_optimizer_args(torch.optim.SGD(params, lr=0.1), other)


@pytest.mark.parametrize("cls,expected", [(torch.optim.Adam, 0.0), (torch.optim.AdamW, 1.0)])
def test_fused_optimizer_args_reads_adam_hyperparameters(cls, expected):
    params = [torch.zeros(3), torch.zeros(2)]
    opt = cls(params, lr=0.5, betas=(0.7, 0.8), eps=1e-4, weight_decay=0.25)
    for step in (1, 2):
        name, hyper, state = ops.fused_optimizer_args(opt, params)
        assert name == "adam" and hyper == [0.5, 0.7, 0.8, 1e-4, 0.25, expected, float(step)]
        assert [s.shape for s in state] == [(3,), (3,), (2,), (2,)]
        ops.advance(opt, params)


def test_fused_optimizer_args_reads_sgd_hyperparameters():
    params = [torch.zeros(3), torch.zeros(2)]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01)
    assert ops.fused_optimizer_args(opt, params)[:2] == ("sgd", [0.5, 0.9, 0.1, 0.01, 0.0, 1.0])
    assert ops.fused_optimizer_args(opt, params)[1][-1] == 0.0  # the buffers exist now: not the first step
    plain = torch.optim.SGD(params, lr=0.5)
    assert ops.fused_optimizer_args(plain, params)[2] == []


# --- one layer step through the three ops ----------------------------------------------------------------

def _layer_step(inp, backend):
    """forward, then the layer's update on the SG's prediction (returning dx), then the SG's regression."""
    weight, bias, sg = inp.weight.clone(), inp.bias.clone(), clone_sg(inp.sg)
    layer_state = make_state(*ADAM, [weight, bias])
    sg_state = make_state(*SGD_MOMENTUM, ops.ordered_params(sg), seed=2)
    f = ops.dni_forward(inp.x, weight, bias, sg, inp.context, activation=inp.activation, backend=backend)
    dx = ops.dni_update_(inp.x, weight, bias, f, *ADAM, layer_state, grad_scale=4.0, activation=inp.activation,
                         need_input_grad=True, backend=backend)
    loss = ops.sg_regression_(f, inp.target, sg, *SGD_MOMENTUM, sg_state, inp.context, target_scale=2.0,
                              loss_weight=0.5, backend=backend)
    outputs = [f.h, f.pre, f.prediction, *f.sg_hidden, weight, bias, *layer_state, dx, loss, *ops.ordered_params(sg),
               *sg_state]
    names = ["h", "pre", "prediction", *indexed_names("sg_hidden", len(f.sg_hidden)), "weight", "bias",
             *indexed_names("layer_state", len(layer_state)), "dx", "loss", *sg_names(sg), *indexed_names("sg_state", len(sg_state))]
    return outputs, names


CHAIN_CASES = [
    Case(dtype=dtype, activation=act, sg=sg, context=ctx)
    for dtype in OP_DTYPES
    for act in ACTIVATIONS
    for sg, ctx in [("linear", "none"), ("mlp1", "labels64"), ("mlp2", "float")]
]


@requires_cpu
@pytest.mark.parametrize("case", CHAIN_CASES, ids=case_id)
def test_layer_step_cpu_matches_reference(case):
    expected, names = _layer_step(make_inputs(case), "reference")
    actual, _ = _layer_step(make_inputs(case), "cpu")
    assert_all_close(actual, expected, names)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layer_step_propagates_nan_in_x(backend, activation):
    """NaN in x[0, 0] reaches row 0 of h and of the prediction, every entry of the updated weight and the
    SG's loss, without an exception."""
    inp = make_inputs(Case(dtype=torch.float32, activation=activation, sg="mlp1", context="labels64"))
    inp.x[0, 0] = float("nan")
    outputs, names = _layer_step(inp, backend)
    got = dict(zip(names, outputs))
    assert torch.isnan(got["h"][0]).all(), f"h[0] = {got['h'][0].tolist()}"
    assert torch.isnan(got["prediction"][0]).all(), f"prediction[0] = {got['prediction'][0].tolist()}"
    assert torch.isnan(got["weight"]).all(), f"{int(torch.isnan(got['weight']).sum())} of {got['weight'].numel()} NaN"
    assert torch.isnan(got["loss"])


# --- a batch of no rows ------------------------------------------------------------------------------------

def _no_rows(inp):
    """The inputs and a forward result cut to 0 rows (weights kept)."""
    forward = reference_forward(inp)
    inp.x, inp.target = inp.x[:0], inp.target[:0]
    if inp.context is not None:
        inp.context = inp.context[:0]
    forward = ops.ForwardResult(forward.h[:0], forward.pre[:0] if forward.pre.numel() else forward.pre,
                                forward.prediction[:0], [z[:0] for z in forward.sg_hidden])
    return inp, forward


# The BatchNorm ops need 2 rows (batch statistics): tests/ops/test_batch_norm_act.py tests 0 and 1 on every backend.
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", [name for name in OP_NAMES if not name.startswith("batch_norm_act")])
def test_a_batch_of_no_rows_is_rejected_by_every_backend(name, backend):
    """One behaviour everywhere: a clear error naming the batch (no ZeroDivisionError, no NaN loss), from the
    wrappers of every backend and from the raw op (C++ or the reference implementation)."""
    inp, forward = _no_rows(make_inputs(Case(dtype=torch.float64, sg="mlp1", context="labels")))
    arg = "h" if name in ("sg_predict", "sg_regression_") else "x"
    message = rf"^{arg}: expected a batch of at least 1 row, got shape \(0, "
    state = _state_like([inp.weight, inp.bias]) if name == "dni_update_" else _state_like(ops.ordered_params(inp.sg))
    with pytest.raises(ValueError, match=message):
        if name == "dni_forward":
            ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, backend=backend)
        elif name == "sg_predict":
            ops.sg_predict(forward.h, inp.sg, inp.context, backend=backend)
        elif name == "dni_update_":
            ops.dni_update_(inp.x, inp.weight.clone(), inp.bias.clone(), forward, *ADAM, state, backend=backend)
        else:
            ops.sg_regression_(forward, inp.target, clone_sg(inp.sg), *ADAM, state, inp.context,
                               backend=backend)
    raw = {"dni_forward": lambda: forward_op_args(inp),
           "sg_predict": lambda: (forward.h, list(inp.sg.weights), list(inp.sg.biases), inp.sg.context_weight, inp.context),
           "dni_update_": lambda: update_op_args(inp, forward, *ADAM, state),
           "sg_regression_": lambda: regression_op_args(inp, forward, *ADAM, state)}[name]()
    with pytest.raises((RuntimeError, ValueError), match=rf"{arg}: expected a batch of at least 1 row"):
        getattr(OPS, name)(*raw)
