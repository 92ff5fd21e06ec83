"""``out = act(x @ weight.T + bias [+ label_weight[:, labels].T])``: one Triton GEMM with a fused epilogue.

This is the building block of ``dni_forward`` (see :mod:`fastdni.reference.layer` and
:mod:`fastdni.reference.synthetic`): the layer itself (``act`` any of ``fastdni.contract.ACTIVATIONS``), each SG
layer (relu for hidden layers, identity for the output layer) and, for the first SG layer of a cDNI
model, the label term ``U[:, y_b]`` gathered row by row instead of a one-hot GEMM.

Design notes (layouts, strides, precision, when ``pre`` is written, NaN): docs/performance.md ("Triton kernels:
design notes").
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdni.contract import LABEL_DTYPES, NEEDS_PRE, check_label_range

from ._checks import check_device, check_float, check_like
from ._launch import record_launch
from ._tiling import INTERPRETED, gemm_configs, grouped_tile, pruner
from .prologue import ACTIVATION_CODES, GradSource, activation_code, activation_derivative, apply_activation, gradient_tile

__all__ = ["linear_act", "check_labels", "ACTIVATION_CODES"]

# Activations are small ints (fastdni.contract.ACTIVATION_CODES): the kernel specialises on a constexpr, so each
# one compiles to straight-line code without a runtime branch.

# Standard GEMM shapes (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for big batches, narrow ones
# for the small batches/widths of SG models; the pruner drops those far larger than the problem. Sized so that
# no variant spills registers (fastdni/kernels/aot.py): with ragged sizes every load and store is scalar, with its own
# 64-bit address per element (out, pre, the label gather), so at most 32 accumulator elements per thread (64
# spilled); a gradient formed in the prologue (gelu' of each element) takes at most 8 elements of the A tile per
# thread (16 spilled on sm_80). fp32 runs tl.dot on FMAs with both operand tiles in registers: at most 16
# accumulator elements per thread, and fewer stages.
_CONFIGS = gemm_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    (128, 64, 16, 8, 4), (64, 128, 32, 8, 4), (64, 64, 32, 8, 4), (32, 64, 32, 4, 4), (32, 32, 32, 4, 4),
], group_key="GROUP_M", fp32_shapes=[(64, 64, 32, 8, 2), (32, 64, 32, 4, 4), (32, 32, 32, 4, 2)])


@triton.autotune(
    configs=_CONFIGS,
    key=["M", "N", "K", "ACTIVATION", "HAS_BIAS", "HAS_LABELS", "HAS_ADDEND", "SAVE_PRE", "OUT_DERIVATIVE",
         "GRAD_MODE", "GRAD_ACTIVATION"],
    prune_configs_by=pruner({"BLOCK_M": "M", "BLOCK_N": "N"}, dtype_arg="x_ptr"),
)
@triton.jit
def _linear_act_kernel(
    x_ptr, x2_ptr, w_ptr, b_ptr, u_ptr, y_ptr, add_ptr, z_ptr, out_ptr, pre_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b,
    stride_un, stride_uc,
    stride_y,
    stride_om, stride_on,  # also the strides of addend and z: contiguous [M, N] like out
    X_SCALE, GRAD_TARGET_SCALE,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    OUT_DERIVATIVE: tl.constexpr,
    GRAD_MODE: tl.constexpr,
    GRAD_ACTIVATION: tl.constexpr,
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

    x_offs = offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # W^T tile, [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Masked loads with 0 fill: ragged K contributes nothing to the dot product.
        mask_k = (offs_k + k0) < K
        # The A operand: x itself (GRAD_MODE 0) or a gradient formed from two tensors as it is loaded
        # (fastdni/kernels/prologue.py), e.g. delta = prediction * act'(h) for dx = delta W.
        a = gradient_tile(x_ptr + x_offs, x2_ptr + x_offs, mask_m[:, None] & mask_k[None, :], GRAD_TARGET_SCALE,
                          GRAD_MODE, GRAD_ACTIVATION)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only, bf16: see linear_act (exact, bf16 * bf16 fits in fp32)
            b = b.to(tl.float32)
        else:  # back to the input dtype for the tensor cores (exact for a stored operand)
            a = a.to(w_ptr.dtype.element_ty)
        if ALLOW_TF32:  # also fp16/bf16 inputs, for which the precision setting does not apply
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        x_offs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue, all in fp32 ----
    acc = acc * X_SCALE  # a gradient source's scale (1 for a plain x), once per output element
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if HAS_LABELS:
        # cDNI label term: ctx_b = U[:, y_b], a gather of one column of U per row (no one-hot GEMM).
        # Labels were range-checked on the host, so the only masking needed is for ragged tiles.
        y = tl.load(y_ptr + offs_m * stride_y, mask=mask_m, other=0).to(tl.int64)
        u = tl.load(u_ptr + offs_n[None, :] * stride_un + y[:, None] * stride_uc,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += u.to(tl.float32)
    if HAS_ADDEND:  # a float cDNI context term c U^T, computed by a library GEMM
        acc += tl.load(add_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if OUT_DERIVATIVE:  # backward through a relu SG layer: grad * 1[z > 0]
        z = tl.load(z_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        acc = acc * activation_derivative(z, OUT_DERIVATIVE)

    if SAVE_PRE:
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)

    acc = apply_activation(acc, ACTIVATION)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def linear_act(
    x: Union[Tensor, GradSource],
    weight: Tensor,
    bias: Optional[Tensor],
    activation: str = "relu",
    *,
    label_weight: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    addend: Optional[Tensor] = None,
    out_derivative: Optional[tuple[Tensor, str]] = None,
    save_pre: Optional[bool] = None,
    check_label_range: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """``out = act(x @ weight.T + bias [+ label_weight[:, labels].T] [+ addend]) [* act2'(z)]`` in one kernel.

    Args:
        x: ``[M, K]`` float32/bfloat16/float16, or a :class:`~fastdni.kernels.prologue.GradSource` whose tiles are
            formed as they are loaded (e.g. ``delta`` for ``dx = delta W``: pass ``weight=W.T``).
        weight: ``[N, K]``, same dtype and device as ``x``.
        bias: ``[N]``, same dtype and device, or ``None`` for no bias.
        activation: one of ``fastdni.contract.ACTIVATIONS`` (gelu exact, with erf).
        label_weight: cDNI ``U``, ``[N, C]``, same dtype and device; given together with ``labels``.
        labels: ``[M]`` int32/int64 class labels in ``[0, C)``.
        addend: ``[M, N]`` added before the activation (a float context term ``c U^T``).
        out_derivative: ``(z, act2)``: multiply the result by ``act2'(z)``, ``z`` ``[M, N]`` the output of an
            ``act2`` layer (the backward through a relu SG layer), not gelu.
        save_pre: write the pre-activation too. ``None`` (default): only for gelu, the activation whose
            derivative needs it; ``True``/``False`` force it on/off.
        check_label_range: check that ``labels`` lie in ``[0, C)`` (a device sync); ``False`` where the caller
            has checked them.

    Returns:
        ``(out, pre)``: ``out`` ``[M, N]`` of ``x.dtype``; ``pre`` the same or ``None`` when not saved.

    Read-only inputs are read through their strides (views such as ``W.T`` are not copied), except the
    tensors of a gradient source, ``addend`` and ``z``, which are made contiguous. Accumulation is in fp32.
    Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    code = activation_code(activation)
    if save_pre is None:
        save_pre = activation in NEEDS_PRE
    elif not isinstance(save_pre, bool):
        raise TypeError(f"save_pre: expected None or a bool, got {type(save_pre).__name__}")

    source = x.check() if isinstance(x, GradSource) else GradSource.stored(x)
    x = check_float("x", source.primary, 2)
    weight = check_float("weight", weight, 2)
    check_like("weight", weight, x, "x")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight: expected shape ({N}, {K}) to match x's {K} input features, got {tuple(weight.shape)}")
    if bias is not None:
        bias = check_float("bias", bias, 1)
        check_like("bias", bias, x, "x")
        if bias.shape[0] != N:
            raise ValueError(f"bias: expected shape ({N},) to match weight's {N} output features, got {tuple(bias.shape)}")
    check_device("x", x, INTERPRETED)
    has_labels = _check_labels(label_weight, labels, x, N, check_label_range)
    if addend is not None:
        addend = _check_output_like("addend", addend, x, M, N)
    deriv_code = 0
    if out_derivative is not None:
        z, act2 = out_derivative
        if act2 not in ACTIVATION_CODES or act2 in NEEDS_PRE:
            raise ValueError(f"out_derivative: expected an activation whose derivative follows from its output "
                             f"(not one of {NEEDS_PRE}), got {act2!r}")
        z = _check_output_like("out_derivative", z, x, M, N)
        deriv_code = ACTIVATION_CODES[act2]

    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(out) if save_pre else None
    if M == 0 or N == 0:
        return out, pre  # nothing to compute; K == 0 is handled by the kernel (act(bias [+ U term]))

    # Unused pointers get a valid tensor (out) so the launch signature never changes; the constexpr
    # flags compile those branches out.
    primary, secondary, grad_args = source.kernel_args()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    record_launch("linear_act")
    _linear_act_kernel[grid](
        primary, secondary, weight, bias if bias is not None else out, label_weight if has_labels else out,
        labels if has_labels else out, addend if addend is not None else out,
        z if deriv_code else out, out, pre if save_pre else out,
        M, N, K,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        label_weight.stride(0) if has_labels else 0, label_weight.stride(1) if has_labels else 0,
        labels.stride(0) if has_labels else 0,
        out.stride(0), out.stride(1),
        float(source.scale), grad_args.pop("GRAD_TARGET_SCALE"),
        ACTIVATION=code,
        HAS_BIAS=bias is not None,
        HAS_LABELS=has_labels,
        HAS_ADDEND=addend is not None,
        SAVE_PRE=save_pre,
        OUT_DERIVATIVE=deriv_code,
        **grad_args,
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


def _check_output_like(name: str, t: object, x: Tensor, M: int, N: int) -> Tensor:
    """An ``[M, N]`` tensor read at the output's offsets: made contiguous."""
    t = check_float(name, t, 2)
    check_like(name, t, x, "x")
    if tuple(t.shape) != (M, N):
        raise ValueError(f"{name}: expected shape {(M, N)} (the output's), got {tuple(t.shape)}")
    return t.contiguous()


def _check_labels(label_weight: Optional[Tensor], labels: Optional[Tensor], x: Tensor, N: int, check_range: bool) -> bool:
    if (label_weight is None) != (labels is None):
        missing = "labels" if labels is None else "label_weight"
        raise ValueError(f"{missing}: label_weight and labels must be given together (got only one)")
    if labels is None:
        return False
    M = x.shape[0]
    label_weight = check_float("label_weight", label_weight, 2)
    check_like("label_weight", label_weight, x, "x")
    if label_weight.shape[0] != N:
        raise ValueError(f"label_weight: expected shape ({N}, C) to match weight's {N} output features, "
                         f"got {tuple(label_weight.shape)}")
    check_labels(labels, M, label_weight.shape[1], x.device, check_range=check_range)
    return True


def check_labels(labels: object, rows: int, classes: int, device: torch.device, *, check_range: bool = True) -> None:
    """int32/int64 ``[rows]`` in ``[0, classes)`` on ``device``. Out-of-range labels would read or write
    outside ``U``: checked on the host (one device sync; :func:`fastdni.contract.check_label_range`, as every
    backend does). ``check_range=False`` skips that sync where the caller
    has checked the same labels already (fastdni/kernels/ops.py checks once per op)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels: expected dtype int32 or int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels: expected shape ({rows},) (one label per row), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: expected device {device}, got {labels.device}")
    if check_range:
        check_label_range("labels", labels, classes)
