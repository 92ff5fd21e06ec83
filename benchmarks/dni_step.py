"""One full DNI layer step: the fused CPU ops against eager PyTorch, torch.compile and the GEMM floor.

Usage::

    python benchmarks/dni_step.py                      # batch 64/256/1024 x width 256..2048, linear and MLP SG
    python benchmarks/dni_step.py --quick              # batch 64, width 256 only (smoke test)
    python benchmarks/dni_step.py --markdown out.md    # also write the table as markdown

What one step is and the variants: ``benchmarks/common.py``; how a row is measured, the roofline and the targets:
docs/performance.md ("The benchmark scripts").
"""
from __future__ import annotations

import argparse
import gc
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

BATCHES = (64, 256, 1024)
WIDTHS = (256, 512, 1024, 2048)
QUICK = ((64, 256),)
FLOOR_TARGET = 1.10  # fused / gemm_floor, at width >= FLOOR_MIN_WIDTH
FLOOR_MIN_WIDTH = 512
EAGER_TARGET = 2.0  # eager / fused, at EAGER_SHAPE
EAGER_SHAPE = (64, 256)
MATCH_TOL = 1e-3  # the equal-work check: relative difference of the parameter updates and outputs


# --------------------------------------------------------------------------------------------------
# Measurement


def measure_bandwidth(nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    """Streaming bandwidth in bytes/s: ``dst.copy_(src)`` over ``nbytes`` (far larger than the
    last-level cache), counted as ``2 * nbytes`` moved (read + write, as STREAM's copy counts it), best of ``reps``:
    the floor wants the bandwidth the machine can reach, not a typical one."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def time_interleaved(steps: dict[str, Callable[[], object]], reps: int, min_block_s: float, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each step, one sample per repetition, the variants timed round-robin.

    ``reps`` is lowered (not below 5) where ``reps`` rounds would take more than ``budget_s``."""
    calls, per_round = {}, 0.0
    for name, fn in steps.items():  # calibration (also one more warm-up call)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        calls[name] = max(1, math.ceil(min_block_s / max(dt, 1e-7)))
        per_round += dt * calls[name]
    reps = max(min(reps, 5), min(reps, int(budget_s / max(per_round, 1e-9))))
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn, n = steps[name], calls[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / scale if scale > 0 else diff


def first_steps(problem: common.Problem, variants: dict[str, common.Variant]) -> tuple[dict[str, float], dict[str, float]]:
    """Run every variant's first step (timed: it compiles ``compiled``); returns those times and, for
    each variant that updates parameters, the largest relative difference of its parameter updates and
    its outputs ``(h, dx, loss)`` from ``fused``'s (:data:`MATCH_TOL`-sized when the work is the same)."""
    first, outs = {}, {}
    for name, v in variants.items():
        t0 = time.perf_counter()
        outs[name] = v.step()
        first[name] = time.perf_counter() - t0
    errors = {}
    ref = variants["fused"]
    ref_updates = [p - p0 for p, p0 in zip(ref.params, problem.params)]
    for name, v in variants.items():
        if name in ("fused", "gemm_floor"):
            continue
        errs = [_rel(p - p0, u) for p, p0, u in zip(v.params, problem.params, ref_updates)]
        errs += [_rel(a.detach(), b) for a, b in zip(outs[name], outs["fused"])]
        errors[name] = max(errs)
    return first, errors


def build_variants(problem: common.Problem, *, raw: bool = False) -> tuple[dict[str, common.Variant], dict[str, float], dict[str, float]]:
    """The variants of one row, after their first (compiling, checked) step. ``compiled`` falls back to
    compiling the math alone if compiling the step with ``opt.step()`` fails."""
    torch._dynamo.reset()  # a fresh compile per row; the code object's recompile limit would otherwise be hit
    names = ["fused", "eager", "compiled", "gemm_floor"] + (["fused_raw"] if raw else [])
    variants = {name: common.make_variant(name, problem) for name in names}
    try:
        first, errors = first_steps(problem, variants)
    except Exception as error:  # noqa: BLE001  torch.compile of opt.step() failed: compile the math only
        print(f"  torch.compile of the whole step failed ({type(error).__name__}: {error}); compiling the math only", file=sys.stderr)
        torch._dynamo.reset()
        variants = {name: common.make_variant(name, problem) for name in names if name != "compiled"}
        variants["compiled"] = common.make_compiled(problem, whole=False)
        first, errors = first_steps(problem, variants)
    return variants, first, errors


def run_row(batch: int, width: int, sg: str, *, reps: int = 15, min_block_s: float = 0.02, budget_s: float = 8.0,
            bandwidth: Optional[float] = None, raw: bool = False, memory: bool = True) -> dict:
    """Everything one table row reports (times in seconds, memory in bytes)."""
    problem = common.make_problem(batch, width, sg)
    variants, first, errors = build_variants(problem, raw=raw)
    for v in variants.values():  # one more warm-up call each (the compiled step's second call may still specialise)
        v.step()
    samples = time_interleaved({name: v.step for name, v in variants.items()}, reps, min_block_s, budget_s)
    t = {name: statistics.median(s) for name, s in samples.items()}
    spread = max((_quantile(s, 0.75) - _quantile(s, 0.25)) / statistics.median(s) for s in samples.values())
    row = dict(
        sg=sg, batch=batch, width=width, time=t, reps=len(samples["fused"]), spread=spread,
        compile_s=max(0.0, first["compiled"] - t["compiled"]), max_err=max(errors.values()), errors=errors,
        compiled_note=variants["compiled"].note, flops=common.step_flops(problem), bytes=common.compulsory_bytes(problem),
    )
    row["traffic"] = row["bytes"] / bandwidth if bandwidth else float("nan")
    row["true_floor"] = max(t["gemm_floor"], row["traffic"]) if bandwidth else t["gemm_floor"]
    row["serial_floor"] = t["gemm_floor"] + row["traffic"] if bandwidth else t["gemm_floor"]
    row["memory"] = {name: common.peak_alloc_bytes(variants[name].step) for name in ("fused", "eager", "compiled")} if memory else {}
    row["targets"] = check_targets(row)
    return row


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def check_targets(row: dict) -> dict[str, Optional[bool]]:
    """``True`` (PASS), ``False`` (MISS) or ``None`` (the target does not apply to this row)."""
    t = row["time"]
    return {
        "floor": t["fused"] <= FLOOR_TARGET * t["gemm_floor"] if row["width"] >= FLOOR_MIN_WIDTH else None,
        "2x": t["eager"] >= EAGER_TARGET * t["fused"] if (row["batch"], row["width"]) == EAGER_SHAPE else None,
        "comp": t["fused"] < t["compiled"],
    }


# --------------------------------------------------------------------------------------------------
# Report

COLUMNS = ("sg", "B", "W", "fused ms", "eager ms", "compiled ms", "floor ms", "traffic ms", "f/eager", "f/comp", "f/floor",
           "f/overlap", "f/serial", "fused GF/s", "mem fused", "mem eager", "mem comp", "spread", "max err", "compile s",
           "floor", "2x", "comp")


def _mem(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n / 2**10:.0f}K"


def _verdict(v: Optional[bool]) -> str:
    return "-" if v is None else ("PASS" if v else "MISS")


def format_row(row: dict) -> list[str]:
    t, mem = row["time"], row["memory"]
    ms = lambda s: f"{s * 1e3:.3f}" if s == s else "nan"  # noqa: E731
    cells = [row["sg"], str(row["batch"]), str(row["width"]), ms(t["fused"]), ms(t["eager"]), ms(t["compiled"]),
             ms(t["gemm_floor"]), ms(row["traffic"]), f"{t['fused'] / t['eager']:.2f}x", f"{t['fused'] / t['compiled']:.2f}x",
             f"{t['fused'] / t['gemm_floor']:.2f}x", f"{t['fused'] / row['true_floor']:.2f}x",
             f"{t['fused'] / row['serial_floor']:.2f}x", f"{row['flops'] / t['fused'] / 1e9:.1f}",
             _mem(mem.get("fused")), _mem(mem.get("eager")), _mem(mem.get("compiled")), f"{row['spread'] * 100:.0f}%",
             f"{row['max_err']:.1e}", f"{row['compile_s']:.1f}"]
    return cells + [_verdict(row["targets"][k]) for k in ("floor", "2x", "comp")]


def misses(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        for name, ok in row["targets"].items():
            if ok is False:
                out.append(f"{name}: {row['sg']} B={row['batch']} W={row['width']}")
    return out


def print_table(rows: list[dict]) -> None:
    table = [list(COLUMNS)] + [format_row(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)), flush=True)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    missed = misses(rows)
    lines += ["", f"Misses ({len(missed)}):" if missed else "No misses.", ""]
    lines += [f"- {m}" for m in missed]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64, width 256 only, few repetitions (smoke test)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown to FILE")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 15, --quick 5)")
    parser.add_argument("--min-block", type=float, default=0.02, help="seconds per timed block of calls (default 0.02)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timing per row before reps are cut (default 8)")
    parser.add_argument("--sg", choices=common.SG_KINDS, action="append", help="only this SG kind (repeatable)")
    parser.add_argument("--batch", type=int, action="append", help="only this batch size (repeatable; overrides --quick's)")
    parser.add_argument("--width", type=int, action="append", help="only this width (repeatable; overrides --quick's)")
    parser.add_argument("--raw", action="store_true", help="add fused_raw: torch.ops.fastdni.* without the Python wrappers")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory profile")
    args = parser.parse_args(argv)
    if not common.ops.HAS_CPU_KERNELS:
        print("fastdni._C did not load: no fused CPU kernels to benchmark", file=sys.stderr)
        return 2

    shapes = QUICK if args.quick else [(b, w) for b in BATCHES for w in WIDTHS]
    if args.batch or args.width:
        shapes = [(b, w) for b in (args.batch or sorted({b for b, _ in shapes})) for w in (args.width or sorted({w for _, w in shapes}))]
    reps = args.reps or (5 if args.quick else 15)
    kinds = args.sg or list(common.SG_KINDS)
    load = os.getloadavg()[0]
    bandwidth = measure_bandwidth()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, relu, Adam, dx on; "
              f"streaming bandwidth {bandwidth / 1e9:.1f} GB/s; load average {load:.2f} at start")
    print(header, flush=True)
    if load > 0.5:
        print(f"warning: load average {load:.2f}: other jobs are running, the times are noisy", flush=True)
    rows = []
    t_start = time.perf_counter()
    for sg in kinds:
        for batch, width in shapes:
            row = run_row(batch, width, sg, reps=reps, min_block_s=args.min_block, budget_s=args.budget if not args.quick else 2.0,
                          bandwidth=bandwidth, raw=args.raw, memory=not args.no_memory)
            rows.append(row)
            extra = f", fused_raw {row['time']['fused_raw'] * 1e3:.3f} ms" if args.raw else ""
            print(f"  {sg} B={batch} W={width}: {row['reps']} reps, fused {row['time']['fused'] * 1e3:.3f} ms{extra}", flush=True)
    print()
    print_table(rows)
    notes = sorted({r["compiled_note"] for r in rows})
    print(f"\ncompiled: {'; '.join(notes)}")
    print("f/x = fused time / x time (< 1: fused faster); f/overlap = fused / max(gemm floor, traffic); "
          "f/serial = fused / (gemm floor + traffic); mem = peak c10 allocation of one step; max err = equal-work check vs fused")
    bad = [r for r in rows if r["max_err"] > MATCH_TOL]
    if bad:
        print(f"ERROR: {len(bad)} rows where the variants did not compute the same update (max err > {MATCH_TOL})")
    missed = misses(rows)
    print(f"\n{len(missed)} misses" + (":" if missed else ""))
    for m in missed:
        print(f"  MISS {m}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, header))
        print(f"wrote {args.markdown}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
