"""fastdni.reference activations and the Linear+activation layer against torch.autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdni.reference import (
    ACTIVATIONS,
    LayerGrads,
    activate,
    activation_derivative,
    layer_backward,
    layer_forward,
)
from op_cases import TORCH_ACTIVATIONS

pytestmark = pytest.mark.usefixtures("single_thread")



def _pre_activations(dtype: torch.dtype) -> torch.Tensor:
    """Values over the interesting range, including exact zeros (relu'(0) convention) and tails."""
    p = torch.randn(32, 17, dtype=dtype) * 3
    p[0, :4] = 0.0
    p[1, :4] = torch.tensor([-9.0, -5.0, 5.0, 9.0], dtype=dtype)
    return p


def test_activation_table_is_covered():
    assert set(ACTIVATIONS) == set(TORCH_ACTIVATIONS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activate_matches_torch(activation, dtype, check_close):
    p = _pre_activations(dtype)
    out = activate(p, activation)
    assert out.dtype == dtype and out.shape == p.shape
    check_close(out, TORCH_ACTIVATIONS[activation](p))
    assert out.data_ptr() != p.data_ptr()  # functional: never aliases its input


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivative_matches_autograd(activation, dtype, check_close):
    p = _pre_activations(dtype).requires_grad_()
    (expected,) = torch.autograd.grad(TORCH_ACTIVATIONS[activation](p).sum(), p)
    check_close(activation_derivative(p.detach(), activation), expected)


def test_relu_derivative_at_zero_is_zero():
    p = torch.tensor([-1.0, 0.0, -0.0, 1e-300, 2.0], dtype=torch.float64)
    assert activation_derivative(p, "relu").tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("fn", [activate, activation_derivative])
def test_unknown_activation_is_refused(fn):
    with pytest.raises(ValueError, match="activation must be one of"):
        fn(torch.zeros(2, 2), "sigmoid")


def _layer_inputs(dtype, batch=16, fan_in=24, fan_out=20):
    x = torch.randn(batch, fan_in, dtype=dtype)
    weight = torch.randn(fan_out, fan_in, dtype=dtype) / fan_in**0.5
    bias = torch.randn(fan_out, dtype=dtype) * 0.5
    return x, weight, bias


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layer_forward_and_backward_match_autograd(activation, dtype, check_close):
    x, weight, bias = _layer_inputs(dtype)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    pre_ref = F.linear(xr, wr, br)
    h_ref = TORCH_ACTIVATIONS[activation](pre_ref)

    h, pre = layer_forward(x, weight, bias, activation)
    assert h.shape == pre.shape == (16, 20) and h.dtype == pre.dtype == dtype
    check_close(pre, pre_ref.detach())
    check_close(h, h_ref.detach())

    grad_h = torch.randn_like(h)
    gx, gw, gb = torch.autograd.grad(h_ref, (xr, wr, br), grad_h)
    grads = layer_backward(x, weight, pre, grad_h, activation)
    assert isinstance(grads, LayerGrads)
    assert grads.weight.shape == weight.shape and grads.bias.shape == bias.shape and grads.input.shape == x.shape
    check_close(grads.weight, gw)
    check_close(grads.bias, gb)
    check_close(grads.input, gx)

    without_input = layer_backward(x, weight, pre, grad_h, activation, need_input_grad=False)
    assert without_input.input is None
    assert torch.equal(without_input.weight, grads.weight)
    assert torch.equal(without_input.bias, grads.bias)


def test_layer_default_activation_is_relu():
    x, weight, bias = _layer_inputs(torch.float64)
    h, pre = layer_forward(x, weight, bias)
    assert torch.equal(h, torch.relu(pre))
    grad_h = torch.randn_like(h)
    assert torch.equal(layer_backward(x, weight, pre, grad_h).weight, layer_backward(x, weight, pre, grad_h, "relu").weight)
    assert not torch.equal(h, layer_forward(x, weight, bias, "identity")[0])


def test_layer_backward_uses_the_weight_it_is_given():
    """dx = delta W with the weight passed in (the pre-update weight in a DNI step)."""
    x, weight, bias = _layer_inputs(torch.float64)
    h, pre = layer_forward(x, weight, bias, "tanh")
    grad_h = torch.randn_like(h)
    delta = grad_h * (1 - torch.tanh(pre) ** 2)
    other = weight + 1.0
    torch.testing.assert_close(layer_backward(x, other, pre, grad_h, "tanh").input, delta @ other, rtol=1e-12, atol=1e-12)


def test_layer_functions_do_not_modify_their_arguments():
    x, weight, bias = _layer_inputs(torch.float64)
    saved = [t.clone() for t in (x, weight, bias)]
    h, pre = layer_forward(x, weight, bias, "gelu")
    pre_saved, grad_h = pre.clone(), torch.randn_like(h)
    grad_saved = grad_h.clone()
    layer_backward(x, weight, pre, grad_h, "gelu")
    for t, s in zip((x, weight, bias, pre, grad_h), (*saved, pre_saved, grad_saved)):
        assert torch.equal(t, s)


def test_layer_forward_argument_errors():
    x, weight, bias = _layer_inputs(torch.float64, batch=4, fan_in=6, fan_out=5)
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got list"):
        layer_forward(x.tolist(), weight, bias)
    with pytest.raises(ValueError, match=r"^x: expected a 2-d tensor, got shape \(24,\)"):
        layer_forward(x.reshape(-1), weight, bias)
    with pytest.raises(TypeError, match="^x: expected a floating-point tensor"):
        layer_forward(x.long(), weight, bias)
    with pytest.raises(ValueError, match=r"^weight: expected shape \(\*, 6\), got \(6, 5\)"):
        layer_forward(x, weight.T, bias)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(5,\), got \(6,\)"):
        layer_forward(x, weight, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="^weight: expected dtype torch.float64, got torch.float32"):
        layer_forward(x, weight.float(), bias)
    with pytest.raises(TypeError, match="^bias: expected dtype torch.float64"):
        layer_forward(x, weight, bias.float())
    with pytest.raises(ValueError, match="^weight: expected device cpu, got meta"):
        layer_forward(x, weight.to("meta"), bias)
    with pytest.raises(ValueError, match="activation"):
        layer_forward(x, weight, bias, "softplus")


def test_layer_backward_argument_errors():
    x, weight, bias = _layer_inputs(torch.float64, batch=4, fan_in=6, fan_out=5)
    h, pre = layer_forward(x, weight, bias)
    grad_h = torch.ones_like(h)
    with pytest.raises(ValueError, match=r"^pre: expected shape \(4, 5\), got \(5, 4\)"):
        layer_backward(x, weight, pre.T, grad_h)
    with pytest.raises(ValueError, match=r"^grad_h: expected shape \(4, 5\), got \(4, 6\)"):
        layer_backward(x, weight, pre, torch.ones(4, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="^grad_h: expected dtype torch.float64, got torch.float32"):
        layer_backward(x, weight, pre, grad_h.float())
    with pytest.raises(ValueError, match="^grad_h: expected device cpu, got meta"):
        layer_backward(x, weight, pre, grad_h.to("meta"))
    with pytest.raises(ValueError, match=r"^weight: expected shape \(\*, 6\)"):
        layer_backward(x, weight[:, :5], pre, grad_h)
    with pytest.raises(ValueError, match="activation"):
        layer_backward(x, weight, pre, grad_h, "elu")
