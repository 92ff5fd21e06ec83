"""fastdni.reference.dni_layer_step: the composed step, oracle equivalence with backprop, bootstrapping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdni.reference import (
    ACTIVATIONS,
    DNILayerStep,
    SGParams,
    dni_layer_step,
    init_sg_params,
    layer_backward,
    layer_forward,
    sg_predict,
    sg_regression,
)
from op_cases import TORCH_ACTIVATIONS

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _layer(fan_in, fan_out, dtype=F64):
    return torch.randn(fan_out, fan_in, dtype=dtype) / fan_in**0.5, torch.randn(fan_out, dtype=dtype) * 0.1


def _random_sg(features, hidden=(), context_features=0, dtype=F64):
    sizes = [features, *hidden, features]
    return SGParams(
        tuple(torch.randn(o, i, dtype=dtype) * 0.3 for i, o in zip(sizes[:-1], sizes[1:])),
        tuple(torch.randn(o, dtype=dtype) * 0.3 for o in sizes[1:]),
        torch.randn(sizes[1], context_features, dtype=dtype) * 0.3 if context_features else None,
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layer_backward_fed_the_true_gradient_is_backprop(activation, check_close):
    """The oracle case: with M = dL/dh the layer's update is exactly backprop's (fp64)."""
    batch, fan_in, width, out = 12, 10, 16, 3
    x = torch.randn(batch, fan_in, dtype=F64, requires_grad=True)
    w1, b1 = (t.requires_grad_() for t in _layer(fan_in, width))
    w2, b2 = _layer(width, out)
    y = torch.randint(0, out, (batch,))

    def above(h):
        return F.cross_entropy(F.linear(torch.tanh(h), w2, b2), y)

    h_net = TORCH_ACTIVATIONS[activation](F.linear(x, w1, b1))
    gx, gw, gb = torch.autograd.grad(above(h_net), (x, w1, b1))

    h, pre = layer_forward(x.detach(), w1.detach(), b1.detach(), activation)
    check_close(h, h_net.detach())
    h_leaf = h.clone().requires_grad_()
    (true_grad_h,) = torch.autograd.grad(above(h_leaf), h_leaf)
    grads = layer_backward(x.detach(), w1.detach(), pre, true_grad_h, activation)
    check_close(grads.weight, gw)
    check_close(grads.bias, gb)
    check_close(grads.input, gx)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dni_layer_step_with_an_exact_linear_sg_is_backprop(activation, check_close):
    """A linear cDNI SG can represent the true gradient of a least-squares head exactly.

    Loss ``L = 1/(2B) sum_b ||h_b A^T + c - y_b||^2`` has ``dL/dh_b = (h_b A^T A + c A - y_b A) / B``,
    i.e. a linear SG with ``W = A^T A / B``, ``b = c A / B`` and context weight ``U = -A^T / B``
    on context ``y``. Then dni_layer_step's gradients are backprop's.
    """
    batch, fan_in, width, out = 8, 6, 10, 4
    x = torch.randn(batch, fan_in, dtype=F64, requires_grad=True)
    w, b = (t.requires_grad_() for t in _layer(fan_in, width))
    a_head, c_head = torch.randn(out, width, dtype=F64), torch.randn(out, dtype=F64)
    y = torch.randn(batch, out, dtype=F64)
    h_net = TORCH_ACTIVATIONS[activation](F.linear(x, w, b))
    loss = ((F.linear(h_net, a_head, c_head) - y) ** 2).sum() / (2 * batch)
    (true_grad_h,) = torch.autograd.grad(loss, h_net, retain_graph=True)
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b))

    oracle = SGParams((a_head.T @ a_head / batch,), (c_head @ a_head / batch,), -a_head.T / batch)
    step = dni_layer_step(
        x.detach(), w.detach(), b.detach(), oracle, activation=activation, context=y, need_input_grad=True
    )
    assert isinstance(step, DNILayerStep) and step.sg is None
    check_close(step.synthetic_gradient, true_grad_h)
    check_close(step.layer_grads.weight, gw)
    check_close(step.layer_grads.bias, gb)
    check_close(step.layer_grads.input, gx)
    # ... and regressing it onto the true gradient costs (numerically) nothing.
    regressed = dni_layer_step(x.detach(), w.detach(), b.detach(), oracle, activation=activation, context=y, target=true_grad_h)
    assert regressed.sg.loss.item() < 1e-25
    for g in (*regressed.sg.grads.weights, *regressed.sg.grads.biases, regressed.sg.grads.context_weight):
        assert g.abs().max() < 1e-12


@pytest.mark.parametrize("context_kind", [None, "labels", "float"])
@pytest.mark.parametrize("hidden", [(), (8,)], ids=["linear", "mlp"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dni_layer_step_composes_the_pieces(activation, hidden, context_kind, dtype, check_close):
    batch, fan_in, width, classes = 7, 9, 12, 5
    x = torch.randn(batch, fan_in, dtype=dtype)
    w, b = _layer(fan_in, width, dtype)
    params = _random_sg(width, hidden, classes if context_kind else 0, dtype)
    context = {None: None, "labels": torch.randint(0, classes, (batch,)), "float": torch.randn(batch, classes, dtype=dtype)}[context_kind]
    target = torch.randn(batch, width, dtype=dtype)

    step = dni_layer_step(x, w, b, params, activation=activation, context=context, target=target, need_input_grad=True)
    h, pre = layer_forward(x, w, b, activation)
    assert step.h.shape == step.pre.shape == step.synthetic_gradient.shape == (batch, width)
    check_close(step.h, h)
    check_close(step.pre, pre)
    prediction = sg_predict(h, params, context)
    assert prediction.abs().max() > 0
    check_close(step.synthetic_gradient, prediction)
    expected = layer_backward(x, w, pre, prediction, activation)
    check_close(tuple(step.layer_grads), tuple(expected))
    assert step.layer_grads.weight.shape == w.shape and step.layer_grads.input.shape == x.shape
    regression = sg_regression(h, params, target, context)
    check_close(step.sg.loss, regression.loss)
    check_close(step.sg.prediction, regression.prediction)
    check_close(step.sg.grads, regression.grads)

    no_target = dni_layer_step(x, w, b, params, activation=activation, context=context)
    assert no_target.sg is None
    assert no_target.layer_grads.input is None  # need_input_grad defaults to False
    check_close(no_target.layer_grads.weight, expected.weight)


def test_dni_layer_step_with_a_fresh_sg_gives_zero_layer_gradients():
    x = torch.randn(5, 4, dtype=F64)
    w, b = _layer(4, 6)
    params = init_sg_params(6, (8,), dtype=F64)
    step = dni_layer_step(x, w, b, params, need_input_grad=True)
    assert not step.synthetic_gradient.any()
    assert not step.layer_grads.weight.any() and not step.layer_grads.bias.any() and not step.layer_grads.input.any()


@pytest.mark.parametrize("hidden", [(), (8,)], ids=["linear", "mlp"])
def test_bootstrapped_target_from_the_layer_above(hidden, check_close):
    """The grad input of layer 2 computed from its SG (with the pre-update W2) is layer 1's SG target."""
    batch, fan_in, width1, width2 = 6, 5, 7, 9
    x = torch.randn(batch, fan_in, dtype=F64)
    w1, b1 = _layer(fan_in, width1)
    w2, b2 = _layer(width1, width2)
    sg1, sg2 = _random_sg(width1, hidden), _random_sg(width2, hidden)

    first = dni_layer_step(x, w1, b1, sg1, activation="tanh")
    second = dni_layer_step(first.h, w2, b2, sg2, activation="tanh", need_input_grad=True)
    bootstrapped = second.layer_grads.input
    assert bootstrapped.shape == first.h.shape

    # Autograd: the vector-Jacobian product of layer 2 at h1 with SG2's prediction.
    h1 = first.h.clone().requires_grad_()
    h2 = torch.tanh(F.linear(h1, w2, b2))
    (vjp,) = torch.autograd.grad(h2, h1, sg_predict(h2.detach(), sg2))
    check_close(bootstrapped, vjp)

    regressed = dni_layer_step(x, w1, b1, sg1, activation="tanh", target=bootstrapped)
    weights = [w.clone().requires_grad_() for w in sg1.weights]
    biases = [b.clone().requires_grad_() for b in sg1.biases]
    loss = ((sg_predict(first.h, SGParams(tuple(weights), tuple(biases))) - vjp) ** 2).sum(1).mean()
    expected = torch.autograd.grad(loss, [*weights, *biases])
    check_close(regressed.sg.loss, loss.detach())
    check_close((*regressed.sg.grads.weights, *regressed.sg.grads.biases), expected)
    # The update of layer 1 is from SG1's prediction, not from the target.
    check_close(regressed.layer_grads.weight, first.layer_grads.weight)


def test_dni_layer_step_argument_errors():
    x = torch.randn(4, 3, dtype=F64)
    w, b = _layer(3, 5)
    params = _random_sg(5, (), 2)
    with pytest.raises(ValueError, match="activation"):
        dni_layer_step(x, w, b, params, activation="swish", context=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="^context"):
        dni_layer_step(x, w, b, params)
    with pytest.raises(ValueError, match=r"^target: expected shape \(4, 5\)"):
        dni_layer_step(x, w, b, params, context=torch.zeros(4, dtype=torch.long), target=torch.zeros(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"^params.weights\[0\]: expected shape \(5, 5\)"):
        dni_layer_step(x, w, b, _random_sg(4))
