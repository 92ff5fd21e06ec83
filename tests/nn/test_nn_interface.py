"""fastdni.nn.DNI: update unlocking below, graph cut, SG regression onto the gradient arriving above."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import DNI, ConvSyntheticGradient, SyntheticGradient
from helpers import randomise_

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def make_case(kind: str, context: bool):
    """(block below, SG model, input, context, head above) in fp64."""
    classes = 3
    if kind == "conv":
        below = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh()).double()
        sg = ConvSyntheticGradient(4, (3,), 3, context_features=classes if context else 0).double()
        head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, classes)).double()
        x = torch.randn(6, 2, 5, 5, dtype=F64, requires_grad=True)
    else:
        below = nn.Sequential(nn.Linear(7, 9), nn.Tanh()).double()
        hidden = () if kind == "linear" else (5,)
        sg = SyntheticGradient(9, hidden, context_features=classes if context else 0).double()
        head = nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, classes)).double()
        x = torch.randn(6, 7, dtype=F64, requires_grad=True)
    y = torch.randint(0, classes, (x.shape[0],))
    return below, randomise_(sg), x, (y if context else None), head, y


def sg_call(sg, h, context):
    return sg(h) if context is None else sg(h, context)


def explicit_sg_grads(sg, h, target, context, loss_weight=1.0):
    """Autograd of ``loss_weight * mean_b ||M(h_b, c_b) - t_b||^2`` w.r.t. the SG parameters."""
    prediction = sg_call(sg, h.detach(), context)
    loss = loss_weight * (prediction - target).pow(2).flatten(1).sum(1).mean()
    return loss.detach(), torch.autograd.grad(loss, list(sg.parameters()))


KINDS = ["linear", "mlp", "conv"]


@pytest.mark.parametrize("gradient_scale", [1.0, 6.0])
@pytest.mark.parametrize("context", [False, True], ids=["dni", "cdni"])
@pytest.mark.parametrize("kind", KINDS)
def test_part_below_gets_the_backward_of_the_prediction(kind, context, gradient_scale, check_close):
    below, sg, x, c, _, _ = make_case(kind, context)
    dni = DNI(sg, gradient_scale=gradient_scale)
    h = below(x)
    out = dni(h, c)
    prediction = sg_call(sg, h.detach(), c).detach()
    assert prediction.abs().max() > 0
    h_again = below(x)
    # M predicts gradient_scale * dL/dh: the part below receives M / gradient_scale
    expected = torch.autograd.grad(h_again, [x, *below.parameters()], prediction / gradient_scale)
    check_close(x.grad, expected[0])
    check_close([p.grad for p in below.parameters()], list(expected[1:]))
    # SG parameters are not touched by the forward: they wait for the gradient from above.
    assert all(p.grad is None for p in sg.parameters())
    assert dni.last_sg_loss is None
    assert torch.equal(out, h)


@pytest.mark.parametrize("kind", KINDS)
def test_returned_tensor_is_cut_from_the_graph_below(kind):
    below, sg, x, c, head, y = make_case(kind, False)
    h = below(x)
    out = DNI(sg)(h)
    assert out is not h and out.requires_grad
    assert torch.autograd.grad(out.sum(), list(below.parameters()) + [x], allow_unused=True, retain_graph=True) == (None,) * 3
    grads_before = [p.grad.clone() for p in below.parameters()]
    F.cross_entropy(head(out), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(below.parameters(), grads_before))


@pytest.mark.parametrize("loss_weight, gradient_scale", [(1.0, 1.0), (0.25, 1.0), (1.0, 6.0)])
@pytest.mark.parametrize("context", [False, True], ids=["dni", "cdni"])
@pytest.mark.parametrize("kind", KINDS)
def test_sg_is_regressed_onto_the_true_gradient(kind, context, loss_weight, gradient_scale, check_close):
    below, sg, x, c, head, y = make_case(kind, context)
    dni = DNI(sg, loss_weight=loss_weight, gradient_scale=gradient_scale)
    h = below(x)
    out = dni(h, c)
    loss = F.cross_entropy(head(out), y)
    loss.backward()

    h_leaf = h.detach().clone().requires_grad_()
    (true_grad,) = torch.autograd.grad(F.cross_entropy(head(h_leaf), y), h_leaf)
    # the regression target is gradient_scale * the true gradient
    sg_loss, expected = explicit_sg_grads(sg, h, gradient_scale * true_grad, c, loss_weight)
    check_close([p.grad for p in sg.parameters()], list(expected))
    assert dni.last_sg_loss.dim() == 0 and not dni.last_sg_loss.requires_grad
    check_close(dni.last_sg_loss, sg_loss)
    # the head above trains as usual
    head_grads = torch.autograd.grad(F.cross_entropy(head(h.detach()), y), list(head.parameters()))
    check_close([p.grad for p in head.parameters()], list(head_grads))


def test_loss_weight_scales_only_the_sg_gradients(check_close):
    results = []
    for loss_weight in (1.0, 0.125):
        torch.manual_seed(1)
        below, sg, x, c, head, y = make_case("mlp", True)
        dni = DNI(sg, loss_weight=loss_weight)
        F.cross_entropy(head(dni(below(x), c)), y).backward()
        results.append(([p.grad for p in below.parameters()], [p.grad for p in sg.parameters()], dni.last_sg_loss))
    (below_1, sg_1, loss_1), (below_w, sg_w, loss_w) = results
    check_close(below_w, below_1)  # the prediction fed below is not weighted
    check_close(sg_w, [0.125 * g for g in sg_1])
    check_close(loss_w, 0.125 * loss_1)
    assert sg_1[0].abs().max() > 0


def test_eval_mode_and_no_grad_are_the_identity():
    below, sg, x, _, _, _ = make_case("mlp", False)
    dni = DNI(sg)
    h = below(x)
    dni.eval()
    assert dni(h) is h
    dni.train()
    with torch.no_grad():
        h_ng = below(x)
        assert dni(h_ng) is h_ng
    assert all(p.grad is None for p in below.parameters()) and x.grad is None
    assert all(p.grad is None for p in sg.parameters()) and dni.last_sg_loss is None
    # identity for the whole model in eval: the backward goes straight through
    dni.eval()
    dni(h).sum().backward()
    check = torch.autograd.grad(below(x).sum(), list(below.parameters()))
    assert all(torch.equal(p.grad, g) for p, g in zip(below.parameters(), check))


@pytest.mark.parametrize("scales", [(1.0, 1.0), (3.0, 5.0)])
def test_bootstrapped_target_between_two_interfaces(scales, check_close):
    """x -> B0 -> DNI0 -> B1 -> DNI1 -> B2 -> loss: SG0's target is SG1's prediction pushed through B1
    (as a gradient: divided by DNI1's scale; as SG0's target: times DNI0's)."""
    s0, s1 = scales
    b0 = nn.Sequential(nn.Linear(5, 8), nn.Tanh()).double()
    b1 = nn.Sequential(nn.Linear(8, 6), nn.ReLU()).double()
    b2 = nn.Linear(6, 3).double()
    sg0 = randomise_(SyntheticGradient(8, (7,)).double())
    sg1 = randomise_(SyntheticGradient(6).double())
    dni0, dni1 = DNI(sg0, gradient_scale=s0), DNI(sg1, loss_weight=0.5, gradient_scale=s1)
    x, y = torch.randn(10, 5, dtype=F64), torch.randint(0, 3, (10,))

    h0 = b0(x)
    a0 = dni0(h0)
    h1 = b1(a0)
    assert all(p.grad is None for p in sg0.parameters())  # nothing has come back yet
    a1 = dni1(h1)
    # DNI1's forward pushed SG1(h1) back through B1, which is SG0's bootstrapped target.
    h0_leaf = h0.detach().clone().requires_grad_()
    (bootstrapped,) = torch.autograd.grad(b1(h0_leaf), h0_leaf, sg1(h1.detach()).detach() / s1)
    sg0_loss, expected0 = explicit_sg_grads(sg0, h0, s0 * bootstrapped, None)
    check_close([p.grad for p in sg0.parameters()], list(expected0))
    check_close(dni0.last_sg_loss, sg0_loss)
    b1_expected = torch.autograd.grad(b1(h0.detach()), list(b1.parameters()), sg1(h1.detach()).detach() / s1)
    check_close([p.grad for p in b1.parameters()], list(b1_expected))
    sg0_grads = [p.grad.clone() for p in sg0.parameters()]

    loss = F.cross_entropy(b2(a1), y)
    loss.backward()
    h1_leaf = h1.detach().clone().requires_grad_()
    (true_grad,) = torch.autograd.grad(F.cross_entropy(b2(h1_leaf), y), h1_leaf)
    sg1_loss, expected1 = explicit_sg_grads(sg1, h1, s1 * true_grad, None, 0.5)
    check_close([p.grad for p in sg1.parameters()], list(expected1))
    check_close(dni1.last_sg_loss, sg1_loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(sg0.parameters(), sg0_grads))  # cut at DNI1


class OracleSG(nn.Module):
    """No parameters: predicts a fixed tensor."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, h):
        return self.value


@pytest.mark.parametrize("gradient_scale", [1.0, 4.0])
def test_sg_without_parameters_feeds_its_prediction_and_cuts_the_graph(gradient_scale, check_close):
    below = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=F64)
    g = torch.randn(5, 3, dtype=F64)
    out = DNI(OracleSG(g * gradient_scale), gradient_scale=gradient_scale)(below(x))
    assert out.requires_grad and out.grad_fn is None  # a fresh leaf
    check_close(below.weight.grad, g.T @ x)
    check_close(below.bias.grad, g.sum(0))


def test_input_that_does_not_require_grad_still_trains_the_sg():
    sg = randomise_(SyntheticGradient(4).double())
    dni = DNI(sg, gradient_scale=1.0)
    h = torch.randn(3, 4, dtype=F64)
    out = dni(h)
    out.pow(2).sum().backward()
    _, expected = explicit_sg_grads(sg, h, 2 * h, None)
    for p, e in zip(sg.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-12)


def test_dni_errors_and_repr():
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="^loss_weight: expected a number > 0"):
            DNI(SyntheticGradient(4), loss_weight=bad)
    for bad in (0, -2.0):
        with pytest.raises(ValueError, match="^gradient_scale: expected a number > 0"):
            DNI(SyntheticGradient(4), gradient_scale=bad)
    with pytest.raises(ValueError, match=r"^synthetic_gradient: returned shape \(2, 3\) for h of shape \(2, 4\)"):
        DNI(OracleSG(torch.zeros(2, 3)))(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="^h: expected a torch.Tensor"):
        DNI(SyntheticGradient(4))([0.0] * 4)
    with pytest.raises(ValueError, match="^context"):
        DNI(SyntheticGradient(4, context_features=2))(torch.zeros(2, 4))
    assert "loss_weight=0.5, gradient_scale=2.0" in repr(DNI(SyntheticGradient(4), loss_weight=0.5, gradient_scale=2))


def test_default_gradient_scale_is_each_calls_batch_size(check_close):
    """DNI() with no gradient_scale equals DNI(gradient_scale=B) for every batch size B it is called with: the
    part below receives M / B and M is regressed onto B times the arriving gradient."""
    for batch in (6, 2):
        grads = []
        for scale in ("batch", float(batch)):
            torch.manual_seed(0)
            below, sg, x, _, head, y = make_case("mlp", False)
            x, y = x[:batch].detach().requires_grad_(), y[:batch]
            dni = DNI(sg) if scale == "batch" else DNI(sg, gradient_scale=scale)
            F.cross_entropy(head(dni(below(x))), y).backward()
            grads.append([p.grad for p in [*below.parameters(), *sg.parameters()]] + [dni.last_sg_loss])
        check_close(grads[0], grads[1])
    assert DNI(SyntheticGradient(4)).gradient_scale == "batch"
    with pytest.raises(ValueError, match="^gradient_scale: expected a number > 0 or 'batch'"):
        DNI(SyntheticGradient(4), gradient_scale="mean")


def test_a_diverging_regression_warns_once():
    """An SG whose output is 100x its target from the start (a constant, so regression cannot fix it at a tiny
    learning rate) trips the divergence warning once, after the start-up regressions; a sound one does not."""
    import warnings

    from fastdni.nn import interface

    def run(bias, steps):
        sg = SyntheticGradient(3)
        with torch.no_grad():
            sg.layers[-1].bias.fill_(bias)
        dni = DNI(sg, gradient_scale=1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                h = torch.randn(4, 3, requires_grad=True)
                dni(h).pow(2).sum().backward()  # target 2 h: norm ~ 1 per example
        return [w for w in caught if issubclass(w.category, RuntimeWarning)]

    steps = 2 * interface.DIVERGENCE_WARMUP + 5
    diverging = run(100.0, steps)
    assert len(diverging) == 1 and "DNI: the SG's squared error is" in str(diverging[0].message)
    assert run(0.0, steps) == []
    assert len(run(100.0, 2 * interface.DIVERGENCE_WARMUP - 1)) == 0  # not during the start-up regressions
    nan = run(float("nan"), 3)
    assert len(nan) == 1 and "nan" in str(nan[0].message)


def test_a_batch_of_no_examples_passes_through():
    """An empty batch (e.g. the last slice of a dataset) has nothing to predict or regress: the identity, no
    ZeroDivisionError from the per-call scale or the regression's mean."""
    below, sg, x, _, head, _ = make_case("mlp", False)
    h = below(x[:0])
    dni = DNI(sg)
    out = dni(h)
    assert out is h and out.shape == (0, 9)
    head(out).sum().backward()
    assert dni.last_sg_loss is None and all(p.grad is None for p in sg.parameters())
