"""fastdni: Decoupled Neural Interfaces using Synthetic Gradients (Jaderberg et al., 2016) for PyTorch."""
from . import nn, reference

__version__ = "0.1.0"
__all__ = ["nn", "reference", "__version__"]
