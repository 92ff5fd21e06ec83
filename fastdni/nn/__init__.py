"""What a PyTorch user drops in: SG models, the DNI interface, and a decoupled container."""
from .decoupled import DecoupledSequential, StepResult
from .interface import DNI
from .synthetic_gradient import ConvSyntheticGradient, SyntheticGradient

__all__ = ["SyntheticGradient", "ConvSyntheticGradient", "DNI", "DecoupledSequential", "StepResult"]
