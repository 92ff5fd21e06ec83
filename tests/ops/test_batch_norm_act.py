"""batch_norm_act and batch_norm_act_update_ (the BatchNorm step of a DNI layer): the reference against
nn.BatchNorm1d + autograd, the cpu backend against the reference (odd shapes, strides, fp32/fp64, every
activation, both optimizers), running statistics, gradcheck, opcheck, and bad arguments (a batch of fewer than
2 rows included: the same error from every backend, wrapper and raw op)."""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from op_cases import (
    ACTIVATIONS, ADAM, BACKEND_PARAMS, OP_DTYPES, OP_TOLERANCES, OPTIMIZERS, SGD_MOMENTUM, TORCH_ACTIVATIONS, assert_all_close,
    at_thread_counts, make_bn_inputs, make_state, noncontiguous, requires_cpu, torch_batch_norm_act,
)

OPS = torch.ops.fastdni
pytestmark = pytest.mark.usefixtures("single_thread")
FP64 = OP_TOLERANCES[torch.float64]
SHAPES = [(3, 7), (2, 3), (37, 130)]  #: (B, N): odd, the smallest batch, a few column strips for the cpu's update
FORWARD_NAMES = ["h", "xhat", "invstd", "running_mean", "running_var"]


def _forward(inp, activation, backend, momentum=0.1, eps=1e-5):
    return ops.batch_norm_act(inp.pre, inp.weight, inp.bias, inp.running_mean, inp.running_var, momentum=momentum,
                              eps=eps, activation=activation, backend=backend)


def _update(inp, forward, activation, backend, optimizer=ADAM, grad_scale=3.0):
    weight, bias = inp.weight.clone(), inp.bias.clone()
    state = make_state(*optimizer, [weight, bias])
    grad_pre = ops.batch_norm_act_update_(weight, bias, forward, inp.prediction, *optimizer, state, grad_scale=grad_scale,
                                          activation=activation, backend=backend)
    return [grad_pre, weight, bias, *state]


# --- the reference is nn.BatchNorm1d + autograd --------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
def test_reference_forward_is_batch_norm_1d(activation, momentum):
    inp = make_bn_inputs(torch.float64)
    norm, want = torch_batch_norm_act(inp, activation, momentum=momentum, eps=1e-3)
    got = _forward(inp, activation, "reference", momentum=momentum, eps=1e-3)
    torch.testing.assert_close(got.h, want, **FP64)
    torch.testing.assert_close(got.running_mean, norm.running_mean, **FP64)
    torch.testing.assert_close(got.running_var, norm.running_var, **FP64)  # the unbiased batch variance
    var = inp.pre.var(0, unbiased=False)
    torch.testing.assert_close(got.invstd, (var + 1e-3).rsqrt(), **FP64)
    torch.testing.assert_close(got.xhat, (inp.pre - inp.pre.mean(0)) * got.invstd, **FP64)
    # functional: the given running statistics are not written
    assert torch.equal(inp.running_mean, make_bn_inputs(torch.float64).running_mean)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_update_is_autograd_then_the_optimizer(activation):
    """dpre, dgamma, dbeta of nn.BatchNorm1d + act under autograd; the step on them (plain SGD: ``-lr * grad``)."""
    inp = make_bn_inputs(torch.float64, batch=5)
    pre = inp.pre.clone().requires_grad_()
    norm, _ = torch_batch_norm_act(inp, activation)
    h = TORCH_ACTIVATIONS[activation](norm(pre))
    want_pre, want_w, want_b = torch.autograd.grad(h, (pre, norm.weight, norm.bias), inp.prediction / 3.0)
    got = _update(inp, _forward(inp, activation, "reference"), activation, "reference",
                  optimizer=("sgd", [0.1, 0.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(got[0], want_pre, **FP64)
    torch.testing.assert_close(got[1], inp.weight - 0.1 * want_w, **FP64)
    torch.testing.assert_close(got[2], inp.bias - 0.1 * want_b, **FP64)


# --- cpu against the reference -----------------------------------------------------------------------------

@requires_cpu
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}N{n}" for b, n in SHAPES])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_cpu_matches_reference(dtype, activation, shape, strided):
    inp = make_bn_inputs(dtype, *shape)
    if strided:  # every input through a non-contiguous view (the parameters are updated in place: contiguous)
        inp.pre, inp.prediction, inp.running_mean, inp.running_var = (
            noncontiguous(t) for t in (inp.pre, inp.prediction, inp.running_mean, inp.running_var))
    want = _forward(inp, activation, "reference")
    got = _forward(inp, activation, "cpu")
    assert_all_close(list(got), list(want), FORWARD_NAMES, **OP_TOLERANCES[dtype])
    xhat = noncontiguous(want.xhat) if strided else want.xhat
    forward = want._replace(xhat=xhat)
    for optimizer in (ADAM, SGD_MOMENTUM, OPTIMIZERS["sgd-nesterov-first"], OPTIMIZERS["adamw-step7"]):
        got = _update(inp, forward, activation, "cpu", optimizer)
        names = ["grad_pre", "weight", "bias", *[f"state{i}" for i in range(len(got) - 3)]]
        assert_all_close(got, _update(inp, forward, activation, "reference", optimizer), names, **OP_TOLERANCES[dtype])


@requires_cpu
def test_cpu_update_is_the_same_at_any_thread_count():
    inp = make_bn_inputs(torch.float64, 37, 300)
    forward = _forward(inp, "gelu", "cpu")
    first, *rest = at_thread_counts(lambda: _update(inp, forward, "gelu", "cpu"), 1, 2)
    for other in rest:
        for a, b in zip(first, other):
            assert torch.equal(a, b)  # column strips: each feature's sums in one thread, in row order


# --- autograd ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ["identity", "tanh", "gelu", "leaky_relu"])
def test_gradcheck(backend, activation):
    inp = make_bn_inputs(torch.float64, 4, 3)
    pre, weight, bias = (t.clone().requires_grad_() for t in (inp.pre, inp.weight, inp.bias))

    def fn(p, w, b):
        return ops.batch_norm_act(p, w, b, inp.running_mean, inp.running_var, activation=activation, backend=backend).h

    assert torch.autograd.gradcheck(fn, (pre, weight, bias))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backward_matches_batch_norm_1d(backend):
    """relu (not smooth at 0, so not in gradcheck): the formula against nn.BatchNorm1d's autograd."""
    inp = make_bn_inputs(torch.float64, 6, 5)
    pre = inp.pre.clone().requires_grad_()
    weight, bias = inp.weight.clone().requires_grad_(), inp.bias.clone().requires_grad_()
    h = ops.batch_norm_act(pre, weight, bias, inp.running_mean, inp.running_var, activation="relu", backend=backend).h
    got = torch.autograd.grad(h, (pre, weight, bias), inp.prediction)
    pre2 = inp.pre.clone().requires_grad_()
    norm, _ = torch_batch_norm_act(inp, "relu")
    want = torch.autograd.grad(torch.relu(norm(pre2)), (pre2, norm.weight, norm.bias), inp.prediction)
    assert_all_close(got, want, ["pre", "weight", "bias"], **FP64)


# --- opcheck ---------------------------------------------------------------------------------------------

@requires_cpu
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("activation,requires_grad", [("gelu", True), ("relu", False)])
def test_opcheck_batch_norm_act(dtype, activation, requires_grad):
    inp = make_bn_inputs(dtype)
    pre, weight, bias = (t.clone().requires_grad_(requires_grad) for t in (inp.pre, inp.weight, inp.bias))
    torch.library.opcheck(OPS.batch_norm_act.default,
                          (pre, weight, bias, inp.running_mean, inp.running_var, 0.1, 1e-5, activation))


@requires_cpu
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("optimizer,activation", [(ADAM, "gelu"), (SGD_MOMENTUM, "tanh")])
def test_opcheck_batch_norm_act_update(dtype, optimizer, activation):
    inp = make_bn_inputs(dtype)
    forward = _forward(inp, activation, "reference")
    state = make_state(*optimizer, [inp.weight, inp.bias])
    torch.library.opcheck(OPS.batch_norm_act_update_.default,
                          (forward.h, forward.xhat, forward.invstd, inp.prediction, inp.weight.clone(), inp.bias.clone(),
                           state, optimizer[0], optimizer[1], 2.0, activation))


# --- bad arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rows", [0, 1])
def test_fewer_than_two_rows_are_rejected_everywhere(backend, rows):
    """Batch statistics need 2 rows (the unbiased variance): one ValueError, wrappers and raw ops, every backend."""
    inp = make_bn_inputs(torch.float64)
    forward = _forward(inp, "relu", "reference")
    message = rf"expected a batch of at least 2 rows \(batch statistics\), got shape [\(\[]{rows}, 7"
    cut = inp.pre[:rows]
    with pytest.raises(ValueError, match="^pre: " + message):
        ops.batch_norm_act(cut, inp.weight, inp.bias, inp.running_mean, inp.running_var, backend=backend)
    small = forward._replace(h=forward.h[:rows], xhat=forward.xhat[:rows])
    state = make_state(*ADAM, [inp.weight, inp.bias])
    with pytest.raises(ValueError, match="^forward.h: " + message):
        ops.batch_norm_act_update_(inp.weight.clone(), inp.bias.clone(), small, inp.prediction[:rows], *ADAM, state,
                                   backend=backend)
    if backend == "cpu":  # the raw ops: the C++ kernels (the reference's raw op is the reference function above)
        with pytest.raises(ValueError, match="pre: " + message):
            OPS.batch_norm_act(cut, inp.weight, inp.bias, inp.running_mean, inp.running_var, 0.1, 1e-5, "relu")
        with pytest.raises(ValueError, match="h: " + message):
            OPS.batch_norm_act_update_(small.h, small.xhat, small.invstd, inp.prediction[:rows], inp.weight.clone(),
                                       inp.bias.clone(), state, *ADAM, 1.0, "relu")


BAD_FORWARD = {
    "weight": (lambda i: i.__setattr__("weight", i.weight[:-1]), r"^weight: expected shape \(7,\)"),
    "running_var dtype": (lambda i: i.__setattr__("running_var", i.running_var.float()), r"^running_var: expected dtype"),
    "pre 1-d": (lambda i: i.__setattr__("pre", i.pre[0]), r"^pre: expected a 2-d tensor"),
}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("bad", list(BAD_FORWARD))
def test_bad_forward_arguments_name_the_argument(backend, bad):
    inp = make_bn_inputs(torch.float64)
    mutate, message = BAD_FORWARD[bad]
    mutate(inp)
    with pytest.raises((ValueError, TypeError), match=message):
        _forward(inp, "relu", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bad_scalars_are_rejected(backend):
    inp = make_bn_inputs(torch.float64)
    with pytest.raises(ValueError, match=r"^momentum: expected a value in \[0, 1\], got 1.5"):
        _forward(inp, "relu", backend, momentum=1.5)
    with pytest.raises(ValueError, match=r"^eps: expected a positive value, got 0.0"):
        _forward(inp, "relu", backend, eps=0.0)
    with pytest.raises(ValueError, match=r"^activation: must be one of|^activation"):
        _forward(inp, "swish", backend)
    forward = _forward(inp, "relu", backend)
    with pytest.raises(ValueError, match=r"^grad_scale"):
        _update(inp, forward, "relu", backend, grad_scale=0.0)
    with pytest.raises(ValueError, match=r"^forward.xhat: expected shape \(3, 7\)"):
        _update(inp, forward._replace(xhat=forward.xhat[:, :-1]), "relu", backend)
    with pytest.raises(ValueError, match=r"^params\[0\]: expected a contiguous tensor"):
        weight = torch.zeros(14, dtype=torch.float64)[::2]
        ops.batch_norm_act_update_(weight, inp.bias.clone(), forward, inp.prediction, *ADAM,
                                   make_state(*ADAM, [inp.weight, inp.bias]), backend=backend)


def test_triton_backend_runs_the_triton_kernels():
    """backend="triton" takes the kernels of fastdni/kernels/batch_norm.py (tests/interpreted/test_triton_batch_norm.py),
    the forward through its autograd wrapper."""
    pytest.importorskip("triton")
    from fastdni.ops import _triton, api

    assert api._implementation("triton", "batch_norm_act") is _triton.batch_norm_act
    assert api._implementation("triton", "batch_norm_act_update_") is _triton.kernel_ops().batch_norm_act_update_