"""fastdni.reference update rules against torch.optim.SGD / Adam / AdamW over several fp64 steps."""
from __future__ import annotations

import pytest
import torch

from fastdni.reference import AdamState, SGDState, adam_update, sgd_momentum_update

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
STEPS = 6
# The reference mirrors torch's single-tensor path op for op; allow a couple of ulps for
# fused multiply-adds inside torch's vectorised kernels.
TIGHT = dict(rtol=1e-14, atol=1e-15)

SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=0.1),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, weight_decay=0.01),
    dict(momentum=0.5, dampening=0.5, weight_decay=0.05),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
]

ADAM_CONFIGS = [
    dict(),
    dict(beta1=0.8, beta2=0.99, eps=1e-3),
    dict(beta1=0.0, beta2=0.5),
    dict(weight_decay=0.01),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.02, decoupled_weight_decay=True),
]


def _trajectory(shape=(7, 5)):
    param = torch.randn(*shape, dtype=F64)
    grads = [torch.randn(*shape, dtype=F64) * (1 + k) for k in range(STEPS)]
    return param, grads


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_matches_torch_optim(config):
    lr = 0.1
    param, grads = _trajectory()
    torch_param = param.clone().requires_grad_()
    opt = torch.optim.SGD([torch_param], lr=lr, foreach=False, **config)
    momentum = config.get("momentum", 0.0)
    p, buf = param, None
    for g in grads:
        torch_param.grad = g.clone()
        opt.step()
        state = sgd_momentum_update(p, g, buf, lr=lr, **config)
        assert isinstance(state, SGDState)
        p, buf = state
        torch.testing.assert_close(p, torch_param.detach(), **TIGHT)
        if momentum == 0:
            assert buf is None
        else:
            torch.testing.assert_close(buf, opt.state[torch_param]["momentum_buffer"], **TIGHT)
    assert not torch.allclose(p, param)  # the trajectory really moved


def test_sgd_zero_buffer_first_step_equals_none_buffer_without_dampening():
    param, (g, *_) = _trajectory()
    first = sgd_momentum_update(param, g, None, lr=0.1, momentum=0.9, nesterov=True)
    zero = sgd_momentum_update(param, g, torch.zeros_like(param), lr=0.1, momentum=0.9, nesterov=True)
    torch.testing.assert_close(zero.param, first.param, rtol=0, atol=0)
    torch.testing.assert_close(zero.momentum_buffer, first.momentum_buffer, rtol=0, atol=0)


def test_sgd_plain_step_formula():
    param, (g, *_) = _trajectory()
    p, buf = sgd_momentum_update(param, g, None, lr=0.25)
    assert buf is None
    torch.testing.assert_close(p, param - 0.25 * g, rtol=0, atol=0)
    p, _ = sgd_momentum_update(param, g, None, lr=0.0, momentum=0.9)
    assert torch.equal(p, param)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_adam_matches_torch_optim(config):
    lr = 0.01
    config = dict(config)
    decoupled = config.pop("decoupled_weight_decay", False)
    betas = (config.pop("beta1", 0.9), config.pop("beta2", 0.999))
    param, grads = _trajectory()
    torch_param = param.clone().requires_grad_()
    optim_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    torch_kwargs = dict(lr=lr, betas=betas, eps=config.get("eps", 1e-8), weight_decay=config.get("weight_decay", 0.0))
    opt = optim_cls([torch_param], foreach=False, **torch_kwargs)
    p, m, v = param, torch.zeros_like(param), torch.zeros_like(param)
    for step, g in enumerate(grads, start=1):
        torch_param.grad = g.clone()
        opt.step()
        state = adam_update(
            p, g, m, v, step, lr=lr, beta1=betas[0], beta2=betas[1], decoupled_weight_decay=decoupled, **config
        )
        assert isinstance(state, AdamState)
        p, m, v = state
        torch_state = opt.state[torch_param]
        torch.testing.assert_close(p, torch_param.detach(), **TIGHT)
        torch.testing.assert_close(m, torch_state["exp_avg"], **TIGHT)
        torch.testing.assert_close(v, torch_state["exp_avg_sq"], **TIGHT)
    assert (p - param).abs().min() > 0


def test_adam_and_adamw_weight_decay_differ():
    param, (g, *_) = _trajectory()
    zeros = torch.zeros_like(param)
    coupled = adam_update(param, g, zeros, zeros, 1, lr=0.1, weight_decay=0.5)
    decoupled = adam_update(param, g, zeros, zeros, 1, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    assert not torch.allclose(coupled.param, decoupled.param)
    # AdamW: p(1 - lr*wd) then the plain Adam step (first step: -lr * sign-ish(g))
    plain = adam_update(param * (1 - 0.1 * 0.5), g, zeros, zeros, 1, lr=0.1)
    torch.testing.assert_close(decoupled.param, plain.param, rtol=0, atol=0)


def test_update_rules_do_not_modify_their_arguments():
    param, (g, *_) = _trajectory()
    buf, m, v = torch.randn_like(param), torch.randn_like(param), torch.rand_like(param)
    tensors = (param, g, buf, m, v)
    saved = [t.clone() for t in tensors]
    sgd_momentum_update(param, g, buf, lr=0.1, momentum=0.9, weight_decay=0.1)
    adam_update(param, g, m, v, 3, lr=0.1, weight_decay=0.1)
    adam_update(param, g, m, v, 3, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
    assert all(torch.equal(t, s) for t, s in zip(tensors, saved))


def test_sgd_argument_errors():
    param, (g, *_) = _trajectory()
    with pytest.raises(ValueError, match="^nesterov: requires momentum > 0 and dampening == 0"):
        sgd_momentum_update(param, g, None, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="^nesterov"):
        sgd_momentum_update(param, g, None, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"^lr: expected a number >= 0, got -0.1"):
        sgd_momentum_update(param, g, None, lr=-0.1)
    with pytest.raises(ValueError, match=r"^grad: expected shape \(7, 5\), got \(5, 7\)"):
        sgd_momentum_update(param, g.T, None, lr=0.1)
    with pytest.raises(TypeError, match="^grad: expected dtype torch.float64, got torch.float32"):
        sgd_momentum_update(param, g.float(), None, lr=0.1)
    with pytest.raises(ValueError, match=r"^momentum_buffer: expected a 2-d tensor, got shape \(5,\)"):
        sgd_momentum_update(param, g, torch.zeros(5, dtype=F64), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="^param: expected a floating-point tensor"):
        sgd_momentum_update(param.long(), g, None, lr=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=0), r"^step: expected an int >= 1 \(steps count from 1\), got 0"),
        (dict(step=-2), "^step: expected an int >= 1"),
        (dict(step=1.0), r"^step: expected an int >= 1 .* got 1.0"),
        (dict(beta1=1.0), r"^beta1: expected a value in \[0, 1\), got 1.0"),
        (dict(beta1=-0.1), "^beta1: expected a value in"),
        (dict(beta2=1.0), r"^beta2: expected a value in \[0, 1\), got 1.0"),
        (dict(beta2=1.5), "^beta2"),
        (dict(lr=-1e-3), "^lr: expected a number >= 0"),
    ],
)
def test_adam_argument_errors(kwargs, match):
    param, (g, *_) = _trajectory()
    args = dict(step=1, lr=1e-3)
    args.update(kwargs)
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        adam_update(param, g, torch.zeros_like(param), torch.zeros_like(param), step, **args)


def test_adam_state_shape_errors():
    param, (g, *_) = _trajectory()
    zeros = torch.zeros_like(param)
    with pytest.raises(ValueError, match=r"^exp_avg: expected a 2-d tensor, got shape \(35,\)"):
        adam_update(param, g, zeros.flatten(), zeros, 1, lr=1e-3)
    with pytest.raises(TypeError, match="^exp_avg_sq: expected dtype torch.float64"):
        adam_update(param, g, zeros, zeros.float(), 1, lr=1e-3)
    with pytest.raises(ValueError, match="^grad: expected device cpu, got meta"):
        adam_update(param, g.to("meta"), zeros, zeros, 1, lr=1e-3)
