"""The CUDA C++ backend (csrc/cuda, ``backend="cuda"``) against the reference, on a GPU.

Run by ``benchmarks/gpu.sh`` (``FASTDNI_TEST_DEVICE=cuda``); skipped where torch sees no GPU or fastdni._C has no
CUDA kernels (CI: there the kernels' math is checked through their CPU twin, tests/ops/test_cuda_twin.py, and their
build by tests/packaging/test_cuda_build.py). The comparisons with the reference are those of the Triton suite
(tests/interpreted/test_triton_ops.py), shared in tests/op_cases.py (``check_*_matches_reference``): the reference in
fp32 on the same (already rounded) inputs and state, upcast, at ``STEP_TOLERANCES``. Shapes are odd and, in the
"tiles" case, span several 64-wide tiles of the grad-step kernel.
"""
from __future__ import annotations

import pytest
import torch

import fastdni.ops as ops
from fastdni.reference import SGParams
from op_cases import (
    ACTIVATIONS, CONTEXTS, OPTIMIZERS, STEP_DTYPE_IDS, STEP_DTYPES, STEP_SGS, STEP_SHAPES, check_forward_matches_reference,
    check_predict_matches_reference, check_regression_matches_reference, check_update_matches_reference, gpu_inputs, step_state,
)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS),
                                reason="needs a CUDA device and fastdni._C built with csrc/cuda")
DEVICE = torch.device("cuda")
DTYPES, DTYPE_IDS = STEP_DTYPES, STEP_DTYPE_IDS  # tolerances: op_cases.STEP_TOLERANCES


def _inputs(dtype, activation="relu", sg="linear", context="none", shape="small"):
    return gpu_inputs(dtype, DEVICE, activation, sg, context, shape)


def _state(optimizer, hyper, params, dtype):
    return step_state(optimizer, hyper, params, dtype, DEVICE)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("sg", tuple(STEP_SGS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward(dtype, activation, sg, context):
    if context != "none" and STEP_SGS[sg] is None:
        pytest.skip("a context needs an SG model")
    check_forward_matches_reference(_inputs(dtype, activation, sg, context), dtype, "cuda")


@pytest.mark.parametrize("strided", (False, True), ids=("contiguous", "strided"))
@pytest.mark.parametrize("shape", tuple(STEP_SHAPES))
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("sg", ("linear", "mlp", "mlp2"))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sg_predict(dtype, sg, context, shape, strided):
    check_predict_matches_reference(_inputs(dtype, "relu", sg, context, shape), dtype, "cuda", strided=strided)


@pytest.mark.parametrize("shape", tuple(STEP_SHAPES))
@pytest.mark.parametrize("need_input_grad", (False, True))
@pytest.mark.parametrize("opt_name", ("adam-l2-step3", "adamw-step7", "sgd", "sgd-nesterov"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_update(dtype, activation, opt_name, need_input_grad, shape):
    check_update_matches_reference(_inputs(dtype, activation, "linear", shape=shape), dtype, opt_name, "cuda",
                                   need_input_grad=need_input_grad)


@pytest.mark.parametrize("shape", tuple(STEP_SHAPES))
@pytest.mark.parametrize("opt_name", ("adam-l2-step3", "sgd-dampening"))
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("sg", ("linear", "mlp", "mlp2"))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sg_regression(dtype, sg, context, opt_name, shape):
    check_regression_matches_reference(_inputs(dtype, "relu", sg, context, shape), dtype, opt_name, "cuda",
                                       target_scale=0.5, loss_weight=2.0)


@pytest.mark.parametrize("sg", ("linear", "mlp"))  # the loss reduced by the fused step, or by the error pass
def test_loss_is_the_same_bits_every_run(sg):
    """Also checks that the reduction leaves its arrival counter at zero: a counter left behind would make the
    next call's last block miss its turn, and the loss would not be written."""
    inp = _inputs(torch.float32, "relu", sg, shape="tiles")
    f = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, activation="relu", backend="cuda")
    optimizer, hyper = OPTIMIZERS["sgd"]
    losses = []
    for _ in range(3):
        sg = SGParams(tuple(w.clone() for w in inp.sg.weights), tuple(b.clone() for b in inp.sg.biases), None)
        losses.append(ops.sg_regression_(f, inp.target, sg, optimizer, hyper, [], backend="cuda").item())
    assert losses[0] == losses[1] == losses[2]


def _kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("context", ("none", "labels64"))
def test_launches_of_a_layer_step(context):
    """relu, linear SG, Adam, dx on: forward 2 GEMMs (+1 label gather for cDNI); update: delta store, dx GEMM, fused
    step; regression: one fused step (the error formed as it is loaded, the loss reduced on the way, cDNI's U in the
    same launch). Counted after a warm-up call (the first call on a stream zeroes the loss's arrival counter).
    Printed for docs/performance.md."""
    inp = _inputs(torch.float32, "relu", "linear", context=context, shape="tiles")
    optimizer, hyper = OPTIMIZERS["adam-l2-step3"]
    layer_state = _state(optimizer, hyper, [inp.weight, inp.bias], torch.float32)
    sg_state = _state(optimizer, hyper, list(ops.ordered_params(inp.sg)), torch.float32)
    box = {}

    def forward():
        box["f"] = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation="relu", backend="cuda")

    def update():
        ops.dni_update_(inp.x, inp.weight, inp.bias, box["f"], optimizer, hyper, layer_state, need_input_grad=True, backend="cuda")

    def regression():
        ops.sg_regression_(box["f"], inp.target, inp.sg, optimizer, hyper, sg_state, inp.context, backend="cuda")

    steps = (("forward", forward), ("update", update), ("regression", regression))
    for _, fn in steps:
        fn()
    counts = {name: _kernels(fn) for name, fn in steps}
    print({name: len(k) for name, k in counts.items()}, counts)
    # cDNI labels: the gather in the forward, plus the labels' range check (ATen's min/max reduction and a copy to the
    # host) in the forward and the regression, which both read the labels
    own = {name: [k for k in kernels if "at::native" not in k and not k.startswith(("Memcpy", "Memset"))]
           for name, kernels in counts.items()}
    assert len(own["forward"]) == (2 if context == "none" else 3)
    assert len(counts["update"]) == 3
    assert len(own["regression"]) == 1
    if context == "none":
        assert len(counts["regression"]) == 1


def test_bad_input_raises_naming_the_argument():
    inp = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="x: the CUDA backend takes float32, bfloat16 or float16 tensors, got Double"):
        torch.ops.fastdni.dni_forward(inp.x.double(), inp.weight.double(), inp.bias.double(), [], [], None, None, "relu")
    with pytest.raises(RuntimeError, match="weight: expected size"):
        torch.ops.fastdni.dni_forward(inp.x, inp.weight[:, :-1], inp.bias, [], [], None, None, "relu")
    labels = torch.full((inp.x.shape[0],), 99, device=DEVICE)
    sg = _inputs(torch.float32, sg="linear", context="labels64").sg
    with pytest.raises(ValueError, match=r"context: labels must lie in \[0, "):
        torch.ops.fastdni.dni_forward(inp.x, inp.weight, inp.bias, list(sg.weights), list(sg.biases), sg.context_weight, labels, "relu")
    h = torch.randn(inp.x.shape[0], inp.weight.shape[0], device=DEVICE)
    with pytest.raises(RuntimeError, match="h: the CUDA backend takes float32, bfloat16 or float16 tensors, got Double"):
        torch.ops.fastdni.sg_predict(h.double(), [w.double() for w in sg.weights], [b.double() for b in sg.biases],
                                     sg.context_weight.double(), torch.zeros_like(labels))
    with pytest.raises(RuntimeError, match=r"h: expected a batch of at least 1 row"):
        torch.ops.fastdni.sg_predict(h[:0], list(sg.weights), list(sg.biases), sg.context_weight, labels[:0])


@pytest.mark.parametrize("sg_hidden, context", [((), "none"), ((40,), "labels64")], ids=["linear", "mlp-cdni"])
def test_dni_fused_on_cuda_equals_the_reference_ops(sg_hidden, context):
    """fastdni.nn.DNI on a [B, 4, 6, 6] activation, backend="auto" (the CUDA C++ sg_predict and sg_regression_) against
    backend="reference", three fp32 steps: the SG losses and parameters."""
    from fastdni.nn import DNI, SyntheticGradient

    runs = []
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        sg = SyntheticGradient(144, sg_hidden, context_features=10 if context != "none" else 0)
        with torch.no_grad():
            for p in sg.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sg = sg.to(DEVICE)
        dni = DNI(sg, optimizer=torch.optim.Adam(sg.parameters(), lr=1e-2), backend=backend)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            h = torch.randn(37, 4, 6, 6, generator=gen).to(DEVICE)
            y = torch.randint(0, 10, (37,), generator=gen).to(DEVICE)
            dni(h, y if context != "none" else None).backward(torch.randn(37, 4, 6, 6, generator=gen).to(DEVICE))
            assert dni.fused, dni.fusion_blocker(h)
            losses.append(dni.last_sg_loss)
        runs.append([torch.stack(losses), *(p.detach() for p in sg.parameters())])
    for i, (g, w) in enumerate(zip(*runs)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"tensor {i}: {m}")
