"""fastdni/kernels/linear_act.py under the Triton interpreter (CPU tensors), against fastdni.reference.

Run with ``TRITON_INTERPRET=1 python -m pytest -q tests/interpreted/test_linear_act.py``; the suite's
conftest collects this folder only when TRITON_INTERPRET=1 is set (it must be set before triton is imported).
"""
from __future__ import annotations

import pytest
import torch

from fastdni.kernels.linear_act import linear_act
from fastdni.reference import ACTIVATIONS, activate, context_term, layer_forward
from op_cases import STEP_DTYPE_IDS, STEP_DTYPES

# Per-dtype tolerances of the kernel's output against the fp32 reference computed from the *same*
# (already rounded) inputs. fp32: only summation order differs (fp32 accumulation, tiled K), a few ulps
# of |x||w|, 1e-4 leaves room for K ~ 100. bf16/fp16: the fp32 accumulator is rounded once at the store,
# so the error is about half an ulp of the output (bf16 2^-9, fp16 2^-12 relative), plus the atol for
# values near zero.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
DTYPES, DTYPE_IDS = STEP_DTYPES, STEP_DTYPE_IDS  # the dtypes of TOLERANCES, in its order

M, K, N, C = 37, 45, 29, 11  # odd, none a multiple of the interpreter's 32-wide tiles


def _make(m=M, k=K, n=N, c=C, dtype=torch.float32, label_dtype=torch.int64):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) * k ** -0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    u = torch.randn(n, c).to(dtype)
    y = torch.randint(0, c, (m,), dtype=label_dtype)
    return x, w, b, u, y


def _reference(x, w, b, activation, u=None, y=None):
    """(h, pre) in fp32 from the same inputs: layer_forward, plus context_term for the label term."""
    h, pre = layer_forward(x.float(), w.float(), b.float(), activation)
    if y is not None:
        pre = pre + context_term(y, u.float())
        h = activate(pre, activation)
    return h, pre


@pytest.mark.parametrize("with_labels", [False, True], ids=["plain", "labels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(activation, dtype, with_labels):
    x, w, b, u, y = _make(dtype=dtype)
    kwargs = dict(label_weight=u, labels=y) if with_labels else {}
    out, pre = linear_act(x, w, b, activation, **kwargs)
    h_ref, pre_ref = _reference(x, w, b, activation, *((u, y) if with_labels else ()))
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
    torch.testing.assert_close(out.float(), h_ref, **TOLERANCES[dtype])
    if activation == "gelu":  # the only activation whose derivative needs pre (reference NEEDS_PRE)
        assert pre is not None and pre.dtype == dtype and pre.shape == (M, N)
        torch.testing.assert_close(pre.float(), pre_ref, **TOLERANCES[dtype])
    else:
        assert pre is None


def test_save_pre_overrides_the_default():
    x, w, b, _, _ = _make()
    out, pre = linear_act(x, w, b, "relu", save_pre=True)
    h_ref, pre_ref = _reference(x, w, b, "relu")
    torch.testing.assert_close(pre, pre_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(out, h_ref, **TOLERANCES[torch.float32])
    out, pre = linear_act(x, w, b, "gelu", save_pre=False)
    assert pre is None
    torch.testing.assert_close(out, _reference(x, w, b, "gelu")[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_several_tiles_and_strided_inputs(label_dtype):
    """Several 32-wide tiles in every dimension, ragged edges, and inputs that are views (transposed,
    sliced, expanded): the kernel reads through strides, no copies."""
    m, k, n, c = 70, 100, 67, 5
    x_full = torch.randn(k, 2 * m)
    x = x_full.T[::2]  # [m, k], strides (1, 2m) -> neither dim contiguous
    w = torch.randn(k, n).T * k ** -0.5  # [n, k] transposed view
    b = torch.randn(1).expand(n)  # stride 0
    u = torch.randn(c, n).T  # [n, c] transposed view
    y = torch.randint(0, c, (2 * m,), dtype=label_dtype)[::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not u.is_contiguous() and not y.is_contiguous()
    out, _ = linear_act(x, w, b, "tanh", label_weight=u, labels=y)
    h_ref, _ = _reference(x, w, b, "tanh", u, y)
    torch.testing.assert_close(out, h_ref, **TOLERANCES[torch.float32])


def test_empty_and_degenerate_shapes():
    # K == 0: the GEMM is empty, out = act(bias); M == 0: nothing to launch.
    x, w, b = torch.empty(5, 0), torch.empty(3, 0), torch.randn(3)
    out, _ = linear_act(x, w, b, "identity")
    torch.testing.assert_close(out, b.expand(5, 3))
    out, pre = linear_act(torch.empty(0, 4), torch.randn(3, 4), torch.randn(3), "gelu")
    assert out.shape == (0, 3) and pre.shape == (0, 3)


def test_tanh_saturates_without_overflow():
    x, w, b, _, _ = _make()
    out, _ = linear_act(x * 1e4, w, b, "tanh")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(x * 1e4, w, b, "tanh")[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_in_x_propagates(activation):
    x, w, b, _, _ = _make()
    x[3, 7] = float("nan")
    out, pre = linear_act(x, w, b, activation, save_pre=True)
    assert torch.isnan(out[3]).all() and torch.isnan(pre[3]).all()  # relu(nan) is nan, as torch.relu
    rows = torch.arange(M) != 3
    assert not torch.isnan(out[rows]).any()
    torch.testing.assert_close(out[rows], _reference(x[rows], w, b, activation)[0], **TOLERANCES[torch.float32])


def _bad_cases():
    x, w, b, u, y = _make()
    return {
        "x not a tensor": (dict(x=x.tolist()), TypeError, "x"),
        "x 3-d": (dict(x=x[None]), ValueError, "x"),
        "x float64": (dict(x=x.double(), weight=w.double(), bias=b.double()), TypeError, "x"),
        "weight wrong K": (dict(weight=w[:, 1:]), ValueError, "weight"),
        "weight 1-d": (dict(weight=w[0]), ValueError, "weight"),
        "weight dtype": (dict(weight=w.half()), TypeError, "weight"),
        "bias wrong N": (dict(bias=b[1:]), ValueError, "bias"),
        "bias dtype": (dict(bias=b.half()), TypeError, "bias"),
        "bias 2-d": (dict(bias=b[None]), ValueError, "bias"),
        "activation": (dict(activation="sigmoid"), ValueError, "activation"),
        "save_pre": (dict(save_pre=1), TypeError, "save_pre"),
        "labels without label_weight": (dict(labels=y), ValueError, "label_weight"),
        "label_weight without labels": (dict(label_weight=u), ValueError, "labels"),
        "label_weight wrong N": (dict(label_weight=u[1:], labels=y), ValueError, "label_weight"),
        "label_weight dtype": (dict(label_weight=u.half(), labels=y), TypeError, "label_weight"),
        "labels float": (dict(label_weight=u, labels=y.float()), TypeError, "labels"),
        "labels uint8": (dict(label_weight=u, labels=y.to(torch.uint8)), TypeError, "labels"),
        "labels wrong length": (dict(label_weight=u, labels=y[1:]), ValueError, "labels"),
        "labels too large": (dict(label_weight=u, labels=torch.full((M,), C)), ValueError, "labels"),
        "labels negative": (dict(label_weight=u, labels=torch.full((M,), -1)), ValueError, "labels"),
        "device": (dict(weight=w.to("meta")), ValueError, "weight"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_name_the_argument(case):
    overrides, error, name = _bad_cases()[case]
    x, w, b, _, _ = _make()
    args = dict(x=x, weight=w, bias=b, activation="relu")
    args.update(overrides)
    with pytest.raises(error, match=rf"^{name}:"):
        linear_act(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("activation"), **args)
