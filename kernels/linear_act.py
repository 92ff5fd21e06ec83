"""``out = act(x @ weight.T + bias [+ label_weight[:, labels].T])``: one Triton GEMM with a fused epilogue.

This is the building block of ``dni_forward`` (see :mod:`fastdni.reference.layer` and
:mod:`fastdni.reference.synthetic`): the layer itself (``act`` = identity/relu/tanh/gelu), each SG
layer (relu for hidden layers, identity for the output layer) and, for the first SG layer of a cDNI
model, the label term ``U[:, y_b]`` gathered row by row instead of a one-hot GEMM.

Design notes
------------
* ``weight`` is ``[N, K]`` row-major (``torch.nn.Linear``'s layout). The kernel reads it as the
  ``[K, N]`` operand of ``tl.dot`` through its strides, so no transposed copy is ever made.
* Every read-only input is addressed through its strides, so non-contiguous views (``w.T``, slices,
  expanded biases) are accepted as they are, with no ``.contiguous()`` copy. Outputs are always
  freshly allocated contiguous ``[M, N]`` tensors of ``x.dtype``.
* Accumulation is fp32 whatever the input dtype (``tl.dot(..., out_dtype=fp32)``); bias, label term
  and activation are applied to the fp32 accumulator and rounded once, at the store.
* fp32 inputs use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set, to match
  what torch's own matmul gives for the same tensors (the reference the tests compare against).
* ``pre`` is written only when asked for: by default only for gelu, the one activation whose
  derivative cannot be formed from the output (``fastdni.reference.NEEDS_PRE``). Skipping it saves a
  full ``[M, N]`` store for relu/tanh/identity.
* relu and tanh are written so that a NaN pre-activation stays NaN (``torch.relu(nan) = nan``):
  ``where(p < 0, 0, p)`` rather than ``maximum`` (whose NaN handling is backend-defined).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiling import INTERPRETED, gemm_configs, grouped_tile, pruner

__all__ = ["linear_act", "ACTIVATION_CODES"]

# Activations as small ints: the kernel specialises on a constexpr, so each one compiles to
# straight-line code without a runtime branch.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "gelu": 3}
_NEEDS_PRE = ("gelu",)  # as fastdni.reference.NEEDS_PRE
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.int32, torch.int64)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)

# Standard GEMM shapes (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for big batches, narrow ones
# for the small batches/widths of SG models; the pruner drops those far larger than the problem.
_CONFIGS = gemm_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 64, 4, 4), (32, 32, 64, 2, 4),
], group_key="GROUP_M")


@triton.autotune(
    configs=_CONFIGS,
    key=["M", "N", "K", "ACTIVATION", "HAS_LABELS", "SAVE_PRE"],
    prune_configs_by=pruner({"BLOCK_M": "M", "BLOCK_N": "N"}),
)
@triton.jit
def _linear_act_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, y_ptr, out_ptr, pre_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b,
    stride_un, stride_uc,
    stride_y,
    stride_om, stride_on,
    ACTIVATION: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ("super-grouping") program order: GROUP_M row tiles share each column tile of W while it
    # is in L2, instead of sweeping all of W once per row tile.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 row/column indices: offset = index * stride must not wrap for tensors over 2^31 elements.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # W^T tile, [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Masked loads with 0 fill: ragged K contributes nothing to the dot product.
        mask_k = (offs_k + k0) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only, bf16: see linear_act (exact, bf16 * bf16 fits in fp32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ALLOW_TF32:  # also fp16/bf16 inputs, for which the precision setting does not apply
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue, all in fp32 ----
    bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)
    acc += bias[None, :]
    if HAS_LABELS:
        # cDNI label term: ctx_b = U[:, y_b], a gather of one column of U per row (no one-hot GEMM).
        # Labels were range-checked on the host, so the only masking needed is for ragged tiles.
        y = tl.load(y_ptr + offs_m * stride_y, mask=mask_m, other=0).to(tl.int64)
        u = tl.load(u_ptr + offs_n[None, :] * stride_un + y[:, None] * stride_uc,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += u.to(tl.float32)

    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SAVE_PRE:
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)

    if ACTIVATION == 1:  # relu; NaN < 0 is false, so NaN passes through as torch.relu does
        acc = tl.where(acc < 0.0, 0.0, acc)
    elif ACTIVATION == 2:  # tanh = sign(p) (1 - t) / (1 + t), t = exp(-2|p|) <= 1: no overflow for large |p|
        t = tl.exp(-2.0 * tl.abs(acc))
        th = (1.0 - t) / (1.0 + t)
        acc = tl.where(acc < 0.0, -th, th)
    elif ACTIVATION == 3:  # exact gelu, p * Phi(p), as fastdni.reference.activations
        acc = acc * 0.5 * (1.0 + tl.erf(acc * 0.7071067811865476))
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _check_float(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    return t


def _check_like(name: str, t: Tensor, x: Tensor, *, dtype: bool = True) -> None:
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")
    if dtype and t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (that of x), got {t.dtype}")


def linear_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    activation: str = "relu",
    *,
    label_weight: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    save_pre: Optional[bool] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``out = act(x @ weight.T + bias [+ label_weight[:, labels].T])`` in one kernel.

    Args:
        x: ``[M, K]`` float32/bfloat16/float16.
        weight: ``[N, K]``, same dtype and device as ``x``.
        bias: ``[N]``, same dtype and device.
        activation: ``"identity"``, ``"relu"``, ``"tanh"`` or ``"gelu"`` (exact, erf).
        label_weight: cDNI ``U``, ``[N, C]``, same dtype and device; given together with ``labels``.
        labels: ``[M]`` int32/int64 class labels in ``[0, C)``.
        save_pre: write the pre-activation too. ``None`` (default): only for gelu, the activation whose
            derivative needs it; ``True``/``False`` force it on/off.

    Returns:
        ``(out, pre)``: ``out`` ``[M, N]`` of ``x.dtype``; ``pre`` the same or ``None`` when not saved.

    Any strides are accepted for the inputs (the kernel reads through them; nothing is copied).
    Accumulation is in fp32. Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    if save_pre is None:
        save_pre = activation in _NEEDS_PRE
    elif not isinstance(save_pre, bool):
        raise TypeError(f"save_pre: expected None or a bool, got {type(save_pre).__name__}")

    x = _check_float("x", x, 2)
    weight = _check_float("weight", weight, 2)
    bias = _check_float("bias", bias, 1)
    _check_like("weight", weight, x)
    _check_like("bias", bias, x)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight: expected shape ({N}, {K}) to match x's {K} input features, got {tuple(weight.shape)}")
    if bias.shape[0] != N:
        raise ValueError(f"bias: expected shape ({N},) to match weight's {N} output features, got {tuple(bias.shape)}")
    if not INTERPRETED and x.device.type != "cuda":
        raise ValueError(f"x: linear_act runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {x.device}")

    if (label_weight is None) != (labels is None):
        missing = "labels" if labels is None else "label_weight"
        raise ValueError(f"{missing}: label_weight and labels must be given together (got only one)")
    has_labels = labels is not None
    if has_labels:
        label_weight = _check_float("label_weight", label_weight, 2)
        _check_like("label_weight", label_weight, x)
        if label_weight.shape[0] != N:
            raise ValueError(f"label_weight: expected shape ({N}, C) to match weight's {N} output features, "
                             f"got {tuple(label_weight.shape)}")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in _LABEL_DTYPES:
            raise TypeError(f"labels: expected dtype int32 or int64, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != M:
            raise ValueError(f"labels: expected shape ({M},) (one label per row of x), got {tuple(labels.shape)}")
        _check_like("labels", labels, x, dtype=False)
        # Out-of-range labels would read outside U: check on the host (one sync; the op contract
        # requires the same check of the reference, fastdni._checks.check_context).
        C = label_weight.shape[1]
        if M and (int(labels.min()) < 0 or int(labels.max()) >= C):
            raise ValueError(f"labels: expected values in [0, {C}), got values in [{int(labels.min())}, {int(labels.max())}]")

    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(out) if save_pre else None
    if M == 0 or N == 0:
        return out, pre  # nothing to compute; K == 0 is handled by the kernel (act(bias [+ U term]))

    # Unused pointers get a valid tensor (out) so the launch signature never changes; the constexpr
    # flags compile those branches out.
    u_arg = label_weight if has_labels else out
    y_arg = labels if has_labels else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _linear_act_kernel[grid](
        x, weight, bias, u_arg, y_arg, out, pre if save_pre else out,
        M, N, K,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        bias.stride(0),
        label_weight.stride(0) if has_labels else 0, label_weight.stride(1) if has_labels else 0,
        labels.stride(0) if has_labels else 0,
        out.stride(0), out.stride(1),
        ACTIVATION=ACTIVATION_CODES[activation],
        HAS_LABELS=has_labels,
        SAVE_PRE=save_pre,
        # input_precision only concerns fp32 operands; fp16/bf16 take the default (native) path.
        ALLOW_TF32=x.dtype != torch.float32 or bool(torch.backends.cuda.matmul.allow_tf32),
        # Triton 3.8's interpreter computes tl.dot of bf16 operands wrongly (results ~1e10: the bf16 bits
        # seem to be read as integers), while loads, stores and casts of bf16 are right. Under the
        # interpreter, bf16 tiles are therefore widened to fp32 before the dot: exact, since a product of
        # two bf16 values fits in fp32's mantissa, so the result equals a bf16 dot with fp32 accumulation
        # up to summation order. Compiled kernels feed bf16 to tl.dot directly.
        UPCAST_DOT=INTERPRETED and x.dtype == torch.bfloat16,
    )
    return out, pre
