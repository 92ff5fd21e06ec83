"""fastdni.nn.SyntheticGradient and ConvSyntheticGradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdni.nn import ConvSyntheticGradient, SyntheticGradient
from fastdni.reference import SGParams, sg_predict
from helpers import randomise_

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


# ---------------------------------------------------------------------------- SyntheticGradient


@pytest.mark.parametrize("context_kind", [None, "labels", "float"])
@pytest.mark.parametrize("hidden", [(), (16,), (12, 8)], ids=["linear", "mlp1", "mlp2"])
def test_forward_equals_reference(hidden, context_kind, dtype, check_close):
    features, classes, batch = 20, 4, 6
    sg = randomise_(SyntheticGradient(features, hidden, classes if context_kind else 0).to(dtype))
    h = torch.randn(batch, features, dtype=dtype)
    context = {None: None, "labels": torch.randint(0, classes, (batch,)), "float": torch.randn(batch, classes, dtype=dtype)}[context_kind]
    out = sg(h, context)
    params = sg.reference_params()
    assert isinstance(params, SGParams) and len(params.weights) == len(hidden) + 1
    assert out.shape == h.shape and out.dtype == dtype
    check_close(out, sg_predict(h, params, context))


def test_reference_params_alias_the_module_parameters():
    sg = SyntheticGradient(6, (5,), 3)
    params = sg.reference_params()
    assert params.weights[0] is sg.layers[0].weight and params.biases[1] is sg.layers[1].bias
    assert params.context_weight is sg.context_weight
    assert SyntheticGradient(6).reference_params().context_weight is None
    named = dict(sg.named_parameters())
    assert set(named) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "context_weight"}


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "channels_last"])
def test_feature_maps_are_flattened(contiguous, check_close):
    batch, c, hh, ww = 3, 4, 5, 6
    sg = randomise_(SyntheticGradient(c * hh * ww, (10,)).double())
    h = torch.randn(batch, c, hh, ww, dtype=F64)
    if not contiguous:
        h = h.to(memory_format=torch.channels_last)
    out = sg(h)
    assert out.shape == h.shape
    check_close(out, sg_predict(h.reshape(batch, -1), sg.reference_params()).view(batch, c, hh, ww))
    # any feature shape with the right number of features
    check_close(sg(h.reshape(batch, c * hh, ww)), out.reshape(batch, c * hh, ww))


@pytest.mark.parametrize("context_features", [0, 3])
@pytest.mark.parametrize("hidden", [(), (7,)], ids=["linear", "mlp"])
def test_zero_initialised_output(hidden, context_features):
    sg = SyntheticGradient(9, hidden, context_features)
    assert not sg.layers[-1].weight.any() and not sg.layers[-1].bias.any()
    for layer in sg.layers[:-1]:
        assert layer.weight.abs().min() > 0
    if context_features:
        if hidden:
            assert sg.context_weight.abs().max() > 0
            assert sg.context_weight.abs().max() <= (9 + context_features) ** -0.5
        else:
            assert not sg.context_weight.any()
    h = torch.randn(4, 9) * 10
    context = torch.randint(0, 3, (4,)) if context_features else None
    assert not sg(h, context).any()
    randomise_(sg)
    assert sg(h, context).any()
    sg.reset_parameters()
    assert not sg(h, context).any()


def test_cdni_context_labels_equal_one_hot_and_train_the_context_weight(check_close):
    sg = randomise_(SyntheticGradient(8, (6,), 5).double())
    h = torch.randn(7, 8, dtype=F64)
    y = torch.tensor([0, 4, 4, 1, 2, 0, 4])
    by_label = sg(h, y)
    check_close(by_label, sg(h, F.one_hot(y, 5).double()))
    assert not torch.allclose(by_label, sg(h, (y + 1) % 5))  # the context matters
    by_label.square().sum().backward()
    assert sg.context_weight.grad is not None
    assert not sg.context_weight.grad[:, 3].any() and sg.context_weight.grad[:, 4].abs().sum() > 0


def test_gradients_flow_to_h_and_all_parameters():
    sg = randomise_(SyntheticGradient(5, (4,), 2).double())
    h = torch.randn(3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: sg(h, torch.tensor([0, 1, 1])), (h,))
    sg(h, torch.tensor([0, 1, 1])).sum().backward()
    assert all(p.grad is not None for p in sg.parameters())


def test_synthetic_gradient_argument_errors():
    sg = SyntheticGradient(12, (8,), 3)
    h = torch.randn(4, 12)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match="^h: expected a torch.Tensor"):
        sg(h.tolist(), y)
    with pytest.raises(ValueError, match=r"^h: expected shape \[B, \*features\] with 12 features, got \(4, 11\)"):
        sg(h[:, :11], y)
    with pytest.raises(ValueError, match=r"^h: expected shape \[B, \*features\] with 12 features, got \(12,\)"):
        sg(h[0], y)
    with pytest.raises(ValueError, match=r"^h: .* got \(4, 3, 5\)"):
        sg(torch.randn(4, 3, 5), y)
    with pytest.raises(TypeError, match="^h: expected dtype torch.float32, got torch.float64"):
        sg(h.double(), y)
    with pytest.raises(TypeError, match="^h: expected a floating-point tensor"):
        sg(h.long(), y)
    with pytest.raises(ValueError, match="^h: expected device cpu, got meta"):
        sg(h.to("meta"), y)
    with pytest.raises(ValueError, match="^context: expected device cpu, got meta"):
        sg(h, y.to("meta"))
    with pytest.raises(ValueError, match="^context: the SG model is conditioned"):
        sg(h)
    with pytest.raises(ValueError, match=r"^context: the SG model takes no context \(context_features=0\)"):
        SyntheticGradient(12)(h, y)
    with pytest.raises(ValueError, match=r"^context: labels must lie in \[0, 3\), got values in \[0, 3\]"):
        sg(h, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"^context: integer labels must be int32/int64 of shape \(4,\), got \(3,\)"):
        sg(h, y[:3])
    with pytest.raises(ValueError, match=r"^context: expected shape \(4, 3\), got \(4, 2\)"):
        sg(h, torch.randn(4, 2))
    with pytest.raises(TypeError, match="^context: expected dtype torch.float32, got torch.float64"):
        sg(h, torch.randn(4, 3, dtype=F64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=0), r"^features: expected positive ints, got \(0,\)"),
        (dict(features=4.0), "^features"),
        (dict(features=4, hidden=(8, 0)), r"^hidden: expected positive ints, got \(8, 0\)"),
        (dict(features=4, context_features=-1), "^context_features: expected an int >= 0, got -1"),
        (dict(features=4, context_features=2.0), "^context_features"),
    ],
)
def test_synthetic_gradient_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticGradient(**kwargs)


def test_synthetic_gradient_repr():
    assert "features=6, hidden=(4,), context_features=2" in repr(SyntheticGradient(6, [4], 2))


# ------------------------------------------------------------------------ ConvSyntheticGradient


def conv_reference(sg: ConvSyntheticGradient, h, context=None):
    """The conv SG written out with F.conv2d; the context is a one-hot per-channel bias."""
    z = h
    for i, conv in enumerate(sg.convs):
        z = F.conv2d(z, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2)
        if i == 0 and context is not None:
            c = context if context.dtype.is_floating_point else F.one_hot(context, sg.context_features).to(h.dtype)
            z = z + (c @ sg.context_weight.T)[:, :, None, None]
        if i < len(sg.convs) - 1:
            z = torch.relu(z)
    return z


@pytest.mark.parametrize("context_kind", [None, "labels", "float"])
@pytest.mark.parametrize("hidden, kernel_size", [((), 1), ((), 3), ((6,), 5), ((6, 4), 3)])
def test_conv_sg_matches_explicit_convolutions(hidden, kernel_size, context_kind, check_close):
    batch, channels, classes = 3, 4, 5
    sg = randomise_(ConvSyntheticGradient(channels, hidden, kernel_size, classes if context_kind else 0).double())
    h = torch.randn(batch, channels, 7, 6, dtype=F64)
    context = {None: None, "labels": torch.randint(0, classes, (batch,)), "float": torch.randn(batch, classes, dtype=F64)}[context_kind]
    out = sg(h, context)
    assert out.shape == h.shape  # "same" padding keeps the spatial size
    check_close(out, conv_reference(sg, h, context))
    if context_kind == "labels":
        check_close(out, sg(h, F.one_hot(context, classes).double()))


@pytest.mark.parametrize("context_features", [0, 3])
@pytest.mark.parametrize("hidden", [(), (5,)], ids=["linear", "deep"])
def test_conv_sg_zero_initialised_output(hidden, context_features):
    sg = ConvSyntheticGradient(4, hidden, 3, context_features)
    assert not sg.convs[-1].weight.any() and not sg.convs[-1].bias.any()
    if context_features:
        assert sg.context_weight.shape == (sg.convs[0].out_channels, context_features)
        assert bool(sg.context_weight.any()) == bool(hidden)  # zero only as part of the output layer
    h = torch.randn(2, 4, 6, 6)
    context = torch.tensor([0, 2]) if context_features else None
    assert not sg(h, context).any()


def test_conv_sg_context_is_a_per_channel_bias(check_close):
    sg = ConvSyntheticGradient(3, (), 3, context_features=2).double()
    with torch.no_grad():
        sg.context_weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]]))
    out = sg(torch.randn(2, 3, 4, 4, dtype=F64), torch.tensor([1, 0]))
    expected = torch.tensor([[-1.0, 0.5, 3.0], [1.0, 2.0, 0.0]], dtype=F64)[:, :, None, None].expand(2, 3, 4, 4)
    check_close(out, expected)


@pytest.mark.parametrize("hidden", [(), (5,)], ids=["linear", "deep"])
@pytest.mark.parametrize("float_context", [False, True], ids=["labels", "float"])
def test_conv_sg_context_map_is_a_per_position_term(hidden, float_context, check_close):
    """With ``context_map`` the context adds a full map per context feature to the first conv's output: what
    the label contributes to the true gradient of a map read by a dense layer varies with the position."""
    channels, classes, size = 3, 4, (5, 6)
    sg = randomise_(ConvSyntheticGradient(channels, hidden, 3, classes, context_map=size).double())
    first = sg.convs[0].out_channels
    assert sg.context_weight.shape == (first * 30, classes)
    h, y = torch.randn(2, channels, *size, dtype=F64), torch.tensor([3, 1])
    context = F.one_hot(y, classes).double() if float_context else y
    maps = (F.one_hot(y, classes).double() @ sg.context_weight.T).view(2, first, *size)
    z = h
    for i, conv in enumerate(sg.convs):
        z = F.conv2d(z, conv.weight, conv.bias, padding=1) + (maps if i == 0 else 0)
        z = torch.relu(z) if i < len(sg.convs) - 1 else z
    check_close(sg(h, context), z)
    assert maps[0].sub(maps[0].mean((1, 2), keepdim=True)).abs().max() > 0  # not a per-channel bias
    with pytest.raises(ValueError, match=r"^h: expected 3 channels and maps of \(5, 6\), got shape \(2, 3, 6, 5\)"):
        sg(h.transpose(2, 3), y)
    with pytest.raises(ValueError, match=r"^context_map: expected the map's \(H, W\), got \(5,\)"):
        ConvSyntheticGradient(channels, (), 3, classes, context_map=(5,))


def test_conv_sg_argument_errors():
    sg = ConvSyntheticGradient(4, (), 3, context_features=3)
    h = torch.randn(2, 4, 5, 5)
    y = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"^h: expected a 4-d tensor, got shape \(2, 100\)"):
        sg(h.reshape(2, -1), y)
    with pytest.raises(ValueError, match=r"^h: expected 4 channels, got shape \(2, 3, 5, 5\)"):
        sg(h[:, :3], y)
    with pytest.raises(TypeError, match="^h: expected dtype torch.float32, got torch.float64"):
        sg(h.double(), y)
    with pytest.raises(ValueError, match="^h: expected device cpu, got meta"):
        sg(h.to("meta"), y)
    with pytest.raises(ValueError, match="^context: the SG model is conditioned"):
        sg(h)
    with pytest.raises(ValueError, match="^context: the SG model takes no context"):
        ConvSyntheticGradient(4)(h, y)
    with pytest.raises(ValueError, match=r"^context: labels must lie in \[0, 3\)"):
        sg(h, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"^context: expected shape \(2, 3\)"):
        sg(h, torch.randn(2, 4))
    with pytest.raises(ValueError, match="^context: expected device cpu, got meta"):
        sg(h, y.to("meta"))


@pytest.mark.parametrize("kernel_size", [0, 2, 4, -3, 3.0])
def test_conv_sg_bad_kernel_size(kernel_size):
    with pytest.raises(ValueError, match=r"^kernel_size: expected an odd int >= 1 \(keeps the spatial size\)"):
        ConvSyntheticGradient(4, kernel_size=kernel_size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=0), "^channels: expected positive ints"),
        (dict(channels=3, hidden_channels=(0,)), "^hidden_channels: expected positive ints"),
        (dict(channels=3, context_features=-2), "^context_features: expected an int >= 0"),
    ],
)
def test_conv_sg_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvSyntheticGradient(**kwargs)
