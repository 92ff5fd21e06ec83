"""Triton backend of the ``torch.ops.fastdni`` ops, installed as ``fastdni.kernels``.

Its kernels implement the contract of :mod:`fastdni.reference` for CUDA tensors; see the
Triton backend issue. Kernels so far (verified under TRITON_INTERPRET=1 only, no GPU run yet): linear_act,
gemm_grad_step_, bias_grad_step_. Importing this package registers no op yet.
"""

# --- linear_act: GEMM + bias [+ cDNI label gather] + activation (kernels/linear_act.py) ---
from .linear_act import linear_act  # noqa: E402,F401
# --- gemm_grad_step_ / bias_grad_step_: weight-gradient GEMM with the optimizer step as epilogue ---
from .grad_step import bias_grad_step_, gemm_grad_step_  # noqa: E402,F401
