"""Pure-PyTorch reference of one DNI layer step: the oracle every fused backend is tested against.

Everything here is functional (no module state, no in-place updates), works in fp32 and
fp64, and states its formula in the docstring. Start with :func:`dni_layer_step`.
"""
from .activations import ACTIVATIONS, activate, activation_derivative
from .layer import LayerGrads, layer_backward, layer_forward
from .optim import AdamState, SGDState, adam_update, sgd_momentum_update
from .step import DNILayerStep, dni_layer_step
from .synthetic import SGParams, SGRegression, context_term, init_sg_params, sg_predict, sg_regression

__all__ = [
    "ACTIVATIONS", "activate", "activation_derivative",
    "LayerGrads", "layer_forward", "layer_backward",
    "SGParams", "SGRegression", "init_sg_params", "sg_predict", "sg_regression", "context_term",
    "SGDState", "AdamState", "sgd_momentum_update", "adam_update",
    "DNILayerStep", "dni_layer_step",
]
