"""The fused DNI ops: one layer step as three ops (forward, update, SG regression), registered as
``torch.ops.fastdni.*`` with fake kernels and autograd, and callable here with checked arguments and
a backend switch. Schemas: :mod:`.schema`; optimizer arguments: :mod:`.optim`."""
from ._extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS
from .api import BACKENDS, ForwardResult, check_backend, dni_forward, dni_update_, sg_regression_
from .optim import HYPER_FIELDS, advance, fused_optimizer_args, optimizer_step_
from .reference_backend import ordered_params

__all__ = [
    "BACKENDS", "HAS_CPU_KERNELS", "HAS_CUDA_KERNELS", "ForwardResult", "check_backend", "dni_forward", "dni_update_", "sg_regression_",
    "HYPER_FIELDS", "fused_optimizer_args", "advance", "optimizer_step_", "ordered_params",
]
