"""fastdni.nn.DecoupledMLP(batch_norm=True): the fcn-bn layer step on the fused ops (dni_forward -> batch_norm_act ->
sg_predict, then batch_norm_act_update_ -> dni_update_ -> sg_regression_) trains exactly as DecoupledSequential over
nn.Sequential(Linear, BatchNorm1d, act) blocks: the same learning curve over hundreds of steps (fp64), the same
parameters, running statistics and eval-mode outputs, in dni, cdni and backprop modes."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdni.ops as ops
from fastdni.nn import DecoupledMLP, DecoupledSequential
from fastdni.reference import SGParams
from helpers import randomise_

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="no fastdni._C"))]
ACT_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity,
               "leaky_relu": functools.partial(nn.LeakyReLU, 0.01)}
OPTIMIZERS = {
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "sgd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1),
}
# Hundreds of steps compound rounding differences; fp64 keeps them ~1e-12 (measured ~1e-14 over 300 steps).
CURVE_TOLERANCE = dict(rtol=1e-9, atol=1e-10)
# The Linear's bias before a BatchNorm has a true gradient of exactly 0 (the normalisation removes any shift), so
# each path steps it on its own rounding noise (~1e-17), which Adam divides by sqrt(v) + eps ~ eps = 1e-8: steps of
# ~lr * 1e-9 that differ between the paths (measured ~1e-10 after 300 steps), carried into the running mean and the
# eval-mode output. Everything else matches to CURVE_TOLERANCE.
BIAS_TOLERANCE = dict(rtol=0.0, atol=1e-8)
MODES = {"dni": ((8,), 0), "cdni": ((), 10), "backprop": ((8,), 0)}  # sg_hidden, context_features


def twin_models(backend, *, mode="dni", activation="relu", optimizer="adam", dtype=torch.float64, sg_targets="bootstrap"):
    """A DecoupledMLP(batch_norm=True) and the DecoupledSequential over copies of its layers, norms and SG models."""
    opt = OPTIMIZERS[optimizer]
    sg_hidden, context_features = MODES[mode]
    torch.manual_seed(0)
    fused = DecoupledMLP(20, (16, 12), 10, activation=activation, sg_hidden=sg_hidden, context_features=context_features,
                         optimizer=opt, gradient_scale=32, backend=backend, batch_norm=True,
                         mode="backprop" if mode == "backprop" else "dni", sg_targets=sg_targets).to(dtype)
    for sg in fused.synthetic_gradients:  # move the zero-initialised output layers off zero
        randomise_(sg, 0.1)
    for norm in fused.norms:  # gamma, beta and the running statistics off their initial 1 and 0
        randomise_(norm, 0.2)
        norm.weight.data.add_(1.0)
        norm.running_var.abs_().add_(0.5)
    # .to(dtype) replaced the parameters the optimizers were built on: rebuild them.
    fused.optimizers = [opt([*layer.parameters(), *norm.parameters()]) for layer, norm in zip(fused.layers, fused.norms)]
    fused.optimizers.append(opt(fused.layers[-1].parameters()))
    fused.sg_optimizers = [opt(sg.parameters()) for sg in fused.synthetic_gradients]
    blocks = [nn.Sequential(copy.deepcopy(layer), copy.deepcopy(norm), ACT_MODULES[activation]())
              for layer, norm in zip(fused.layers[:-1], fused.norms)]
    sgs = copy.deepcopy(list(fused.synthetic_gradients)) if mode != "backprop" else None
    reference = DecoupledSequential(blocks + [copy.deepcopy(fused.layers[-1])], sgs, optimizer=opt, gradient_scale=32,
                                    mode="backprop" if mode == "backprop" else "dni", sg_targets=sg_targets)
    return fused, reference


def batches(steps, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y = torch.randint(0, 10, (32,), generator=gen)
        # class-dependent inputs: something to learn, so the curve moves
        x = torch.randn(32, 20, generator=gen, dtype=dtype) + F.one_hot(y, 20).to(dtype) * 4.0
        yield x, y


def train_curves(models, steps, *, context=False, dtype=torch.float64):
    curves = [[] for _ in models]
    for x, y in batches(steps, dtype):
        for curve, model in zip(curves, models):
            result = model.train_step(x, y, F.cross_entropy, y if context else None)
            curve.append(torch.stack([result.loss, *result.sg_losses]))
    return [torch.stack(c) for c in curves]


def assert_same_state(fused, reference, tolerance=CURVE_TOLERANCE, bias_tolerance=BIAS_TOLERANCE):
    """Parameters and BatchNorm buffers, block by block, and the eval-mode outputs."""
    for i, (layer, norm) in enumerate(zip(fused.layers, fused.norms)):
        linear, batch_norm = reference.blocks[i][0], reference.blocks[i][1]
        for got, want in ((layer.weight, linear.weight), (norm.weight, batch_norm.weight), (norm.bias, batch_norm.bias),
                          (norm.running_var, batch_norm.running_var)):
            torch.testing.assert_close(got, want, **tolerance)
        torch.testing.assert_close(layer.bias, linear.bias, **bias_tolerance)
        torch.testing.assert_close(norm.running_mean, batch_norm.running_mean, **bias_tolerance)
        assert int(norm.num_batches_tracked) == int(batch_norm.num_batches_tracked)
    torch.testing.assert_close(fused.layers[-1].weight, reference.blocks[-1].weight, **tolerance)
    torch.testing.assert_close(fused.layers[-1].bias, reference.blocks[-1].bias, **tolerance)
    x = next(batches(1, fused.layers[0].weight.dtype, seed=7))[0]
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), reference.eval()(x), **bias_tolerance)
    fused.train(), reference.train()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_learning_curve_matches_decoupled_sequential(backend, mode):
    """The acceptance test of issue 17 for fcn-bn: 300 steps, the same losses (task and SG) at every step."""
    steps = 300 if backend == "cpu" else 60  # the reference is the oracle of the ops: fewer steps suffice
    fused, reference = twin_models(backend, mode=mode)
    got, want = train_curves((fused, reference), steps, context=mode == "cdni")
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert got[-10:, 0].mean() < 0.85 * got[:10, 0].mean()  # it learned: the comparison is of a moving curve
    assert_same_state(fused, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_true_sg_targets_match_decoupled_sequential(backend, mode):
    """sg_targets="true": every SG regressed onto the true gradient, on the fused ops as on autograd."""
    fused, reference = twin_models(backend, mode=mode, sg_targets="true")
    got, want = train_curves((fused, reference), 60, context=mode == "cdni")
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert_same_state(fused, reference)
    bootstrap, _ = twin_models(backend, mode=mode)
    other = train_curves((bootstrap,), 60, context=mode == "cdni")[0]
    assert not torch.allclose(other[:, 1], got[:, 1])  # the bottom SG's loss: another target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["identity", "tanh", "gelu", "leaky_relu"])
def test_other_activations_and_sgd_match(backend, activation):
    fused, reference = twin_models(backend, activation=activation, optimizer="sgd")
    got, want = train_curves((fused, reference), 20)
    torch.testing.assert_close(got, want, **CURVE_TOLERANCE)
    assert_same_state(fused, reference)


@pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="no fastdni._C")
def test_fp32_curve_stays_close():
    """fp32: the fused and autograd paths round differently; over 100 steps the curves stay within 1e-3."""
    fused, reference = twin_models("cpu", dtype=torch.float32)
    got, want = train_curves((fused, reference), 100, dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_state_dict_holds_the_running_statistics():
    fused, _ = twin_models("reference")
    train_curves((fused,), 3)
    state = fused.state_dict()
    for i, norm in enumerate(fused.norms):
        assert torch.equal(state[f"norms.{i}.running_mean"], norm.running_mean)
        assert torch.equal(state[f"norms.{i}.running_var"], norm.running_var)
        assert int(state[f"norms.{i}.num_batches_tracked"]) == 3
    restored, _ = twin_models("reference")
    restored.load_state_dict(state)
    x = next(batches(1))[0]
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), fused.eval()(x))


def test_bad_batch_norm_arguments():
    with pytest.raises(ValueError, match=r"^bn_momentum: expected a number in \[0, 1\], got None"):
        DecoupledMLP(4, (3,), 2, batch_norm=True, bn_momentum=None)
    with pytest.raises(ValueError, match=r"^bn_eps"):
        DecoupledMLP(4, (3,), 2, batch_norm=True, bn_eps=0.0)


def test_a_batch_of_one_row_is_rejected():
    """Batch statistics need two rows, as nn.BatchNorm1d in training says too."""
    fused, _ = twin_models("reference")
    with pytest.raises(ValueError, match=r"^pre: expected a batch of at least 2 rows"):
        fused.train_step(torch.randn(1, 20, dtype=torch.float64), torch.tensor([3]), F.cross_entropy)


def _bn_layer_step(x, weight, bias, gamma, beta, mean, var, sg_weight, sg_bias, state, hyper):
    """One fcn-bn layer step on the ops, as DecoupledMLP runs it (the SG's regression left out)."""
    pre = ops.dni_forward(x, weight, bias, activation="identity").h
    normed = ops.batch_norm_act(pre, gamma, beta, mean, var, activation="relu")
    predicted = ops.sg_predict(normed.h, SGParams((sg_weight,), (sg_bias,), None))
    grad_pre = ops.batch_norm_act_update_(gamma, beta, normed, predicted.prediction, "adam", hyper, state[4:])
    dx = ops.dni_update_(x, weight, bias, ops.ForwardResult(grad_pre, grad_pre.new_empty(0), grad_pre, []), "adam", hyper,
                         state[:4], activation="identity", need_input_grad=True)
    return normed.h, normed.running_mean, normed.running_var, dx


def test_torch_compile_fullgraph_of_a_bn_layer_step():
    """The five op calls trace into one graph (fake kernels, the mutations of the update ops functionalised)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 12, generator=gen)
    params = [torch.randn(8, 12, generator=gen) / 4, torch.randn(8, generator=gen), 1 + torch.rand(8, generator=gen),
              torch.randn(8, generator=gen) * 0.1, torch.randn(8, generator=gen), 1 + torch.rand(8, generator=gen),
              torch.randn(8, 8, generator=gen) * 0.3, torch.randn(8, generator=gen) * 0.1]
    hyper = [1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]

    def fresh():
        ps = [p.clone() for p in params]
        return ps, [torch.zeros_like(ps[i]) for i in (0, 0, 1, 1, 2, 2, 3, 3)]

    eager_params, eager_state = fresh()
    want = _bn_layer_step(x, *eager_params, eager_state, hyper)
    got_params, got_state = fresh()
    got = torch.compile(_bn_layer_step, fullgraph=True, backend="aot_eager")(x, *got_params, got_state, hyper)
    for a, b in zip([*got, *got_params, *got_state], [*want, *eager_params, *eager_state]):
        torch.testing.assert_close(a, b)
    assert not torch.equal(got_params[2], params[2])  # gamma stepped in place under compile too
