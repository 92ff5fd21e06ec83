"""fastdni.nn.decouple: a DNI after chosen submodules of an existing model, SG models chosen by shape."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdni.nn import DNI, ConvSyntheticGradient, SyntheticGradient, decouple, synthetic_gradient_for

F64 = torch.float64


class SmallNet(nn.Module):
    """A user's own model: a conv block, a pooled vector block, a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 8), nn.Tanh())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.fc(self.conv(x)))


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
    blocks and the default SG models, in fp64: every gradient, SG step and loss."""
    torch.manual_seed(0)
    model = SmallNet().double()
    by_hand = copy.deepcopy(model)
    x, y = data()
    sgs = decouple(model, at=["conv", "fc"], context_features=context_features)
    sgs.context = y if context_features else None
    out = model(x)
    F.cross_entropy(out, y).backward()

    c = y if context_features else None
    map_size = tuple(by_hand.conv(x).shape[2:])  # the default conv SG's label term is a map of this size
    dni_conv = DNI(ConvSyntheticGradient(3, (), 3, context_features, context_map=map_size).double())
    dni_fc = DNI(SyntheticGradient(8, context_features=context_features).double())
    for made, mine in ((sgs.interfaces["conv"], dni_conv), (sgs.interfaces["fc"], dni_fc)):
        mine.load_state_dict(made.state_dict())
    out2 = by_hand.head(dni_fc(by_hand.fc(dni_conv(by_hand.conv(x), c)), c))
    F.cross_entropy(out2, y).backward()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    for a, b in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    for made, mine in ((sgs.interfaces["conv"], dni_conv), (sgs.interfaces["fc"], dni_fc)):
        for a, b in zip(made.parameters(), mine.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert set(sgs.sg_losses()) == {"conv", "fc"} and all(v is not None for v in sgs.sg_losses().values())
    before = [p.detach().clone() for p in sgs.parameters()]
    sgs.step()
    assert all(p.grad is None for p in sgs.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, sgs.parameters()))


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
    for a, b in zip(half.parameters(), full.parameters()):
        torch.testing.assert_close(a.grad, 0.5 * b.grad, rtol=1e-12, atol=1e-15)
