"""fastdni.nn.decouple: a DNI after chosen submodules of an existing model, SG models chosen by shape."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import DNI, ConvSyntheticGradient, SyntheticGradient, decouple, synthetic_gradient_for
from fastdni.nn.decouple import default_sg_optimizer
from helpers import SmallNet, randomise_

F64 = torch.float64


def data(batch=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 4, (batch,), generator=g)


def test_sg_models_are_chosen_by_shape():
    assert isinstance(synthetic_gradient_for(torch.zeros(2, 3, 4, 4)), ConvSyntheticGradient)
    vector = synthetic_gradient_for(torch.zeros(2, 3, 5, dtype=F64), context_features=4)
    assert isinstance(vector, SyntheticGradient) and vector.features == 15 and vector.context_features == 4
    assert vector.layers[0].weight.dtype == F64
    with pytest.raises(ValueError, match="^h: expected a batch"):
        synthetic_gradient_for(torch.zeros(3))


@pytest.mark.parametrize("context_features", [0, 4])
def test_decouple_equals_dnis_placed_by_hand(context_features):
    """decouple(model, at=[conv, fc]) trains exactly like the same model written with DNI modules after those
    blocks, the default SG models and their default optimizer, in fp64: every gradient, SG step and loss (the
    vector SG's step fused on both sides where the C++ kernels are built)."""
    torch.manual_seed(0)
    model = SmallNet().double()
    by_hand = copy.deepcopy(model)
    x, y = data()
    sgs = decouple(model, at=["conv", "fc"], context_features=context_features, sg_targets="bootstrap")
    sgs.context = y if context_features else None
    out = model(x)
    # The SG models as built, before the backward (a fused interface steps its SG as the gradient arrives).
    built = {k: copy.deepcopy(d.synthetic_gradient.state_dict()) for k, d in sgs.interfaces.items()}
    F.cross_entropy(out, y).backward()

    c = y if context_features else None
    # By hand: each DNI given decouple's default SG optimizer, as decouple gives it (the vector SG then runs fused).
    map_size = tuple(by_hand.conv(x).shape[2:])  # the default conv SG's label term is a map of this size
    conv_sg = ConvSyntheticGradient(3, (), 3, context_features, context_map=map_size).double()
    fc_sg = SyntheticGradient(8, context_features=context_features).double()
    conv_sg.load_state_dict(built["conv"])
    fc_sg.load_state_dict(built["fc"])
    dni_conv, dni_fc = DNI(conv_sg, optimizer=default_sg_optimizer), DNI(fc_sg, optimizer=default_sg_optimizer)
    out2 = by_hand.head(dni_fc(by_hand.fc(dni_conv(by_hand.conv(x), c)), c))
    F.cross_entropy(out2, y).backward()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    for a, b in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    for made, mine in ((sgs.interfaces["conv"], dni_conv), (sgs.interfaces["fc"], dni_fc)):
        assert made.fused == mine.fused
        torch.testing.assert_close(made.last_sg_loss, mine.last_sg_loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(made.parameters(), mine.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)  # None for a fused interface
    assert set(sgs.sg_losses()) == {"conv", "fc"} and all(v is not None for v in sgs.sg_losses().values())
    sgs.step()
    for mine in (dni_conv, dni_fc):
        if not mine.fused:  # the caller steps an interface that ran on autograd; a fused one stepped itself
            mine.optimizer.step()
    assert all(p.grad is None for p in sgs.parameters())
    for key, made in sgs.interfaces.items():  # each SG stepped once since it was built (the fused one in the backward)
        assert {float(s["step"]) for s in made.optimizer.state.values()} == {1.0}, key
    # The fc SG regressed onto the true gradient moved (the conv SG's target is the fc SG's zero prediction).
    assert any(not torch.equal(p, built["fc"][name]) for name, p in sgs.interfaces["fc"].synthetic_gradient.state_dict().items())
    for a, b in zip(sgs.parameters(), [*dni_conv.parameters(), *dni_fc.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_default_sg_rate_shrinks_with_the_fan_in():
    def rate(sg):
        return default_sg_optimizer(sg.parameters()).param_groups[0]["lr"]
    assert rate(SyntheticGradient(64)) == pytest.approx(1e-3)
    assert rate(SyntheticGradient(128, (32,), context_features=10)) == pytest.approx(1e-3)
    assert rate(SyntheticGradient(1024)) == pytest.approx(1e-3 * (128 / 1024) ** 0.5)
    assert rate(ConvSyntheticGradient(32, (), kernel_size=3)) == pytest.approx(1e-3 * (128 / 288) ** 0.5)  # 32 * 3 * 3
    # Conditioned SGs register their label weight (fan-in 10) first: the rate is still the widest unit's.
    assert rate(SyntheticGradient(1024, context_features=10)) == pytest.approx(1e-3 * (128 / 1024) ** 0.5)
    assert rate(ConvSyntheticGradient(32, (), kernel_size=3, context_features=10, context_map=(7, 7))) == pytest.approx(
        1e-3 * (128 / 288) ** 0.5)
    assert rate(nn.Linear(1, 1).requires_grad_(False)) == pytest.approx(1e-3)


def random_sgs(h, context_features):
    return randomise_(synthetic_gradient_for(h, context_features))


@pytest.mark.parametrize("context_features", [0, 4])
def test_true_targets_regress_every_sg_onto_the_true_gradient(context_features):
    """sg_targets="true" (the default): the model's parameters get what they get with bootstrapped targets (each
    part its own SG's prediction, the head the true gradient); every SG is regressed onto the true dL/dh."""
    torch.manual_seed(0)
    model = SmallNet().double()
    boot_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    x, y = data()
    c = y if context_features else None
    losses = {}
    for net, targets in ((model, "true"), (boot_model, "bootstrap")):
        torch.manual_seed(1)  # the same random SG models on both
        sgs = decouple(net, at=["conv", "fc"], context_features=context_features, sg_factory=random_sgs,
                       sg_targets=targets)
        sgs.context = c
        out = net(x)
        built = {k: copy.deepcopy(d.synthetic_gradient) for k, d in sgs.interfaces.items()}
        F.cross_entropy(out, y).backward()
        losses[targets] = {k: float(d.last_sg_loss) for k, d in sgs.interfaces.items()}
    for a, b in zip(model.parameters(), boot_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    # The true gradients at both interfaces, by plain backprop; each SG's loss is w * mean_b ||M(h) - B t||^2.
    h_conv = plain.conv(x)
    h_fc = plain.fc(h_conv)
    t_conv, t_fc = torch.autograd.grad(F.cross_entropy(plain.head(h_fc), y), (h_conv, h_fc))
    batch = x.shape[0]
    for key, h, t in (("conv", h_conv, t_conv), ("fc", h_fc, t_fc)):
        with torch.no_grad():
            m = built[key](h, c) if context_features else built[key](h)
            expected = float((m - batch * t).pow(2).sum() / batch)
        assert losses["true"][key] == pytest.approx(expected, rel=1e-10), key
    assert losses["bootstrap"]["fc"] == pytest.approx(losses["true"]["fc"], rel=1e-10)  # the top: the same target
    assert losses["bootstrap"]["conv"] != pytest.approx(losses["true"]["conv"], rel=1e-3)
    with pytest.raises(ValueError, match="sg_targets"):
        decouple(SmallNet(), at=["fc"], sg_targets="oracle")


def test_true_targets_over_steps_and_a_forward_without_backward():
    """Several steps, and a forward whose backward never came (the chain starts over): no error, SGs learn."""
    torch.manual_seed(0)
    model = SmallNet().double()
    sgs = decouple(model, at=["conv", "fc"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(16)
    model(x)  # never backpropagated
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sgs.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < first and all(v is not None for v in sgs.sg_losses().values())


def test_eval_is_the_plain_model_and_remove_detaches():
    torch.manual_seed(0)
    model = SmallNet().double()
    plain = copy.deepcopy(model)
    x, y = data()
    sgs = decouple(model, at="fc")
    model.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert len(sgs.interfaces) == 0  # nothing built outside training
    model.train()
    model(x).sum().backward()
    assert len(sgs.interfaces) == 1 and model.conv[0].weight.grad is not None  # the part below stepped on M(h)
    sgs.remove()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain.train()
    F.cross_entropy(plain(x), y).backward()
    torch.testing.assert_close(model.conv[0].weight.grad, plain.conv[0].weight.grad, rtol=1e-12, atol=1e-12)


def test_decouple_errors_are_named():
    model = SmallNet()
    with pytest.raises(ValueError, match=r"^at: expected names of submodules.*\['nope'\] not among them"):
        decouple(model, at=["conv", "nope"])
    with pytest.raises(ValueError, match="^at: expected names"):
        decouple(model, at=[])
    sgs = decouple(model, at=["fc"], context_features=4)
    with pytest.raises(ValueError, match=r"^context: the SG models are conditioned"):
        model(torch.zeros(2, 1, 6, 6))
    sgs.remove()

    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    wrapper = nn.Sequential(TupleOut())
    decouple(wrapper, at=["0"])
    with pytest.raises(TypeError, match="^at: '0' returned tuple"):
        wrapper(torch.zeros(2, 3))


def test_interface_factory_is_used_for_every_chosen_module():
    """interface=...: the interfaces are built by the given factory (here DNI with loss weight 0.5 and a fixed scale),
    so the regression gradients of the SG models are half those of the default interface."""
    import functools

    torch.manual_seed(0)
    model = SmallNet().double()
    twin = copy.deepcopy(model)
    x, y = data()
    half = decouple(model, at=["conv", "fc"], interface=functools.partial(DNI, loss_weight=0.5, gradient_scale=5.0))
    full = decouple(twin, at=["conv", "fc"])
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    assert all(d.loss_weight == 0.5 and d.gradient_scale == 5.0 for d in half.interfaces.values())
    for key in ("conv", "fc"):  # gradient_scale 5.0 is "batch" on this batch of 5: only the weight differs
        torch.testing.assert_close(half.interfaces[key].last_sg_loss, 0.5 * full.interfaces[key].last_sg_loss,
                                   rtol=1e-12, atol=1e-15)
    for a, b in zip(half.interfaces["conv"].parameters(), full.interfaces["conv"].parameters()):  # autograd: .grad
        torch.testing.assert_close(a.grad, 0.5 * b.grad, rtol=1e-12, atol=1e-15)
