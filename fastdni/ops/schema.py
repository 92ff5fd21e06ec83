"""The ``torch.ops.fastdni`` schemas, each declared once, here.

One DNI layer step ``x [B, K] -> h [B, N]`` with an SG model of ``L`` layers is three ops, in the
order a layer needs them (why this split is minimal: ``docs/ops.md``); a fourth, ``sg_predict``, is the SG
side alone, for an SG on an activation the ops did not compute (``fastdni.nn.DNI`` on any model):

``dni_forward``
    ``h = act(x W^T + b)`` and the SG prediction ``M(h, c)``. Returns ``pre`` only for activations
    whose derivative needs it (gelu; an empty tensor otherwise: ``act'`` follows from ``h``) and the
    SG's hidden activations ``z_1 .. z_{L-1}`` (empty for a linear SG), which the regression needs.
    With no SG layers it is the plain layer and ``prediction`` is empty. Differentiable.
``sg_predict``
    The SG prediction ``M(h, c)`` of ``h [B, N]`` (``dni_forward``'s SG part), and the hidden activations
    ``z_1 .. z_{L-1}`` that ``sg_regression_`` then takes. Differentiable.
``dni_update_``
    ``delta = prediction / grad_scale * act'(pre)``; ``dW = delta^T x`` and ``db`` go straight into
    the optimizer step on ``weight``, ``bias`` and their ``state`` (in place). Returns
    ``dx = delta W`` with the pre-update ``W`` when ``need_input_grad`` (the bootstrapped target of the
    SG below), else an empty tensor.
``sg_regression_``
    ``e = prediction - target_scale * target``, returns ``loss = loss_weight * mean_b ||e_b||^2`` and
    steps every SG parameter on its gradient, in place.

``batch_norm_act``
    A BatchNorm layer's step between the GEMM (``dni_forward`` with identity and no SG) and the SG
    (``sg_predict``): ``h = act(gamma * xhat + beta)`` with batch statistics; returns ``xhat`` and ``invstd``
    (what the backward needs) and the *new* running statistics (functional, as ATen's
    ``_native_batch_norm_legit_functional``: an op that mutates cannot have an autograd formula, and backprop
    mode differentiates it). Differentiable w.r.t. ``pre``, ``weight``, ``bias``.
``batch_norm_act_update_``
    ``dy = prediction / grad_scale * act'(y)``, the batch-statistics BatchNorm backward to ``dpre`` (returned:
    ``dni_update_`` then takes it as its prediction, with identity and ``grad_scale`` 1), and the optimizer
    step on ``weight`` (gamma) and ``bias`` (beta), in place, from the gradients of their pre-update values.

Optimizer arguments (``optimizer``, ``hyper``, ``state``): see :mod:`fastdni.ops.optim`.
"""
import torch

NAMESPACE = "fastdni"

SCHEMAS = {
    "dni_forward": (
        "dni_forward(Tensor x, Tensor weight, Tensor bias, Tensor[] sg_weights, Tensor[] sg_biases, "
        "Tensor? context_weight, Tensor? context, str activation) "
        "-> (Tensor h, Tensor pre, Tensor prediction, Tensor[] sg_hidden)"
    ),
    "sg_predict": (
        "sg_predict(Tensor h, Tensor[] sg_weights, Tensor[] sg_biases, Tensor? context_weight, Tensor? context) "
        "-> (Tensor prediction, Tensor[] sg_hidden)"
    ),
    "dni_update_": (
        "dni_update_(Tensor x, Tensor(a!) weight, Tensor(b!) bias, Tensor h, Tensor pre, Tensor prediction, "
        "Tensor(c!)[] state, str optimizer, float[] hyper, float grad_scale, str activation, "
        "bool need_input_grad) -> Tensor"
    ),
    "sg_regression_": (
        "sg_regression_(Tensor h, Tensor[] sg_hidden, Tensor prediction, Tensor target, "
        "Tensor(a!)[] sg_weights, Tensor(b!)[] sg_biases, Tensor(c!)? context_weight, Tensor? context, "
        "Tensor(d!)[] state, str optimizer, float[] hyper, float target_scale, float loss_weight) -> Tensor"
    ),
    "batch_norm_act": (
        "batch_norm_act(Tensor pre, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
        "float momentum, float eps, str activation) "
        "-> (Tensor h, Tensor xhat, Tensor invstd, Tensor running_mean_out, Tensor running_var_out)"
    ),
    "batch_norm_act_update_": (
        "batch_norm_act_update_(Tensor h, Tensor xhat, Tensor invstd, Tensor prediction, Tensor(a!) weight, "
        "Tensor(b!) bias, Tensor(c!)[] state, str optimizer, float[] hyper, float grad_scale, str activation) -> Tensor"
    ),
}

#: Every op has a Triton kernel (``fastdni/kernels``).
GPU_OPS = tuple(SCHEMAS)
#: The ops of the CUDA C++ backend (``csrc/cuda``). The BatchNorm ops have none there: per-feature column reductions
#: and elementwise passes, no GEMM for cuBLASLt to carry, which Triton's kernels already do in one launch each
#: (``fastdni/kernels/batch_norm.py``); on CUDA they run Triton's even where ``csrc/cuda`` owns the other ops.
CUDA_CPP_OPS = ("dni_forward", "sg_predict", "dni_update_", "sg_regression_")
TRITON_ONLY_OPS = tuple(name for name in GPU_OPS if name not in CUDA_CPP_OPS)

# Kept alive for the life of the process: dropping the Library object would deregister the schemas.
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _LIBRARY.define(_schema)
