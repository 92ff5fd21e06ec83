"""One DNI layer step on a GPU: the Triton and CUDA C++ backends against eager PyTorch, torch.compile and the GEMM floor.

Usage::

    python benchmarks/gpu_step.py                                 # batch 64..4096 x width 256..4096, linear/mlp, fp32/bf16
    python benchmarks/gpu_step.py --quick                         # batch 64, width 256, fp32 (smoke test)
    python benchmarks/gpu_step.py --batch 256 --width 1024 --sg mlp --dtype bf16
    python benchmarks/gpu_step.py --json out.json --markdown out.md
    TRITON_INTERPRET=1 python benchmarks/gpu_step.py --quick --device cpu   # the Triton interpreter (plumbing only)

The step and the variants are those of ``benchmarks/common.py`` on the chosen device and dtype (parameters, Adam
moments and activations all of that dtype): ``triton`` (the three public ops with ``backend="triton"``),
``eager`` (explicit gradients + ``torch.optim.Adam(foreach=True)``), ``compiled`` (``torch.compile`` of eager,
``opt.step()`` included) and ``gemm_floor`` (the step's GEMMs alone, ``torch.mm`` into preallocated outputs).
On a GPU with fastdni._C built with its CUDA kernels (``fastdni.ops.HAS_CUDA_KERNELS``), ``cuda`` runs the same
three ops with ``backend="cuda"`` (csrc/cuda), checked, counted and timed like ``triton`` (columns ``cuda ms``,
``c/floor``, ``c/t`` = cuda / triton, ``launch c``; ``--skip cuda`` leaves it out).
Every variant updates its own parameters in place on each call, so each call is a full step.

How a row is checked, counted and timed, and the targets: docs/performance.md ("The benchmark scripts").
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import cost_model  # noqa: E402
import dni_step  # noqa: E402

BACKEND = "triton"  #: the backend the ``triton`` variant runs
BATCHES = (64, 256, 1024, 4096)
WIDTHS = (256, 512, 1024, 2048, 4096)
DTYPES = ("fp32", "bf16")
QUICK = dict(batch=(64,), width=(256,), dtype=("fp32",))
VARIANTS = ("triton", "eager", "compiled", "gemm_floor")
CUDA_VARIANT = "cuda"  #: the CUDA C++ backend, where this install has it (:func:`has_cuda_backend`)
#: Equal-work check (:func:`check_equal_step`), against an fp64 step: ``rms``, the root mean square of the update
#: error relative to that of the update (the bulk); ``max``, the largest update error relative to the largest
#: update, and the largest output error relative to the largest output (or EAGER_ERROR_FACTOR times eager's own,
#: where larger). fp32 sees summation order only: on an H200 Triton's blocked fp32 sums over K = 2048 and 4096 gave
#: the largest update error 2.1x and 2.4x cuBLAS's (1.6e-4 and 3.7e-4, rms 4e-6 and 8e-6), where a wrong term is O(1). In bf16/fp16 every stored value is rounded (eager also rounds every intermediate),
#: and a weight-gradient element summed with cancellation over the batch moves by percents of the largest
#: update: eager's own largest bf16 error reaches 0.6 at B = 4096 (CPU), its rms error stays below 1%.
CHECK_TOL = {"fp32": dict(rms=1e-4, max=1e-4), "bf16": dict(rms=2e-2, max=5e-2), "fp16": dict(rms=1e-2, max=2e-2)}
EAGER_ERROR_FACTOR = 4.0
MIN_EXP_AVG_SQ = 1e-6  #: added to the problem's Adam second moments (see :func:`device_problem`)
LAUNCH_TARGET = cost_model.LAUNCH_TARGET
BYTES_TARGET = cost_model.BYTES_TARGET
EAGER_TARGET, EAGER_MAX_BATCH = 2.0, 256
FLOOR_TARGET, FLOOR_MIN_WIDTH = 1.15, 1024
CUDA_LAUNCH_TARGET, CUDA_FLOOR_TARGET = 4, 1.10
TARGETS = ("launches", "bytes", "eager2x", "compiled", "floor", "cuda_launches", "cuda_floor")


# --------------------------------------------------------------------------------------------------
# Variants on a device


def device_problem(batch: int, width: int, sg: str, dtype: str, device: torch.device) -> common.Problem:
    """:func:`common.make_problem` (seeded on the CPU, the same values on any device) moved to ``device``, with
    the second moments raised by :data:`MIN_EXP_AVG_SQ`.

    Why raised: ``make_problem`` draws them from ``U(0, 1e-6)``, so a few are near zero. There Adam's update
    divides by the root of a tiny gradient formed with cancellation, and any two implementations (bf16 eager
    against fp64 eager, too) differ by tens of percent of the largest update: the equal-work check would
    compare noise. (In fp16 they also underflow and eager's step turns infinite.) The time does not depend
    on the values."""
    problem = common.make_problem(batch, width, sg, dtype=cost_model.DTYPES[dtype])
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return dataclasses.replace(problem, x=problem.x.to(device), target=problem.target.to(device), params=move(problem.params),
                               exp_avg=move(problem.exp_avg), exp_avg_sq=[(v + MIN_EXP_AVG_SQ).to(device) for v in problem.exp_avg_sq])


def make_ops_variant(problem: common.Problem, backend: str = BACKEND) -> common.Variant:
    """The three public ops with ``backend`` (what a user calls, argument checks included); Adam's step count
    advances with every call, as in :func:`common.make_fused`."""
    import fastdni.ops as ops

    args = common.fused_args(problem)
    x, target, weight, bias, sg = problem.x, problem.target, args.weight, args.bias, args.sg
    count = itertools.count(1)

    def step():
        hyper = [*args.hyper[:-1], float(next(count))]
        f = ops.dni_forward(x, weight, bias, sg, activation="relu", backend=backend)
        dx = ops.dni_update_(x, weight, bias, f, "adam", hyper, args.layer_state, activation="relu", need_input_grad=True,
                             backend=backend)
        loss = ops.sg_regression_(f, target, sg, "adam", hyper, args.sg_state, backend=backend)
        return f.h, dx, loss

    return common.Variant(backend, step, args.params, f"fastdni.ops, backend={backend!r}")


def has_cuda_backend(device: torch.device) -> bool:
    """Whether the ``cuda`` variant runs: a CUDA device and fastdni._C built with csrc/cuda."""
    import fastdni.ops as ops

    return device.type == "cuda" and ops.HAS_CUDA_KERNELS


def _operand(rows: int, cols: int, transposed: bool, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random ``[rows, cols]`` GEMM operand, a transposed view where the step's operand is one (``A^T``)."""
    shape = (cols, rows) if transposed else (rows, cols)
    t = torch.randn(shape, generator=gen, dtype=like.dtype).to(like.device)
    return t.t() if transposed else t


def make_gemm_floor(problem: common.Problem) -> common.Variant:
    """The step's GEMMs (:func:`common.gemm_shapes`) alone, ``torch.mm`` into preallocated outputs, on the
    problem's device and dtype, each operand laid out as in the step (``W^T``, ``delta^T`` are transposed views)."""
    gen = torch.Generator().manual_seed(1)
    mats = []
    for name, m, n, k in common.gemm_shapes(problem):
        lhs, rhs = name.split(" = ")[1].split()  # e.g. "dW = delta^T x": delta^T is a transposed view
        a = _operand(m, k, lhs.endswith("^T"), problem.x, gen)
        b = _operand(k, n, rhs.endswith("^T"), problem.x, gen)
        mats.append((a, b, problem.x.new_empty(m, n)))

    def step():
        for a, b, c in mats:
            torch.mm(a, b, out=c)
        return mats[0][2]

    return common.Variant("gemm_floor", step, [], "torch.mm(out=) on the step's GEMM shapes and layouts")


def make_compiled(problem: common.Problem) -> common.Variant:
    """:func:`common.make_compiled` after its first (compiling) call; the math alone if the whole step fails to compile."""
    try:
        variant = common.make_compiled(problem)
        variant.step()
    except Exception as error:  # noqa: BLE001  torch.compile of opt.step() failed: compile the math only
        print(f"  torch.compile of the whole step failed ({type(error).__name__}: {error}); compiling the math only", file=sys.stderr)
        torch._dynamo.reset()
        variant = common.make_compiled(problem, whole=False)
        variant.step()
    return variant


# --------------------------------------------------------------------------------------------------
# Equal work


def update_errors(new: torch.Tensor, want: torch.Tensor, old: torch.Tensor) -> tuple[float, float]:
    """``(largest, rms)`` of ``|(new - old) - (want - old)|`` beyond 2 ulps of the parameter (the rounding of the
    stored value, at the larger of ``|old|`` and ``|want|``), relative to the largest ``|want - old|`` and to the
    root mean square of ``want - old``."""
    got, ref = new.detach().double() - old.double(), want.detach().double() - old.double()
    slack = 2 * torch.finfo(old.dtype).eps * torch.maximum(old.double().abs(), want.detach().double().abs())
    excess = ((got - ref).abs() - slack).clamp_min(0)
    largest, norm = ref.abs().max().item(), ref.norm().item()
    return (excess.max().item() / largest if largest > 0 else excess.max().item(),
            excess.norm().item() / norm if norm > 0 else excess.norm().item())


def output_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want|`` relative to the largest ``|want|``."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def _as_fp64(problem: common.Problem) -> common.Problem:
    up = lambda ts: [t.double() for t in ts]  # noqa: E731
    return dataclasses.replace(problem, dtype=torch.float64, x=problem.x.double(), target=problem.target.double(),
                               params=up(problem.params), exp_avg=up(problem.exp_avg), exp_avg_sq=up(problem.exp_avg_sq))


def _errors(variant: common.Variant, out, truth: common.Variant, truth_out, problem: common.Problem) -> dict:
    params = [update_errors(g, w, p0) for g, w, p0 in zip(variant.params, truth.params, problem.params)]
    return dict(params_max=max(e[0] for e in params), params_rms=max(e[1] for e in params),
                outputs=max(output_error(g, w) for g, w in zip(out, truth_out)))


def check_equal_step(problem: common.Problem, triton_v: common.Variant, eager_v: common.Variant, tol: dict) -> dict:
    """One step of ``triton`` and ``eager`` from the same initial state, and of eager in fp64 from that state
    upcast (the truth both are measured against): errors of the parameter updates and of ``(h, dx, loss)``.

    ``ok`` when triton's result is finite, its updates' rms error is at most ``tol["rms"]``, and its largest
    update and output errors are at most ``tol["max"]`` or ``EAGER_ERROR_FACTOR`` times eager's own (where finite)."""
    truth = common.make_eager(_as_fp64(problem))
    out = {"triton": triton_v.step(), "eager": eager_v.step(), "fp64": truth.step()}
    triton_err = _errors(triton_v, out["triton"], truth, out["fp64"], problem)
    eager_err = _errors(eager_v, out["eager"], truth, out["fp64"], problem)
    vs_eager = _errors(triton_v, out["triton"], eager_v, out["eager"], problem)
    finite = all(bool(torch.isfinite(t).all()) for t in [*triton_v.params, *out["triton"]])
    allowed = {k: max(tol["max"], EAGER_ERROR_FACTOR * e) if math.isfinite(e) else tol["max"] for k, e in eager_err.items()}
    allowed["params_rms"] = tol["rms"]
    ok = finite and all(triton_err[k] <= allowed[k] for k in triton_err)
    return dict(ok=ok, finite=finite, allowed=allowed, triton_vs_fp64=triton_err, eager_vs_fp64=eager_err, triton_vs_eager=vs_eager)


# --------------------------------------------------------------------------------------------------
# Launches and timing


def cuda_kernels(fn: Callable[[], object]) -> dict[str, int]:
    """The CUDA kernels one call of ``fn`` launches, by name (``torch.profiler``; memcpy/memset not counted)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with common._quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for e in prof.events():
        kind = getattr(e, "activity_type", None)
        is_kernel = kind == "kernel" if kind else not e.name.startswith(("Memcpy", "Memset"))
        if e.device_type == DeviceType.CUDA and is_kernel:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def triton_cpu_launches(fn: Callable[[], object]) -> Optional[dict[str, int]]:
    """``fastdni.kernels.launch_counter()`` around one call (the interpreter has no CUDA kernels to profile)."""
    try:
        from fastdni.kernels import launch_counter
    except ImportError:
        return None
    with launch_counter() as count:
        fn()
    return dict(count.by_name)


def count_launches(variants: dict[str, common.Variant], device: torch.device) -> dict:
    """``{variant: {"total", "by_name", "kind"}}``: CUDA kernels on a GPU; on the CPU triton's launch counter and
    eager's ATen ops with work (``kind="aten"``)."""
    out = {}
    for name, v in variants.items():
        if device.type == "cuda":
            counts, kind = cuda_kernels(v.step), "cuda kernels"
        elif name == "triton":
            counts, kind = triton_cpu_launches(v.step), "launch_counter"
        elif name == "eager":
            counts, kind = dict(cost_model.profiled_kernels(v.step)), "aten"
        else:
            continue
        out[name] = dict(total=None if counts is None else sum(counts.values()), by_name=counts, kind=kind)
    return out


def time_variants(variants: dict[str, common.Variant], device: torch.device, opts: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per step of each variant: ``do_bench`` on CUDA, a perf_counter loop (median) on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: float(do_bench(v.step, warmup=opts.warmup, rep=opts.rep)) for name, v in variants.items()}
    samples = dni_step.time_interleaved({name: v.step for name, v in variants.items()}, opts.cpu_reps, 0.0, 1e9)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


# --------------------------------------------------------------------------------------------------
# One row


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _at_most(value: Optional[float], limit: float, applies: bool = True) -> Optional[bool]:
    return None if not applies or value is None else value <= limit


def check_targets(row: dict, *, timed: bool = True) -> dict[str, Optional[bool]]:
    """``True`` (met), ``False`` (missed) or ``None`` (the target does not apply, or was not measured).

    ``timed=False`` (the interpreter on the CPU): the times say nothing about a GPU, so the speed targets are ``None``."""
    ratio = row["ratios"] if timed else dict.fromkeys(row["ratios"])
    compiled = ratio["triton/compiled"]
    return {
        "launches": _at_most(row["launches"].get("triton", {}).get("total"), LAUNCH_TARGET),
        "bytes": row["model"]["fastdni_ratio"] <= BYTES_TARGET,
        "eager2x": _at_most(ratio["triton/eager"], 1 / EAGER_TARGET, row["batch"] <= EAGER_MAX_BATCH),
        "compiled": None if compiled is None else compiled < 1.0,
        "floor": _at_most(ratio["triton/gemm_floor"], FLOOR_TARGET, row["width"] >= FLOOR_MIN_WIDTH),
        "cuda_launches": _at_most(row["launches"].get(CUDA_VARIANT, {}).get("total"), CUDA_LAUNCH_TARGET),
        "cuda_floor": _at_most(ratio.get("cuda/gemm_floor"), CUDA_FLOOR_TARGET, row["width"] >= FLOOR_MIN_WIDTH),
    }


def _build(problem: common.Problem, skip: set[str], notes: list[str]) -> dict[str, common.Variant]:
    """The row's variants, each with its own copy of the initial state; ``compiled`` already compiled, or left out
    (with a note) where torch.compile fails: that is no fault of the Triton path, the row goes on."""
    torch._dynamo.reset()  # a fresh compile per row (dynamic=False recompiles per shape anyway)
    makers = {"triton": make_ops_variant, "eager": common.make_eager, "gemm_floor": make_gemm_floor}
    variants = {name: makers[name](problem) for name in VARIANTS if name not in skip and name != "compiled"}
    if CUDA_VARIANT not in skip and has_cuda_backend(problem.x.device):
        variants[CUDA_VARIANT] = make_ops_variant(problem, "cuda")
    if "compiled" not in skip:
        try:
            variants["compiled"] = make_compiled(problem)
            notes.append(variants["compiled"].note)
        except Exception as error:  # noqa: BLE001
            notes.append(f"compiled left out: torch.compile failed ({type(error).__name__}: {error})")
    return variants


def _failed(row: dict, why: str) -> dict:
    print(f"  FAILED {row['sg']} {row['dtype']} B={row['batch']} W={row['width']}: {why}", flush=True)
    return dict(row, status="failed", error=why)


def run_row(batch: int, width: int, sg: str, dtype: str, device: torch.device, opts: argparse.Namespace, peak: cost_model.Peak) -> dict:
    """Everything one row reports (times in ms); ``status`` ``"failed"`` (and no times) where the triton step
    raised or did not compute the eager step's update."""
    step = cost_model.Step(batch, width, sg, dtype)
    row = dict(sg=sg, dtype=dtype, batch=batch, width=width, model=cost_model.summary(step, peak), ms={}, launches={},
               ratios={}, check={}, notes=[])
    problem = device_problem(batch, width, sg, dtype, device)
    try:
        variants = _build(problem, opts.skip, row["notes"])
        row["check"] = check_equal_step(problem, variants["triton"], variants["eager"], CHECK_TOL[dtype])
    except Exception as error:  # noqa: BLE001  a row that cannot run is reported, the grid goes on
        return _failed(row, f"{type(error).__name__}: {error}")
    if not row["check"]["ok"]:
        return _failed(row, f"the triton step is off: {row['check']}")
    if CUDA_VARIANT in variants:  # against an eager step of its own, from the same initial state
        try:
            row["check_cuda"] = check_equal_step(problem, variants[CUDA_VARIANT], common.make_eager(problem), CHECK_TOL[dtype])
        except Exception as error:  # noqa: BLE001
            return _failed(row, f"the cuda step raised {type(error).__name__}: {error}")
        if not row["check_cuda"]["ok"]:
            return _failed(row, f"the cuda step is off: {row['check_cuda']}")
    row["launches"] = count_launches(variants, device)
    row["ms"] = time_variants(variants, device, opts)
    t = row["ms"]
    row["ratios"] = {f"triton/{name}": _ratio(t["triton"], t.get(name)) for name in VARIANTS[1:]}
    if CUDA_VARIANT in t:
        row["ratios"].update({f"cuda/{name}": _ratio(t[CUDA_VARIANT], t.get(name)) for name in VARIANTS})
    seconds = t["triton"] * 1e-3
    row["triton_GBps"] = row["model"]["compulsory_bytes"] / seconds / 1e9
    row["triton_TFLOPs"] = row["model"]["flops"] / seconds / 1e12
    row["triton/roofline"] = seconds / row["model"]["roofline_s"] if device.type == "cuda" else None
    row["targets"] = check_targets(row, timed=device.type == "cuda")
    row["status"] = "ok"
    return row


# --------------------------------------------------------------------------------------------------
# Report

COLUMNS = ("sg", "dtype", "B", "W", "triton ms", "eager ms", "compiled ms", "floor ms", "t/eager", "t/comp", "t/floor",
           "t/roof", "GB/s", "TFLOP/s", "launch t/e", "bytes x", "cuda ms", "c/floor", "c/t", "launch c", *TARGETS)


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _verdict(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("met" if ok else "missed")


def _launches(row: dict) -> str:
    get = lambda name: row["launches"].get(name, {}).get("total")  # noqa: E731
    aten = " (aten)" if row["launches"].get("eager", {}).get("kind") == "aten" else ""
    return f"{_fmt(get('triton'), 'd')}/{_fmt(get('eager'), 'd')}{aten}"


def format_row(row: dict) -> list[str]:
    head = [row["sg"], row["dtype"], str(row["batch"]), str(row["width"])]
    if row["status"] != "ok":
        return head + ["FAILED"] + [""] * (len(COLUMNS) - len(head) - 1)
    t, r = row["ms"], row["ratios"]
    return head + [_fmt(t.get(n), ".4f") for n in VARIANTS] + [_fmt(r[f"triton/{n}"], ".2f", "x") for n in VARIANTS[1:]] + [
        _fmt(row["triton/roofline"], ".2f", "x"), f"{row['triton_GBps']:.1f}", f"{row['triton_TFLOPs']:.2f}", _launches(row),
        f"{row['model']['fastdni_ratio']:.2f}x", _fmt(t.get(CUDA_VARIANT), ".4f"), _fmt(r.get("cuda/gemm_floor"), ".2f", "x"),
        _fmt(r.get("cuda/triton"), ".2f", "x"), _fmt(row["launches"].get(CUDA_VARIANT, {}).get("total"), "d")] + [
        _verdict(row["targets"][k]) for k in TARGETS]


def summarize(rows: list[dict]) -> list[str]:
    """Per target, on how many rows it was met of those it applies to, and the misses; the failed rows."""
    lines = []
    ok = [r for r in rows if r["status"] == "ok"]
    for target in TARGETS:
        applies = [r for r in ok if r["targets"][target] is not None]
        missed = [f"{r['sg']}/{r['dtype']} B={r['batch']} W={r['width']}" for r in applies if not r["targets"][target]]
        missed_list = f"; missed: {', '.join(missed)}" if missed else ""
        lines.append(f"{target}: met on {len(applies) - len(missed)} of {len(applies)} rows{missed_list}")
    failed = [f"{r['sg']}/{r['dtype']} B={r['batch']} W={r['width']} ({r['error']})" for r in rows if r["status"] != "ok"]
    lines.append(f"failed rows: {len(failed)}" + (": " + "; ".join(failed) if failed else ""))
    return lines


def device_info(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                allow_tf32=torch.backends.cuda.matmul.allow_tf32, backend=BACKEND)


def header_lines(info: dict, peak: cost_model.Peak, device: torch.device, opts: argparse.Namespace) -> list[str]:
    timing = (f"triton.testing.do_bench (mean, warmup {opts.warmup} ms, rep {opts.rep} ms, L2 flushed between calls)"
              if device.type == "cuda" else f"perf_counter loop, median of {opts.cpu_reps} (interpreter: not a speed)")
    return [f"device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}; "
            f"fp32 GEMMs {'TF32' if info['allow_tf32'] else 'IEEE'} (allow_tf32={info['allow_tf32']})",
            f"timing: {timing}; relu, Adam, dx on; all tensors of the row's dtype",
            f"roofline (t/roof, from benchmarks/cost_model.py): {peak.name}: {peak.note}"]


def markdown(rows: list[dict], header: list[str]) -> str:
    table = cost_model.format_table([format_row(r) for r in rows], COLUMNS, markdown=True)
    return "\n\n".join(["\n".join(f"- {line}" for line in header), table, "\n".join(f"- {line}" for line in summarize(rows))]) + "\n"


def _report(rows: list[dict], info: dict, peak: cost_model.Peak) -> dict:
    return dict(info, peak=dataclasses.asdict(peak), timing="do_bench mean ms" if info["device"] != "cpu (Triton interpreter)"
                else "perf_counter median ms", check_tol=CHECK_TOL, rows=rows)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help="batch 64, width 256, fp32 only (smoke test)")
    parser.add_argument("--batch", type=int, action="append", help="only this batch (repeatable; overrides --quick's)")
    parser.add_argument("--width", type=int, action="append", help="only this width (repeatable; overrides --quick's)")
    parser.add_argument("--sg", choices=common.SG_KINDS, action="append", help="only this SG kind (repeatable)")
    parser.add_argument("--dtype", choices=tuple(cost_model.DTYPES), action="append", help="only this dtype (repeatable)")
    parser.add_argument("--skip", choices=(*VARIANTS[1:], CUDA_VARIANT), action="append", default=[],
                        help="leave out this variant (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the device as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    parser.add_argument("--cpu-reps", type=int, default=3, help="timed calls per variant on the CPU (default 3)")
    opts = parser.parse_args(argv)
    opts.skip = set(opts.skip)
    return opts


def _grid(opts: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    base = QUICK if opts.quick else dict(batch=BATCHES, width=WIDTHS, dtype=DTYPES)
    batches, widths = opts.batch or base["batch"], opts.width or base["width"]
    return list(itertools.product(opts.sg or common.SG_KINDS, opts.dtype or base["dtype"], batches, widths))


def _device(opts: argparse.Namespace) -> torch.device:
    """The device, or a clear error: CUDA must be visible; the CPU needs the Triton interpreter."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (for the CPU plumbing run: TRITON_INTERPRET=1 ... --device cpu)")
    if opts.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the Triton kernels through the interpreter: set TRITON_INTERPRET=1 before starting python")
    return torch.device(opts.device)


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    device = _device(opts)
    if device.type == "cpu" and opts.quick and "compiled" not in opts.skip:
        opts.skip.add("compiled")
        print("note: --quick on the CPU leaves out `compiled` (torch.compile takes tens of seconds per row here)")
    info = device_info(device)
    peak = cost_model.peak_for(info["device"])
    header = header_lines(info, peak, device, opts)
    print("\n".join(header), flush=True)
    rows, t_start = [], time.perf_counter()
    for sg, dtype, batch, width in _grid(opts):
        row = run_row(batch, width, sg, dtype, device, opts, peak)
        rows.append(row)
        if opts.json:  # after every row: a run stopped at a time limit keeps what it measured
            Path(opts.json).write_text(json.dumps(_report(rows, info, peak), indent=1) + "\n")
        if row["status"] == "ok":
            cuda = f", cuda {row['ms'][CUDA_VARIANT]:.4f} ms" if CUDA_VARIANT in row["ms"] else ""
            print(f"  {sg} {dtype} B={batch} W={width}: triton {row['ms']['triton']:.4f} ms{cuda}", flush=True)
    print()
    print(cost_model.format_table([format_row(r) for r in rows], COLUMNS))
    print("t/x = triton time / x time (< 1: triton faster); t/roof = triton / roofline floor; GB/s, TFLOP/s: compulsory "
          "bytes and GEMM flops per triton step time; launch t/e: per step, triton/eager; bytes x: modelled triton bytes / compulsory")
    print("\n".join(summarize(rows)))
    notes = sorted({n for r in rows for n in r["notes"]})
    if notes:
        print("notes: " + "; ".join(notes))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if opts.json:
        Path(opts.json).write_text(json.dumps(_report(rows, info, peak), indent=1) + "\n")
        print(f"wrote {opts.json}")
    if opts.markdown:
        Path(opts.markdown).write_text(markdown(rows, header))
        print(f"wrote {opts.markdown}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
