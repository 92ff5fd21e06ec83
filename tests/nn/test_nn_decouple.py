"""fastdni.nn.decouple: a DNI after chosen submodules of an existing model, SG models chosen by shape."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import DNI, ConvSyntheticGradient, SyntheticGradient, decouple, synthetic_gradient_for
from fastdni.nn.decouple import default_sg_optimizer
from helpers import SmallNet

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
    sgs = decouple(model, at=["conv", "fc"], context_features=context_features)
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
