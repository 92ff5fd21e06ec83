"""What a PyTorch user drops in: SG models, the DNI interface, a decoupled container, recurrent boundaries."""
from .decouple import Decoupled, decouple, synthetic_gradient_for
from .decoupled import DecoupledSequential, StepResult
from .fused import DecoupledMLP
from .fused_cnn import DecoupledCNN
from .interface import DNI
from .recurrent import Alignment, TruncationDNI, flatten_state, sg_alignment, truncation_windows, unflatten_state
from .synthetic_gradient import ConvSyntheticGradient, SyntheticGradient
from .unlocked import ForwardUnlockedSequential, RandomRateSequential

__all__ = [
    "SyntheticGradient", "ConvSyntheticGradient", "DNI", "decouple", "Decoupled", "synthetic_gradient_for", "DecoupledSequential", "DecoupledMLP", "DecoupledCNN", "StepResult",
    "TruncationDNI", "sg_alignment", "Alignment", "flatten_state", "unflatten_state", "truncation_windows",
    "RandomRateSequential", "ForwardUnlockedSequential",
]
