"""The fused ops as Python functions: argument checks, then the chosen backend.

``backend``:

- ``"reference"``: :mod:`.reference_backend` (pure PyTorch, the oracle);
- ``"cpu"``: the C++ kernels of ``csrc/cpu`` (ATen GEMMs with fused epilogues);
- ``"cuda"``: the CUDA C++ kernels of ``csrc/cuda`` (cuBLASLt GEMMs and fused optimizer kernels; CUDA tensors
  of fp32, bf16 or fp16), where the extension was built with them;
- ``"triton"``: the Triton kernels of ``fastdni/kernels/`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
- ``"auto"``: ``torch.ops.fastdni``, i.e. the compiled kernel for the tensors' device where this
  install has one (CPU: the C++ kernels; CUDA: the CUDA C++ kernels if built, else Triton), else the reference. This is the path to use
  under ``torch.compile``: the ops are opaque nodes with fake implementations, so ``fullgraph=True`` holds.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._checks import check_context_presence, check_positive, check_tensor
from ..contract import NEEDS_PRE, check_activation
from ..reference import SGParams
from ..reference.batch_norm import check_batch_norm, check_momentum_eps
from ..reference.layer import check_layer
from ..reference.synthetic import check_sg
from . import _triton, reference_backend, registration  # noqa: F401  (registration: fake, fallback, autograd)
from ._extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS, LOAD_ERROR
from .optim import check_optimizer_args
from .reference_backend import ordered_params

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_OPS = torch.ops.fastdni


class ForwardResult(NamedTuple):
    h: Tensor  #: ``act(x W^T + b)``, ``[B, N]``
    pre: Tensor  #: the pre-activation where ``act'`` needs it (``fastdni.contract.NEEDS_PRE``: gelu), else empty
    prediction: Tensor  #: the synthetic gradient ``M(h, c)``, ``[B, N]`` (empty without an SG)
    sg_hidden: list[Tensor]  #: the SG's hidden activations, kept for the regression


class Prediction(NamedTuple):
    """What :func:`sg_predict` returns; :func:`sg_regression_` takes it as it takes a :class:`ForwardResult`."""

    h: Tensor  #: the SG's input, ``[B, N]`` (as given: the regression reads it again)
    prediction: Tensor  #: the synthetic gradient ``M(h, c)``, ``[B, N]``
    sg_hidden: list[Tensor]  #: the SG's hidden activations, kept for the regression


class BatchNormResult(NamedTuple):
    """What :func:`batch_norm_act` returns; :func:`batch_norm_act_update_` takes it whole."""

    h: Tensor  #: ``act(gamma * xhat + beta)``, ``[B, N]``
    xhat: Tensor  #: the normalised pre-activation, ``[B, N]``
    invstd: Tensor  #: ``1 / sqrt(var + eps)`` of the batch, ``[N]``
    running_mean: Tensor  #: the updated running mean (new tensor: copy it into the module's buffer)
    running_var: Tensor  #: the updated running variance (unbiased batch variance)


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  #: also the CUDA C++ backend's


def check_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None, name: str = "x") -> str:
    """The backend that will run: ``"reference"``, ``"triton"`` or ``"compiled"`` (``torch.ops.fastdni``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not _triton.HAS_TRITON:
            raise RuntimeError("backend: 'triton' needs the triton package and fastdni.kernels, which are not installed")
        if device.type != "cuda" and not _triton.INTERPRETED:
            raise ValueError(f"backend: 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before "
                             f"importing torch), got tensors on {device}")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise TypeError(f"{name}: backend 'triton' takes float32, bfloat16 or float16 tensors, got {dtype}")
        return "triton"
    if backend == "cuda":
        if not HAS_CUDA_KERNELS:
            raise RuntimeError("backend: 'cuda' needs fastdni._C built with its CUDA kernels (csrc/cuda; nvcc at build time), "
                               f"which this install lacks ({LOAD_ERROR or 'built without CUDA'})")
        if device.type != "cuda":
            raise ValueError(f"backend: 'cuda' runs on CUDA tensors, got tensors on {device}")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise TypeError(f"{name}: backend 'cuda' takes float32, bfloat16 or float16 tensors, got {dtype}")
    if backend == "cpu":
        if not HAS_CPU_KERNELS:
            raise RuntimeError(f"backend: 'cpu' needs the compiled extension fastdni._C, which did not load ({LOAD_ERROR})")
        if device.type != "cpu":
            raise ValueError(f"backend: 'cpu' runs on CPU tensors, got tensors on {device}")
    return "compiled"


CPU_DTYPES = (torch.float32, torch.float64)  #: the C++ CPU backend's


def fused_backend_blocker(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` would not run the ops on ``device``/``dtype`` with a fused kernel, or None where it would.

    ``"auto"`` counts only the compiled kernels (the C++ CPU ones; on CUDA the C++ or the Triton ones): where it would
    fall back to the reference, a module using the ops falls back to autograd instead. A backend named explicitly
    (``"reference"`` included) counts where :func:`check_backend` accepts it."""
    if backend == "auto":
        if device.type == "cpu":
            if not HAS_CPU_KERNELS:
                return f"no compiled CPU kernels (fastdni._C did not load: {LOAD_ERROR})"
            return None if dtype in CPU_DTYPES else f"the CPU kernels take float32 or float64, got {dtype}"
        if device.type == "cuda":
            if not (HAS_CUDA_KERNELS or _triton.HAS_TRITON):
                return "no CUDA kernels (fastdni._C built without csrc/cuda, and no triton)"
            return None if dtype in TRITON_DTYPES else f"the CUDA kernels take float32, bfloat16 or float16, got {dtype}"
        return f"no fused kernels for {device.type} tensors"
    try:
        check_backend(backend, device, dtype, "h")
    except (ValueError, TypeError, RuntimeError) as error:
        return str(error)
    if backend == "cpu" and dtype not in CPU_DTYPES:
        return f"the CPU kernels take float32 or float64, got {dtype}"
    return None


def runs_cpp_kernels(backend: str, device: torch.device) -> bool:
    """Whether the ops with ``backend`` on ``device`` run the C++ kernels of ``fastdni._C`` (``torch.ops.fastdni``
    without a Triton or reference fallback). Those check every argument themselves (``csrc/common/op_args.h``), so
    a caller that has checked what the Python wrappers add may call ``torch.ops.fastdni`` directly."""
    if backend not in ("auto", "cpu", "cuda"):
        return False
    if device.type == "cpu":
        return backend != "cuda" and HAS_CPU_KERNELS
    return device.type == "cuda" and backend != "cpu" and HAS_CUDA_KERNELS


def _implementation(run: str, op: str):
    if run == "reference":
        return getattr(reference_backend, op)
    if run == "triton":
        return _triton.DIFFERENTIABLE.get(op) or getattr(_triton.kernel_ops(), op)
    return getattr(_OPS, op)


def _check_contiguous(name: str, tensors: Sequence[Optional[Tensor]]) -> None:
    # Updated in place by the ops: a non-contiguous view would need a copy that is then written back.
    for i, t in enumerate(tensors):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}[{i}]: expected a contiguous tensor (it is updated in place), got strides {t.stride()}")


def _check_step_args(optimizer: str, hyper: Sequence[float], state: Sequence[Tensor], params: Sequence[Tensor],
                     params_name: str = "params") -> None:
    """What every op that steps parameters in place needs of them and of the optimizer's state."""
    check_optimizer_args(optimizer, hyper, state, params)
    _check_contiguous(params_name, params)
    _check_contiguous("state", state)


def dni_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    sg: Optional[SGParams] = None,
    context: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    backend: str = "auto",
) -> ForwardResult:
    """``h = act(x W^T + b)`` and, with an SG model ``sg``, its prediction ``M(h, context)``.

    Differentiable w.r.t. ``x``, the layer's and the SG's parameters (backprop mode)."""
    check_layer(x, weight, bias)
    check_activation(activation)
    sg = sg or SGParams((), (), None)
    if sg.weights:
        # The labels' range (a device sync) is checked once, by the backend that runs (the same ValueError on each).
        check_sg(x.new_empty(x.shape[0], weight.shape[0]), sg, context, label_range=False)
    else:
        check_context_presence(context, False)
    run = check_backend(backend, x.device, x.dtype)
    args = (x, weight, bias, list(sg.weights), list(sg.biases), sg.context_weight, context, activation)
    out = _implementation(run, "dni_forward")(*args)
    return ForwardResult(out[0], out[1], out[2], list(out[3]))


def sg_predict(
    h: Tensor,
    sg: SGParams,
    context: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Prediction:
    """The SG prediction ``M(h, context)`` of an activation ``h [B, N]`` (any strides), with the hidden
    activations :func:`sg_regression_` needs: ``dni_forward``'s SG part, for an ``h`` the ops did not compute.

    Differentiable w.r.t. ``h`` and the SG's parameters. A batch of no rows is an error, as for every op."""
    check_sg(h, sg, context, label_range=False)  # the labels' range: the backend that runs checks it, once
    run = check_backend(backend, h.device, h.dtype, "h")
    prediction, hidden = _implementation(run, "sg_predict")(h, list(sg.weights), list(sg.biases), sg.context_weight, context)
    return Prediction(h, prediction, list(hidden))


def dni_update_(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    forward: ForwardResult,
    optimizer: str,
    hyper: Sequence[float],
    state: Sequence[Tensor],
    *,
    grad_scale: float = 1.0,
    activation: str = "relu",
    need_input_grad: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Step ``weight`` and ``bias`` in place on the synthetic gradient ``forward.prediction / grad_scale``.

    Returns what the op returns on every backend: ``dx`` (computed with the pre-update weight, ``[B, K]``) when
    ``need_input_grad``, else an empty tensor (shape ``(0,)``, ``x``'s dtype and device; an op's schema cannot
    return None)."""
    check_layer(x, weight, bias)
    check_activation(activation)
    check_tensor("forward.h", forward.h, shape=(x.shape[0], weight.shape[0]), like=x)
    check_tensor("forward.prediction", forward.prediction, shape=tuple(forward.h.shape), like=x)
    if activation in NEEDS_PRE:
        check_tensor("forward.pre", forward.pre, shape=tuple(forward.h.shape), like=x)
    check_positive("grad_scale", grad_scale)
    _check_step_args(optimizer, hyper, state, [weight, bias])
    run = check_backend(backend, x.device, x.dtype)
    args = (x, weight, bias, forward.h, forward.pre, forward.prediction, list(state), optimizer, [float(v) for v in hyper],
            float(grad_scale), activation, bool(need_input_grad))
    with torch.no_grad():
        return _implementation(run, "dni_update_")(*args)


def sg_regression_(
    forward: Union[ForwardResult, Prediction],
    target: Tensor,
    sg: SGParams,
    optimizer: str,
    hyper: Sequence[float],
    state: Sequence[Tensor],
    context: Optional[Tensor] = None,
    *,
    target_scale: float = 1.0,
    loss_weight: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Regress the SG model onto ``target_scale * target`` and step its parameters in place.

    ``forward`` is the :func:`dni_forward` (or :func:`sg_predict`) result whose prediction is regressed: its ``h`` is the SG's input
    (named ``h`` in error messages, as in the op's schema), its ``sg_hidden`` the SG's hidden activations.
    Returns ``loss_weight * mean_b ||M(h_b) - target_scale * target_b||^2``."""
    h = forward.h
    check_sg(h, sg, context, label_range=False)  # the labels' range: the backend that runs checks it, once
    check_tensor("forward.prediction", forward.prediction, shape=tuple(h.shape), like=h)
    check_tensor("target", target, shape=tuple(h.shape), like=h)
    if len(forward.sg_hidden) != len(sg.weights) - 1:
        raise ValueError(f"forward.sg_hidden: expected {len(sg.weights) - 1} tensors for this SG, got {len(forward.sg_hidden)}")
    for i, (z, w) in enumerate(zip(forward.sg_hidden, sg.weights)):
        check_tensor(f"forward.sg_hidden[{i}]", z, shape=(h.shape[0], w.shape[0]), like=h)
    check_positive("target_scale", target_scale, allow_zero=True)
    check_positive("loss_weight", loss_weight)
    params = ordered_params(sg)
    _check_step_args(optimizer, hyper, state, params, "sg params")
    run = check_backend(backend, h.device, h.dtype, "h")
    args = (h, list(forward.sg_hidden), forward.prediction, target, list(sg.weights), list(sg.biases), sg.context_weight,
            context, list(state), optimizer, [float(v) for v in hyper], float(target_scale), float(loss_weight))
    with torch.no_grad():
        return _implementation(run, "sg_regression_")(*args)


def batch_norm_act(
    pre: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    backend: str = "auto",
) -> BatchNormResult:
    """``h = act(BatchNorm(pre))`` with the batch's statistics (``nn.BatchNorm1d`` in training mode, ``weight`` and
    ``bias`` its gamma and beta), and the running statistics moved by ``momentum`` (returned as new tensors; the
    inputs are not written). A batch needs 2 rows at least (the unbiased variance).

    Differentiable w.r.t. ``pre``, ``weight``, ``bias`` (backprop mode). Eval mode is no op of its own:
    ``torch.nn.functional.batch_norm`` with the running statistics, then the activation."""
    check_batch_norm(pre, weight, bias, running_mean, running_var)
    check_momentum_eps(float(momentum), float(eps))
    check_activation(activation)
    run = check_backend(backend, pre.device, pre.dtype, "pre")
    out = _implementation(run, "batch_norm_act")(pre, weight, bias, running_mean, running_var, float(momentum), float(eps),
                                                 activation)
    return BatchNormResult(*out)


def batch_norm_act_update_(
    weight: Tensor,
    bias: Tensor,
    forward: BatchNormResult,
    prediction: Tensor,
    optimizer: str,
    hyper: Sequence[float],
    state: Sequence[Tensor],
    *,
    grad_scale: float = 1.0,
    activation: str = "relu",
    backend: str = "auto",
) -> Tensor:
    """Step gamma (``weight``) and beta (``bias``) in place on the synthetic gradient ``prediction / grad_scale``
    of ``forward.h``, and return ``dL/dpre`` (from their pre-update values): the delta of the layer's GEMM, which
    :func:`dni_update_` takes as its prediction (``activation="identity"``, ``grad_scale=1``)."""
    h = forward.h
    check_tensor("forward.h", h, ndim=2)
    rows, features = h.shape
    check_batch_norm(h, weight, bias, name="forward.h")
    check_tensor("forward.xhat", forward.xhat, shape=(rows, features), like=h)
    check_tensor("forward.invstd", forward.invstd, shape=(features,), like=h)
    check_tensor("prediction", prediction, shape=(rows, features), like=h)
    check_activation(activation)
    check_positive("grad_scale", grad_scale)
    _check_step_args(optimizer, hyper, state, [weight, bias])
    run = check_backend(backend, h.device, h.dtype, "h")
    args = (h, forward.xhat, forward.invstd, prediction, weight, bias, list(state), optimizer, [float(v) for v in hyper],
            float(grad_scale), activation)
    with torch.no_grad():
        return _implementation(run, "batch_norm_act_update_")(*args)
