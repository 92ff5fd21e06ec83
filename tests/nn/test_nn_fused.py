"""fastdni.nn.DecoupledMLP: the fused-op MLP trains exactly as DecoupledSequential over Linear+act blocks
(every backend, both dtypes), backprop mode, checkpoints, torch.compile of a fused training step."""
from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdni.ops as ops
from fastdni.nn import DecoupledMLP, DecoupledSequential
from helpers import randomise_

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="no fastdni._C"))]
ACT_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}
OPTIMIZERS = {
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    "sgd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1),
}
# Several steps of training compound rounding differences: fp32 gets a looser bound than one op.
STEP_TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def twin_models(dtype, backend, *, activation="relu", sg_hidden=(8,), context_features=0, optimizer="adam",
                sg_targets="bootstrap"):
    """A DecoupledMLP and the DecoupledSequential over copies of its layers and SG models."""
    opt = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    fused = DecoupledMLP(20, (16, 12), 10, activation=activation, sg_hidden=sg_hidden, context_features=context_features,
                         optimizer=opt, gradient_scale=32, backend=backend, sg_targets=sg_targets).to(dtype)
    for sg in fused.synthetic_gradients:  # move the zero-initialised output layers off zero
        randomise_(sg, 0.1)
    # .to(dtype) replaced the parameters the optimizers were built on: rebuild them.
    fused.optimizers = [opt(layer.parameters()) for layer in fused.layers]
    fused.sg_optimizers = [opt(sg.parameters()) for sg in fused.synthetic_gradients]
    blocks = [nn.Sequential(copy.deepcopy(layer), ACT_MODULES[activation]()) for layer in fused.layers[:-1]]
    reference = DecoupledSequential(blocks + [copy.deepcopy(fused.layers[-1])], copy.deepcopy(list(fused.synthetic_gradients)),
                                    optimizer=opt, gradient_scale=32, sg_targets=sg_targets)
    return fused, reference


def run_steps(models, dtype, steps=3, context=False):
    results = []
    for _ in range(steps):
        x, y = torch.randn(32, 20, dtype=dtype), torch.randint(0, 10, (32,))
        results.append([m.train_step(x, y, F.cross_entropy, y if context else None) for m in models])
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("sg_hidden,context", [((8,), False), ((), True), ((8, 6), True)])
def test_matches_decoupled_sequential(dtype, backend, optimizer, sg_hidden, context):
    fused, reference = twin_models(dtype, backend, sg_hidden=sg_hidden, context_features=10 if context else 0,
                                   optimizer=optimizer)
    for got, want in run_steps((fused, reference), dtype, context=context):
        torch.testing.assert_close(got.loss, want.loss, **STEP_TOLERANCES[dtype])
        torch.testing.assert_close(torch.stack(got.sg_losses), torch.stack(want.sg_losses), **STEP_TOLERANCES[dtype])
    for p, q in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("context", [False, True])
def test_true_sg_targets_match_decoupled_sequential(backend, activation, context):
    fused, reference = twin_models(torch.float64, backend, activation=activation, sg_targets="true",
                                   context_features=10 if context else 0)
    for got, want in run_steps((fused, reference), torch.float64, steps=5, context=context):
        torch.testing.assert_close(got.loss, want.loss, **STEP_TOLERANCES[torch.float64])
        torch.testing.assert_close(torch.stack(got.sg_losses), torch.stack(want.sg_losses), **STEP_TOLERANCES[torch.float64])
    for p, q in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOLERANCES[torch.float64])
    with pytest.raises(ValueError, match="sg_targets"):
        DecoupledMLP(4, (3,), 2, sg_targets="oracle")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "gelu", "identity"])
def test_other_activations_match(backend, activation):
    fused, reference = twin_models(torch.float64, backend, activation=activation)
    run_steps((fused, reference), torch.float64)
    for p, q in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backprop_mode_is_plain_backprop(backend):
    fused, reference = twin_models(torch.float64, backend)
    fused.mode = reference.mode = "backprop"
    run_steps((fused, reference), torch.float64)
    for p, q in zip(fused.layers.parameters(), reference.blocks.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOLERANCES[torch.float64])


def test_backends_agree_and_training_moves_params():
    models = [twin_models(torch.float32, b)[0] for b in ("reference", "auto")]
    before = [p.clone() for p in models[0].parameters()]
    run_steps(models, torch.float32)
    for p, q, p0 in zip(models[0].parameters(), models[1].parameters(), before):
        torch.testing.assert_close(p, q, **STEP_TOLERANCES[torch.float32])
        assert not torch.equal(p, p0)


def test_optimizer_state_round_trips_through_checkpoint():
    a, _ = twin_models(torch.float64, "auto")
    run_steps((a,), torch.float64, steps=2)
    b, _ = twin_models(torch.float64, "auto")
    buffer = io.BytesIO()  # through serialisation: an in-process load_state_dict would alias a's state tensors
    torch.save({"model": a.state_dict(), "optimizers": a.optimizer_state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    b.load_state_dict(saved["model"])
    b.load_optimizer_state_dict(saved["optimizers"])
    torch.manual_seed(1)
    run_steps((a,), torch.float64, steps=2)
    torch.manual_seed(1)
    run_steps((b,), torch.float64, steps=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert float(a.optimizers[0].state[a.layers[0].weight]["step"]) == 4


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="hidden"):
        DecoupledMLP(4, (), 2)
    with pytest.raises(ValueError, match="backend"):
        DecoupledMLP(4, (3,), 2, backend="gpu")
    with pytest.raises(ValueError, match="activation"):
        DecoupledMLP(4, (3,), 2, activation="swish")
    with pytest.raises(ValueError, match="mode"):
        DecoupledMLP(4, (3,), 2, mode="greedy")
    model = DecoupledMLP(4, (3,), 2, optimizer=functools.partial(torch.optim.RMSprop, lr=1e-3))
    with pytest.raises(TypeError, match="optimizer"):
        model.train_step(torch.randn(5, 4), torch.randint(0, 2, (5,)), F.cross_entropy)
    model = DecoupledMLP(4, (3,), 2, optimizer=functools.partial(torch.optim.Adam, lr=1e-3, amsgrad=True))
    with pytest.raises(ValueError, match="amsgrad"):
        model.train_step(torch.randn(5, 4), torch.randint(0, 2, (5,)), F.cross_entropy)


def fused_layer_step(x, weight, bias, sg_weight, sg_bias, layer_state, sg_state, target, hyper):
    """One DNI layer step on torch.ops.fastdni: forward, the layer's Adam step, the SG's Adam step."""
    h, pre, prediction, hidden = torch.ops.fastdni.dni_forward(x, weight, bias, [sg_weight], [sg_bias], None, None, "relu")
    dx = torch.ops.fastdni.dni_update_(x, weight, bias, h, pre, prediction, layer_state, "adam", hyper, 4.0, "relu", True)
    loss = torch.ops.fastdni.sg_regression_(h, hidden, prediction, target, [sg_weight], [sg_bias], None, None, sg_state,
                                            "adam", hyper, 4.0, 1.0)
    return h, dx, loss


def test_torch_compile_fullgraph_of_a_fused_training_step():
    torch._dynamo.reset()
    x, target = torch.randn(16, 12), torch.randn(16, 8)
    params = [torch.randn(8, 12), torch.randn(8), torch.randn(8, 8) * 0.1, torch.randn(8) * 0.1]
    hyper = [1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]

    def fresh():
        ps = [p.clone() for p in params]
        return ps, [torch.zeros_like(ps[i]) for i in (0, 0, 1, 1)], [torch.zeros_like(ps[i]) for i in (2, 2, 3, 3)]

    eager_params, eager_layer, eager_sg = fresh()
    want = fused_layer_step(x, *eager_params, eager_layer, eager_sg, target, hyper)
    compiled = torch.compile(fused_layer_step, fullgraph=True, backend="inductor")
    got_params, got_layer, got_sg = fresh()
    got = compiled(x, *got_params, got_layer, got_sg, target, hyper)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_params + got_layer + got_sg, eager_params + eager_layer + eager_sg):
        torch.testing.assert_close(a, b)  # the in-place updates happened under compile too
    assert not torch.equal(got_params[0], params[0])
