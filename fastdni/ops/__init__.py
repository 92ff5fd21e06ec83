"""The fused DNI ops: one layer step as three ops (forward, update, SG regression), and the SG prediction alone
(``sg_predict``, for an SG on any activation), a BatchNorm layer's normalisation step (``batch_norm_act``,
``batch_norm_act_update_``), registered as
``torch.ops.fastdni.*`` with fake kernels and autograd, and callable here with checked arguments and
a backend switch. Schemas: :mod:`.schema`; optimizer arguments: :mod:`.optim`."""
from ._extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS
from .api import (
    BACKENDS, BatchNormResult, ForwardResult, Prediction, batch_norm_act, batch_norm_act_update_, check_backend, dni_forward,
    dni_update_, fused_backend_blocker, runs_cpp_kernels, sg_predict, sg_regression_,
)
from .optim import (HYPER_FIELDS, advance, check_fusable_optimizer, fusable_optimizer_key, fused_optimizer_args, fused_step,
                    optimizer_step_)
from .reference_backend import ordered_params

__all__ = [
    "BACKENDS", "HAS_CPU_KERNELS", "HAS_CUDA_KERNELS", "ForwardResult", "Prediction", "check_backend", "dni_forward", "sg_predict",
    "dni_update_", "sg_regression_", "BatchNormResult", "batch_norm_act", "batch_norm_act_update_",
    "HYPER_FIELDS", "fused_optimizer_args", "advance", "check_fusable_optimizer", "fusable_optimizer_key", "fused_step",
    "optimizer_step_", "ordered_params", "fused_backend_blocker", "runs_cpp_kernels",
]
