"""The optimizer steps of the fused Triton kernels, written once: ``@triton.jit`` helpers plus the host side.

Every kernel that updates a parameter in its epilogue (``fastdni/kernels/grad_step.py``) calls
:func:`optimizer_epilogue` on an fp32 gradient tile; the formulae are those of
:mod:`fastdni.reference.optim` (``torch.optim.Adam``/``AdamW``/``SGD``) and of ``csrc/common/dni_math.h``.

Host side, :func:`optimizer_args` checks ``(optimizer, hyper)`` (:func:`fastdni.contract.check_kernel_hyper`; layout:
:mod:`fastdni.ops.optim`) and turns it into

* ``scalars``: a dict of runtime float arguments, ``OPT_LR`` ... ``OPT_ONE_MINUS_DAMPENING``, always all
  present (unused ones are 0) so each kernel has one fixed signature. Per-step quantities such as
  ``1 - beta2``, ``lr / (1 - beta1^step)`` and ``sqrt(1 - beta2^step)`` are formed here in Python float
  (double) and rounded to fp32 only when passed to the kernel, as ``parse_optimizer`` in
  ``csrc/common/op_args.h`` does (``1 - 0.999`` formed in fp32 would be off by ~1e-5 relative).
* ``constexprs``: a dict of ``tl.constexpr`` flags (optimizer kind, weight decay on/off, decoupled,
  momentum buffer on/off, nesterov, first step), so each variant compiles to straight-line code.

Pass both with ``**`` to a kernel that declares the same names (see ``OPTIMIZER_KERNEL_ARGS``).
"""
from __future__ import annotations

import math
from typing import Sequence

import triton
import triton.language as tl

from fastdni.contract import check_kernel_hyper, state_per_param

__all__ = [
    "optimizer_args",
    "state_per_param",
    "OPTIMIZER_KERNEL_ARGS",
    "adam_update",
    "sgd_update",
    "optimizer_epilogue",
]

#: Names of the runtime scalars and of the constexpr flags a kernel using :func:`optimizer_epilogue` declares.
SCALAR_NAMES = (
    "OPT_LR", "OPT_WEIGHT_DECAY",
    "OPT_BETA2", "OPT_EPS", "OPT_STEP_SIZE", "OPT_BC2_SQRT", "OPT_LERP_WEIGHT", "OPT_ONE_MINUS_BETA2",
    "OPT_DECOUPLED_FACTOR",
    "OPT_MOMENTUM", "OPT_ONE_MINUS_DAMPENING",
)
CONSTEXPR_NAMES = ("IS_ADAM", "HAS_WD", "DECOUPLED", "HAS_BUF", "NESTEROV", "FIRST_STEP")
OPTIMIZER_KERNEL_ARGS = SCALAR_NAMES + CONSTEXPR_NAMES


def optimizer_args(optimizer: str, hyper: Sequence[float]) -> tuple[dict, dict]:
    """``(scalars, constexprs)`` for one step; raises ``ValueError`` naming ``optimizer``/``hyper`` when invalid."""
    h = check_kernel_hyper(optimizer, hyper)  # the op contract's checks (fastdni.contract)
    lr = h[0]
    scalars = dict.fromkeys(SCALAR_NAMES, 0.0)
    scalars["OPT_LR"] = lr
    if optimizer == "adam":
        _, beta1, beta2, eps, wd, decoupled, step = h
        scalars.update(
            OPT_WEIGHT_DECAY=wd,
            OPT_BETA2=beta2,
            OPT_EPS=eps,
            OPT_STEP_SIZE=lr / (1.0 - beta1**step),
            OPT_BC2_SQRT=math.sqrt(1.0 - beta2**step),
            OPT_LERP_WEIGHT=1.0 - beta1,
            OPT_ONE_MINUS_BETA2=1.0 - beta2,
            OPT_DECOUPLED_FACTOR=1.0 - lr * wd,
        )
        constexprs = dict(IS_ADAM=True, HAS_WD=wd != 0.0, DECOUPLED=decoupled != 0.0,
                          HAS_BUF=False, NESTEROV=False, FIRST_STEP=False)
    else:
        _, momentum, dampening, wd, nesterov, first_step = h
        scalars.update(OPT_WEIGHT_DECAY=wd, OPT_MOMENTUM=momentum, OPT_ONE_MINUS_DAMPENING=1.0 - dampening)
        has_buf = momentum != 0.0
        constexprs = dict(IS_ADAM=False, HAS_WD=wd != 0.0, DECOUPLED=False, HAS_BUF=has_buf,
                          NESTEROV=has_buf and nesterov != 0.0, FIRST_STEP=has_buf and first_step != 0.0)
    return scalars, constexprs


@triton.jit
def adam_update(p, m, v, g, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr):
    """Adam/AdamW on fp32 blocks: returns ``(param, exp_avg, exp_avg_sq)`` (dni_math.h ``adam_update``)."""
    if HAS_WD:
        if DECOUPLED:
            p = p * OPT_DECOUPLED_FACTOR
        else:
            g = g + OPT_WEIGHT_DECAY * p
    # torch's lerp(m, g, w): two formulae depending on w, for accuracy near both ends.
    w = OPT_LERP_WEIGHT
    if w < 0.5:
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (1.0 - w)
    v = v * OPT_BETA2 + OPT_ONE_MINUS_BETA2 * g * g
    denom = tl.sqrt_rn(v) / OPT_BC2_SQRT + OPT_EPS
    p = p - OPT_STEP_SIZE * (m / denom)
    return p, m, v


@triton.jit
def sgd_update(p, buf, g, OPT_LR, OPT_WEIGHT_DECAY, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
               HAS_WD: tl.constexpr, HAS_BUF: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr):
    """SGD (momentum, dampening, nesterov) on fp32 blocks: returns ``(param, buffer)`` (dni_math.h ``sgd_update``).

    Without a buffer (``HAS_BUF`` false, momentum 0) ``buf`` is returned unchanged and must not be stored.
    ``FIRST_STEP``: the buffer starts at the gradient (torch's first step); the old buffer is not read.
    """
    if HAS_WD:
        g = g + OPT_WEIGHT_DECAY * p
    if HAS_BUF:
        if FIRST_STEP:
            buf = g
        else:
            buf = buf * OPT_MOMENTUM + OPT_ONE_MINUS_DAMPENING * g
        if NESTEROV:
            g = g + OPT_MOMENTUM * buf
        else:
            g = buf
    p = p - OPT_LR * g
    return p, buf


@triton.jit
def optimizer_epilogue(g, p_ptrs, s0_ptrs, s1_ptrs, mask,
                       OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                       OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                       IS_ADAM: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_BUF: tl.constexpr,
                       NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr):
    """Load the param/state block at ``p_ptrs``/``s*_ptrs`` (same offsets), step it in fp32 with gradient ``g``
    (fp32, same shape) and store it back in its own dtype (fp32 master math for bf16/fp16 params), under
    ``mask``. ``s0``: exp_avg or momentum buffer; ``s1``:
    exp_avg_sq. Pointers of state the optimizer does not have are never dereferenced (any pointer will do).

    The caller must own these elements exclusively (no other program of the launch touches them): the
    read-modify-write is not atomic.
    """
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    if IS_ADAM:
        m = tl.load(s0_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(s1_ptrs, mask=mask, other=0.0).to(tl.float32)
        p, m, v = adam_update(p, m, v, g, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT,
                              OPT_LERP_WEIGHT, OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, HAS_WD, DECOUPLED)
        tl.store(s0_ptrs, m.to(s0_ptrs.dtype.element_ty), mask=mask)
        tl.store(s1_ptrs, v.to(s1_ptrs.dtype.element_ty), mask=mask)
    else:
        if HAS_BUF:
            if FIRST_STEP:
                buf = g  # not read: torch's first step starts the buffer at the gradient
            else:
                buf = tl.load(s0_ptrs, mask=mask, other=0.0).to(tl.float32)
            p, buf = sgd_update(p, buf, g, OPT_LR, OPT_WEIGHT_DECAY, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                                HAS_WD, HAS_BUF, NESTEROV, FIRST_STEP)
            tl.store(s0_ptrs, buf.to(s0_ptrs.dtype.element_ty), mask=mask)
        else:
            p, _ = sgd_update(p, g, g, OPT_LR, OPT_WEIGHT_DECAY, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                              HAS_WD, HAS_BUF, NESTEROV, FIRST_STEP)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)
