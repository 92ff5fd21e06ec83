"""Triton backend of the ``torch.ops.fastdni`` ops.

Its kernels implement the ``torch.ops.fastdni`` op contract (``fastdni/ops/schema.py``) for CUDA tensors:
:mod:`.ops` composes them into the three ops, which ``fastdni.ops`` registers for the CUDA dispatch key and
runs for ``backend="triton"``. Under ``TRITON_INTERPRET=1`` (set before torch/triton are imported) they run
on CPU tensors, which is how CI checks them against :mod:`fastdni.reference`.
"""

# --- linear_act: GEMM + bias [+ cDNI label gather] + activation (fastdni/kernels/linear_act.py) ---
from .linear_act import linear_act  # noqa: E402,F401
# --- gemm_grad_step_ / bias_grad_step_: weight-gradient GEMM with the optimizer step as epilogue ---
from .grad_step import bias_grad_step_, gemm_grad_step_  # noqa: E402,F401
# --- gradient operands formed in a GEMM's operand load (delta, SG error), and launch counting ---
from .prologue import GradSource  # noqa: E402,F401
from ._launch import LaunchCount, launch_counter  # noqa: E402,F401
