"""Loads the compiled backends, if this install has them (``FASTDNI_BUILD_EXT=0`` builds none).

``HAS_CUDA_KERNELS``: the extension was built with ``csrc/cuda`` (nvcc found at build time; no GPU needed) and
registered its kernels for the CUDA dispatch key. Then they own ``torch.ops.fastdni.*`` on CUDA tensors (and
``backend="auto"``/``"cuda"``), but for the ops they lack (``schema.TRITON_ONLY_OPS``), and the Triton kernels of
the others run only when asked for (``backend="triton"``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import schema  # the ops must be defined before asking which kernels they have

try:
    from .. import _C  # noqa: F401  registers the C++ CPU (and CUDA) kernels of torch.ops.fastdni
except ImportError as error:  # a pure-Python install: the reference backend serves every device
    _C = None
    LOAD_ERROR: Optional[ImportError] = error
else:
    LOAD_ERROR = None

HAS_CPU_KERNELS = _C is not None
HAS_CUDA_KERNELS = HAS_CPU_KERNELS and all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdni::{name}", "CUDA")
    for name in schema.CUDA_CPP_OPS
)
