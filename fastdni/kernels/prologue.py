"""Gradient operands formed on the fly, in the load of a GEMM operand, so they are never stored.

A DNI layer step needs two gradients that are cheap elementwise functions of tensors it already has:

* the layer's ``delta = prediction / grad_scale * act'(pre)``, where ``act'`` is formed from the output ``h``
  (identity, relu, tanh, leaky_relu) or the saved pre-activation (gelu), as
  :func:`fastdni.reference.activation_derivative_from_output`;
* the SG's output gradient ``2 loss_weight / B * (prediction - target_scale * target)``.

Each feeds several GEMMs (``dW``, ``db``, ``dx``; ``dA``, ``dc``, ``dU``, the gradient through the SG). Instead
of writing it to memory and reading it back, every GEMM that consumes it loads ``prediction`` and ``h``
(or ``target``) and forms the tile in registers: :func:`gradient_tile`. The host side describes the operand
with a :class:`GradSource`, which every kernel launcher accepts in place of a stored gradient tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from fastdni import contract
from fastdni.contract import ACTIVATION_CODES

LEAKY_RELU_SLOPE = tl.constexpr(contract.LEAKY_RELU_SLOPE)  #: a compile-time constant of the kernels


def activation_code(activation: str) -> int:
    """The kernels' constexpr code of ``activation`` (``fastdni.contract.ACTIVATION_CODES``); a ``ValueError``
    naming the argument for an unknown one."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    return ACTIVATION_CODES[activation]

__all__ = ["GradSource", "gradient_tile", "activation_derivative", "STORED", "DELTA", "ERROR"]

STORED, DELTA, ERROR = 0, 1, 2  # GradSource.mode, a tl.constexpr of the kernels


@dataclass(frozen=True)
class GradSource:
    """A ``[rows, cols]`` gradient operand: stored, or formed from two same-shaped tensors at load time.

    The value is ``scale * raw`` with ``raw`` one of ``primary`` (STORED), ``primary * act'(secondary)``
    (DELTA) or ``primary - target_scale * secondary`` (ERROR). Kernels apply ``scale`` after their
    reduction (one multiply per output element instead of one per input element) and reduce ``raw^2`` for
    the SG loss.
    """

    primary: Tensor
    secondary: Optional[Tensor] = None
    mode: int = STORED
    activation: str = "identity"
    scale: float = 1.0
    target_scale: float = 0.0

    @staticmethod
    def stored(grad: Tensor, scale: float = 1.0) -> "GradSource":
        return GradSource(grad, None, STORED, scale=scale)

    @staticmethod
    def delta(prediction: Tensor, derivative_input: Tensor, activation: str, scale: float) -> "GradSource":
        """``scale * prediction * act'(derivative_input)``; ``derivative_input`` is ``pre`` for gelu, else ``h``."""
        return GradSource(prediction, derivative_input, DELTA, activation, scale)

    @staticmethod
    def error(prediction: Tensor, target: Tensor, target_scale: float, scale: float) -> "GradSource":
        """``scale * (prediction - target_scale * target)``."""
        return GradSource(prediction, target, ERROR, scale=scale, target_scale=target_scale)

    @property
    def shape(self):
        return self.primary.shape

    @property
    def dtype(self):
        return self.primary.dtype

    @property
    def device(self):
        return self.primary.device

    def check(self) -> "GradSource":
        """Contiguous operands of one shape, dtype and device (``secondary`` is read at ``primary``'s offsets)."""
        if self.mode not in (STORED, DELTA, ERROR):
            raise ValueError(f"mode: expected STORED, DELTA or ERROR, got {self.mode!r}")
        activation_code(self.activation)
        if self.mode == STORED:
            return self
        s = self.secondary
        if s is None or s.shape != self.primary.shape or s.dtype != self.primary.dtype or s.device != self.primary.device:
            got = None if s is None else (tuple(s.shape), s.dtype, s.device)
            raise ValueError(f"secondary: expected a tensor like primary {tuple(self.primary.shape)} {self.primary.dtype} "
                             f"on {self.primary.device}, got {got}")
        if not (self.primary.is_contiguous() and s.is_contiguous()):
            return GradSource(self.primary.contiguous(), s.contiguous(), self.mode, self.activation, self.scale,
                              self.target_scale)
        return self

    def kernel_args(self) -> tuple[Tensor, Tensor, dict]:
        """``(primary, secondary, kwargs)`` for a kernel calling :func:`gradient_tile` (``secondary`` is
        ``primary`` when absent; the kernel never reads it then)."""
        second = self.secondary if self.secondary is not None else self.primary
        return self.primary, second, dict(GRAD_MODE=self.mode, GRAD_ACTIVATION=ACTIVATION_CODES[self.activation],
                                          GRAD_TARGET_SCALE=float(self.target_scale))


@triton.jit
def apply_activation(p, ACTIVATION: tl.constexpr):
    """``act(p)`` of an fp32 block (codes: ``fastdni.contract.ACTIVATION_CODES``), as ``fastdni.reference.activations``."""
    if ACTIVATION == 1:  # relu; NaN < 0 is false, so NaN passes through as torch.relu does
        p = tl.where(p < 0.0, 0.0, p)
    elif ACTIVATION == 2:  # tanh = sign(p) (1 - t) / (1 + t), t = exp(-2|p|) <= 1: no overflow for large |p|
        t = tl.exp(-2.0 * tl.abs(p))
        th = (1.0 - t) / (1.0 + t)
        p = tl.where(p < 0.0, -th, th)
    elif ACTIVATION == 3:  # exact gelu, p * Phi(p)
        p = p * 0.5 * (1.0 + tl.erf(p * 0.7071067811865476))
    elif ACTIVATION == 4:  # leaky_relu; NaN < 0 is false, so NaN passes through
        p = tl.where(p < 0.0, p * LEAKY_RELU_SLOPE, p)
    return p


@triton.jit
def activation_derivative(q, ACTIVATION: tl.constexpr):
    """``act'`` from the output (identity 0, relu 1, tanh 2, leaky_relu 4) or the pre-activation (gelu 3), fp32,
    as ``fastdni.reference.activation_derivative_from_output`` (relu: ``1[h > 0]``, tanh: ``1 - h^2``; codes:
    ``fastdni.contract.ACTIVATION_CODES``)."""
    if ACTIVATION == 1:
        d = tl.where(q > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        d = 1.0 - q * q
    elif ACTIVATION == 3:
        cdf = 0.5 * (1.0 + tl.erf(q * 0.7071067811865476))
        d = cdf + q * tl.exp(-0.5 * q * q) * 0.3989422804014327
    elif ACTIVATION == 4:
        d = tl.where(q > 0.0, 1.0, LEAKY_RELU_SLOPE)
    else:
        d = tl.full(q.shape, 1.0, tl.float32)
    return d


@triton.jit
def gradient_tile(p_ptrs, q_ptrs, mask, GRAD_TARGET_SCALE, GRAD_MODE: tl.constexpr, GRAD_ACTIVATION: tl.constexpr):
    """The fp32 ``raw`` tile of a :class:`GradSource` at ``p_ptrs`` (``primary``) / ``q_ptrs`` (``secondary``,
    same offsets), zero where ``mask`` is false. The caller multiplies by the source's ``scale``."""
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    if GRAD_MODE == 1:
        q = tl.load(q_ptrs, mask=mask, other=0.0).to(tl.float32)
        p = p * activation_derivative(q, GRAD_ACTIVATION)
    elif GRAD_MODE == 2:
        q = tl.load(q_ptrs, mask=mask, other=0.0).to(tl.float32)
        p = p - GRAD_TARGET_SCALE * q
    return p
