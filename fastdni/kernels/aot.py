"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, with no GPU: resource usage per variant.

Why: CI has no GPU. There the kernels run only under ``TRITON_INTERPRET=1``, which never compiles them, so a
config that fails to compile, spills registers to local memory or needs more shared memory than the GPU
has would otherwise first show up on a GPU machine, at autotuning time. ``triton.compile`` needs no driver
for a :class:`~triton.backends.compiler.GPUTarget`: this module compiles each *variant* (kernel, autotune
config, dtype, constexpr flags, launch specialisation) for a target and reads back what ``ptxas -v`` reports
for the cubin: registers, spill stores/loads, stack frame, plus Triton's shared-memory size.

A launch compiles more than its constexpr flags: Triton specialises on its arguments (``triton/runtime/jit.py``):
an int argument equal to 1 becomes a constexpr, other ints that are multiples of 16 and 16-byte-aligned
pointers get ``tt.divisibility=16`` (which lets loads vectorise). That changes register use a lot, so each
variant names the launch it models: pointers aligned (torch allocations are), unit strides of contiguous
operands as constexpr 1 (which strides depends on the call site: ``W`` or ``W.T``), and ``sizes`` either
``"aligned"`` (every size and row stride a multiple of 16) or ``"ragged"`` (none is: e.g. 1000 features),
the two kinds of cubin a real model gets.

:func:`compile_variant` compiles one variant and returns a :class:`CompileRecord`; :func:`variant_set` is the
set CI compiles (every autotune config of every kernel with its heaviest flags on one arch, plus one compile
of each other flag combination :mod:`fastdni.kernels.ops` launches); :func:`compile_all` runs a set in a process pool.
``tests/ops/test_triton_compile.py`` asserts that every variant compiles and none spills. As a script::

    python -m fastdni.kernels.aot [--arch 80 90] [--dtype fp32 bf16 fp16] [--sizes aligned ragged]
                                  [--kernel linear_act ...] [--jobs N] [--all] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import product
from multiprocessing import get_context
from typing import Iterable, Optional, Sequence

from fastdni.contract import ACTIVATION_CODES

__all__ = ["Variant", "CompileRecord", "ToolMissing", "KERNELS", "CALL_SITES", "ARCHS", "SHARED_LIMIT", "find_tool",
           "compile_variant", "variant_set", "compile_all", "format_table", "kernel_configs", "dtype_configs",
           "config_name"]

#: Targets CI compiles for (A100, H100). ``GPUTarget("cuda", 90, ...)`` compiles for sm_90a.
ARCHS = (80, 90)
#: The most dynamic shared memory one block may use (``cudaDevAttrMaxSharedMemoryPerBlockOptin``; A100, H100):
#: Triton refuses a launch whose kernel needs more ("out of resource: shared memory").
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = ("fp32", "bf16", "fp16")
SIZES = ("aligned", "ragged")


@dataclass(frozen=True)
class KernelInfo:
    """Where a kernel lives and how its non-constexpr arguments are typed: pointers (``*_ptr``) point to the
    variant's dtype unless listed in ``pointer_types``; ``stride_*`` and one-letter sizes are ints; every other
    runtime argument is an fp32 scalar. ``unit_strides``: the strides a launch on contiguous operands passes as 1."""

    module: str
    name: str
    unit_strides: tuple[str, ...]
    pointer_types: tuple[tuple[str, str], ...] = ()


KERNELS = {
    "linear_act": KernelInfo(
        "linear_act", "_linear_act_kernel",
        # x [M, K], weight [N, K], bias [N], U [N, C], labels [M], out/pre/addend/z [M, N], all contiguous
        unit_strides=("stride_xk", "stride_wk", "stride_b", "stride_uc", "stride_y", "stride_on"),
        pointer_types=(("y_ptr", "*i64"),)),
    "gemm_grad_step": KernelInfo(
        "grad_step", "_gemm_grad_step_kernel",
        unit_strides=("stride_gn", "stride_xk", "stride_y"),  # grad_out [B, N], input [B, K], labels [B]
        # the loss is of the step's dtype; its per-program partials fp32, their arrival counter int32
        pointer_types=(("y_ptr", "*i64"), ("partial_ptr", "*fp32"), ("counter_ptr", "*i32"))),
    "bias_grad_step": KernelInfo(
        "grad_step", "_bias_grad_step_kernel", unit_strides=("stride_gn",),
        pointer_types=(("partial_ptr", "*fp32"), ("counter_ptr", "*i32"))),
    "batch_norm_act": KernelInfo(
        "batch_norm", "_batch_norm_act_kernel", unit_strides=("stride_pn",),  # pre [B, N]
        pointer_types=(("mean_ptr", "*fp32"), ("var_ptr", "*fp32"))),  # the batch moments: fp32 scratch
    "batch_norm_act_update": KernelInfo(
        "batch_norm", "_batch_norm_act_update_kernel",
        unit_strides=("stride_hn", "stride_xn", "stride_pn", "stride_i")),  # h, xhat, prediction [B, N]; invstd [N]
}
#: linear_act called with ``weight=W.T`` (``dx = delta W``, the gradient through an SG layer): W.T is [K_in, N_out]
#: with strides (1, K_in), so ``stride_wn`` is the unit stride.
W_TRANSPOSED = ("stride_xk", "stride_wn", "stride_on")


@dataclass(frozen=True)
class Variant:
    """One compile: ``kernel`` (a key of :data:`KERNELS`), index ``config`` into its autotune configs, ``dtype``
    (``fp32``/``bf16``/``fp16``: every tensor but labels and the loss's scratch buffers), the constexpr ``flags`` other than the
    config's (a sorted tuple of ``(name, value)``), ``arch`` (80/90), ``sizes`` (``aligned``/``ragged``, see the
    module docstring), the call site's ``unit_strides`` (``None``: the kernel's default) and a ``label`` for tables."""

    kernel: str
    config: int
    dtype: str
    flags: tuple[tuple[str, object], ...]
    arch: int
    sizes: str = "aligned"
    unit_strides: Optional[tuple[str, ...]] = None
    label: str = ""


@dataclass
class CompileRecord:
    """Resource usage of one compiled variant (``error`` set, numbers ``-1``, when it did not compile)."""

    kernel: str
    config: str  # e.g. "128x128x32 w8 s3" (the config's block sizes, warps, stages)
    dtype: str
    flags: dict
    arch: int
    sizes: str
    label: str
    registers: int = -1
    shared: int = -1  # bytes of shared memory Triton allocates (what a launch checks against SHARED_LIMIT)
    spill_stores: int = -1  # bytes, as ptxas -v reports them
    spill_loads: int = -1
    stack: int = -1  # bytes of stack frame (spills live there)
    cubin_bytes: int = 0
    compile_s: float = 0.0
    error: Optional[str] = None
    ptxas_log: str = field(default="", repr=False)

    @property
    def spills(self) -> bool:
        return self.spill_stores != 0 or self.spill_loads != 0


class ToolMissing(RuntimeError):
    """ptxas or cuobjdump (shipped in Triton's wheel, ``triton/backends/nvidia/bin``) cannot be found or run."""


def find_tool(name: str) -> str:
    """Path of ``ptxas``/``cuobjdump`` as Triton resolves it (``TRITON_<NAME>_PATH``, else the copy in Triton's
    package); :class:`ToolMissing` if neither runs."""
    import triton

    default = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    try:
        return getattr(triton.knobs.nvidia, name).path
    except (RuntimeError, AttributeError) as e:
        raise ToolMissing(f"{name} not found: Triton looks for ${'TRITON_' + name.upper() + '_PATH'} or {default} "
                          f"(shipped with the triton wheel for Linux x86-64/aarch64) ({e})") from None


def _kernel(name: str):
    """The kernel's Autotuner (its ``.configs``) and the JITFunction under it."""
    import triton

    info = KERNELS[name]
    module = importlib.import_module(f"{__package__ or 'fastdni.kernels'}.{info.module}")
    tuner = getattr(module, info.name)
    if importlib.import_module(f"{module.__name__.rsplit('.', 1)[0]}._tiling").INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels were built with the interpreter's single config; "
                           "compile them in a process without it")
    fn = tuner
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # Autotuner / Heuristics wrap the JITFunction
    return tuner, fn


def kernel_configs(name: str) -> list:
    """The autotune configs (``triton.Config``) of kernel ``name``."""
    return list(_kernel(name)[0].configs)


def dtype_configs(name: str, dtype: str) -> list[int]:
    """Indices into :func:`kernel_configs` of the configs a launch of ``name`` on ``dtype`` operands tunes over
    (fastdni/kernels/_tiling.py ``for_dtype``: fp32 and bf16/fp16 have their own lists); the others never run on it."""
    for_dtype = importlib.import_module(f"{__package__ or 'fastdni.kernels'}._tiling").for_dtype
    configs = kernel_configs(name)
    kept = for_dtype(configs, dtype)
    return [i for i, c in enumerate(configs) if any(c is k for k in kept)]


def config_name(config) -> str:
    """``"128x128x32 w8 s3"``: a config's block sizes (in the kernel's order), warps and stages."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _signature(fn, info: KernelInfo, variant: Variant) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for :class:`~triton.compiler.ASTSource`, specialised as a launch of the
    variant would be (the rules of ``triton/runtime/jit.py`` and ``BaseBackend.get_int_specialization``)."""
    pointer_types = dict(info.pointer_types)
    unit = set(info.unit_strides if variant.unit_strides is None else variant.unit_strides)
    divisible = [["tt.divisibility", 16]]
    signature, constexprs, attrs = {}, dict(variant.flags), {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*" + variant.dtype)
            attrs[(i,)] = divisible  # torch allocations are 256-byte aligned
        elif name.startswith("stride_") or len(name) == 1:
            if name in unit:  # an int argument equal to 1 is compiled in as a constexpr
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if variant.sizes == "aligned":
                    attrs[(i,)] = divisible
        else:
            signature[name] = "fp32"  # float scalars are never specialised
    return signature, constexprs, attrs


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(log: str, kernel: str) -> tuple[int, int, int, int]:
    """``(registers, stack, spill stores, spill loads)`` of ``kernel`` from a ``ptxas -v`` log."""
    start = log.find(f"Function properties for {kernel}")
    body = log[start:] if start >= 0 else ""
    spills, regs = _SPILLS.search(body), _REGISTERS.search(body)
    if not (spills and regs):
        raise ValueError(f"no resource usage for {kernel} in the ptxas log:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), int(spills.group(3))


def _ptxas_usage(ptx: str, arch: int, kernel: str) -> tuple[str, tuple[int, int, int, int]]:
    """Run ptxas -v on ``ptx`` with the flags Triton's ``make_cubin`` uses; the log and its parsed usage."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    gpu = target.group(1) if target else f"sm_{arch}{'a' if arch >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [find_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stderr, _parse_ptxas(done.stderr, kernel)


def _cubin_usage(cubin: bytes, kernel: str) -> dict:
    """``{REG: n, STACK: n, SHARED: n, LOCAL: n}`` of ``kernel`` in ``cubin`` (``cuobjdump --dump-resource-usage``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([find_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True)
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", out.stdout)
    if out.returncode or not match:
        raise RuntimeError(f"cuobjdump found no function {kernel} in the cubin: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", match.group(1))}


def compile_variant(variant: Variant) -> CompileRecord:
    """Compile ``variant`` for ``GPUTarget("cuda", variant.arch, 32)`` (always afresh: the Triton cache is not
    read) and return its resource usage. A failed compile gives a record with ``error`` set instead of raising;
    a missing ptxas/cuobjdump raises :class:`ToolMissing`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    find_tool("ptxas"), find_tool("cuobjdump")
    info = KERNELS[variant.kernel]
    tuner, fn = _kernel(variant.kernel)
    config = tuner.configs[variant.config]
    record = CompileRecord(variant.kernel, config_name(config), variant.dtype, dict(variant.flags), variant.arch,
                           variant.sizes, variant.label)
    signature, constexprs, attrs = _signature(fn, info, variant)
    constexprs.update(config.kwargs)
    start = time.perf_counter()
    try:
        log = io.StringIO()
        # always_compile: a real compile (ptxas included) whatever the cache holds; dump_ptxas_log: Triton
        # prints the log of the ptxas run that made the cubin, which is where spills are reported.
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", variant.arch, 32),
                                    options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        record.compile_s = time.perf_counter() - start
        record.ptxas_log = log.getvalue()
        try:
            usage = _parse_ptxas(record.ptxas_log, fn.__name__)
        except ValueError:  # this Triton printed no log: run ptxas ourselves, with Triton's flags
            record.ptxas_log, usage = _ptxas_usage(kernel.asm["ptx"], variant.arch, fn.__name__)
        record.registers, record.stack, record.spill_stores, record.spill_loads = usage
        cubin = kernel.asm["cubin"]
        record.cubin_bytes = len(cubin)
        record.shared = int(kernel.metadata.shared)
        in_cubin = _cubin_usage(cubin, fn.__name__)
        if (in_cubin.get("REG"), in_cubin.get("STACK")) != (record.registers, record.stack):
            raise RuntimeError(f"the cubin's resource usage {in_cubin} differs from the ptxas log's "
                               f"(registers {record.registers}, stack {record.stack})")
    except ToolMissing:
        raise
    except Exception as e:  # reported per variant: the caller asserts on it
        record.compile_s = time.perf_counter() - start
        record.error = f"{type(e).__name__}: {str(e)[-3000:]}"
    return record


# ---------------------------------------------------------------------------------------------------------------
# The variants CI compiles: the flag combinations fastdni/kernels/ops.py launches.

ADAM = dict(IS_ADAM=True, HAS_WD=False, DECOUPLED=False, HAS_BUF=False, NESTEROV=False, FIRST_STEP=False)
ADAMW = dict(ADAM, HAS_WD=True, DECOUPLED=True)
SGD_MOMENTUM = dict(IS_ADAM=False, HAS_WD=True, DECOUPLED=False, HAS_BUF=True, NESTEROV=False, FIRST_STEP=False)
SGD = dict(SGD_MOMENTUM, HAS_WD=False, HAS_BUF=False)
_IDENTITY, _RELU, _TANH, _GELU, _LEAKY_RELU = (ACTIVATION_CODES[name] for name in ("identity", "relu", "tanh", "gelu",
                                                                                    "leaky_relu"))
_STORED, _DELTA, _ERROR = 0, 1, 2  # fastdni/kernels/prologue.py's GradSource modes (importing it imports triton)


def _la(act=_IDENTITY, bias=False, labels=False, addend=False, pre=False, deriv=0, grad=_STORED, grad_act=_IDENTITY):
    return dict(ACTIVATION=act, HAS_BIAS=bias, HAS_LABELS=labels, HAS_ADDEND=addend, SAVE_PRE=pre, OUT_DERIVATIVE=deriv,
                GRAD_MODE=grad, GRAD_ACTIVATION=grad_act)


def _gs(opt, grad=_STORED, grad_act=_IDENTITY, onehot=False, bias=False, loss=False):
    return dict(GRAD_MODE=grad, GRAD_ACTIVATION=grad_act, ONEHOT_INPUT=onehot, HAS_BIAS=bias, HAS_LOSS=loss, **opt)


def _bs(opt, grad=_STORED, grad_act=_IDENTITY, loss=False):
    return dict(GRAD_MODE=grad, GRAD_ACTIVATION=grad_act, HAS_LOSS=loss, **opt)


#: Per kernel: ``(label, flags, unit strides or None, heaviest)``, the flag combinations fastdni/kernels/ops.py launches.
#: The heaviest (the most live values: prologue loads and math, epilogue loads and math, an Adam step) are compiled
#: with every autotune config of each dtype; each other one once, arch, dtype, sizes and config taken in turn.
#: Register allocation is not monotone in the flags (a lighter variant can spill where the heaviest does not), so
#: after changing a kernel or its configs, run ``python -m fastdni.kernels.aot --all`` (every site x config x
#: dtype x sizes x arch) once.
CALL_SITES = {
    "linear_act": [
        # Every epilogue input at once: bias, a label gather, a saved pre-activation and gelu (a superset of the
        # forward launches: gelu layers save pre, the first SG layer of a cDNI model gathers labels).
        ("fwd gelu+bias+labels+pre", _la(_GELU, bias=True, labels=True, pre=True), None, True),
        # dx = delta W, delta = prediction * act'(h or pre) formed as the tile is loaded (weight = W.T).
        # The heaviest prologue: two loads and gelu' per element of the A tile, pipelined.
        ("dx delta(gelu) @ W", _la(grad=_DELTA, grad_act=_GELU), W_TRANSPOSED, True),
        ("dx delta(relu) @ W", _la(grad=_DELTA, grad_act=_RELU), W_TRANSPOSED, False),
        ("dx delta(tanh) @ W", _la(grad=_DELTA, grad_act=_TANH), W_TRANSPOSED, False),
        # The gradient through an SG layer: the error (top layer) or a stored gradient, times relu'(z).
        ("sg grad error @ A *relu'", _la(deriv=_RELU, grad=_ERROR), W_TRANSPOSED, False),
        ("sg grad stored @ A *relu'", _la(deriv=_RELU), W_TRANSPOSED, False),
        ("fwd relu+bias", _la(_RELU, bias=True), None, False),
        ("fwd tanh+bias", _la(_TANH, bias=True), None, False),
        ("fwd identity+bias", _la(_IDENTITY, bias=True), None, False),
        ("fwd leaky_relu+bias", _la(_LEAKY_RELU, bias=True), None, False),
        ("sg relu+bias+labels", _la(_RELU, bias=True, labels=True), None, False),
        ("sg relu+bias+addend", _la(_RELU, bias=True, addend=True), None, False),
    ],
    "gemm_grad_step": [
        # The top SG layer's step: error formed in the prologue, bias step and loss reduced in the same pass, Adam.
        ("sg top error+bias+loss adam", _gs(ADAM, _ERROR, bias=True, loss=True), None, True),
        ("update delta(gelu)+bias adam", _gs(ADAM, _DELTA, _GELU, bias=True), None, False),
        ("dU onehot error adam", _gs(ADAM, _ERROR, onehot=True), None, False),
        ("sg top error+bias+loss sgd-m", _gs(SGD_MOMENTUM, _ERROR, bias=True, loss=True), None, False),
        ("update delta(relu)+bias adam", _gs(ADAM, _DELTA, _RELU, bias=True), None, False),
        ("update delta(relu)+bias sgd-m", _gs(SGD_MOMENTUM, _DELTA, _RELU, bias=True), None, False),
        ("update delta(tanh)+bias adamw", _gs(ADAMW, _DELTA, _TANH, bias=True), None, False),
        ("update delta(leaky_relu)+bias adam", _gs(ADAM, _DELTA, _LEAKY_RELU, bias=True), None, False),
        ("sg lower stored+bias adam", _gs(ADAM, bias=True), None, False),
        ("sg lower stored+bias sgd-m", _gs(SGD_MOMENTUM, bias=True), None, False),
        ("dU onehot stored sgd-m", _gs(SGD_MOMENTUM, onehot=True), None, False),
    ],
    "batch_norm_act": [
        ("gelu", dict(ACTIVATION=_GELU), None, True),
        ("relu", dict(ACTIVATION=_RELU), None, False),
        ("tanh", dict(ACTIVATION=_TANH), None, False),
        ("identity", dict(ACTIVATION=_IDENTITY), None, False),
    ],
    "batch_norm_act_update": [
        # gelu forms y = gamma xhat + beta again in both passes; Adam steps gamma and beta in the epilogue.
        ("gelu adam", dict(ACTIVATION=_GELU, **ADAM), None, True),
        ("relu adam", dict(ACTIVATION=_RELU, **ADAM), None, False),
        ("relu sgd-m", dict(ACTIVATION=_RELU, **SGD_MOMENTUM), None, False),
        ("tanh adamw", dict(ACTIVATION=_TANH, **ADAMW), None, False),
        ("leaky_relu sgd", dict(ACTIVATION=_LEAKY_RELU, **SGD), None, False),
    ],
    "bias_grad_step": [
        ("error+loss adam", _bs(ADAM, _ERROR, loss=True), None, True),
        ("delta(gelu) adam", _bs(ADAM, _DELTA, _GELU), None, False),
        ("error+loss sgd-m", _bs(SGD_MOMENTUM, _ERROR, loss=True), None, False),
        ("loss only (sgd, lr 0)", _bs(SGD, _ERROR, loss=True), None, False),
        ("stored adam", _bs(ADAM), None, False),
    ],
}


def _dtype_flags(kernel: str, dtype: str) -> dict:
    if kernel in ("bias_grad_step", "batch_norm_act", "batch_norm_act_update"):
        return {}  # no dot
    # IEEE fp32 products (torch's default, allow_tf32 off); bf16/fp16 take the native dot. UPCAST_DOT: interpreter only.
    return dict(ALLOW_TF32=dtype != "fp32", UPCAST_DOT=False)


def variant_set(archs: Sequence[int] = ARCHS, dtypes: Sequence[str] = ("fp32", "bf16"), sizes: Sequence[str] = SIZES,
                full: bool = False) -> list[Variant]:
    """The variants CI compiles: each heaviest call site of each kernel with every autotune config of each dtype,
    on the last of ``archs`` with the last of ``sizes`` (by default sm_90 and ragged sizes, where loads and stores
    are scalar and every element has its own address: where the spills showed); every other call site once, its
    arch, sizes, dtype and config taken in turn. ``full``: every call site with every config of every dtype, on
    every arch with both ``sizes``."""
    variants = []

    def add(kernel, label, flags, unit, picks):
        variants.extend(Variant(kernel, c, dtype, tuple(sorted({**flags, **_dtype_flags(kernel, dtype)}.items())),
                                arch, size, unit, label) for arch, dtype, size, c in picks)

    for kernel, sites in CALL_SITES.items():
        configs = {dtype: dtype_configs(kernel, dtype) for dtype in dtypes}
        turn = 0
        for label, flags, unit, heavy in sites:
            if full:
                add(kernel, label, flags, unit, [(a, d, z, c) for a, d, z in product(archs, dtypes, sizes) for c in configs[d]])
            elif heavy:
                add(kernel, label, flags, unit, [(archs[-1], d, sizes[-1], c) for d in dtypes for c in configs[d]])
            else:
                arch, size = archs[turn % len(archs)], sizes[turn // len(archs) % len(sizes)]
                dtype = dtypes[turn // (len(archs) * len(sizes)) % len(dtypes)]
                add(kernel, label, flags, unit, [(arch, dtype, size, configs[dtype][turn % len(configs[dtype])])])
                turn += 1
    return variants


def _init_worker() -> None:
    # One compile per core: ptxas and LLVM are single-threaded; keep torch's intra-op pool out of the way.
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)


def compile_all(variants: Iterable[Variant], jobs: Optional[int] = None) -> list[CompileRecord]:
    """:func:`compile_variant` for each variant, in ``jobs`` processes (default: one per CPU core), in order."""
    variants = list(variants)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants)))
    find_tool("ptxas"), find_tool("cuobjdump")
    if jobs == 1:
        return [compile_variant(v) for v in variants]
    # Longest first, so the workers finish together; results come back in the given order.
    order = sorted(range(len(variants)), key=lambda i: _cost(variants[i]), reverse=True)
    records: list = [None] * len(variants)
    # spawn, not fork: the parent may hold torch's and MLIR's threads.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        for i, record in zip(order, pool.map(compile_variant, [variants[i] for i in order], chunksize=1)):
            records[i] = record
    return records


def _cost(variant: Variant) -> float:
    """A rough relative compile time: fp32 (FMA dot) and sm_90 compile slowest, then by tile size."""
    config = kernel_configs(variant.kernel)[variant.config]
    area = 1
    for k, v in config.kwargs.items():
        area *= v if k.startswith("BLOCK_") else 1
    return area * (4 if variant.dtype == "fp32" else 1) * (2 if variant.arch == 90 else 1)


def format_table(records: Sequence[CompileRecord]) -> str:
    """One line per record: kernel, call site, config, dtype, arch, sizes, registers, shared, spills, stack, time."""
    head = ("kernel", "call site", "config", "dtype", "arch", "sizes", "regs", "shared", "spill st/ld", "stack", "s")
    rows = [head]
    for r in records:
        usage = ("ERROR", "", "", "", "") if r.error else (
            str(r.registers), str(r.shared), f"{r.spill_stores}/{r.spill_loads}", str(r.stack), f"{r.compile_s:.1f}")
        rows.append((r.kernel, r.label, r.config, r.dtype, f"sm_{r.arch}", r.sizes) + usage)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 6 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    failed = [r for r in records if r.error]
    spilled = [r for r in records if not r.error and r.spills]
    over = [r for r in records if not r.error and r.shared > SHARED_LIMIT[r.arch]]
    lines.append(f"{len(records)} variants: {len(failed)} failed to compile, {len(spilled)} spill, "
                 f"{len(over)} over the shared-memory limit; max registers "
                 f"{max((r.registers for r in records if not r.error), default=0)}")
    for r in failed:
        lines.append(f"FAILED {r.kernel} [{r.label}] {r.config} {r.dtype} sm_{r.arch} {r.sizes}: {r.error.splitlines()[0]}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdni.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU cores)")
    parser.add_argument("--all", action="store_true", help="every call site with every config (slow)")
    parser.add_argument("--json", metavar="PATH", help="also write the records to PATH as JSON")
    args = parser.parse_args(argv)
    variants = [v for v in variant_set(args.arch, args.dtype, args.sizes, full=args.all) if v.kernel in args.kernel]
    start = time.perf_counter()
    records = compile_all(variants, args.jobs)
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in asdict(r).items() if k != "ptxas_log"} for r in records], f, indent=1)
    print(f"compiled in {time.perf_counter() - start:.0f} s")
    bad = [r for r in records if r.error or r.spills or r.shared > SHARED_LIMIT[r.arch]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
