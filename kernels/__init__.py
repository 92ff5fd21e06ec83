"""Triton backend of the ``torch.ops.fastdni`` ops, installed as ``fastdni.kernels``.

Its kernels implement the contract of :mod:`fastdni.reference` for CUDA tensors; see the
Triton backend issue. Importing this package registers nothing yet.
"""
