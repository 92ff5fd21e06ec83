"""Analytic cost model of one DNI layer step: work, memory traffic and kernel launches.

The step is the one of :mod:`common` (``benchmarks/common.py``): a layer ``x [B, W] -> h = relu(x W^T + b)``,
its SG (``"linear"``: one ``W x W`` layer; ``"mlp"``: ``W -> W -> W`` with ReLU), Adam on every parameter,
``dx`` computed (``need_input_grad=True``) and the SG regressed onto a target. What it costs, as functions
of the batch ``B``, the width ``W``, the SG kind and the dtype (activations, parameters and Adam state all
of that dtype):

- :func:`flops`: the GEMMs' ``2 m n k`` (:func:`common.gemm_shapes`; the elementwise work is ``O(B W + W^2)``
  and left out);
- :func:`compulsory_bytes`: what any implementation must move to or from HBM: read ``x``, the target, every
  parameter and its two Adam moments once; write ``h``, ``dx``, the loss and every parameter and moment once;
- :func:`fastdni_kernels`: the Triton path's kernel plan (see the function), each kernel with the bytes it
  moves; :func:`fastdni_bytes` sums them, optimistic (operand re-reads hit L2) or pessimistic (a tiled
  GEMM re-reads each operand once per output tile along the other dimension, :data:`PESSIMISTIC_BLOCK`);
- :func:`eager_kernels`: the ATen ops that the eager step of :mod:`common` dispatches (its launches), each
  reading its inputs and writing its outputs (``torch.optim.Adam(foreach=True)`` is eight foreach ops: 18
  parameter-sized accesses per parameter where a fused step needs 6). Checked against the real eager step
  by :func:`profiled_kernels` (``torch.profiler``) and :func:`traced_kernels` (a dispatch trace) in
  ``tests/benchmarks/test_cost_model.py``;
- :func:`roofline_s`: ``max(flops / peak flops, compulsory bytes / HBM bandwidth)`` on a :class:`Peak` (with
  :func:`fastdni_bytes` instead: the floor of the Triton path's plan).

``python benchmarks/cost_model.py`` prints the table for the grid of ``benchmarks/gpu_step.py``.
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_BYTES = 4  #: the loss: one scalar (counted as fp32; its per-program partials, ~W/32 floats, are left out)
STEP_COUNTER_BYTES = 4  #: torch.optim's step counter: one fp32 0-dim (host) tensor per parameter
PESSIMISTIC_BLOCK = 128  #: tile edge of the no-L2-reuse variant of :func:`fastdni_bytes`
BYTES_TARGET = 1.2  #: the Triton target: fastdni bytes <= 1.2x compulsory
LAUNCH_TARGET = 5  #: the Triton target: at most 5 launches per step

GRID_BATCHES = (64, 256, 1024, 4096)
GRID_WIDTHS = (256, 512, 1024, 2048, 4096)
GRID_DTYPES = ("fp32", "bf16")


def dtype_name(dtype) -> str:
    """``"fp32"``/``"bf16"``/``"fp16"`` for a name or a ``torch.dtype`` (the keys of :data:`DTYPES`)."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype: expected one of {tuple(DTYPES)} or their torch dtypes, got {dtype!r}")


@dataclass(frozen=True)
class Step:
    """The shape of one layer step: everything its cost depends on.

    Duck-compatible with :class:`common.Problem` for :func:`common.gemm_shapes` (``batch``, ``width``, ``sg``)."""

    batch: int
    width: int
    sg: str = "linear"
    dtype: str = "fp32"

    def __post_init__(self):
        for name in ("batch", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        common.sg_hidden(self.sg, self.width)  # validates sg
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def elem(self) -> int:
        """Bytes per element of every activation, parameter and moment."""
        return DTYPES[self.dtype].itemsize

    @property
    def sizes(self) -> list[int]:
        """``[W, *hidden, W]``: SG layer ``j`` (1-based) maps ``sizes[j - 1] -> sizes[j]``."""
        return [self.width, *common.sg_hidden(self.sg, self.width), self.width]

    @property
    def sg_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def param_tensors(self) -> int:
        """Parameter tensors: ``W, b`` and a weight and bias per SG layer."""
        return 2 + 2 * self.sg_layers

    @property
    def layer_params(self) -> int:
        return self.width * self.width + self.width

    def sg_layer_params(self, j: int) -> int:
        """Elements of SG layer ``j``'s weight ``A_j`` and bias ``c_j``."""
        s = self.sizes
        return s[j] * s[j - 1] + s[j]

    @property
    def params(self) -> int:
        """All parameter elements (layer and SG)."""
        return self.layer_params + sum(self.sg_layer_params(j) for j in range(1, self.sg_layers + 1))

    def act(self, features: int) -> int:
        """Bytes of one ``[B, features]`` activation."""
        return self.batch * features * self.elem


@dataclass(frozen=True)
class Kernel:
    """One kernel launch (an ATen op, or a Triton kernel) and the bytes it moves.

    A GEMM ``C[m, n] = A[m, k] B[k, n]`` tiled over ``C`` reads ``A`` once per column tile and ``B`` once per
    row tile unless the re-reads hit L2: ``row_operand`` / ``col_operand`` are the bytes of ``A`` / ``B``
    (whatever tensors they are formed from), ``reads`` / ``writes`` what is read or written exactly once."""

    name: str
    reads: int = 0
    writes: int = 0
    row_operand: int = 0
    col_operand: int = 0
    m: int = 1
    n: int = 1

    def bytes(self, block: Optional[int] = None) -> int:
        """Bytes moved: each operand once (``block=None``: re-reads hit L2), or re-read once per
        ``block``-wide output tile along the other dimension (no L2 reuse)."""
        if block is None:
            return self.reads + self.writes + self.row_operand + self.col_operand
        return self.reads + self.writes + self.row_operand * math.ceil(self.n / block) + self.col_operand * math.ceil(self.m / block)


def _gemm(name: str, m: int, n: int, row_operand: int, col_operand: int, *, reads: int = 0, writes: int = 0) -> Kernel:
    return Kernel(name, reads, writes, row_operand, col_operand, m, n)


# --------------------------------------------------------------------------------------------------
# Work and the compulsory traffic


def flops(step: Step) -> int:
    """GEMM flops of one step: 5 GEMMs of ``2 B W^2`` with a linear SG, 8 with an MLP SG."""
    return sum(2 * m * n * k for _, m, n, k in common.gemm_shapes(step))


def compulsory_bytes(step: Step) -> int:
    """Read ``x``, the target, each parameter and its two moments once; write ``h``, ``dx``, the loss and each
    parameter and moment once: ``e (4 B W + 6 P) + 4`` with ``P`` parameters of ``e`` bytes."""
    activations = 2 * step.act(step.width) + 2 * step.act(step.width)  # x, target; h, dx
    return activations + 2 * 3 * step.params * step.elem + LOSS_BYTES


def arithmetic_intensity(step: Step) -> float:
    """Flops per compulsory byte."""
    return flops(step) / compulsory_bytes(step)


# --------------------------------------------------------------------------------------------------
# The fastdni Triton path


def _adam_bytes(step: Step, params: int) -> int:
    """A parameter and its two Adam moments, read or written once."""
    return 3 * params * step.elem


def fastdni_kernels(step: Step) -> list[Kernel]:
    """The Triton path's launches, in order, and what each moves (``e`` bytes per element, ``K = N = W``).

    forward
        1 GEMM + bias + ReLU (reads ``x, W, b``, writes ``h``); 1 GEMM per SG layer (reads its input, weight
        and bias, writes its output: hidden ``z`` or the prediction).
    update
        ``dx = delta W`` with ``delta = prediction * relu'(h)`` formed in the operand load (reads prediction,
        ``h``, ``W``; writes ``dx``); the weight-gradient GEMM ``delta^T x`` with ``delta`` formed on the fly
        and the Adam step on ``W`` and ``b`` in its epilogue (reads prediction, ``h``, ``x``; reads and writes
        ``W, b`` and their moments; ``dW`` is never written).
    regression
        for SG layer ``j = L .. 1`` (from the top): if
        ``j > 1``, the input-gradient GEMM ``g_{j-1} = (g_j A_j) * relu'(z_{j-1})`` with the pre-update
        ``A_j`` (writes ``g_{j-1}``); then the weight-gradient GEMM ``g_j^T z_{j-1}`` with the Adam step on
        ``A_j`` and ``c_j`` fused (``dA_j`` never written). At the top, ``g_L`` is the error
        ``prediction - target`` formed on the fly, and that kernel also reduces the loss (per-program partials,
        summed and written by the last program to finish: no zero-initialised accumulator to launch).

    Linear SG: 2 + 2 + 1 = 5 launches; MLP SG: 3 + 2 + 3 = 8."""
    B, N, s, L = step.batch, step.width, step.sizes, step.sg_layers
    e, act = step.elem, step.act
    out = [_gemm("forward: h = relu(x W^T + b)", B, N, act(N), N * N * e, reads=N * e, writes=act(N))]
    for j in range(1, L + 1):
        what = "prediction" if j == L else f"z{j}"
        out.append(_gemm(f"forward: {what} = SG layer {j}", B, s[j], act(s[j - 1]), s[j] * s[j - 1] * e,
                         reads=s[j] * e, writes=act(s[j])))
    delta = 2 * act(N)  # delta = prediction * relu'(h), formed from both in the operand load
    out.append(_gemm("update: dx = delta W", B, N, delta, N * N * e, writes=act(N)))
    out.append(_gemm("update: delta^T x, Adam on W and b", N, N, delta, act(N),
                     reads=_adam_bytes(step, step.layer_params), writes=_adam_bytes(step, step.layer_params)))
    for j in range(L, 0, -1):
        g = 2 * act(N) if j == L else act(s[j])  # the top layer forms g_L from prediction and target
        if j > 1:
            out.append(_gemm(f"regression: g{j - 1} = (g{j} A{j}) * relu'(z{j - 1})", B, s[j - 1], g, s[j] * s[j - 1] * e,
                             reads=act(s[j - 1]), writes=act(s[j - 1])))
        loss = LOSS_BYTES if j == L else 0
        adam = _adam_bytes(step, step.sg_layer_params(j))
        out.append(_gemm(f"regression: g{j}^T z{j - 1}, Adam on A{j} and c{j}" + (", loss" if loss else ""),
                         s[j], s[j - 1], g, act(s[j - 1]), reads=adam, writes=adam + loss))
    return out


def fastdni_bytes(step: Step, *, pessimistic: bool = False) -> int:
    """Bytes the Triton path moves: operands once (re-reads hit L2), or, ``pessimistic``, re-read once per
    :data:`PESSIMISTIC_BLOCK`-wide output tile (no L2 reuse at all)."""
    block = PESSIMISTIC_BLOCK if pessimistic else None
    return sum(k.bytes(block) for k in fastdni_kernels(step))


def fastdni_launches(step: Step) -> int:
    return len(fastdni_kernels(step))


# --------------------------------------------------------------------------------------------------
# Eager PyTorch (common._eager_math + torch.optim.Adam(foreach=True))


def _relu_mask_ops(step: Step, features: int, what: str) -> list[Kernel]:
    """``grad * (z > 0).to(dtype)``: ``gt`` (bool out), ``_to_copy``, ``mul``."""
    e, n = step.elem, step.batch * features
    return [Kernel(f"gt: {what} > 0", reads=n * e, writes=n), Kernel(f"_to_copy: mask of {what}", reads=n, writes=n * e),
            Kernel(f"mul: grad * relu'({what})", reads=2 * n * e, writes=n * e)]


def _eager_forward(step: Step) -> list[Kernel]:
    B, N, s, e, act = step.batch, step.width, step.sizes, step.elem, step.act
    out = [_gemm("addmm: pre = b + x W^T", B, N, act(N), N * N * e, reads=N * e, writes=act(N)),
           Kernel("relu: h", reads=act(N), writes=act(N))]
    for j in range(1, step.sg_layers + 1):
        out.append(_gemm(f"addmm: a{j} = c{j} + z{j - 1} A{j}^T", B, s[j], act(s[j - 1]), s[j] * s[j - 1] * e,
                         reads=s[j] * e, writes=act(s[j])))
        if j < step.sg_layers:
            out.append(Kernel(f"relu: z{j}", reads=act(s[j]), writes=act(s[j])))
    return out


def _eager_layer_backward(step: Step) -> list[Kernel]:
    B, N, e, act = step.batch, step.width, step.elem, step.act
    return _relu_mask_ops(step, N, "pre") + [
        _gemm("mm: dx = delta W", B, N, act(N), N * N * e, writes=act(N)),
        _gemm("mm: dW = delta^T x", N, N, act(N), act(N), writes=N * N * e),
        Kernel("sum: db", reads=act(N), writes=N * e),
    ]


def _eager_sg_backward(step: Step) -> list[Kernel]:
    N, s, e, act = step.width, step.sizes, step.elem, step.act
    out = [Kernel("sub: error = prediction - target", reads=2 * act(N), writes=act(N)),
           Kernel("mul: error * error", reads=act(N), writes=act(N)),
           Kernel("sum: loss * B", reads=act(N), writes=e),
           Kernel("div: loss", reads=e, writes=e),
           Kernel("mul: g = error * 2 / B", reads=act(N), writes=act(N))]
    for j in range(step.sg_layers, 0, -1):
        out += [_gemm(f"mm: dA{j} = g{j}^T z{j - 1}", s[j], s[j - 1], act(s[j]), act(s[j - 1]), writes=s[j] * s[j - 1] * e),
                Kernel(f"sum: dc{j}", reads=act(s[j]), writes=s[j] * e)]
        if j > 1:
            out.append(_gemm(f"mm: g{j} A{j}", step.batch, s[j - 1], act(s[j]), s[j] * s[j - 1] * e, writes=act(s[j - 1])))
            out += _relu_mask_ops(step, s[j - 1], f"z{j - 1}")
    return out


def _eager_adam(step: Step) -> list[Kernel]:
    """``torch.optim.Adam(foreach=True).step()`` (not capturable): 8 foreach ops over all parameters."""
    p, t = step.params * step.elem, step.param_tensors * STEP_COUNTER_BYTES
    return [
        Kernel("_foreach_add_: step counters", reads=t + STEP_COUNTER_BYTES, writes=t),  # the counters and the 1
        Kernel("_foreach_lerp_: exp_avg", reads=2 * p, writes=p),
        Kernel("_foreach_mul_: exp_avg_sq * beta2", reads=p, writes=p),
        Kernel("_foreach_addcmul_: exp_avg_sq + g^2", reads=2 * p, writes=p),
        Kernel("_foreach_sqrt: denom", reads=p, writes=p),
        Kernel("_foreach_div_: denom / bias correction", reads=p, writes=p),
        Kernel("_foreach_add_: denom + eps", reads=p, writes=p),
        Kernel("_foreach_addcdiv_: param", reads=3 * p, writes=p),
    ]


def eager_kernels(step: Step) -> list[Kernel]:
    """The ATen ops with work that one eager step (:func:`common.make_eager`) dispatches, in order, each
    reading its (distinct) inputs and writing its outputs once; views and host scalar reads left out."""
    return _eager_forward(step) + _eager_layer_backward(step) + _eager_sg_backward(step) + _eager_adam(step)


def eager_bytes(step: Step) -> int:
    return sum(k.bytes() for k in eager_kernels(step))


def eager_launches(step: Step) -> int:
    """ATen ops with work per eager step (one kernel each on a GPU, roughly: on CUDA the step-counter
    increment runs on host tensors, and a foreach op over large tensors may take several launches)."""
    return len(eager_kernels(step))


# --------------------------------------------------------------------------------------------------
# Measured counterparts (CPU): what the tests compare the eager model with

#: Leaf ops that launch no kernel: views, allocations, host reads of scalars, no-op conversions.
NO_WORK = frozenset({
    "aten::as_strided", "aten::view", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::numpy_T", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resolve_conj",
    "aten::resolve_neg", "aten::to", "aten::detach_", "detach_", "aten::detach", "detach", "aten::lift_fresh",
    "aten::item", "aten::_local_scalar_dense",
})


def _does_work(event) -> bool:
    """Not a view, allocation or scalar read itself, or calls one that does work (``aten::to`` -> ``_to_copy``)."""
    return event.name not in NO_WORK or any(_does_work(c) for c in event.cpu_children)


def _top_level_aten(event) -> bool:
    """An ATen op none of whose ancestors is one (a foreach op counts once, not per tensor)."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def profiled_kernels(fn: Callable[[], object]) -> collections.Counter:
    """``torch.profiler`` (CPU) of one call of ``fn``: the top-level ATen ops that do work, by name.

    Each is one kernel launch of the same step on a GPU (a foreach op one launch per tensor chunk group)."""
    from torch.profiler import ProfilerActivity, profile

    with common._quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if _top_level_aten(e) and _does_work(e))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct tensors (the same tensor passed twice, e.g. ``error * error``, is read once)."""
    seen = {(t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


def traced_kernels(fn: Callable[[], object]) -> list[Kernel]:
    """The ATen ops one call of ``fn`` dispatches (a ``TorchDispatchMode`` trace), without views and host
    scalar reads, each with the bytes of its distinct tensor inputs (``reads``) and of its outputs and
    in-place arguments (``writes``): the eager model's accounting, taken from the code that runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[Kernel] = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = f"aten::{func.__name__.split('.')[0]}"
            if func.namespace == "aten" and name not in NO_WORK:
                inputs = _tensors(list(args) + list(kwargs.values()))
                mutated = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
                ops.append(Kernel(name, reads=_nbytes(inputs), writes=_nbytes(_tensors(out) + _tensors(mutated))))
            return out

    with Trace():
        fn()
    return ops


def eager_step(step: Step) -> Callable[[], object]:
    """The eager variant of :mod:`common` for ``step``'s shape, after one warm-up step (CPU)."""
    variant = common.make_eager(common.make_problem(step.batch, step.width, step.sg, dtype=DTYPES[step.dtype]))
    variant.step()
    return variant.step


# --------------------------------------------------------------------------------------------------
# Roofline


@dataclass(frozen=True)
class Peak:
    """Vendor peak numbers of one GPU (dense, no sparsity): HBM bandwidth and GEMM flop rates by dtype."""

    name: str
    hbm: float  #: bytes/s
    flops: dict  #: dtype name -> flop/s for the GEMMs of that dtype
    note: str = ""


# fp32 GEMMs: IEEE fp32 on the non-tensor cores (torch.backends.cuda.matmul.allow_tf32 is False by default,
# and the Triton kernels use IEEE products unless it is set); TF32 is the tensor-core rate when it is set.
H100_SXM = Peak("H100 SXM5 80GB", 3.35e12, {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},
                "HBM3 3.35 TB/s; dense bf16/fp16 989 TFLOP/s; fp32 = IEEE non-tensor 66.9 TFLOP/s (TF32 494.7)")
H100_PCIE = Peak("H100 PCIe 80GB", 2.0e12, {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 51.2e12, "tf32": 378.0e12},
                 "HBM2e 2.0 TB/s; dense bf16/fp16 756 TFLOP/s; fp32 = IEEE non-tensor 51.2 TFLOP/s (TF32 378)")
H200 = Peak("H200 SXM 141GB", 4.8e12, {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},
            "HBM3e 4.8 TB/s; dense bf16/fp16 989 TFLOP/s; fp32 = IEEE non-tensor 66.9 TFLOP/s (TF32 494.7)")
PEAKS = {"h100": H100_SXM, "h100-pcie": H100_PCIE, "h200": H200}


def peak_for(device_name: str) -> Peak:
    """The :class:`Peak` for a ``torch.cuda.get_device_name`` (H100 SXM unless it names an H200 or a PCIe card)."""
    name = device_name.upper()
    if "H200" in name:
        return H200
    return H100_PCIE if "PCIE" in name else H100_SXM


def roofline_s(step: Step, peak: Peak = H100_SXM, *, fp32_as: str = "fp32", nbytes: Optional[int] = None) -> float:
    """Seconds below which no implementation can go: ``max(flops / peak flops, compulsory bytes / HBM)``
    (compute and traffic perfectly overlapped). ``fp32_as="tf32"`` rates fp32 GEMMs at the TF32 peak; ``nbytes``
    replaces the compulsory bytes (e.g. :func:`fastdni_bytes`: the floor of the Triton path's plan)."""
    rate = peak.flops[fp32_as if step.dtype == "fp32" else step.dtype]
    return max(flops(step) / rate, (compulsory_bytes(step) if nbytes is None else nbytes) / peak.hbm)


# --------------------------------------------------------------------------------------------------
# Summary and table


def summary(step: Step, peak: Peak = H100_SXM) -> dict:
    """Everything the table (and ``gpu_step.py``'s JSON) reports for one step, as plain numbers."""
    need = compulsory_bytes(step)
    fast, slow, eager = fastdni_bytes(step), fastdni_bytes(step, pessimistic=True), eager_bytes(step)
    bound = "compute" if flops(step) / peak.flops[step.dtype] > need / peak.hbm else "memory"
    return dict(
        batch=step.batch, width=step.width, sg=step.sg, dtype=step.dtype, flops=flops(step),
        compulsory_bytes=need, fastdni_bytes=fast, fastdni_ratio=fast / need,
        fastdni_bytes_pessimistic=slow, fastdni_ratio_pessimistic=slow / need,
        eager_bytes=eager, eager_ratio=eager / need,
        fastdni_launches=fastdni_launches(step), eager_launches=eager_launches(step),
        intensity=flops(step) / need, roofline_s=roofline_s(step, peak), plan_floor_s=roofline_s(step, peak, nbytes=fast),
        bound=bound, peak=peak.name,
    )


def grid(batches=GRID_BATCHES, widths=GRID_WIDTHS, sgs=common.SG_KINDS, dtypes=GRID_DTYPES) -> list[Step]:
    return [Step(b, w, sg, dt) for sg in sgs for dt in dtypes for b in batches for w in widths]


TABLE_COLUMNS = ("sg", "dtype", "B", "W", "GFLOP", "need MB", "fastdni MB", "f/need", "no-L2 f/need", "eager MB", "e/need",
                 "launch f/e", "flop/B", "floor us", "plan us", "bound", "bytes<=1.2x")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def table_row(s: dict) -> list[str]:
    return [s["sg"], s["dtype"], str(s["batch"]), str(s["width"]), f"{s['flops'] / 1e9:.2f}", _mb(s["compulsory_bytes"]),
            _mb(s["fastdni_bytes"]), f"{s['fastdni_ratio']:.2f}", f"{s['fastdni_ratio_pessimistic']:.2f}", _mb(s["eager_bytes"]),
            f"{s['eager_ratio']:.2f}", f"{s['fastdni_launches']}/{s['eager_launches']}", f"{s['intensity']:.0f}",
            f"{s['roofline_s'] * 1e6:.1f}", f"{s['plan_floor_s'] * 1e6:.1f}", s["bound"],
            "met" if s["fastdni_ratio"] <= BYTES_TARGET else "missed"]


def format_table(rows: list[list[str]], columns: Sequence[str], *, markdown: bool = False) -> str:
    """Right-aligned text columns, or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    table = [list(columns)] + rows
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="only this batch (repeatable)")
    parser.add_argument("--width", type=int, action="append", help="only this width (repeatable)")
    parser.add_argument("--sg", choices=common.SG_KINDS, action="append", help="only this SG kind (repeatable)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="only this dtype (repeatable)")
    parser.add_argument("--peak", choices=tuple(PEAKS), default="h100", help="GPU peak numbers of the roofline (default h100: SXM)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--kernels", action="store_true", help="also list the fastdni and eager kernels of the first row")
    args = parser.parse_args(argv)
    peak = PEAKS[args.peak]
    steps = grid(args.batch or GRID_BATCHES, args.width or GRID_WIDTHS, args.sg or common.SG_KINDS, args.dtype or GRID_DTYPES)
    print(f"Cost model of one DNI layer step (relu, Adam, dx on); roofline on {peak.name}: {peak.note}")
    print(format_table([table_row(summary(s, peak)) for s in steps], TABLE_COLUMNS, markdown=args.markdown))
    print(f"need = compulsory bytes; f/need, e/need = fastdni, eager bytes / compulsory (target f/need <= {BYTES_TARGET}); "
          f"no-L2 = every GEMM operand "
          f"re-read per {PESSIMISTIC_BLOCK}-wide output tile; launch f/e = fastdni / eager (ATen ops with work; target "
          f"<= {LAUNCH_TARGET}); floor = max(flops / peak, compulsory bytes / HBM); plan = the same with fastdni's bytes")
    for sg in args.sg or common.SG_KINDS:
        measured = sum(profiled_kernels(eager_step(Step(8, 16, sg))).values())
        print(f"eager launches, {sg} SG: model {eager_launches(Step(8, 16, sg))}, profiled on CPU {measured}")
    if args.kernels:
        for label, kernels in (("fastdni", fastdni_kernels(steps[0])), ("eager", eager_kernels(steps[0]))):
            print(f"\n{label} kernels of {steps[0]}:")
            for k in kernels:
                print(f"  {k.bytes() / 1e6:10.3f} MB  {k.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
