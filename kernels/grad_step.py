"""Weight/bias gradient GEMMs with the optimizer step fused into the epilogue: the gradient is never stored.

* :func:`gemm_grad_step_`: ``dW = grad_out^T @ input`` (``grad_out [B, N]``, ``input [B, K]``, ``param
  [N, K]``), tile by tile with fp32 accumulation; each program owns one ``[BLOCK_N, BLOCK_K]`` output
  tile, reduces over all of ``B`` itself, then loads that tile of ``param`` and its state, applies the
  optimizer step (:mod:`kernels.optim`) and stores them back in place.
* :func:`bias_grad_step_`: ``db = grad_out.sum(0)`` (fp32) with the same epilogue on ``bias``.

Design notes
------------
* Race-freedom: the grid is exactly one program per output tile and the reduction over ``B`` happens
  inside the program (no split-K), so no two programs read or write the same param/state elements.
  That is what makes the non-atomic in-place read-modify-write of the epilogue safe.
* ``grad_out``/``input`` are read through their strides (views such as ``x.T`` or slices are fine, no
  copy); fp32, bf16 or fp16, both of the same dtype. ``param``/``bias`` and their state are fp32 master
  weights and must be contiguous: they are updated in place, so a hidden ``.contiguous()`` copy would
  silently drop the update; they are rejected instead.
* fp32 operands use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
* Autotuning benchmarks run the kernel several times; ``restore_value`` restores param and state
  after each run so the step is applied exactly once. Under ``TRITON_INTERPRET=1`` there is one config.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiling import INTERPRETED, gemm_configs, grouped_tile, pruner
from .optim import num_state, optimizer_args, optimizer_epilogue

__all__ = ["gemm_grad_step_", "bias_grad_step_"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_RESTORE = ["p_ptr", "s0_ptr", "s1_ptr"]
# (BLOCK_N, BLOCK_K, BLOCK_B, warps, stages). The Adam epilogue keeps four fp32 tiles live (grad, param,
# exp_avg, exp_avg_sq): tiles stay at <= 128x64 so they fit in registers.
_GEMM_CONFIGS = gemm_configs(("BLOCK_N", "BLOCK_K", "BLOCK_B"), [
    (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 3), (64, 32, 64, 4, 4), (32, 64, 64, 4, 4), (32, 32, 64, 2, 4),
], group_key="GROUP_N")
_KEY_FLAGS = ["IS_ADAM", "HAS_WD", "DECOUPLED", "HAS_BUF", "NESTEROV", "FIRST_STEP"]
_BIAS_CONFIGS = gemm_configs(("BLOCK_N", "BLOCK_B"), [(128, 32, 4), (64, 64, 4), (32, 128, 4), (256, 16, 4)])


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["N", "K", "B"] + _KEY_FLAGS,
    prune_configs_by=pruner({"BLOCK_N": "N", "BLOCK_K": "K"}),
    restore_value=None if INTERPRETED else _RESTORE,
)
@triton.jit
def _gemm_grad_step_kernel(
    g_ptr, x_ptr, p_ptr, s0_ptr, s1_ptr,
    B, N, K,
    stride_gb, stride_gn,
    stride_xb, stride_xk,
    stride_pn,  # param and state: contiguous [N, K], so stride_pk == 1
    OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
    OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
    IS_ADAM: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_BUF: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
    ALLOW_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, GROUP_N: tl.constexpr,
):
    # One program per [BLOCK_N, BLOCK_K] tile of dW/param, in grouped order (GROUP_N row tiles share each
    # column block of `input` while it is in L2). The whole reduction over B happens in this program, so
    # this program is the only one that touches its tile of param and state: the in-place epilogue below
    # is race-free. (A split-B variant would need a separate reduction before the step.)
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)

    # int64 indices: index * stride must not wrap for tensors of more than 2^31 elements.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_k = offs_k < K

    g_ptrs = g_ptr + offs_n[:, None] * stride_gn + offs_b[None, :] * stride_gb  # grad_out^T tile [BLOCK_N, BLOCK_B]
    x_ptrs = x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk  # input tile [BLOCK_B, BLOCK_K]

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        mask_b = (offs_b + b0) < B  # masked loads with 0 fill: a ragged B contributes nothing
        a = tl.load(g_ptrs, mask=mask_n[:, None] & mask_b[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only: exact, a product of two bf16/fp16 values fits in fp32
            a = a.to(tl.float32)
            x = x.to(tl.float32)
        if ALLOW_TF32:
            acc = tl.dot(a, x, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, x, acc, input_precision="ieee", out_dtype=tl.float32)
        g_ptrs += BLOCK_B * stride_gb
        x_ptrs += BLOCK_B * stride_xb

    # ---- epilogue: the optimizer step on this tile; dW (acc) never leaves registers ----
    offs = offs_n[:, None] * stride_pn + offs_k[None, :]
    optimizer_epilogue(acc, p_ptr + offs, s0_ptr + offs, s1_ptr + offs, mask_n[:, None] & mask_k[None, :],
                       OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                       OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                       IS_ADAM, HAS_WD, DECOUPLED, HAS_BUF, NESTEROV, FIRST_STEP)


@triton.autotune(
    configs=_BIAS_CONFIGS,
    key=["N", "B"] + _KEY_FLAGS,
    prune_configs_by=pruner({"BLOCK_N": "N"}),
    restore_value=None if INTERPRETED else _RESTORE,
)
@triton.jit
def _bias_grad_step_kernel(
    g_ptr, p_ptr, s0_ptr, s1_ptr,
    B, N,
    stride_gb, stride_gn,
    OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
    OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
    IS_ADAM: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_BUF: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One program per BLOCK_N columns, summing all B rows itself: it alone touches its bias/state elements
    # (race-free in-place epilogue, as in the GEMM kernel).
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B).to(tl.int64)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = offs_b + b0
        g = tl.load(g_ptr + rows[:, None] * stride_gb + offs_n[None, :] * stride_gn,
                    mask=(rows < B)[:, None] & mask_n[None, :], other=0.0)
        acc += g.to(tl.float32)
    db = tl.sum(acc, axis=0)
    optimizer_epilogue(db, p_ptr + offs_n, s0_ptr + offs_n, s1_ptr + offs_n, mask_n,
                       OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                       OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                       IS_ADAM, HAS_WD, DECOUPLED, HAS_BUF, NESTEROV, FIRST_STEP)


# ---------------------------------------------------------------------------------------------------
# Host side: validation, then launch.

def _check_float(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    return t


def _check_master(name: str, t: object, shape: tuple, device: torch.device) -> Tensor:
    """A tensor updated in place: fp32, the given shape and device, contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype float32 (master weights), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of grad_out), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (it is updated in place), got strides {t.stride()}")
    return t


def _check_step_args(param_name: str, param: Tensor, state: Sequence[Tensor], optimizer: str,
                     hyper: Sequence[float], device: torch.device) -> tuple[dict, dict, Tensor, Tensor]:
    scalars, constexprs = optimizer_args(optimizer, hyper)
    _check_master(param_name, param, tuple(param.shape) if isinstance(param, Tensor) else (), device)
    if isinstance(state, Tensor) or not isinstance(state, (list, tuple)):
        raise TypeError(f"state: expected a list of tensors, got {type(state).__name__}")
    want = num_state(optimizer, hyper)
    if len(state) != want:
        raise ValueError(f"state: expected {want} tensors for {optimizer!r} (hyper {list(hyper)}), got {len(state)}")
    shape = tuple(param.shape)
    for i, s in enumerate(state):
        _check_master(f"state[{i}]", s, shape, device)
    ptrs = [param.data_ptr()] + [s.data_ptr() for s in state]
    if param.numel() and len(set(ptrs)) != len(ptrs):
        raise ValueError(f"state: {param_name} and its state tensors must be distinct tensors (no aliasing)")
    s0 = state[0] if want >= 1 else param  # never dereferenced by the kernel when absent
    s1 = state[1] if want >= 2 else param
    return scalars, constexprs, s0, s1


def gemm_grad_step_(grad_out: Tensor, input: Tensor, param: Tensor, state: Sequence[Tensor],
                    optimizer: str, hyper: Sequence[float]) -> None:
    """Apply one optimizer step to ``param`` with gradient ``grad_out^T @ input``, in place; dW is never stored.

    Args:
        grad_out: ``[B, N]`` float32/bfloat16/float16, any strides.
        input: ``[B, K]``, same dtype and device as ``grad_out``, any strides.
        param: ``[N, K]`` float32, contiguous, same device; updated in place.
        state: the optimizer's tensors for ``param`` (adam: ``[exp_avg, exp_avg_sq]``; sgd:
            ``[momentum_buffer]``, or ``[]`` when momentum is 0), each float32, contiguous, shaped like
            ``param``; updated in place.
        optimizer, hyper: ``"adam"``/``"sgd"`` and its hyperparameters, as in :mod:`fastdni.ops.optim`.
    """
    _check_float("grad_out", grad_out, 2)
    _check_float("input", input, 2)
    if input.device != grad_out.device:
        raise ValueError(f"input: expected device {grad_out.device} (that of grad_out), got {input.device}")
    if input.dtype != grad_out.dtype:
        raise TypeError(f"input: expected dtype {grad_out.dtype} (that of grad_out), got {input.dtype}")
    B, N = grad_out.shape
    if input.shape[0] != B:
        raise ValueError(f"input: expected {B} rows (the batch of grad_out {tuple(grad_out.shape)}), got shape {tuple(input.shape)}")
    K = input.shape[1]
    if not isinstance(param, Tensor):
        raise TypeError(f"param: expected a torch.Tensor, got {type(param).__name__}")
    if tuple(param.shape) != (N, K):
        raise ValueError(f"param: expected shape {(N, K)} (grad_out columns, input columns), got {tuple(param.shape)}")
    scalars, constexprs, s0, s1 = _check_step_args("param", param, state, optimizer, hyper, grad_out.device)
    if N == 0 or K == 0:
        return

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    _gemm_grad_step_kernel[grid](
        grad_out, input, param, s0, s1,
        B, N, K,
        grad_out.stride(0), grad_out.stride(1),
        input.stride(0), input.stride(1),
        param.stride(0),
        **scalars, **constexprs,
        ALLOW_TF32=grad_out.dtype != torch.float32 or bool(torch.backends.cuda.matmul.allow_tf32),
        # Triton 3.8's interpreter gets tl.dot of bf16 operands wrong (see kernels/linear_act.py); widen
        # low-precision tiles to fp32 there (exact).
        UPCAST_DOT=INTERPRETED and grad_out.dtype != torch.float32,
    )


def bias_grad_step_(grad_out: Tensor, bias: Tensor, state: Sequence[Tensor], optimizer: str,
                    hyper: Sequence[float]) -> None:
    """Apply one optimizer step to ``bias`` with gradient ``grad_out.sum(0)`` (fp32), in place.

    Args:
        grad_out: ``[B, N]`` float32/bfloat16/float16, any strides.
        bias: ``[N]`` float32, contiguous, same device; updated in place.
        state, optimizer, hyper: as for :func:`gemm_grad_step_`, shaped like ``bias``.
    """
    _check_float("grad_out", grad_out, 2)
    B, N = grad_out.shape
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape {(N,)} (grad_out columns), got {tuple(bias.shape)}")
    scalars, constexprs, s0, s1 = _check_step_args("bias", bias, state, optimizer, hyper, grad_out.device)
    if N == 0:
        return

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    _bias_grad_step_kernel[grid](
        grad_out, bias, s0, s1,
        B, N,
        grad_out.stride(0), grad_out.stride(1),
        **scalars, **constexprs,
    )
