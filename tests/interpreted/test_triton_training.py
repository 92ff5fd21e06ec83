"""Training on the Triton backend: DecoupledMLP steps on real MNIST batches equal the reference backend's, backprop
mode differentiates through the Triton forward, and torch.compile(fullgraph=True) traces a step through the ops.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdni.ops as ops
from fastdni.data import DatasetError
from fastdni.data.mnist import load_mnist
from fastdni.kernels import launch_counter
from fastdni.nn import DecoupledMLP
from fastdni.ops import _triton
from fastdni.reference import init_sg_params

from conftest import DEVICE

BUILDS_ON_CPU = True  # MNIST and the models are built on the CPU, then moved
STEPS, BATCH = 3, 64
# fp32 throughout: three steps of Adam (lr 1e-3) agree to summation order; 1e-4 leaves room for the
# reordering compounding over the steps, far below one step (1e-3).
STEP_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def mnist_batches():
    try:
        data = load_mnist()
    except DatasetError as err:
        pytest.skip(f"MNIST not available: {err}")
    x = data.train_images[: STEPS * BATCH].flatten(1)
    y = data.train_labels[: STEPS * BATCH]
    return [(x[i:i + BATCH].to(DEVICE), y[i:i + BATCH].to(DEVICE)) for i in range(0, STEPS * BATCH, BATCH)]


def _twins(**kwargs):
    torch.manual_seed(0)
    reference = DecoupledMLP(784, (64, 48), 10, backend="reference", **kwargs)
    with torch.no_grad():  # a trained SG, not the zero one, so the first steps already move every layer
        for sg in reference.synthetic_gradients:
            for p in sg.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    triton = copy.deepcopy(reference)
    triton.backend = "triton"
    return reference.to(DEVICE), triton.to(DEVICE)


@pytest.mark.parametrize("context_features", [0, 10], ids=["dni", "cdni"])
@pytest.mark.parametrize("sg_hidden", [(), (32,)], ids=["linear-sg", "mlp-sg"])
def test_decoupled_mlp_mnist_steps_match_reference(mnist_batches, context_features, sg_hidden):
    models = _twins(context_features=context_features, sg_hidden=sg_hidden)
    before = [p.detach().clone() for p in models[0].parameters()]
    for x, y in mnist_batches:
        results = [m.train_step(x, y, F.cross_entropy, y if context_features else None) for m in models]
        torch.testing.assert_close(results[1].loss, results[0].loss, **STEP_TOL)
        for want, got in zip(results[0].sg_losses, results[1].sg_losses):
            torch.testing.assert_close(got, want, **STEP_TOL)
    named = list(models[0].named_parameters())
    for (name, want), got, start in zip(named, models[1].parameters(), before):
        assert not torch.equal(want.detach(), start), f"{name} did not train"
        torch.testing.assert_close(got.detach(), want.detach(), **STEP_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["dni", "backprop"])
def test_fcn_bn_mnist_steps_match_reference(mnist_batches, mode):
    """batch_norm=True on backend="triton": the GEMMs, the BatchNorm ops and the SG side on the Triton kernels: the
    same losses at every step.

    Only the losses are compared, and to 2e-3 rather than STEP_TOL: a BatchNorm makes the gradient of any weight on
    an input that is constant over the batch exactly 0 (the Linear's bias, and the first layer's columns of the pixels
    that are 0 in every image of a batch), so each backend steps those on its own fp32 rounding noise, which Adam turns
    into steps of ~lr (docs/ops.md, "BatchNorm"); a pixel constant in one batch is not in the next, and the paths
    part by ~1e-4 within 3 steps. The exact comparison is fp64: tests/nn/test_nn_fused_bn.py (1e-9 over 300 steps)."""
    models = _twins(batch_norm=True, sg_hidden=(32,), mode=mode)
    for x, y in mnist_batches:
        results = [m.train_step(x, y, F.cross_entropy) for m in models]
        torch.testing.assert_close(results[1].loss, results[0].loss, rtol=2e-3, atol=0.0)
        for want, got in zip(results[0].sg_losses, results[1].sg_losses):
            torch.testing.assert_close(got, want, rtol=2e-3, atol=0.0)


def test_backprop_mode_differentiates_through_the_triton_forward(mnist_batches):
    models = _twins(mode="backprop")
    x, y = mnist_batches[0]
    for model in models:
        F.cross_entropy(model(x), y).backward()
    for (name, want), got in zip(models[0].named_parameters(), models[1].parameters()):
        if want.grad is None:
            assert got.grad is None, name
            continue
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def triton_dispatch():
    """``torch.ops.fastdni`` routed to the Triton kernels for the test device: on CUDA they are registered at
    import; on the CPU (interpreted) they override the C++ kernels for the duration of the test."""
    if DEVICE.type == "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": intended, undone below
        library = _triton.register("CPU")
    try:
        yield
    finally:
        library._destroy()


def _layer_step(x, weight, bias, sg, target, state, sg_state):
    """One DNI layer step on the ops with ``backend="auto"`` (the dispatcher: the path torch.compile sees)."""
    forward = ops.dni_forward(x, weight, bias, sg, activation="relu")
    adam = [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]
    dx = ops.dni_update_(x, weight, bias, forward, "adam", adam, state, need_input_grad=True)
    loss = ops.sg_regression_(forward, target, sg, "adam", adam, sg_state)
    return forward.h, dx, loss


def test_compiled_step_equals_eager(triton_dispatch):
    gen = torch.Generator().manual_seed(0)
    B, K, N = 37, 45, 33
    x, target = torch.randn(B, K, generator=gen), torch.randn(B, N, generator=gen)
    weight, bias = torch.randn(N, K, generator=gen) * K ** -0.5, torch.randn(N, generator=gen) * 0.1
    sg = init_sg_params(N, (40,), generator=gen)
    sg = sg._replace(weights=tuple(w + 0.05 * torch.randn(w.shape, generator=gen) for w in sg.weights))
    tensors = [x, target, weight, bias, *sg.weights, *sg.biases]
    runs = []
    for compile_ in (False, True):
        x_, target_, w, b, *rest = [t.to(DEVICE, copy=True) for t in tensors]
        sg_ = sg._replace(weights=tuple(rest[:2]), biases=tuple(rest[2:]))
        state = [torch.zeros_like(t) for t in (w, w, b, b)]
        sg_state = [torch.zeros_like(t) for t in ops.ordered_params(sg_) for _ in range(2)]
        fn = torch.compile(_layer_step, fullgraph=True, dynamic=False) if compile_ else _layer_step
        with launch_counter() as count:
            outputs = fn(x_, w, b, sg_, target_, state, sg_state)
        assert count.total == 3 + 2 + 3, f"the step did not run on the Triton kernels: {dict(count.by_name)}"
        runs.append([*outputs, w, b, *ops.ordered_params(sg_), *state, *sg_state])
    for i, (eager, compiled) in enumerate(zip(*runs)):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7, msg=lambda m, i=i: f"output/param {i}: {m}")
    assert not torch.equal(runs[0][3], tensors[2].to(DEVICE)), "the eager step did not update the weight"


# --- fastdni.nn.DNI on a user's activation, its SG step fused on the Triton backend -------------------------------

def _dni_model(backend: str, map_shaped: bool):
    """A small model with a DNI on a feature map [B, 4, 6, 6] (linear SG) or a vector [B, 40] (MLP SG + labels)."""
    from fastdni.nn import DNI, SyntheticGradient

    torch.manual_seed(0)
    if map_shaped:
        below = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh())
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 10))
        sg = SyntheticGradient(144)
    else:
        below = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 40), torch.nn.Tanh())
        head = torch.nn.Linear(40, 10)
        sg = SyntheticGradient(40, (33,), context_features=10)
    with torch.no_grad():  # a trained SG, not the zero one
        for p in sg.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    below, head, sg = below.to(DEVICE), head.to(DEVICE), sg.to(DEVICE)
    dni = DNI(sg, optimizer=torch.optim.Adam(sg.parameters(), lr=1e-2), backend=backend)
    return below, head, dni


@pytest.mark.parametrize("map_shaped", [True, False], ids=["map-linear-sg", "vector-mlp-sg-cdni"])
def test_dni_fused_on_triton_equals_the_reference_ops(map_shaped):
    """Three training steps (B = 37) of a model with a DNI: the Triton ops' SG step equals the reference ops' step
    (fp32): the SG losses, the SG parameters and the layers below, which learn from the prediction."""
    runs = []
    for backend in ("triton", "reference"):
        below, head, dni = _dni_model(backend, map_shaped)
        opt = torch.optim.SGD([*below.parameters(), *head.parameters()], lr=0.1)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x = torch.randn(37, 1, 6, 6, generator=gen).to(DEVICE)
            y = torch.randint(0, 10, (37,), generator=gen).to(DEVICE)
            F.cross_entropy(head(dni(below(x), None if map_shaped else y)), y).backward()
            assert dni.fused, dni.fusion_blocker(below(x))
            opt.step()
            opt.zero_grad()
            losses.append(dni.last_sg_loss)
        runs.append((torch.stack(losses), [p.detach() for p in [*dni.parameters(), *below.parameters()]]))
    (got_losses, got), (want_losses, want) = runs
    torch.testing.assert_close(got_losses, want_losses, **STEP_TOL)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"parameter {i}: {m}", **STEP_TOL)


def test_dni_fused_launches():
    """A DNI step on the Triton ops: sg_predict's L launches, sg_regression_'s 2L - 1 (+1 for U)."""
    below, head, dni = _dni_model("triton", map_shaped=False)
    x, y = torch.randn(37, 1, 6, 6).to(DEVICE), torch.randint(0, 10, (37,)).to(DEVICE)
    with launch_counter() as forward:
        out = dni(below(x), y)
    with launch_counter() as backward:
        F.cross_entropy(head(out), y).backward()
    assert (forward.total, backward.total) == (2, 4)


def test_dni_fused_on_triton_strided_h_float_context_expanded_gradient():
    """The Triton ops on what a user's model may hand DNI: a permuted (strided) 3-d h, a float context, SGD with
    momentum, and an arriving gradient of stride 0 (``out.sum().backward()``): the reference ops' step."""
    from fastdni.nn import DNI, SyntheticGradient

    runs = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        sg = SyntheticGradient(40, (33,), context_features=5)
        with torch.no_grad():
            for p in sg.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sg = sg.to(DEVICE)
        dni = DNI(sg, optimizer=torch.optim.SGD(sg.parameters(), lr=0.1, momentum=0.9), backend=backend)
        gen = torch.Generator().manual_seed(2)
        for _ in range(2):
            h = torch.randn(37, 5, 8, generator=gen).to(DEVICE).permute(0, 2, 1)  # [B, 8, 5], not contiguous
            dni(h, torch.randn(37, 5, generator=gen).to(DEVICE)).sum().backward()
            assert dni.fused
        runs.append([*(p.detach() for p in sg.parameters()), dni.last_sg_loss])
    for i, (g, w) in enumerate(zip(*runs)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"tensor {i}: {m}", **STEP_TOL)
