"""Pure-PyTorch reference of one DNI layer step: the oracle every fused backend is tested against.

Everything here is functional (no module state, no in-place updates), works in fp32 and
fp64, and states its formula in the docstring. Start with :func:`dni_layer_step`.
"""
from .activations import ACTIVATIONS, NEEDS_PRE, activate, activation_derivative, activation_derivative_from_output
from .batch_norm import BatchNormForward, BatchNormGrads, batch_norm_act_backward, batch_norm_act_forward
from .layer import LayerGrads, layer_backward, layer_forward, layer_grads_from_delta
from .optim import AdamState, SGDState, adam_update, sgd_momentum_update
from .step import DNILayerStep, dni_layer_step
from .synthetic import SGParams, SGRegression, context_term, init_sg_params, sg_backward, sg_forward, sg_predict, sg_regression

__all__ = [
    "ACTIVATIONS", "NEEDS_PRE", "activate", "activation_derivative", "activation_derivative_from_output",
    "BatchNormForward", "BatchNormGrads", "batch_norm_act_forward", "batch_norm_act_backward",
    "LayerGrads", "layer_forward", "layer_backward", "layer_grads_from_delta",
    "SGParams", "SGRegression", "init_sg_params", "sg_forward", "sg_backward", "sg_predict", "sg_regression",
    "context_term",
    "SGDState", "AdamState", "sgd_momentum_update", "adam_update",
    "DNILayerStep", "dni_layer_step",
]
