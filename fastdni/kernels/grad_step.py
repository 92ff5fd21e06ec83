"""Weight/bias gradient GEMMs with the optimizer step fused into the epilogue: the gradient is never stored.

* :func:`gemm_grad_step_`: ``dW = grad_out^T @ input`` (``grad_out [B, N]``, ``input [B, K]``, ``param
  [N, K]``), tile by tile with fp32 accumulation; each program owns one ``[BLOCK_N, BLOCK_K]`` output
  tile, reduces over all of ``B`` itself, then loads that tile of ``param`` and its state, applies the
  optimizer step (:mod:`fastdni.kernels.optim`) and stores them back in place. Optionally in the same pass:
  ``grad_out`` formed on the fly (:mod:`fastdni.kernels.prologue`: the layer's delta, the SG's error), the input
  formed from labels (``onehot(y)``, cDNI's ``dU``), the bias step on ``grad_out.sum(0)`` and the SG loss
  ``sum(error^2)``, both by the programs of the first column of tiles, which see every gradient element once.
* :func:`bias_grad_step_`: ``db = grad_out.sum(0)`` (fp32) with the same epilogue on ``bias``, for where
  there is no weight to fuse it into.

Design notes (race-freedom, strides, precision, autotuning): docs/performance.md ("Triton kernels: design notes").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import FLOAT_DTYPES, check_device, check_float, check_like, check_updated
from ._tiling import INTERPRETED, gemm_configs, grouped_tile, pruner
from ._launch import record_launch
from .linear_act import check_labels
from .optim import optimizer_args, optimizer_epilogue, state_per_param
from .prologue import GradSource, gradient_tile

__all__ = ["gemm_grad_step_", "bias_grad_step_", "check_param_step"]

# Autotuning runs a launch once per config: these in-place outputs are restored after each run.
_RESTORE = ["p_ptr", "s0_ptr", "s1_ptr", "pb_ptr", "sb0_ptr", "sb1_ptr"]
_RESTORE_BIAS = ["p_ptr", "s0_ptr", "s1_ptr"]
_MIN_BLOCK_N = 32  # the smallest BLOCK_N of any config: sizes the buffer of per-program loss partials
# (BLOCK_N, BLOCK_K, BLOCK_B, warps, stages). The Adam epilogue keeps four fp32 tiles live (grad, param,
# exp_avg, exp_avg_sq) and, with ragged sizes (scalar loads), a 64-bit address per element for each of the three
# arrays: tiles stay at <= 16 elements per thread (32 spilled, fastdni/kernels/aot.py). A gradient formed in the prologue
# (gelu' of each element) keeps BLOCK_B at 32 (64 spilled on sm_80). fp32 (FMA dot, both operands in registers)
# takes BLOCK_B 16 for the 64x64 tile.
_GEMM_CONFIGS = gemm_configs(("BLOCK_N", "BLOCK_K", "BLOCK_B"), [
    (64, 64, 32, 8, 3), (64, 32, 32, 8, 3), (32, 64, 32, 4, 4), (32, 32, 32, 2, 4),
], group_key="GROUP_N", fp32_shapes=[
    (64, 64, 16, 8, 3), (64, 32, 32, 8, 3), (32, 64, 32, 8, 3),  # 32x32 (w2, w4) spilled on sm_80 or sm_90
])
_KEY_FLAGS = ["IS_ADAM", "HAS_WD", "DECOUPLED", "HAS_BUF", "NESTEROV", "FIRST_STEP"]
_BIAS_CONFIGS = gemm_configs(("BLOCK_N", "BLOCK_B"), [(128, 32, 4), (64, 64, 4), (32, 128, 4), (256, 16, 4)])


@triton.jit
def reduce_partials(value, slot, num_slots, partial_ptr, counter_ptr, out_ptr, SCALE):
    """``out = SCALE * sum`` of one scalar ``value`` per program (``slot`` in ``[0, num_slots)``), summed in slot
    order whatever order the programs run in: each stores its partial, then counts itself in; the last to
    arrive reads every partial, writes ``out`` and resets the counter for the next launch."""
    tl.store(partial_ptr + slot, value)
    tl.debug_barrier()  # every thread's store is issued before the (release) atomic below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == num_slots - 1:
        total = tl.zeros((128,), dtype=tl.float32)
        for start in range(0, num_slots, 128):
            offs = start + tl.arange(0, 128)
            # .cg: read through L2, where the other programs' partials are, not a stale L1 line
            total += tl.load(partial_ptr + offs, mask=offs < num_slots, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr, (tl.sum(total) * SCALE).to(out_ptr.dtype.element_ty))
        tl.atomic_xchg(counter_ptr, 0)


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["N", "K", "B", "GRAD_MODE", "GRAD_ACTIVATION", "ONEHOT_INPUT", "HAS_BIAS", "HAS_LOSS"] + _KEY_FLAGS,
    prune_configs_by=pruner({"BLOCK_N": "N", "BLOCK_K": "K"}, dtype_arg="g_ptr"),
    restore_value=None if INTERPRETED else _RESTORE,
)
@triton.jit
def _gemm_grad_step_kernel(
    g_ptr, g2_ptr, x_ptr, y_ptr, p_ptr, s0_ptr, s1_ptr, pb_ptr, sb0_ptr, sb1_ptr, loss_ptr, partial_ptr, counter_ptr,
    B, N, K,
    stride_gb, stride_gn,  # also those of g2 (a gradient source's second tensor)
    stride_xb, stride_xk,
    stride_y,
    stride_pn,  # param and state: contiguous [N, K], so stride_pk == 1
    GRAD_SCALE, GRAD_TARGET_SCALE, LOSS_SCALE,
    OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
    OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
    GRAD_MODE: tl.constexpr, GRAD_ACTIVATION: tl.constexpr, ONEHOT_INPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LOSS: tl.constexpr,
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
    offs_b = tl.arange(0, BLOCK_B).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # db (unscaled), used by the pid_k == 0 programs
    sq_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the SG loss, sum of error^2 (unscaled)
    for b0 in range(0, B, BLOCK_B):
        rows = offs_b + b0
        mask_b = rows < B  # masked loads with 0 fill: a ragged B contributes nothing
        # Tile offsets are formed here from the row/column vectors, not carried across iterations as
        # [BLOCK, BLOCK] int64 tensors: with ragged sizes (scalar loads) those cost registers per element.
        g_offs = offs_n[:, None] * stride_gn + rows[None, :] * stride_gb  # grad_out^T tile [BLOCK_N, BLOCK_B]
        # The gradient tile, stored or formed here from prediction and h/target (fastdni/kernels/prologue.py).
        a = gradient_tile(g_ptr + g_offs, g2_ptr + g_offs, mask_n[:, None] & mask_b[None, :], GRAD_TARGET_SCALE,
                          GRAD_MODE, GRAD_ACTIVATION)
        if HAS_BIAS:
            row_sum += tl.sum(a, axis=1)
        if HAS_LOSS:
            sq_sum += tl.sum(a * a, axis=1)
        if ONEHOT_INPUT:  # cDNI dU = g^T onehot(y): the one-hot tile is built from the labels, never stored
            y = tl.load(y_ptr + rows * stride_y, mask=mask_b, other=-1)
            x = tl.where(y[:, None] == offs_k[None, :], 1.0, 0.0)
        else:
            x_offs = rows[:, None] * stride_xb + offs_k[None, :] * stride_xk  # input tile [BLOCK_B, BLOCK_K]
            x = tl.load(x_ptr + x_offs, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only: exact, a product of two bf16/fp16 values fits in fp32
            x = x.to(tl.float32)
        else:  # the input dtype for the tensor cores (exact for a stored gradient; a formed one rounds as eager)
            a = a.to(g_ptr.dtype.element_ty)
            x = x.to(g_ptr.dtype.element_ty)
        if ALLOW_TF32:
            acc = tl.dot(a, x, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, x, acc, input_precision="ieee", out_dtype=tl.float32)

    # ---- epilogue: the optimizer step on this tile; dW (acc) never leaves registers ----
    offs = offs_n[:, None] * stride_pn + offs_k[None, :]
    optimizer_epilogue(acc * GRAD_SCALE, p_ptr + offs, s0_ptr + offs, s1_ptr + offs, mask_n[:, None] & mask_k[None, :],
                       OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                       OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                       IS_ADAM, HAS_WD, DECOUPLED, HAS_BUF, NESTEROV, FIRST_STEP)
    # The first column of programs has also seen every (row, b) element of the gradient once: it steps
    # the bias on the row sums and adds the loss. No other program touches the bias.
    if pid_k == 0:
        if HAS_BIAS:
            optimizer_epilogue(row_sum * GRAD_SCALE, pb_ptr + offs_n, sb0_ptr + offs_n, sb1_ptr + offs_n, mask_n,
                               OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT,
                               OPT_LERP_WEIGHT, OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM,
                               OPT_ONE_MINUS_DAMPENING, IS_ADAM, HAS_WD, DECOUPLED, HAS_BUF, NESTEROV, FIRST_STEP)
        if HAS_LOSS:
            reduce_partials(tl.sum(sq_sum), pid_n, tl.cdiv(N, BLOCK_N), partial_ptr, counter_ptr, loss_ptr, LOSS_SCALE)


@triton.autotune(
    configs=_BIAS_CONFIGS,
    key=["N", "B", "GRAD_MODE", "GRAD_ACTIVATION", "HAS_LOSS"] + _KEY_FLAGS,
    prune_configs_by=pruner({"BLOCK_N": "N"}),
    restore_value=None if INTERPRETED else _RESTORE_BIAS,
)
@triton.jit
def _bias_grad_step_kernel(
    g_ptr, g2_ptr, p_ptr, s0_ptr, s1_ptr, loss_ptr, partial_ptr, counter_ptr,
    B, N,
    stride_gb, stride_gn,
    GRAD_SCALE, GRAD_TARGET_SCALE, LOSS_SCALE,
    OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
    OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
    GRAD_MODE: tl.constexpr, GRAD_ACTIVATION: tl.constexpr, HAS_LOSS: tl.constexpr,
    IS_ADAM: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_BUF: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One program per BLOCK_N columns, summing all B rows itself: it alone touches its bias/state elements
    # (race-free in-place epilogue, as in the GEMM kernel). Used alone where there is no weight to fuse
    # the bias step into (an input with no columns).
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B).to(tl.int64)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = offs_b + b0
        offs = rows[:, None] * stride_gb + offs_n[None, :] * stride_gn
        g = gradient_tile(g_ptr + offs, g2_ptr + offs, (rows < B)[:, None] & mask_n[None, :], GRAD_TARGET_SCALE,
                          GRAD_MODE, GRAD_ACTIVATION)
        acc += g
        if HAS_LOSS:
            sq += g * g
    optimizer_epilogue(tl.sum(acc, axis=0) * GRAD_SCALE, p_ptr + offs_n, s0_ptr + offs_n, s1_ptr + offs_n, mask_n,
                       OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                       OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                       IS_ADAM, HAS_WD, DECOUPLED, HAS_BUF, NESTEROV, FIRST_STEP)
    if HAS_LOSS:
        reduce_partials(tl.sum(tl.sum(sq, axis=1), axis=0), pid, tl.cdiv(N, BLOCK_N), partial_ptr, counter_ptr, loss_ptr,
                        LOSS_SCALE)


# ---------------------------------------------------------------------------------------------------
# Host side: validation, then launch.

def check_param_step(param_name: str, param: object, shape: tuple, state: Sequence[Tensor], optimizer: str,
                     hyper: Sequence[float], like: Tensor) -> tuple[dict, dict, Tensor, Tensor]:
    """Optimizer arguments of one updated tensor; ``(scalars, constexprs, state0, state1)`` for the launch."""
    scalars, constexprs = optimizer_args(optimizer, hyper)
    param = check_float(param_name, param, len(shape))
    if tuple(param.shape) != shape:
        raise ValueError(f"{param_name}: expected shape {shape}, got {tuple(param.shape)}")
    check_like(param_name, param, like, "grad_out", dtype=False)
    check_updated(param_name, param, shape, param, param_name)
    if isinstance(state, Tensor) or not isinstance(state, (list, tuple)):
        raise TypeError(f"{param_name} state: expected a list of tensors, got {type(state).__name__}")
    want = state_per_param(optimizer, hyper)
    if len(state) != want:
        raise ValueError(f"{param_name} state: expected {want} tensors for {optimizer!r} (hyper {list(hyper)}), got {len(state)}")
    for i, s in enumerate(state):
        check_updated(f"{param_name} state[{i}]", s, shape, param, param_name)
    ptrs = [param.data_ptr()] + [s.data_ptr() for s in state]
    if param.numel() and len(set(ptrs)) != len(ptrs):
        raise ValueError(f"{param_name} state: {param_name} and its state tensors must be distinct tensors (no aliasing)")
    s0 = state[0] if want >= 1 else param  # never dereferenced by the kernel when absent
    s1 = state[1] if want >= 2 else param
    return scalars, constexprs, s0, s1


def _check_loss(loss: object, like: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.dtype not in FLOAT_DTYPES or loss.numel() != 1 or loss.device != like.device:
        raise ValueError(f"loss: expected a one-element float tensor on {like.device}, got "
                         f"{loss if not isinstance(loss, Tensor) else (tuple(loss.shape), loss.dtype, loss.device)}")


_COUNTERS: dict = {}


def _loss_buffers(device: torch.device, num_partials: int) -> tuple[Tensor, Tensor]:
    """``(partials, counter)`` for :func:`reduce_partials`: scratch partials, and an int32 arrival counter the
    kernel resets to 0 after use, allocated (zeroed) once per device and stream. Launches on one stream run one
    after another, so they never share it; another stream gets its own."""
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return torch.empty(num_partials, dtype=torch.float32, device=device), counter


def _grad_source(grad_out: object) -> GradSource:
    source = grad_out.check() if isinstance(grad_out, GradSource) else GradSource.stored(grad_out)
    check_float("grad_out", source.primary, 2)
    check_device("grad_out", source.primary, INTERPRETED)
    return source


def gemm_grad_step_(grad_out: "Tensor | GradSource", input: Optional[Tensor], param: Tensor, state: Sequence[Tensor],
                    optimizer: str, hyper: Sequence[float], *, labels: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, bias_state: Sequence[Tensor] = (),
                    loss: Optional[Tensor] = None, loss_scale: float = 1.0, check_label_range: bool = True) -> None:
    """Apply one optimizer step to ``param`` with gradient ``grad_out^T @ input``, in place; dW is never stored.

    Args:
        grad_out: ``[B, N]`` float32/bfloat16/float16, any strides; or a :class:`~fastdni.kernels.prologue.GradSource`
            (the layer's delta or the SG's error, formed tile by tile as it is loaded).
        input: ``[B, K]``, same dtype and device as ``grad_out``, any strides; ``None`` with ``labels``.
        param: ``[N, K]``, float, contiguous, same device; updated in place in fp32 math.
        state: the optimizer's tensors for ``param`` (adam: ``[exp_avg, exp_avg_sq]``; sgd:
            ``[momentum_buffer]``, or ``[]`` when momentum is 0), each of ``param``'s dtype and shape,
            contiguous; updated in place.
        optimizer, hyper: ``"adam"``/``"sgd"`` and its hyperparameters, as in :mod:`fastdni.ops.optim`.
        labels: ``[B]`` int labels in ``[0, K)``: the input is ``onehot(labels)`` (cDNI's ``dU``), built
            tile by tile.
        bias, bias_state: also step ``bias`` ``[N]`` (and its state) on ``grad_out.sum(0)``, in the same pass.
        loss: a one-element float tensor that receives ``loss_scale * sum(raw grad_out^2)`` (the SG loss,
            reduced in the same pass; written when ``N > 0``).
        check_label_range: as for :func:`~fastdni.kernels.linear_act.linear_act`.
    """
    source = _grad_source(grad_out)
    g = source.primary
    B, N = g.shape
    if labels is None:
        input = check_float("input", input, 2)
        check_like("input", input, g, "grad_out")
        if input.shape[0] != B:
            raise ValueError(f"input: expected {B} rows (the batch of grad_out {tuple(g.shape)}), got shape {tuple(input.shape)}")
        K = input.shape[1]
    else:
        if input is not None:
            raise ValueError("input: expected None when labels are given (the input is onehot(labels))")
        if not isinstance(param, Tensor) or param.dim() != 2:
            raise ValueError(f"param: expected a 2-d tensor [N, classes], got {getattr(param, 'shape', param)}")
        K = param.shape[1]
        check_labels(labels, B, K, g.device, check_range=check_label_range)
    scalars, constexprs, s0, s1 = check_param_step("param", param, (N, K), state, optimizer, hyper, g)
    pb, sb0, sb1 = param, param, param
    if bias is not None:
        _, _, sb0, sb1 = check_param_step("bias", bias, (N,), bias_state, optimizer, hyper, g)
        pb = bias
    if loss is not None:
        _check_loss(loss, g)
    if N == 0:
        return
    if K == 0:  # no weight tile to fuse the bias step into
        if bias is not None or loss is not None:
            _launch_bias(source, bias, bias_state, optimizer, hyper, loss, loss_scale)
        return

    primary, secondary, grad_args = source.kernel_args()
    x = input if labels is None else g  # not read when the input is one-hot

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    record_launch("gemm_grad_step")
    _gemm_grad_step_kernel[grid](
        primary, secondary, x, labels if labels is not None else g, param, s0, s1, pb, sb0, sb1,
        loss if loss is not None else param, *_loss_buffers(g.device, triton.cdiv(N, _MIN_BLOCK_N)),
        B, N, K,
        primary.stride(0), primary.stride(1),
        x.stride(0), x.stride(1),
        labels.stride(0) if labels is not None else 0,
        param.stride(0),
        float(source.scale), grad_args.pop("GRAD_TARGET_SCALE"), float(loss_scale),
        **scalars, **grad_args,
        ONEHOT_INPUT=labels is not None, HAS_BIAS=bias is not None, HAS_LOSS=loss is not None,
        **constexprs,
        ALLOW_TF32=g.dtype != torch.float32 or bool(torch.backends.cuda.matmul.allow_tf32),
        # Triton 3.8's interpreter gets tl.dot of bf16 operands wrong (see fastdni/kernels/linear_act.py); widen
        # low-precision tiles to fp32 there (exact).
        UPCAST_DOT=INTERPRETED and g.dtype != torch.float32,
    )


def bias_grad_step_(grad_out: "Tensor | GradSource", bias: Tensor, state: Sequence[Tensor], optimizer: str,
                    hyper: Sequence[float], *, loss: Optional[Tensor] = None, loss_scale: float = 1.0) -> None:
    """Apply one optimizer step to ``bias`` with gradient ``grad_out.sum(0)`` (fp32), in place.

    Args:
        grad_out: ``[B, N]`` float32/bfloat16/float16, any strides, or a gradient source.
        bias: ``[N]``, float, contiguous, same device; updated in place.
        state, optimizer, hyper: as for :func:`gemm_grad_step_`, shaped like ``bias``.
        loss, loss_scale: as for :func:`gemm_grad_step_`.
    """
    source = _grad_source(grad_out)
    N = source.shape[1]
    check_param_step("bias", bias, (N,), state, optimizer, hyper, source.primary)
    if loss is not None:
        _check_loss(loss, source.primary)
    if N:
        _launch_bias(source, bias, state, optimizer, hyper, loss, loss_scale)


def _launch_bias(source: GradSource, bias: Optional[Tensor], state: Sequence[Tensor], optimizer: str,
                 hyper: Sequence[float], loss: Optional[Tensor], loss_scale: float) -> None:
    B, N = source.shape
    if bias is None:  # only the loss is wanted: step a scratch bias with plain SGD, lr 0 (a no-op)
        bias, state, optimizer, hyper = torch.zeros(N, device=source.device), [], "sgd", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    scalars, constexprs = optimizer_args(optimizer, hyper)
    n_state = state_per_param(optimizer, hyper)
    s0 = state[0] if n_state >= 1 else bias
    s1 = state[1] if n_state >= 2 else bias
    primary, secondary, grad_args = source.kernel_args()

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    record_launch("bias_grad_step")
    _bias_grad_step_kernel[grid](
        primary, secondary, bias, s0, s1, loss if loss is not None else bias,
        *_loss_buffers(source.device, triton.cdiv(N, _MIN_BLOCK_N)),
        B, N,
        primary.stride(0), primary.stride(1),
        float(source.scale), grad_args.pop("GRAD_TARGET_SCALE"), float(loss_scale),
        **scalars, **grad_args, HAS_LOSS=loss is not None, **constexprs,
    )
