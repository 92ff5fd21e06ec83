"""One DNI layer step as a benchmark problem, and the four ways of running it that ``dni_step.py`` compares.

The problem (:func:`make_problem`): a layer ``x [B, K] -> h [B, N] = relu(x W^T + b)`` with
``K = N = width``, fp32, no context, its SG model ``M`` either

- ``"linear"``: one layer ``N -> N``, or
- ``"mlp"``: ``N -> H -> N`` with ``H = width`` (one hidden layer as wide as the layer, ReLU);

Adam (``lr=1e-3, betas=(0.9, 0.999), eps=1e-8``, no weight decay) on every parameter (layer and SG),
the input gradient ``dx`` computed (``need_input_grad=True``: the bootstrapped target of the SG
below) and the SG regressed onto a random target (``target_scale = loss_weight = grad_scale = 1``).
The SG's output layer is random (``0.01 * randn``) rather than the zero of :func:`init_sg_params`,
as for a trained SG (a zero SG predicts zero, which would make the layer's update trivially sparse),
and the Adam moments start from small random values (a step in mid-training), identically for
every variant.

ONE step is: forward (layer + SG prediction), the layer's Adam step on the synthetic gradient (and
``dx`` with the pre-update ``W``), the SG's regression and Adam step. The variants (``fused``, ``eager``,
``compiled``, ``gemm_floor``) and the GEMMs each does: docs/performance.md ("The benchmark scripts").
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

import fastdni.ops as ops
from fastdni.ops.schema import TRITON_ONLY_OPS
from fastdni.reference import SGParams, init_sg_params, layer_backward, sg_backward

SG_KINDS = ("linear", "mlp")
ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
VARIANTS = ("fused", "eager", "compiled", "gemm_floor")


def sg_hidden(sg: str, width: int) -> tuple[int, ...]:
    """The SG's hidden sizes: ``()`` for ``"linear"``, ``(width,)`` for ``"mlp"``."""
    if sg not in SG_KINDS:
        raise ValueError(f"sg: expected one of {SG_KINDS}, got {sg!r}")
    return () if sg == "linear" else (width,)


@dataclass
class Problem:
    """The inputs and the initial parameters and Adam moments of one step; variants copy them."""

    batch: int
    width: int
    sg: str
    dtype: torch.dtype
    x: Tensor  #: ``[B, K]``, read only
    target: Tensor  #: ``[B, N]``, the SG's regression target, read only
    params: list[Tensor]  #: ``W, b, Ws_1, bs_1, ..., Ws_L, bs_L``
    exp_avg: list[Tensor] = field(default_factory=list)  #: Adam's first moments, one per parameter
    exp_avg_sq: list[Tensor] = field(default_factory=list)  #: and second moments

    @property
    def sg_layers(self) -> int:
        return (len(self.params) - 2) // 2

    def clone_params(self) -> list[Tensor]:
        return [p.clone() for p in self.params]


def make_problem(batch: int, width: int, sg: str = "linear", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=gen, dtype=dtype)
    weight = torch.randn(width, width, generator=gen, dtype=dtype) / math.sqrt(width)
    bias = torch.randn(width, generator=gen, dtype=dtype) * 0.1
    sgp = init_sg_params(width, sg_hidden(sg, width), dtype=dtype, generator=gen)
    sg_weights = list(sgp.weights[:-1]) + [torch.randn(sgp.weights[-1].shape, generator=gen, dtype=dtype) * 0.01]
    sg_biases = list(sgp.biases[:-1]) + [torch.randn(sgp.biases[-1].shape, generator=gen, dtype=dtype) * 0.01]
    params = [weight, bias] + [t for pair in zip(sg_weights, sg_biases) for t in pair]
    target = torch.randn(batch, width, generator=gen, dtype=dtype) * 0.01
    exp_avg = [torch.randn(p.shape, generator=gen, dtype=dtype) * 1e-3 for p in params]
    exp_avg_sq = [torch.rand(p.shape, generator=gen, dtype=dtype) * 1e-6 for p in params]
    return Problem(batch, width, sg, dtype, x, target, params, exp_avg, exp_avg_sq)


# --------------------------------------------------------------------------------------------------
# Work counts


def gemm_shapes(problem: Problem) -> list[tuple[str, int, int, int]]:
    """``(name, m, n, k)`` of every GEMM of one step (``C[m, n] = A[m, k] B[k, n]``), in step order."""
    B, N = problem.batch, problem.width
    sizes = [N, *sg_hidden(problem.sg, N), N]  # SG layer j maps sizes[j] -> sizes[j + 1]
    L = len(sizes) - 1
    out = [("h = x W^T", B, N, N)]
    out += [(f"a{j + 1} = z{j} Ws{j + 1}^T", B, sizes[j + 1], sizes[j]) for j in range(L)]
    out += [("dW = delta^T x", N, N, B), ("dx = delta W", B, N, N)]
    for j in reversed(range(L)):
        out.append((f"dWs{j + 1} = g{j + 1}^T z{j}", sizes[j + 1], sizes[j], B))
        if j > 0:
            out.append((f"g{j} = g{j + 1} Ws{j + 1}", B, sizes[j], sizes[j + 1]))
    return out


def step_flops(problem: Problem) -> int:
    """GEMM flops of one step (``2 m n k`` each); the elementwise work is O(B W + W^2) and left out."""
    return sum(2 * m * n * k for _, m, n, k in gemm_shapes(problem))


def compulsory_bytes(problem: Problem) -> int:
    """Bytes one step must move to or from memory at the least, whatever the implementation.

    Read ``x`` and the target; write ``h`` and ``dx`` (the step's outputs to the layers above and
    below); read and write every parameter and its two Adam moments (layer and SG). Everything else
    (``pre``, the prediction, ``delta``, the SG's hidden activations, gradients) is an intermediate a
    perfectly fused step could keep in cache, so it is not counted.
    """
    elem = torch.empty((), dtype=problem.dtype).element_size()
    activations = problem.x.numel() + problem.target.numel() + 2 * problem.batch * problem.width  # x, target, h, dx
    params = sum(p.numel() for p in problem.params)
    return elem * (activations + 2 * 3 * params)  # param, exp_avg, exp_avg_sq: read + write each


# --------------------------------------------------------------------------------------------------
# Variants


class Variant(NamedTuple):
    name: str
    step: Callable[[], object]  #: one full step; fused/eager/compiled return ``(h, dx, loss)``
    params: list[Tensor]  #: this variant's own parameters, updated in place by ``step``
    note: str = ""


def _moments(problem: Problem) -> tuple[list[Tensor], list[Tensor]]:
    return [m.clone() for m in problem.exp_avg], [v.clone() for v in problem.exp_avg_sq]


class FusedArgs(NamedTuple):
    """A private copy of the problem's parameters and Adam state, in the fused ops' argument layout."""

    params: list[Tensor]  #: ``weight, bias, Ws_1, bs_1, ...`` (the tensors below, in the problem's order)
    weight: Tensor
    bias: Tensor
    sg: SGParams
    layer_state: list[Tensor]  #: ``exp_avg(W), exp_avg_sq(W), exp_avg(b), exp_avg_sq(b)``
    sg_state: list[Tensor]  #: the same for ``Ws_1, bs_1, ...``
    hyper: list[float]  #: Adam's ``hyper`` for the first step (``step = 1``)


def fused_args(problem: Problem) -> FusedArgs:
    params = problem.clone_params()
    m, v = _moments(problem)
    state = [t for pair in zip(m, v) for t in pair]  # per parameter: exp_avg, exp_avg_sq
    sg = SGParams(tuple(params[2::2]), tuple(params[3::2]), None)
    hyper = [ADAM["lr"], *ADAM["betas"], ADAM["eps"], ADAM["weight_decay"], 0.0, 1.0]
    return FusedArgs(params, params[0], params[1], sg, state[:4], state[4:], hyper)


def make_fused(problem: Problem, *, raw: bool = False) -> Variant:
    """The three fused ops with ``backend="cpu"``; ``raw``: ``torch.ops.fastdni.*`` without the wrappers."""
    if not ops.HAS_CPU_KERNELS:
        raise RuntimeError("the fused variant needs the compiled CPU kernels (fastdni._C)")
    args = fused_args(problem)
    params, x, target, weight, bias, sg = args.params, problem.x, problem.target, args.weight, args.bias, args.sg
    layer_state, sg_state = args.layer_state, args.sg_state
    lr, (beta1, beta2), eps = ADAM["lr"], ADAM["betas"], ADAM["eps"]
    count = [0]

    if raw:
        fw = torch.ops.fastdni.dni_forward.default
        up = torch.ops.fastdni.dni_update_.default
        reg = torch.ops.fastdni.sg_regression_.default
        sg_w, sg_b = list(sg.weights), list(sg.biases)

        def step():
            count[0] += 1
            hyper = [lr, beta1, beta2, eps, 0.0, 0.0, float(count[0])]
            h, pre, prediction, hidden = fw(x, weight, bias, sg_w, sg_b, None, None, "relu")
            dx = up(x, weight, bias, h, pre, prediction, layer_state, "adam", hyper, 1.0, "relu", True)
            loss = reg(h, hidden, prediction, target, sg_w, sg_b, None, None, sg_state, "adam", hyper, 1.0, 1.0)
            return h, dx, loss

        return Variant("fused_raw", step, params, "torch.ops.fastdni.* called directly")

    def step():
        count[0] += 1
        hyper = [lr, beta1, beta2, eps, 0.0, 0.0, float(count[0])]
        f = ops.dni_forward(x, weight, bias, sg, activation="relu", backend="cpu")
        dx = ops.dni_update_(x, weight, bias, f, "adam", hyper, layer_state, activation="relu", need_input_grad=True, backend="cpu")
        loss = ops.sg_regression_(f, target, sg, "adam", hyper, sg_state, backend="cpu")
        return f.h, dx, loss

    return Variant("fused", step, params, "fastdni.ops wrappers, backend='cpu'")


def _adam(problem: Problem, params: list[Tensor]) -> torch.optim.Adam:
    opt = torch.optim.Adam(params, foreach=True, **ADAM)
    m, v = _moments(problem)
    for p, mp, vp in zip(params, m, v):
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": mp, "exp_avg_sq": vp}
    return opt


def _eager_math(x: Tensor, target: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Forward, the layer's and the SG's gradients (assigned to ``.grad``); returns ``(h, dx, loss)``."""
    weight, bias, sg_w, sg_b = params[0], params[1], params[2::2], params[3::2]
    batch = x.shape[0]
    pre = torch.addmm(bias, x, weight.t())
    h = torch.relu(pre)
    z = [h]
    for i, (w, b) in enumerate(zip(sg_w, sg_b)):
        a = torch.addmm(b, z[-1], w.t())
        z.append(torch.relu(a) if i < len(sg_w) - 1 else a)
    prediction = z.pop()
    grads = layer_backward(x, weight, pre, prediction, "relu", need_input_grad=True)
    error = prediction - target
    loss = (error * error).sum() / batch
    sg_grads, _ = sg_backward(error * (2.0 / batch), z, SGParams(tuple(sg_w), tuple(sg_b), None))
    weight.grad, bias.grad = grads.weight, grads.bias
    for p, g in zip(sg_w, sg_grads.weights):
        p.grad = g
    for p, g in zip(sg_b, sg_grads.biases):
        p.grad = g
    return h, grads.input, loss


def _eager_step(math_fn: Callable, opt: torch.optim.Optimizer, x: Tensor, target: Tensor,
                params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One eager-style step: ``math_fn`` (:func:`_eager_math`, or a compiled copy), ``opt.step()``, gradients freed."""
    with torch.no_grad():
        out = math_fn(x, target, params)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def _eager_params(problem: Problem) -> tuple[list[Tensor], torch.optim.Adam]:
    """Leaf copies of the problem's parameters and their Adam optimizer (for the eager and compiled variants)."""
    params = [p.clone().requires_grad_() for p in problem.params]
    return params, _adam(problem, params)


def make_eager(problem: Problem) -> Variant:
    """Plain eager PyTorch: explicit gradients, then ``torch.optim.Adam(foreach=True).step()``."""
    params, opt = _eager_params(problem)
    step = functools.partial(_eager_step, _eager_math, opt, problem.x, problem.target, params)
    return Variant("eager", step, params, "explicit grads + torch.optim.Adam(foreach=True)")


def make_compiled(problem: Problem, *, whole: bool = True) -> Variant:
    """``torch.compile`` of the eager step: with ``opt.step()`` (``whole``) or of the math alone."""
    params, opt = _eager_params(problem)
    if whole:
        step = functools.partial(torch.compile(_eager_step, dynamic=False), _eager_math, opt, problem.x, problem.target, params)
        return Variant("compiled", step, params, "torch.compile(step incl. opt.step())")
    math_fn = torch.compile(_eager_math, dynamic=False)
    step = functools.partial(_eager_step, math_fn, opt, problem.x, problem.target, params)
    return Variant("compiled", step, params, "torch.compile(math), opt.step() eager")


def make_gemm_floor(problem: Problem) -> Variant:
    """Only the step's GEMMs (:func:`gemm_shapes`), ``torch.mm`` into preallocated outputs."""
    gen = torch.Generator().manual_seed(1)
    B, N, dtype = problem.batch, problem.width, problem.dtype
    params = problem.clone_params()
    weight, sg_w = params[0], params[2::2]
    sizes = [N, *sg_hidden(problem.sg, N), N]
    L = len(sizes) - 1
    x = problem.x
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    h = torch.empty(B, N, dtype=dtype)
    a = [torch.empty(B, sizes[j + 1], dtype=dtype) for j in range(L)]
    delta, dW, dx = rnd(B, N), torch.empty(N, N, dtype=dtype), torch.empty(B, N, dtype=dtype)
    g = [rnd(B, sizes[j + 1]) * 0.01 for j in range(L)]  # the SG's back-propagated gradients (inputs here)
    g_below = [torch.empty(B, sizes[j], dtype=dtype) for j in range(L)]
    dWs = [torch.empty(sizes[j + 1], sizes[j], dtype=dtype) for j in range(L)]
    z = [h, *a[:-1]]  # the SG layers' inputs
    mm = torch.mm

    def step():
        mm(x, weight.t(), out=h)
        for j in range(L):
            mm(z[j], sg_w[j].t(), out=a[j])
        mm(delta.t(), x, out=dW)
        mm(delta, weight, out=dx)
        for j in reversed(range(L)):
            mm(g[j].t(), z[j], out=dWs[j])
            if j > 0:
                mm(g[j], sg_w[j], out=g_below[j])
        return h, dx

    return Variant("gemm_floor", step, params, "torch.mm(out=) on the step's GEMM shapes")


def make_variant(name: str, problem: Problem, **kwargs) -> Variant:
    makers = {"fused": make_fused, "eager": make_eager, "compiled": make_compiled, "gemm_floor": make_gemm_floor}
    if name == "fused_raw":
        return make_fused(problem, raw=True)
    return makers[name](problem, **kwargs)


# --------------------------------------------------------------------------------------------------
# The pytest benchmarks of the single ops (bench_dni_forward.py, bench_dni_update.py, bench_sg_regression.py)

BENCH_SHAPES = [(64, 256), (256, 512)]  #: ``(batch, width)`` of the single-op benchmarks


def backend_params() -> list:
    """The single-op benchmarks' ``backend`` values: ``"reference"``, and ``"cpu"`` where ``fastdni._C`` loaded."""
    import pytest  # here, not at the top: dni_step.py imports this module and runs without pytest

    skip = pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="fastdni._C (CPU kernels) did not load")
    return ["reference", pytest.param("cpu", marks=skip)]


def bench_inputs(batch: int, width: int, sg: str) -> tuple[Problem, FusedArgs]:
    """The problem (:func:`make_problem`) and a private copy of its fused-op arguments (:func:`fused_args`)."""
    problem = make_problem(batch, width, sg)
    return problem, fused_args(problem)


def reference_forward(problem: Problem, args: FusedArgs) -> ops.ForwardResult:
    """The reference backend's forward (relu, no autograd) on ``args``: what the update and regression ops consume."""
    with torch.no_grad():
        return ops.dni_forward(problem.x, args.weight, args.bias, args.sg, activation="relu", backend="reference")


def label_benchmark(benchmark, op: str, batch: int, width: int, backend: str, sg: Optional[str] = None) -> None:
    """Puts the run in the group ``op [sg] B=.. W=..`` (both backends of one shape) and records its parameters."""
    shape = f"B={batch} W={width}"
    benchmark.group = f"{op} {sg} {shape}" if sg else f"{op} {shape}"
    info = dict(batch=batch, width=width)
    if sg:
        info["sg"] = sg
    benchmark.extra_info.update(info, backend=backend, dtype="float32")


# --------------------------------------------------------------------------------------------------
# Peak memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (Kineto logs two lines to it per profile, from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_alloc_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes that ``fn()`` holds allocated at once on the c10 CPU allocator, its outputs included.

    Read from ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
    of the c10 CPU allocator, i.e. of every ATen tensor, whether PyTorch, Inductor's generated code or
    the fastdni C++ kernels made it. The running sum of the sizes of the blocks ``fn`` allocates
    (minus those it frees again), in time order, peaks at the step's transient working set (what it
    needs on top of the persistent parameters, moments and inputs). Not seen: memory that bypasses c10
    (MKL/oneDNN internal scratch, Python objects) and, possibly, tensors allocated on OpenMP worker
    threads, which do not carry the profiler's thread-local state (e.g. the fused dW GEMM's per-thread
    tile scratch, ~64 KiB each). ``None`` if the profiler gave no memory records.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # the profiler's internals moved
        return None
    live = peak = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak


def step_row_header(columns: Sequence[str], ratios: Sequence[str]) -> list[str]:
    """Header cells after a whole-step row's keys (``bench_cnn_step``, ``fcn_bn_step``): times, time ratios to
    ``fused``, peak memory, memory ratios to ``fused``, the equal-step check."""
    return [*(f"{c} ms" for c in columns), *(f"{c}/fused" for c in ratios),
            *(f"mem {c} MB" for c in columns), *(f"mem {c}/fused" for c in ratios), "check"]


def step_row_cells(row: dict, columns: Sequence[str], ratios: Sequence[str], ms_format: str = ".1f") -> list[str]:
    """The cells of :func:`step_row_header` for ``row`` (``ms``, ``memory`` in bytes and ``check`` per variant)."""
    ms, mem = row["ms"], row["memory"]

    def ratio(a: Optional[float], b: Optional[float]) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    cells = [format(ms[c], ms_format) if c in ms else "-" for c in columns]
    cells += [ratio(ms.get(c), ms.get("fused")) for c in ratios]
    cells += [f"{mem[c] / 2**20:.1f}" if mem.get(c) else "-" for c in columns]
    cells += [ratio(mem.get(c), mem.get("fused")) for c in ratios]
    cells.append("ok" if all(c["ok"] for c in row["check"].values()) else "MISMATCH " + str(row["check"]))
    return cells


def bench_device(opts, script: str) -> Optional[torch.device]:
    """A benchmark's ``--device`` as a device, its ``--threads`` applied; None, after saying why on stderr, where it
    asks for CUDA and torch sees no CUDA device (the caller exits 2)."""
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script}: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return None
    return device


# --------------------------------------------------------------------------------------------------
# A whole training step on the CPU or on CUDA (fcn_bn_step.py, bench_cnn_step.py)


def add_whole_step_args(parser) -> None:
    """``--device`` and ``--json``, the options a whole-step benchmark adds for ``benchmarks/gpu.sh``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda: the models and data there, fused on backend 'auto'")
    parser.add_argument("--json", metavar="PATH", help="write the title and the rows as JSON")


def device_name(device: torch.device) -> str:
    """What a table's title says the step ran on: ``CPU (n threads)`` or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


DO_BENCH = dict(warmup=25, rep=100)  #: ``triton.testing.do_bench``'s arguments in step_times_ms (dni_sg_step.py's)


def prepare_whole_step(device: torch.device) -> list[str]:
    """Prepares ``device`` for a whole-step benchmark; the lines that say how it measures there. Nothing on the CPU.

    On CUDA: a RuntimeError where ``backend="auto"`` would not run fp32 fused kernels (``fused_backend_blocker``: the
    ``fused`` column would time the reference ops); fp32 as IEEE products in every variant, TF32 off for cuBLAS and
    cuDNN (the ops' fp32 GEMMs are IEEE; cuDNN's convolutions default to TF32)."""
    if device.type != "cuda":
        return []
    blocker = ops.fused_backend_blocker("auto", device, torch.float32)
    if blocker is not None:
        raise RuntimeError(f"fused: backend 'auto' would not run fused kernels on {device}: {blocker}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    kernels = (f"the CUDA C++ kernels, Triton's for {', '.join(TRITON_ONLY_OPS)}" if ops.HAS_CUDA_KERNELS
               else "the Triton kernels")
    return [f"fused: backend 'auto' on CUDA: {kernels}",
            "fp32 IEEE in every variant (torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 off)",
            f"times: triton.testing.do_bench (mean ms, warmup {DO_BENCH['warmup']} ms, rep {DO_BENCH['rep']} ms); "
            "memory: the peak of torch.cuda's allocator over one step above what was allocated before it"]


def step_times_ms(steps: dict[str, Callable[[], object]], device: torch.device, reps: int, min_block_s: float,
                  budget_s: float) -> dict[str, float]:
    """Milliseconds per call of each of ``steps``: ``triton.testing.do_bench`` (mean; CUDA events, synchronised) on
    CUDA, else the median of ``dni_step.time_interleaved``'s samples (``reps``, ``min_block_s``, ``budget_s``: its)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: float(do_bench(step, **DO_BENCH)) for name, step in steps.items()}
    import dni_step  # here: it imports this module

    samples = dni_step.time_interleaved(steps, reps, min_block_s, budget_s)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def peak_step_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes that ``fn()`` holds allocated at once above what was allocated before it, its outputs included: on
    the CPU :func:`peak_alloc_bytes`; on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``."""
    if device.type != "cuda":
        return peak_alloc_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    del out
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def write_step_tables(opts, title: str, header: list[str], rows: list[dict], format_row: Callable[[dict], list[str]],
                      notes: list[str]) -> None:
    """A whole-step benchmark's ``--markdown`` (``# title``, the table, the rows' and the run's ``notes``) and
    ``--json`` (``title`` and ``rows``, as ``dni_sg_step.py`` and ``bench_copy_lstm_step.py`` write them)."""
    if opts.markdown:
        write_markdown_table(opts.markdown, f"# {title}", header, [format_row(r) for r in rows],
                             [*notes, *(n for r in rows for n in r["notes"])])
    if opts.json:
        with open(opts.json, "w") as f:
            f.write(json.dumps(dict(title=title, notes=notes, rows=rows), indent=1))


def write_markdown_table(path: str, title: str, header: list[str], cells: list[list[str]], notes: list[str]) -> None:
    """``path``: a markdown file with ``title``, one table (``header``, then a row per entry of ``cells``) and the
    sorted, de-duplicated ``notes`` as a list under it."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    notes = sorted(set(notes))
    with open(path, "w") as f:
        f.write("\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n")
