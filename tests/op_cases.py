"""Shared cases of the fused-op tests (test_dni_forward, test_sg_predict, test_dni_update, test_sg_regression,
test_ops_registration): the per-dtype tolerance table, seeded input builders, optimizer configurations
(and the fused-vs-torch.optim pairs), the argument lists of the raw ``torch.ops.fastdni`` calls, and
the pieces of the bad-argument tests (mutations, the raw op's skip).

Importable because pytest puts ``tests/`` on ``sys.path``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
from torch import Tensor

import fastdni.ops as ops
from fastdni.ops import ForwardResult
from fastdni.contract import ACTIVATIONS, STATE_FIELDS, state_per_param  # noqa: F401  (ACTIVATIONS: the suites' parameter)
from fastdni.reference import SGParams, init_sg_params

# CPU backend vs reference (and vs torch.optim), per dtype. Both compute the same formulae; they differ in
# the order of floating-point operations (tiled/blocked GEMMs, double-accumulated loss, fused epilogues).
# Inputs are scaled so that every result is O(1) (weights ~ 1/sqrt(fan_in)), so atol and rtol mean the
# same thing. Measured on these cases, the worst error is ~2e-15 (fp64) and ~4e-7 (fp32) relative to a
# result's largest entry, i.e. at most ~0.6% (fp64) and ~5% (fp32) of the tolerances below: room for
# other BLAS builds and thread counts, while any wrong term (an O(1) relative error) still fails by far.
OP_TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
OP_DTYPES = tuple(OP_TOLERANCES)
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64"}

# The fused GPU kernels (Triton, and CUDA C++ with its CPU twin) against the reference in fp32 on the same, already
# rounded, inputs. Results are O(1) (inputs scaled by 1/sqrt(fan_in)); fp32 sees only summation order (worst seen
# ~4e-6 on the Triton suite's shapes); bf16 (8 mantissa bits, eps 7.8e-3) and fp16 (11 bits, eps 9.8e-4) add the
# rounding of each stored result and of the operands formed on the fly (delta, error) before a low-precision dot.
STEP_TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
STEP_DTYPES = tuple(STEP_TOLERANCES)
STEP_DTYPE_IDS = [str(d).replace("torch.", "") for d in STEP_DTYPES]

requires_cpu = pytest.mark.skipif(
    not ops.HAS_CPU_KERNELS, reason="the C++ extension fastdni._C is not built (pure-Python install)"
)
# Parametrising over the backends: the "cpu" one only where the extension is built.
BACKEND_PARAMS = [pytest.param("reference"), pytest.param("cpu", marks=requires_cpu)]

#: Each activation as torch computes it, the oracle of the reference's (fastdni.contract.ACTIVATIONS, all of them).
TORCH_ACTIVATIONS = {
    "identity": lambda p: p * 1,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": lambda p: torch.nn.functional.gelu(p, approximate="none"),
    "leaky_relu": lambda p: torch.nn.functional.leaky_relu(p, 0.01),
}
SG_SHAPES = {"linear": (), "mlp1": (7,), "mlp2": (7, 9)}  #: SG hidden widths by name
CONTEXTS = ("none", "labels64", "labels32", "float")

# Small non-square defaults: B != K != N != C.
BATCH, IN_FEATURES, FEATURES, CLASSES = 6, 5, 4, 3


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration; :func:`make_inputs` builds its tensors from ``seed``."""

    dtype: torch.dtype = torch.float64
    activation: str = "relu"
    sg: Optional[str] = "mlp1"  #: a key of SG_SHAPES, or None: no SG model
    context: str = "none"  #: one of CONTEXTS
    batch: int = BATCH
    in_features: int = IN_FEATURES
    features: int = FEATURES
    classes: int = CLASSES
    sg_hidden: Optional[tuple[int, ...]] = None  #: overrides SG_SHAPES[sg] (large cases)
    seed: int = 0

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.sg_hidden if self.sg_hidden is not None else SG_SHAPES[self.sg]


@dataclasses.dataclass
class Inputs:
    x: Tensor
    weight: Tensor
    bias: Tensor
    sg: Optional[SGParams]
    context: Optional[Tensor]
    target: Tensor  #: a regression target, ``[B, N]``
    activation: str


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


def make_inputs(case: Case) -> Inputs:
    """Seeded inputs for ``case``; every SG parameter random (a fresh SG predicts 0, hiding mistakes)."""
    if case.context != "none" and case.sg is None:
        raise ValueError("a context needs an SG model")
    gen = torch.Generator().manual_seed(case.seed)
    B, K, N, C, dt = case.batch, case.in_features, case.features, case.classes, case.dtype
    x = _randn(gen, B, K, dtype=dt)
    weight = _randn(gen, N, K, dtype=dt, scale=K ** -0.5)
    bias = _randn(gen, N, dtype=dt, scale=0.1)
    sg = context = None
    if case.sg is not None:
        use_context = case.context != "none"
        shapes = init_sg_params(N, case.hidden, C if use_context else 0, dtype=dt, generator=torch.Generator())
        sg = SGParams(
            tuple(_randn(gen, *w.shape, dtype=dt, scale=w.shape[1] ** -0.5) for w in shapes.weights),
            tuple(_randn(gen, *b.shape, dtype=dt, scale=0.1) for b in shapes.biases),
            None if shapes.context_weight is None else _randn(gen, *shapes.context_weight.shape, dtype=dt, scale=0.5),
        )
        if case.context == "float":
            context = _randn(gen, B, C, dtype=dt)
        elif case.context.startswith("labels"):
            labels = torch.randint(0, C, (B,), generator=gen)
            k = min(B, C)
            labels[:k] = torch.arange(k)  # every class present (where the batch allows)
            context = labels.to(torch.int64 if case.context == "labels64" else torch.int32)
    target = _randn(gen, B, N, dtype=dt)
    return Inputs(x, weight, bias, sg, context, target, case.activation)



def step_inputs(dtype: torch.dtype, device, *, sg_hidden: Optional[tuple[int, ...]], activation: str = "relu",
                context: str = "none", seed: int = 0, **shape: int) -> Inputs:
    """The GPU-kernel suites' inputs: :func:`make_inputs` in fp32 from seeded CPU generators (the same values on every
    device), then every float tensor cast to ``dtype`` and all moved to ``device``. ``sg_hidden``: None for no SG
    model, else its hidden widths; ``shape``: ``batch``, ``in_features``, ``features``."""
    case = Case(dtype=torch.float32, activation=activation, sg=None if sg_hidden is None else "linear",
                sg_hidden=sg_hidden, context=context, seed=seed, **shape)
    inp = make_inputs(case)
    cast = lambda t: t if t is None else (t.to(device, dtype) if t.is_floating_point() else t.to(device))  # noqa: E731
    sg_params = None if inp.sg is None else SGParams(tuple(map(cast, inp.sg.weights)), tuple(map(cast, inp.sg.biases)),
                                                     cast(inp.sg.context_weight))
    return dataclasses.replace(inp, x=cast(inp.x), weight=cast(inp.weight), bias=cast(inp.bias), sg=sg_params,
                               context=cast(inp.context), target=cast(inp.target))

# --- the GPU-kernel suites: Triton (tests/interpreted/test_triton_ops.py) and CUDA C++ (tests/gpu/test_cuda_ops.py) ---

#: Odd shapes, none a multiple of 32, each over more than one tile; "tiles" spans several 64-wide tiles too.
STEP_SHAPES = {"small": dict(batch=37, in_features=45, features=33), "tiles": dict(batch=150, in_features=130, features=97)}
STEP_SGS = {"nosg": None, "linear": (), "mlp": (40,), "mlp2": (40, 35)}  #: SG hidden widths (None: no SG model)


def gpu_inputs(dtype: torch.dtype, device, activation: str = "relu", sg: str = "linear", context: str = "none",
               shape: str = "small", seed: int = 0) -> Inputs:
    """:func:`step_inputs` for a key of :data:`STEP_SGS` and of :data:`STEP_SHAPES`."""
    return step_inputs(dtype, device, sg_hidden=STEP_SGS[sg], activation=activation, context=context, seed=seed,
                       **STEP_SHAPES[shape])


def step_state(optimizer: str, hyper: Sequence[float], params: Sequence[Tensor], dtype: torch.dtype, device) -> list[Tensor]:
    """Random mid-run optimizer state (:func:`make_state`, seeded on the CPU) in ``dtype`` on ``device``."""
    return [s.to(device, dtype) for s in make_state(optimizer, hyper, [p.cpu().float() for p in params])]


def upcast(t: Optional[Tensor]) -> Optional[Tensor]:
    """A float tensor as an fp32 copy (the oracle's input); labels and None as they are."""
    return t if t is None or not t.is_floating_point() else t.to(torch.float32, copy=True)


def upcast_sg(sg: Optional[SGParams]) -> Optional[SGParams]:
    return None if sg is None else SGParams(tuple(map(upcast, sg.weights)), tuple(map(upcast, sg.biases)), upcast(sg.context_weight))


def upcast_inputs(inp: Inputs) -> Inputs:
    return dataclasses.replace(inp, x=upcast(inp.x), weight=upcast(inp.weight), bias=upcast(inp.bias), sg=upcast_sg(inp.sg),
                               context=upcast(inp.context), target=upcast(inp.target))


def upcast_forward(forward: ForwardResult) -> ForwardResult:
    return ForwardResult(upcast(forward.h), upcast(forward.pre), upcast(forward.prediction), [upcast(z) for z in forward.sg_hidden])


def assert_step_close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    """A GPU kernel's result: of ``dtype``, and within :data:`STEP_TOLERANCES` of the fp32 oracle's."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    torch.testing.assert_close(got.float(), want.float(), msg=lambda m: f"{what}: {m}", **STEP_TOLERANCES[dtype])


def assert_adam_step_close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str, lr: float) -> None:
    """A parameter that a low-precision kernel stepped with Adam. The step is lr * m/(sqrt(v) + eps), a ratio: for an
    element whose gradient is about as small as its own rounding error (half precision's delta and dot), the ratio,
    and so the step, can land anywhere within about +-lr (seen on an H200: one fp16 weight in 12,610 off by 0.53 lr).
    So at most one element in a thousand may miss :data:`STEP_TOLERANCES`, and only by less than lr; a wrong term
    still moves most elements."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    tol = STEP_TOLERANCES[dtype]
    diff = (got.float() - want.float()).abs()
    outside = diff > tol["atol"] + tol["rtol"] * want.float().abs()
    allowed = max(1, got.numel() // 1000)
    assert int(outside.sum()) <= allowed and bool((diff[outside] < lr).all()), (
        f"{what}: {int(outside.sum())} of {got.numel()} elements outside {tol} (at most {allowed} allowed, each within "
        f"lr={lr}); largest difference {diff.max().item():.3g}")


def check_forward_matches_reference(inp: Inputs, dtype: torch.dtype, backend: str) -> ForwardResult:
    """``dni_forward`` on ``backend`` against the reference in fp32 on the same (rounded) inputs, every result."""
    got = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend=backend)
    want = reference_forward(upcast_inputs(inp))
    assert_step_close(got.h, want.h, dtype, "h")
    assert got.pre.numel() == want.pre.numel(), "pre is saved for the activations of NEEDS_PRE only"
    if want.pre.numel():
        assert_step_close(got.pre, want.pre, dtype, "pre")
    assert got.prediction.numel() == want.prediction.numel()
    if want.prediction.numel():
        assert_step_close(got.prediction, want.prediction, dtype, "prediction")
    assert len(got.sg_hidden) == len(want.sg_hidden)
    for i, (g, w) in enumerate(zip(got.sg_hidden, want.sg_hidden)):
        assert_step_close(g, w, dtype, f"sg_hidden[{i}]")
    return got


def check_predict_matches_reference(inp: Inputs, dtype: torch.dtype, backend: str, *, strided: bool = False) -> None:
    """``sg_predict`` on ``backend`` against the reference in fp32 on the same (rounded) inputs: the prediction and the
    hidden activations. Its ``h`` is ``inp.target`` (any ``[B, N]`` does), a transposed (strided) view if ``strided``."""
    h = inp.target.T.contiguous().T if strided else inp.target
    assert h.is_contiguous() != strided
    got = ops.sg_predict(h, inp.sg, inp.context, backend=backend)
    ref = upcast_inputs(inp)
    want = ops.sg_predict(ref.target, ref.sg, ref.context, backend="reference")
    assert_step_close(got.prediction, want.prediction, dtype, "prediction")
    assert len(got.sg_hidden) == len(want.sg_hidden)
    for i, (g, w) in enumerate(zip(got.sg_hidden, want.sg_hidden)):
        assert_step_close(g, w, dtype, f"sg_hidden[{i}]")


def check_update_matches_reference(inp: Inputs, dtype: torch.dtype, optimizer_key: str, backend: str, *,
                                   need_input_grad: bool, grad_scale: float = 2.5) -> None:
    """``dni_update_`` on ``backend`` (after its own forward) against the reference on the upcast forward and state:
    ``dx``, the stepped weight and bias, the state."""
    forward = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend=backend)
    optimizer, hyper = OPTIMIZERS[optimizer_key]
    state = step_state(optimizer, hyper, [inp.weight, inp.bias], dtype, inp.x.device)
    ref, ref_state = upcast_inputs(inp), [upcast(s) for s in state]
    want_dx = ops.dni_update_(ref.x, ref.weight, ref.bias, upcast_forward(forward), optimizer, hyper, ref_state,
                              grad_scale=grad_scale, activation=inp.activation, need_input_grad=need_input_grad, backend="reference")
    got_dx = ops.dni_update_(inp.x, inp.weight, inp.bias, forward, optimizer, hyper, state, grad_scale=grad_scale,
                             activation=inp.activation, need_input_grad=need_input_grad, backend=backend)
    if need_input_grad:
        assert_step_close(got_dx, want_dx, dtype, "dx")
    else:  # the op's empty tensor, as the raw op returns it
        assert got_dx.shape == (0,) and got_dx.dtype == inp.x.dtype and got_dx.device == inp.x.device, got_dx
    for name, g, w in zip(["weight", "bias", *indexed_names("state", len(state))], [inp.weight, inp.bias, *state],
                          [ref.weight, ref.bias, *ref_state], strict=True):
        if optimizer == "adam" and dtype in (torch.float16, torch.bfloat16) and name in ("weight", "bias"):
            assert_adam_step_close(g, w, dtype, name, lr=hyper[0])
        else:
            assert_step_close(g, w, dtype, name)


def check_regression_matches_reference(inp: Inputs, dtype: torch.dtype, optimizer_key: str, backend: str, *,
                                       target_scale: float, loss_weight: float) -> None:
    """``sg_regression_`` on ``backend`` (after its own forward) against the reference on the upcast forward and
    state: the loss, every SG parameter, the state."""
    forward = ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend=backend)
    optimizer, hyper = OPTIMIZERS[optimizer_key]
    params = ops.ordered_params(inp.sg)
    state = step_state(optimizer, hyper, params, dtype, inp.x.device)
    ref, ref_state = upcast_inputs(inp), [upcast(s) for s in state]
    up_forward = upcast_forward(forward)
    want_loss = ops.sg_regression_(up_forward, ref.target, ref.sg, optimizer, hyper, ref_state, ref.context,
                                   target_scale=target_scale, loss_weight=loss_weight, backend="reference")
    got_loss = ops.sg_regression_(forward, inp.target, inp.sg, optimizer, hyper, state, inp.context,
                                  target_scale=target_scale, loss_weight=loss_weight, backend=backend)
    assert_step_close(got_loss, want_loss, dtype, "loss")
    names = [*indexed_names("param", len(params)), *indexed_names("state", len(state))]
    for name, g, w in zip(names, params + state, ops.ordered_params(ref.sg) + ref_state, strict=True):
        assert_step_close(g, w, dtype, name)


def case_id(case: Case) -> str:
    parts = [DTYPE_IDS[case.dtype], case.activation, case.sg or "nosg"]
    if case.context != "none":
        parts.append(case.context)
    if (case.batch, case.in_features, case.features) != (BATCH, IN_FEATURES, FEATURES):
        parts.append(f"B{case.batch}K{case.in_features}N{case.features}")
    return "-".join(parts)


# --- optimizers -------------------------------------------------------------------------------------

# (optimizer, hyper): see fastdni/ops/optim.py for the layouts.
OPTIMIZERS = {
    "adam-step1": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]),
    "adam-step4": ("adam", [1e-2, 0.8, 0.99, 1e-6, 0.0, 0.0, 4.0]),
    "adam-l2-step1": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 1.0]),
    "adam-l2-step3": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 3.0]),
    "adamw-step1": ("adam", [1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0, 1.0]),
    "adamw-step7": ("adam", [1e-2, 0.5, 0.9, 1e-6, 0.05, 1.0, 7.0]),
    "sgd": ("sgd", [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]),
    "sgd-wd-first": ("sgd", [0.1, 0.0, 0.0, 0.05, 0.0, 1.0]),
    "sgd-momentum-first": ("sgd", [0.1, 0.9, 0.0, 0.0, 0.0, 1.0]),
    "sgd-momentum": ("sgd", [0.1, 0.9, 0.0, 0.0, 0.0, 0.0]),
    "sgd-dampening-first": ("sgd", [0.1, 0.9, 0.3, 0.01, 0.0, 1.0]),
    "sgd-dampening": ("sgd", [0.1, 0.9, 0.3, 0.01, 0.0, 0.0]),
    "sgd-nesterov-first": ("sgd", [0.1, 0.9, 0.0, 0.01, 1.0, 1.0]),
    "sgd-nesterov": ("sgd", [0.1, 0.9, 0.0, 0.01, 1.0, 0.0]),
}
ADAM = OPTIMIZERS["adam-l2-step3"]
SGD_MOMENTUM = OPTIMIZERS["sgd-dampening"]


def make_state(optimizer: str, hyper: Sequence[float], params: Sequence[Tensor], seed: int = 1) -> list[Tensor]:
    """Random optimizer state for ``params`` (a mid-run state: Adam's second moment non-negative)."""
    gen = torch.Generator().manual_seed(seed)
    per = state_per_param(optimizer, hyper)
    state = []
    for p in params:
        if optimizer == "adam":
            state.append(_randn(gen, *p.shape, dtype=p.dtype, scale=0.1))
            state.append(torch.rand(*p.shape, generator=gen, dtype=p.dtype) * 0.01)
        else:
            state += [_randn(gen, *p.shape, dtype=p.dtype, scale=0.1) for _ in range(per)]
    return state


# torch.optim configurations, for the multi-step equivalence tests: (class, kwargs).
TORCH_OPTIMIZERS = {
    "Adam": (torch.optim.Adam, dict(lr=1e-2)),
    "Adam-l2": (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "SGD": (torch.optim.SGD, dict(lr=0.1)),
    "SGD-wd": (torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)),
    "SGD-momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "SGD-dampening": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "SGD-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
}
TORCH_OPTIMIZER_STEPS = 3


def make_torch_optimizer(name: str, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    cls, kwargs = TORCH_OPTIMIZERS[name]
    return cls(list(params), foreach=False, **kwargs)  # single-tensor path: the fused ops' formulae


def optimizer_states(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """A torch.optim optimizer's state tensors for ``params``, in the fused ops' order."""
    out = []
    for p in params:
        s = opt.state[p]
        out += [s[k] for names in STATE_FIELDS.values() for k in names if s.get(k) is not None]
    return out


def optimizer_pair(name: str, params: Sequence[Tensor]) -> tuple[torch.optim.Optimizer, list[Tensor], torch.optim.Optimizer]:
    """``(fused, leaves, oracle)``: optimizer ``name`` on ``params`` (to drive the fused ops) and on leaf copies."""
    leaves = [p.clone().requires_grad_() for p in params]
    return make_torch_optimizer(name, params), leaves, make_torch_optimizer(name, leaves)


def assert_states_match(fused: torch.optim.Optimizer, params: Sequence[Tensor], oracle: torch.optim.Optimizer,
                        leaves: Sequence[Tensor], step: int) -> None:
    """After step ``step``: the fused optimizer's state tensors equal the oracle's, one by one."""
    expected = optimizer_states(oracle, leaves)
    assert_all_close(optimizer_states(fused, params), expected, indexed_names(f"step {step}: state", len(expected)))


# --- copies and layouts -------------------------------------------------------------------------------

def clone_sg(sg: Optional[SGParams]) -> Optional[SGParams]:
    if sg is None:
        return None
    return SGParams(
        tuple(w.clone() for w in sg.weights),
        tuple(b.clone() for b in sg.biases),
        None if sg.context_weight is None else sg.context_weight.clone(),
    )


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


def noncontiguous(t: Tensor) -> Tensor:
    """The same values as ``t`` in a strided (non-contiguous) view; floats and integer labels alike."""
    out = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def reference_forward(inp: Inputs) -> ForwardResult:
    return ops.dni_forward(inp.x, inp.weight, inp.bias, inp.sg, inp.context, activation=inp.activation, backend="reference")


def layer_params(inp: Inputs) -> list[Tensor]:
    """The layer's parameters in the fused ops' order: ``weight, bias``."""
    return [inp.weight, inp.bias]


def sg_params(inp: Inputs) -> list[Tensor]:
    """The SG model's parameters in the fused ops' order (:func:`fastdni.ops.ordered_params`)."""
    return ops.ordered_params(inp.sg)


def prepare_step(case: Case, optimizer_key: str, params: Callable[[Inputs], list[Tensor]]) -> tuple:
    """``(inp, forward, optimizer, hyper, state)``: inputs, their reference forward, a key of
    :data:`OPTIMIZERS` and a random state for ``params(inp)`` (:func:`layer_params` or :func:`sg_params`)."""
    inp = make_inputs(case)
    optimizer, hyper = OPTIMIZERS[optimizer_key]
    return inp, reference_forward(inp), optimizer, hyper, make_state(optimizer, hyper, params(inp))


# --- the raw torch.ops.fastdni argument lists -----------------------------------------------------------

def forward_op_args(inp: Inputs) -> tuple:
    sg = inp.sg or SGParams((), (), None)
    return (inp.x, inp.weight, inp.bias, list(sg.weights), list(sg.biases), sg.context_weight, inp.context, inp.activation)


def update_op_args(inp: Inputs, forward: ForwardResult, optimizer: str, hyper: Sequence[float], state: Sequence[Tensor],
                   *, grad_scale: float = 1.0, need_input_grad: bool = True) -> tuple:
    return (inp.x, inp.weight, inp.bias, forward.h, forward.pre, forward.prediction, list(state), optimizer,
            [float(v) for v in hyper], float(grad_scale), inp.activation, bool(need_input_grad))


def regression_op_args(inp: Inputs, forward: ForwardResult, optimizer: str, hyper: Sequence[float],
                       state: Sequence[Tensor], *, target_scale: float = 1.0, loss_weight: float = 1.0) -> tuple:
    sg = inp.sg
    return (forward.h, list(forward.sg_hidden), forward.prediction, inp.target, list(sg.weights), list(sg.biases),
            sg.context_weight, inp.context, list(state), optimizer, [float(v) for v in hyper], float(target_scale),
            float(loss_weight))


# --- comparisons ----------------------------------------------------------------------------------------

def assert_all_close(actual: Sequence[Tensor], expected: Sequence[Tensor], names: Sequence[str], **overrides) -> None:
    """Pairwise ``assert_close`` at :data:`OP_TOLERANCES` for the expected tensor's dtype, naming the pair."""
    assert len(actual) == len(expected) == len(names), (len(actual), len(expected), len(names))
    for a, e, name in zip(actual, expected, names):
        kwargs = dict(OP_TOLERANCES[e.dtype])
        kwargs.update(overrides)
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}", **kwargs)


def indexed_names(prefix: str, count: int) -> list[str]:
    """``prefix[0], ..., prefix[count - 1]``: the names of a list's entries."""
    return [f"{prefix}[{i}]" for i in range(count)]


def sg_names(sg: SGParams, prefix: str = "sg") -> list[str]:
    names = [f"{prefix}.{kind}[{i}]" for i in range(len(sg.weights)) for kind in ("weights", "biases")]
    if sg.context_weight is not None:
        names.append(f"{prefix}.context_weight")
    return names


@contextlib.contextmanager
def num_threads(n: int):
    """Run with ``n`` intra-op threads (the suites run single-threaded: the conftest's ``single_thread``;
    the tests of the parallel paths, tiles split across threads and label scatters, ask for 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def at_thread_counts(fn: Callable[[], Any], *counts: int) -> list:
    """``fn()`` run once with each intra-op thread count of ``counts``; the results, in that order."""
    results = []
    for n in counts:
        with num_threads(n):
            results.append(fn())
    return results


# --- bad arguments --------------------------------------------------------------------------------------

ARG_ERRORS = (ValueError, TypeError)  #: what the Python wrappers raise for a bad argument
META_DEVICE_SKIP = ("a CPU/meta mix is dispatched to the Meta (fake) kernel, as for torch's own ops (torch.mm included), "
                    "so the kernel's device check is not reachable on a CPU-only machine")


def raw_op_pattern(pattern: Optional[str], skip_reason: str = META_DEVICE_SKIP) -> str:
    """The raw op's expected message ``pattern``; skips the calling test where it is None (not applicable)."""
    if pattern is None:
        pytest.skip(skip_reason)
    return pattern


# Mutations of a bad-argument test's arguments (an ``Inputs`` or a test file's own ``Args``), applied in place.

def set_field(name: str, value) -> Callable[[Any], None]:
    """Sets ``args.<name>`` to ``value(args)`` (to ``value`` itself where it is not callable)."""
    def mutate(args):
        setattr(args, name, value(args) if callable(value) else value)
    return mutate


def set_forward(field: str, value: Callable[[Any], Any]) -> Callable[[Any], None]:
    """Replaces ``args.forward.<field>`` (a :class:`ForwardResult` field) by ``value(args)``."""
    def mutate(args):
        args.forward = args.forward._replace(**{field: value(args)})
    return mutate


def set_sg(field: str, index: Optional[int], value: Callable[[Any], Any]) -> Callable[[Any], None]:
    """Replaces ``args.sg.<field>[index]`` (the whole field where ``index`` is None) by ``value(args)``."""
    def mutate(args):
        if index is None:
            args.sg = args.sg._replace(**{field: value(args)})
        else:
            items = list(getattr(args.sg, field))
            items[index] = value(args)
            args.sg = args.sg._replace(**{field: tuple(items)})
    return mutate


def set_first_label(value: int) -> Callable[[Any], None]:
    """Sets ``args.context[0]`` (on a copy of the labels) to ``value``."""
    def mutate(args):
        args.context = args.context.clone()
        args.context[0] = value
    return mutate


#: The bad cDNI contexts of the SG ops' bad-argument tables (test_sg_predict, test_sg_regression):
#: id: (base context, mutation of ``args.context``/``args.sg``, wrapper message pattern, raw-op message pattern).
CONTEXT_BAD_INPUTS = {
    "float-context-shape": ("float", set_field("context", lambda a: a.context[:, :-1]), r"^context\b", r"^context\b"),
    "float-context-dtype": ("float", set_field("context", lambda a: a.context.double()), r"^context\b", r"^context\b"),
    "context-without-context-weight": ("float", set_sg("context_weight", None, lambda a: None), r"^context\b",
                                       r"^context\b"),
    "context-weight-without-context": ("float", set_field("context", None), r"^context\b", r"^context\b"),
    "context-weight-shape": ("float", set_sg("context_weight", None, lambda a: torch.randn(8, a.context.shape[1])),
                             r"^params\.context_weight\b", r"^context_weight\b"),
}


# --- batch_norm_act / batch_norm_act_update_ ----------------------------------------------------------------

@dataclasses.dataclass
class BatchNormInputs:
    pre: Tensor  #: the layer's pre-activation ``[B, N]`` (non-zero mean, non-unit variance per feature)
    weight: Tensor  #: gamma ``[N]``
    bias: Tensor  #: beta ``[N]``
    running_mean: Tensor
    running_var: Tensor
    prediction: Tensor  #: a synthetic gradient of ``h``, ``[B, N]``


def make_bn_inputs(dtype: torch.dtype, batch: int = 3, features: int = 7, seed: int = 0, device="cpu") -> BatchNormInputs:
    """Seeded BatchNorm inputs (odd sizes by default: B=3, N=7), every tensor away from its trivial value."""
    gen = torch.Generator().manual_seed(seed)
    pre = _randn(gen, batch, features, dtype=dtype) * (0.5 + torch.rand(features, generator=gen, dtype=dtype)) + 0.3
    weight = 0.5 + torch.rand(features, generator=gen, dtype=dtype)
    bias = _randn(gen, features, dtype=dtype, scale=0.3)
    running_mean = _randn(gen, features, dtype=dtype, scale=0.2)
    running_var = 0.5 + torch.rand(features, generator=gen, dtype=dtype)
    prediction = _randn(gen, batch, features, dtype=dtype)
    return BatchNormInputs(*(t.to(device) for t in (pre, weight, bias, running_mean, running_var, prediction)))


def torch_batch_norm_act(inp: BatchNormInputs, activation: str, momentum: float = 0.1, eps: float = 1e-5):
    """The oracle: ``nn.BatchNorm1d`` in training mode and the torch activation; returns (module, h)."""
    norm = torch.nn.BatchNorm1d(inp.pre.shape[1], eps=eps, momentum=momentum).to(inp.pre.dtype)
    with torch.no_grad():
        for dst, src in ((norm.weight, inp.weight), (norm.bias, inp.bias), (norm.running_mean, inp.running_mean),
                         (norm.running_var, inp.running_var)):
            dst.copy_(src)
    return norm, TORCH_ACTIVATIONS[activation](norm.train()(inp.pre))
