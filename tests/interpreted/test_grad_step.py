"""fastdni/kernels/grad_step.py (GEMM/bias gradient + fused optimizer step) under the Triton interpreter (CPU tensors).

Run with ``TRITON_INTERPRET=1 python -m pytest -q tests/interpreted/test_grad_step.py``; the suite's
conftest collects this folder only when TRITON_INTERPRET=1 is set (it must be set before triton is imported).

Oracle: :func:`fastdni.ops.optim.optimizer_step_` in fp64 on fp64 copies of param/state, with the gradient
``grad_out.T @ input`` (or ``grad_out.sum(0)``) computed in fp64 from the *same* (already rounded) inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastdni.kernels.grad_step import bias_grad_step_, gemm_grad_step_
from fastdni.ops.optim import optimizer_step_
from conftest import on_device
from op_cases import STEP_DTYPE_IDS, STEP_DTYPES

# Per-dtype tolerances of the kernel's fp32 param/state against the fp64 oracle. The kernel sees the same
# rounded inputs as the oracle, and a product of two bf16/fp16 values is exact in fp32, so for every input
# dtype the only errors are fp32 accumulation over B (a few ulps of sum |g||x|, B = 33) and the fp32 step
# (scalars such as 1 - beta2 rounded to fp32, ~1e-7 relative). Adam divides by sqrt(v): a gradient error
# of 1e-6 relative moves the param by ~lr * 1e-6. Low precision inputs have a smaller dynamic range, not a
# less exact product, hence the same bound; kept per dtype so a GPU run (tensor cores) can loosen it.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
}
DTYPES, DTYPE_IDS = STEP_DTYPES, STEP_DTYPE_IDS  # the dtypes of TOLERANCES, in its order

B, N, K = 33, 29, 45  # odd, none a multiple of the interpreter's 32-wide tiles

#: (optimizer, hyper); adam: lr, beta1, beta2, eps, weight_decay, decoupled, step;
#: sgd: lr, momentum, dampening, weight_decay, nesterov, first_step.
CASES = {
    "adam-step1": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0, 1]),
    "adam-wd-step3": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 3]),
    "adamw-wd-step3": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0, 3]),
    "adam-beta1-0.3-step3": ("adam", [1e-3, 0.3, 0.99, 1e-6, 0.0, 0.0, 3]),  # lerp weight >= 0.5 branch
    "sgd-plain-wd": ("sgd", [0.1, 0.0, 0.0, 0.01, 0.0, 0.0]),
    "sgd-momentum-dampening": ("sgd", [0.1, 0.9, 0.25, 0.0, 0.0, 0.0]),
    "sgd-momentum-dampening-first": ("sgd", [0.1, 0.9, 0.25, 0.01, 0.0, 1.0]),
    "sgd-nesterov-wd": ("sgd", [0.05, 0.9, 0.0, 0.01, 1.0, 0.0]),
}


def _state(optimizer, hyper, shape):
    if optimizer == "adam":
        return [torch.randn(shape), torch.rand(shape)]  # exp_avg_sq >= 0
    return [torch.randn(shape)] if hyper[1] != 0 else []


def _oracle(optimizer, hyper, param, grad64, state):
    p = param.double()
    s = [t.double() for t in state]
    optimizer_step_(optimizer, hyper, p, grad64, s)
    return p, s


def _assert_close(got, want, tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_gemm_grad_step_matches_reference(case, dtype):
    optimizer, hyper = CASES[case]
    g = torch.randn(B, N).to(dtype)
    x = torch.randn(B, K).to(dtype)
    param = torch.randn(N, K)
    state = _state(optimizer, hyper, (N, K))
    want_p, want_s = _oracle(optimizer, hyper, param, g.double().T @ x.double(), state)
    gemm_grad_step_(g, x, param, state, optimizer, hyper)
    _assert_close([param, *state], [want_p, *want_s], TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bias_grad_step_matches_reference(case, dtype):
    optimizer, hyper = CASES[case]
    g = torch.randn(B, N).to(dtype)
    bias = torch.randn(N)
    state = _state(optimizer, hyper, (N,))
    want_p, want_s = _oracle(optimizer, hyper, bias, g.double().sum(0), state)
    bias_grad_step_(g, bias, state, optimizer, hyper)
    _assert_close([bias, *state], [want_p, *want_s], TOLERANCES[dtype])


def test_strided_inputs_and_larger_batch():
    """grad_out/input as transposed/sliced views (read through strides), B > 2 tiles, two steps in a row."""
    optimizer, hyper = CASES["adamw-wd-step3"]
    bb = 70
    g = torch.randn(N, bb).T  # [bb, N], non-contiguous
    x = torch.randn(bb, 2 * K)[:, ::2]  # [bb, K], column stride 2
    param = torch.randn(N, K)
    state = _state(optimizer, hyper, (N, K))
    grad = g.double().T @ x.double()
    want_p, want_s = _oracle(optimizer, hyper, param, grad, state)
    hyper4 = hyper[:-1] + [4]
    optimizer_step_(optimizer, hyper4, want_p, grad, want_s)
    gemm_grad_step_(g, x, param, state, optimizer, hyper)
    gemm_grad_step_(g, x, param, state, optimizer, hyper4)
    _assert_close([param, *state], [want_p, *want_s], TOLERANCES[torch.float32])


def test_empty_batch_is_a_step_with_zero_gradient():
    optimizer, hyper = CASES["sgd-nesterov-wd"]
    g, x = torch.randn(0, N), torch.randn(0, K)
    param = torch.randn(N, K)
    state = _state(optimizer, hyper, (N, K))
    want_p, want_s = _oracle(optimizer, hyper, param, torch.zeros(N, K, dtype=torch.float64), state)
    gemm_grad_step_(g, x, param, state, optimizer, hyper)
    _assert_close([param, *state], [want_p, *want_s], TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", ["adam-wd-step3", "sgd-momentum-dampening"])
def test_nan_in_grad_out_propagates(case):
    """A NaN in column 0 of grad_out makes dW row 0 and db[0] NaN: param row 0 / bias[0] become NaN, the
    rest is still updated correctly, and nothing crashes."""
    optimizer, hyper = CASES[case]
    g = torch.randn(B, N)
    g[5, 0] = math.nan
    x = torch.randn(B, K)
    param, bias = torch.randn(N, K), torch.randn(N)
    state, bstate = _state(optimizer, hyper, (N, K)), _state(optimizer, hyper, (N,))
    want_p, want_s = _oracle(optimizer, hyper, param, g.double().T @ x.double(), state)
    want_b, want_bs = _oracle(optimizer, hyper, bias, g.double().sum(0), bstate)
    gemm_grad_step_(g, x, param, state, optimizer, hyper)
    bias_grad_step_(g, bias, bstate, optimizer, hyper)
    assert torch.isnan(param[0]).all() and torch.isnan(bias[0])
    assert torch.isfinite(param[1:]).all() and torch.isfinite(bias[1:]).all()
    tol = dict(TOLERANCES[torch.float32], equal_nan=True)
    _assert_close([param, *state, bias, *bstate], [want_p, *want_s, want_b, *want_bs], tol)


def _valid():
    return dict(grad_out=torch.randn(B, N), input=torch.randn(B, K), param=torch.randn(N, K),
                state=[torch.zeros(N, K), torch.zeros(N, K)], optimizer="adam", hyper=list(CASES["adam-step1"][1]))


def _bad_gemm() -> dict:
    """Each bad argument, built when called: under the suite's default device (a dict built at import would hold
    CPU tensors, which on a GPU run fail on their device before the property under test)."""
    return {
        "grad_out-dtype": (dict(grad_out=torch.randn(B, N, dtype=torch.float64)), TypeError, "grad_out"),
        "grad_out-ndim": (dict(grad_out=torch.randn(B, N, 1)), ValueError, "grad_out"),
        "input-dtype": (dict(input=torch.randn(B, K).half()), TypeError, "input"),
        "input-rows": (dict(input=torch.randn(B + 1, K)), ValueError, "input"),
        "input-device": (dict(input=torch.randn(B, K, device="meta")), ValueError, "input"),
        "param-shape": (dict(param=torch.randn(K, N)), ValueError, "param"),
        "param-dtype": (dict(param=torch.randn(N, K).bfloat16()), TypeError, "param"),
        "param-device": (dict(param=torch.randn(N, K, device="meta")), ValueError, "param"),
        "param-noncontiguous": (dict(param=torch.randn(K, N).T), ValueError, "param"),
        "state-count": (dict(state=[torch.zeros(N, K)]), ValueError, "state"),
        "state-shape": (dict(state=[torch.zeros(N, K), torch.zeros(N, K + 1)]), ValueError, r"state\[1\]"),
        "state-noncontiguous": (dict(state=[torch.zeros(K, N).T, torch.zeros(N, K)]), ValueError, r"state\[0\]"),
        "state-dtype": (dict(state=[torch.zeros(N, K), torch.zeros(N, K).double()]), TypeError, r"state\[1\]"),
        "state-not-list": (dict(state=torch.zeros(N, K)), TypeError, "state"),
        "optimizer-name": (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        "hyper-length": (dict(hyper=[1e-2, 0.9]), ValueError, "hyper"),
        "hyper-step0": (dict(hyper=[1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0, 0]), ValueError, "hyper"),
        "hyper-negative-lr": (dict(hyper=[-1.0, 0.9, 0.999, 1e-8, 0.0, 0.0, 1]), ValueError, "hyper"),
        "sgd-momentum0-with-state": (dict(optimizer="sgd", hyper=[0.1, 0.0, 0.0, 0.0, 0.0, 0.0]), ValueError, "state"),
        "sgd-nesterov-dampening": (dict(optimizer="sgd", hyper=[0.1, 0.9, 0.5, 0.0, 1.0, 0.0],
                                        state=[torch.zeros(N, K)]), ValueError, "hyper"),
    }


with torch.device("meta"):  # the case names only: meta tensors cost nothing and hold no data
    BAD_GEMM_NAMES = tuple(_bad_gemm())


@pytest.mark.parametrize("bad", BAD_GEMM_NAMES)
def test_gemm_bad_arguments_raise_naming_the_argument(bad):
    change, exc, name = _bad_gemm()[bad]
    args = {**_valid(), **change}
    before = args["param"].clone() if args["param"].device.type == "cpu" else None
    with pytest.raises(exc, match=name):
        gemm_grad_step_(**args)
    if before is not None:
        assert torch.equal(args["param"], before)  # nothing was launched


def test_state_aliasing_param_is_rejected():
    a = _valid()
    a["state"] = [a["param"], torch.zeros(N, K)]
    with pytest.raises(ValueError, match="state"):
        gemm_grad_step_(**a)


@pytest.mark.parametrize("make_change, exc, name", [  # built in the test, on the suite's device (see _bad_gemm)
    (lambda: dict(bias=torch.randn(N + 1)), ValueError, "bias"),
    (lambda: dict(bias=torch.randn(N).half()), TypeError, "bias"),
    (lambda: dict(bias=torch.randn(2 * N)[::2]), ValueError, "bias"),
    (lambda: dict(state=[torch.zeros(N)]), ValueError, "state"),
    (lambda: dict(grad_out=torch.randn(N)), ValueError, "grad_out"),
], ids=["shape", "dtype", "noncontiguous", "state-count", "grad_out-ndim"])
def test_bias_bad_arguments_raise_naming_the_argument(make_change, exc, name):
    change = make_change()
    args = dict(grad_out=torch.randn(B, N), bias=torch.randn(N), state=[torch.zeros(N), torch.zeros(N)],
                optimizer="adam", hyper=list(CASES["adam-step1"][1]))
    args.update(change)
    with pytest.raises(exc, match=name):
        bias_grad_step_(**args)


@pytest.mark.parametrize("kind", ["stored", "delta", "error"])
def test_grad_source_scale_is_a_multiplier(kind):
    """G = scale * raw for every kind, as the C++ GradSource (tests/ops/test_cuda_twin.py): a power-of-two scale on the
    source steps the parameter as that scale applied to the stored operand beforehand."""
    from fastdni.kernels.prologue import GradSource

    gen = torch.Generator().manual_seed(3)  # a CPU generator: the same values on either device, then moved
    first, second, x = (on_device(torch.randn(shape, generator=gen, device="cpu")) for shape in ((B, N), (B, N), (B, K)))
    source = {"stored": GradSource.stored(first, 0.25), "delta": GradSource.delta(first, second, "relu", 0.25),
              "error": GradSource.error(first, second, 0.5, 0.25)}[kind]
    raw = {"stored": first, "delta": first * (second > 0), "error": first - 0.5 * second}[kind]
    sgd = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    scaled, prescaled = torch.zeros(N, K), torch.zeros(N, K)
    gemm_grad_step_(source, x, scaled, [], "sgd", sgd)
    gemm_grad_step_(0.25 * raw, x, prescaled, [], "sgd", sgd)
    assert scaled.abs().sum() > 0
    torch.testing.assert_close(scaled, prescaled, rtol=1e-6, atol=1e-7)
