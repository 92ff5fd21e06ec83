"""DecoupledCNN on the Triton backend: the conv blocks' steps (the weight step as dni_update_'s GEMM over the unfolded
input or ATen's, BatchNorm as the Triton BatchNorm kernels, the conv SGs as sg_predict / sg_regression_ over their
unfolded maps) train as on the reference backend, the oracle: the same losses and parameters over a few steps."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from fastdni.kernels import launch_counter
from fastdni.nn import DecoupledCNN

from conftest import DEVICE

BUILDS_ON_CPU = True  # the models are built on the CPU (same seeds, same values), then moved
BATCH, STEPS, LR = 16, 3, 1e-3
# fp32, summation order only: the losses and every parameter but the conv biases agree far below one Adam step.
# The conv biases sit under a BatchNorm, so their true gradient is 0 and each path steps them on its own rounding
# noise by up to lr per step (as in tests/nn/test_fused_cnn.py): the two paths differ by at most twice that.
TOL = dict(rtol=1e-4, atol=1e-5)


def _model(backend: str, mode: str, weight_grad: str) -> DecoupledCNN:
    torch.manual_seed(0)
    model = DecoupledCNN(2, (4, 6), (8, 8), 10, kernel_size=3, batch_norm=True, sg_hidden=(4,) if mode == "dni" else (),
                         sg_kernel_size=3, context_features=10 if mode == "cdni" else 0, gradient_scale=BATCH,
                         optimizer=functools.partial(torch.optim.Adam, lr=LR), backend=backend, weight_grad=weight_grad)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the zero-initialised SG outputs off zero, so that the first steps move every layer
        for sg in model.synthetic_gradients:
            for p in sg.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.to(DEVICE)


@pytest.mark.parametrize("weight_grad", ["gemm", "aten"])
@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_decoupled_cnn_on_triton_trains_as_the_reference(mode, weight_grad):
    reference, triton = _model("reference", mode, weight_grad), _model("triton", mode, weight_grad)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 2, 8, 8, generator=gen).to(DEVICE)
        y = torch.randint(0, 10, (BATCH,), generator=gen).to(DEVICE)
        context = y if mode == "cdni" else None
        want = reference.train_step(x, y, F.cross_entropy, context)
        with launch_counter() as launches:
            got = triton.train_step(x, y, F.cross_entropy, context)
        assert launches.total > 0  # the Triton kernels ran
        torch.testing.assert_close(torch.stack([got.loss, *got.sg_losses]),
                                   torch.stack([want.loss, *want.sg_losses]), **TOL)
    for (name, want), got in zip(reference.named_parameters(), triton.parameters()):
        if name.startswith("convs.") and name.endswith(".bias"):
            assert float((got - want).abs().max()) <= 2 * STEPS * LR * 1.01, name  # each path up to lr a step
        else:
            torch.testing.assert_close(got, want, **TOL, msg=name)
    for (name, want), got in zip(reference.named_buffers(), triton.buffers()):  # the BatchNorms' running statistics
        if name.endswith("running_mean"):  # the mean of the conv's output: it holds the conv bias's difference
            assert float((got - want).abs().max()) <= 2 * STEPS * LR * 1.01, name
        else:
            torch.testing.assert_close(got, want, **TOL, msg=name)
