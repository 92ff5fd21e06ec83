"""Loads the compiled backends, if this install has them (``FASTDNI_BUILD_EXT=0`` builds none)."""
from __future__ import annotations

from typing import Optional

try:
    from .. import _C  # noqa: F401  registers the C++ CPU (and CUDA) kernels of torch.ops.fastdni
except ImportError as error:  # a pure-Python install: the reference backend serves every device
    _C = None
    LOAD_ERROR: Optional[ImportError] = error
else:
    LOAD_ERROR = None

HAS_CPU_KERNELS = _C is not None
