"""fastdni.nn.DecoupledCNN: the conv block step on the fused ops (unfold -> dni_forward -> batch_norm_act -> max pool,
the synthetic gradient through the pooling's backward, batch_norm_act_update_ -> convolution_backward (dx) ->
dni_update_ on the unfolded input; a linear conv SG as dni_forward / dni_update_ over its unfolded map) trains exactly
as DecoupledSequential over nn.Sequential(Conv2d, BatchNorm2d, act, MaxPool2d) blocks with ConvSyntheticGradient
interfaces: the same learning curve over hundreds of steps (fp64), the same parameters, running statistics and
eval-mode outputs, in dni, cdni and backprop modes."""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdni.ops as ops
from fastdni.experiments import mnist
from fastdni.nn import DecoupledCNN, DecoupledSequential
from fastdni.nn.fused_cnn import channels_last_input
from helpers import randomise_

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="no fastdni._C"))]
ACT_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity,
               "leaky_relu": functools.partial(nn.LeakyReLU, 0.01)}
OPTIMIZERS = {
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "sgd": functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, dampening=0.1),
}
# As in test_nn_fused_bn.py: fp64 keeps hundreds of steps' rounding differences ~1e-14; the conv biases before a
# BatchNorm have a true gradient of 0, which Adam turns into rounding-noise steps of ~lr * 1e-9 that differ between
# the paths (carried into the running means and the eval-mode output).
CURVE_TOLERANCE = dict(rtol=1e-9, atol=1e-10)
BIAS_TOLERANCE = dict(rtol=0.0, atol=1e-7)
MODES = {"dni": ((4,), 0), "cdni": ((), 10), "backprop": ((4,), 0)}  # sg_hidden, context_features
BATCH, IN_CHANNELS, IMAGE = 12, 2, (10, 9)


def twin_models(backend, *, mode="dni", activation="relu", optimizer="adam", batch_norm=True, sg_hidden=None,
                context_map=True, image=IMAGE, channels=(3, 5), kernel_size=3, in_channels=IN_CHANNELS,
                dtype=torch.float64, weight_grad="gemm"):
    """A DecoupledCNN and the DecoupledSequential over copies of its convs, norms, classifier and SG models."""
    opt = OPTIMIZERS[optimizer]
    default_hidden, context_features = MODES[mode]
    torch.manual_seed(0)
    fused = DecoupledCNN(in_channels, channels, image, 10, kernel_size=kernel_size, batch_norm=batch_norm,
                         activation=activation, sg_hidden=default_hidden if sg_hidden is None else sg_hidden,
                         sg_kernel_size=3, context_features=context_features, context_map=context_map, optimizer=opt,
                         gradient_scale=BATCH, backend=backend, weight_grad=weight_grad,
                         mode="backprop" if mode == "backprop" else "dni").to(dtype)
    for sg in fused.synthetic_gradients:  # move the zero-initialised output convolutions off zero
        randomise_(sg, 0.1)
    for norm in fused.norms or ():  # gamma, beta and the running statistics off their initial 1 and 0
        randomise_(norm, 0.2)
        norm.weight.data.add_(1.0)
        norm.running_var.abs_().add_(0.5)
    # .to(dtype) replaced the parameters the optimizers were built on: rebuild them.
    norms = fused.norms or [nn.Identity()] * len(fused.convs)
    fused.optimizers = [opt([*conv.parameters(), *norm.parameters()]) for conv, norm in zip(fused.convs, norms)]
    fused.optimizers.append(opt(fused.head.parameters()))
    fused.sg_optimizers = [opt(sg.parameters()) for sg in fused.synthetic_gradients]
    blocks = [nn.Sequential(copy.deepcopy(conv), copy.deepcopy(norm), ACT_MODULES[activation](), nn.MaxPool2d(2))
              for conv, norm in zip(fused.convs, norms)]
    blocks.append(nn.Sequential(nn.Flatten(), copy.deepcopy(fused.head)))
    sgs = copy.deepcopy(list(fused.synthetic_gradients)) if mode != "backprop" else None
    reference = DecoupledSequential(blocks, sgs, optimizer=opt, gradient_scale=BATCH, sg_targets="bootstrap",
                                    mode="backprop" if mode == "backprop" else "dni")  # DecoupledCNN's targets
    return fused, reference


def batches(steps, dtype=torch.float64, seed=1, image=IMAGE, in_channels=IN_CHANNELS, context="labels"):
    # class-dependent inputs (a fixed random image per class under the noise): something to learn, so the curve moves
    templates = 1.5 * torch.randn(10, in_channels, *image, generator=torch.Generator().manual_seed(0), dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        x = torch.randn(BATCH, in_channels, *image, generator=gen, dtype=dtype) + templates[y]
        yield x, y


def train_curves(models, steps, *, context=None, dtype=torch.float64, **data):
    """``context``: None, ``"labels"`` or ``"features"`` (the one-hot labels as floats)."""
    curves = [[] for _ in models]
    for x, y in batches(steps, dtype, **data):
        c = None if context is None else y if context == "labels" else F.one_hot(y, 10).to(dtype)
        for curve, model in zip(curves, models):
            result = model.train_step(x, y, F.cross_entropy, c)
            curve.append(torch.stack([result.loss, *result.sg_losses]))
    return [torch.stack(c) for c in curves]


def assert_same_state(fused, reference, tolerance=CURVE_TOLERANCE, bias_tolerance=BIAS_TOLERANCE, **data):
    """Parameters and BatchNorm buffers, block by block, and the eval-mode outputs."""
    for i, conv in enumerate(fused.convs):
        block = reference.blocks[i]
        torch.testing.assert_close(conv.weight, block[0].weight, **tolerance)
        torch.testing.assert_close(conv.bias, block[0].bias, **(bias_tolerance if fused.norms else tolerance))
        if fused.norms is not None:
            norm = fused.norms[i]
            for got, want in ((norm.weight, block[1].weight), (norm.bias, block[1].bias),
                              (norm.running_var, block[1].running_var)):
                torch.testing.assert_close(got, want, **tolerance)
            torch.testing.assert_close(norm.running_mean, block[1].running_mean, **bias_tolerance)
            assert int(norm.num_batches_tracked) == int(block[1].num_batches_tracked)
    torch.testing.assert_close(fused.head.weight, reference.blocks[-1][1].weight, **tolerance)
    x = next(batches(1, fused.head.weight.dtype, seed=7, **data))[0]
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), reference.eval()(x), **bias_tolerance)
    fused.train(), reference.train()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_learning_curve_matches_decoupled_sequential(backend, mode):
    """The acceptance test of issue 17 for cnn: 300 steps, the same losses (task and SG) at every step."""
    steps = 300 if backend == "cpu" else 40  # the reference is the oracle of the ops: fewer steps suffice
    fused, reference = twin_models(backend, mode=mode)
    got, want = train_curves((fused, reference), steps, context="labels" if mode == "cdni" else None)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    if steps >= 300:
        assert got[-20:, 0].mean() < 0.9 * got[:20, 0].mean()  # it learned: the comparison is of a moving curve
    assert_same_state(fused, reference)
    assert fused.sg_fusion_blockers == [None, None]  # both SGs (dni's MLP conv SG, cdni's linear one) ran on the ops


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_aten_weight_gradients_train_alike(mode):
    """weight_grad="aten": the conv weights stepped by the optimizer's step() on convolution_backward's gradients."""
    fused, reference = twin_models("auto", mode=mode, weight_grad="aten")
    got, want = train_curves((fused, reference), 100, context="labels" if mode == "cdni" else None)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert_same_state(fused, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["identity", "tanh", "gelu", "leaky_relu"])
def test_without_batch_norm_other_activations_and_sgd_match(backend, activation):
    fused, reference = twin_models(backend, activation=activation, optimizer="sgd", batch_norm=False, sg_hidden=(),
                                   mode="cdni")
    got, want = train_curves((fused, reference), 20, context="labels")
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert_same_state(fused, reference)


@pytest.mark.parametrize("context_map, context, sg_hidden", [(False, "labels", ()), (True, "features", ()),
                                                            (False, "features", ()), (True, "labels", (4, 3)),
                                                            (False, "labels", (2,))])
def test_label_bias_per_channel_float_context_and_mlp_sgs_with_context(context_map, context, sg_hidden):
    """The fused conv SG's context term in its other forms: a per-channel bias, float features (with or without the
    per-position map), under hidden convs (the term added before the first ReLU)."""
    fused, reference = twin_models("auto", mode="cdni", context_map=context_map, sg_hidden=sg_hidden)
    got, want = train_curves((fused, reference), 30, context=context)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert_same_state(fused, reference)
    assert fused.sg_fusion_blockers == [None, None]


def test_an_sg_with_frozen_parameters_runs_on_autograd():
    fused, reference = twin_models("auto", mode="dni")
    for model in (fused, reference):
        sgs = model.synthetic_gradients if model is fused else [i.synthetic_gradient for i in model.interfaces]
        sgs[1].convs[0].bias.requires_grad_(False)
    got, want = train_curves((fused, reference), 20)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert fused.sg_fusion_blockers == [None, "some SG parameters are frozen (requires_grad=False)"]


@pytest.mark.parametrize("image, kernel_size, in_channels", [((7, 5), 5, 3), ((6, 11), 1, 1), ((4, 4), 3, 2)])
def test_odd_shapes(image, kernel_size, in_channels):
    """Odd maps (pooled with a floor), a 1x1 and a 5x5 kernel, odd channel counts, a linear conv SG. (SGD: Adam's
    noise steps of the biases before a BatchNorm, ``BIAS_TOLERANCE``, grow large for a 1x1 conv of one channel.)"""
    fused, reference = twin_models("auto", mode="cdni", image=image, kernel_size=kernel_size, in_channels=in_channels,
                                   channels=(3, 7), optimizer="sgd")
    data = dict(image=image, in_channels=in_channels)
    got, want = train_curves((fused, reference), 15, context="labels", **data)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert_same_state(fused, reference, **data)


@pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="no fastdni._C")
def test_fp32_curve_stays_close():
    """fp32: the fused and autograd paths round differently; over 50 steps the curves stay within 1e-3."""
    fused, reference = twin_models("cpu", mode="cdni", dtype=torch.float32)
    got, want = train_curves((fused, reference), 50, context="labels", dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_checkpoint_resumes_the_same_curve():
    """state_dict + optimizer_state_dict (what fastdni.train's checkpoints hold) into a fresh model: the next steps
    are those of the model that went on."""
    fused, _ = twin_models("auto", mode="cdni")
    train_curves((fused,), 5, context="labels")
    restored, _ = twin_models("auto", mode="cdni")
    restored.load_state_dict(fused.state_dict())
    restored.load_optimizer_state_dict(copy.deepcopy(fused.optimizer_state_dict()))
    assert int(restored.norms[0].num_batches_tracked) == 5
    got, want = train_curves((restored, fused), 5, context="labels", seed=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_contiguous_weights_and_optimizer_state_are_taken_as_they_come():
    """The GEMM steps a conv weight and its Adam moments through a channels-last view: a weight assigned anew or a
    state loaded contiguous (e.g. from another model's checkpoint) is made channels-last once, values unchanged."""
    fused, reference = twin_models("auto", mode="cdni")
    train_curves((fused, reference), 3, context="labels")
    convs = [*fused.convs, *(conv for sg in fused.synthetic_gradients for conv in sg.convs)]
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous()
    for opt in (*fused.optimizers, *fused.sg_optimizers):
        for state in opt.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].contiguous()
    got, want = train_curves((fused, reference), 10, context="labels", seed=4)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)


def test_eval_mode_uses_the_running_statistics():
    fused, reference = twin_models("auto")
    train_curves((fused, reference), 3)
    x = next(batches(1, seed=5))[0]
    with torch.no_grad():
        out = fused.eval()(x)
        torch.testing.assert_close(out, reference.eval()(x), **BIAS_TOLERANCE)
        torch.testing.assert_close(fused(x[:1]), out[:1], rtol=1e-12, atol=1e-12)  # per example: no batch statistics
    assert int(fused.norms[0].num_batches_tracked) == 3  # eval changed no statistics


def test_mnist_builds_the_fused_cnn_with_the_autograd_models_initialisation():
    """``--model cnn`` is DecoupledCNN by default; ``--backend autograd`` DecoupledSequential; same parameters."""
    config = mnist.RunConfig(mode="cdni", steps=1, lr=1e-3, sg_lr=1e-3, lr_schedule="constant", model="cnn",
                             cnn_channels=(4, 6), sg_hidden=())
    fused = mnist.build_model(config)
    autograd = mnist.build_model(dataclasses.replace(config, backend="autograd"))
    assert isinstance(fused, DecoupledCNN) and isinstance(autograd, DecoupledSequential)
    fused_tensors = [*fused.convs[0].parameters(), *fused.norms[0].parameters(), *fused.convs[1].parameters(),
                     *fused.norms[1].parameters(), *fused.head.parameters(), *fused.synthetic_gradients.parameters()]
    autograd_tensors = [*autograd.blocks.parameters(), *(p for i in autograd.interfaces for p in i.parameters())]
    assert len(fused_tensors) == len(autograd_tensors)
    for a, b in zip(fused_tensors, autograd_tensors):
        assert torch.equal(a, b)
    assert fused.synthetic_gradients[0].context_map == autograd.interfaces[0].synthetic_gradient.context_map == (14, 14)


def test_bad_arguments_name_themselves():
    fused, _ = twin_models("auto", mode="cdni")
    x, y = next(batches(1))
    with pytest.raises(ValueError, match=r"^x: expected a batch \[B >= 1, 2, 10, 9\], got shape \(12, 2, 9, 10\)"):
        fused.train_step(x.transpose(2, 3), y, F.cross_entropy, y)
    with pytest.raises(ValueError, match=r"^x: expected a 4-d tensor"):
        fused(x.flatten(1))
    with pytest.raises(ValueError, match=r"^x: expected a batch"):
        fused.train_step(x[:0], y[:0], F.cross_entropy, y[:0])
    with pytest.raises(ValueError, match=r"^context"):
        fused.train_step(x, y, F.cross_entropy)  # cDNI SGs need the labels
    with pytest.raises(ValueError, match=r"^context"):
        fused.train_step(x, y + 10, F.cross_entropy, y + 10)  # labels beyond the SG's 10 classes
    with pytest.raises(TypeError, match=r"^x: expected"):
        fused(x.float())
    for kwargs, pattern in ((dict(kernel_size=4), r"^kernel_size: expected an odd int"),
                            (dict(sg_kernel_size=0), r"^sg_kernel_size"),
                            (dict(channels=()), r"^channels: expected at least one"),
                            (dict(image_size=3), r"^image_size: 3 is pooled to nothing"),
                            (dict(image_size=(4, 4, 4)), r"^image_size: expected"),
                            (dict(backend="gpu"), r"^backend"), (dict(mode="sg"), r"^mode"),
                            (dict(weight_grad="unfold"), r"^weight_grad: expected one of \('aten', 'gemm'\)"),
                            (dict(bn_momentum=None), r"^bn_momentum"), (dict(activation="swish"), r"activation")):
        args = dict(in_channels=1, channels=(2, 3), image_size=8, out_features=10) | kwargs
        with pytest.raises(ValueError, match=pattern):
            DecoupledCNN(**args)


def test_a_single_example_with_one_position_is_rejected():
    """BatchNorm2d's batch statistics need two values per channel: one example of a 1x1 map has one."""
    fused = DecoupledCNN(1, (2,), 1, 3, kernel_size=1, pool=1)
    with pytest.raises(ValueError, match=r"^pre: expected a batch of at least 2 rows"):
        fused.train_step(torch.randn(1, 1, 1, 1), torch.tensor([0]), F.cross_entropy)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_input_makes_the_convolution_return_channels_last_maps(channels):
    """One channel: torch keeps plain strides for channels_last (the same memory), and the convolution would then
    return a plain map that the block's rows and its backward copy; the spelled-out strides avoid both copies."""
    x = torch.randn(4, channels, 9, 7)
    cl = channels_last_input(x)
    assert torch.equal(cl, x) and cl.stride() == (9 * 7 * channels, 1, 7 * channels, channels)
    assert torch.equal(channels_last_input(x[1:]), x[1:])  # a view into a larger storage keeps its offset
    weight = torch.randn(5, channels, 3, 3).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(cl, weight, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride()[1] == 1
