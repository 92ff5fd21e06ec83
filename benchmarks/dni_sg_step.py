"""The SG step of a ``fastdni.nn.DNI`` on a user's activation: fused ops against autograd DNI and torch.compile.

Usage::

    python benchmarks/dni_sg_step.py --quick                        # CPU: one map row and one vector row, fp32
    python benchmarks/dni_sg_step.py --device cuda                  # GPU grid, fp32 and bf16 (benchmarks/gpu.sh)
    python benchmarks/dni_sg_step.py --batch 256 --shape 64x8x8 --sg mlp --json out.json --markdown out.md

One step is what the interface does for the SG once a batch is through: predict ``M(h)`` and, when the gradient
``t`` for ``h`` arrives, regress ``M`` onto ``s t`` (``s = B``, DNI's default scale) and step Adam (lr 1e-3) on the SG
parameters. ``h`` has no graph below (a leaf): the backward of ``M / s`` into the layers below is the same work on
every variant and is left out. The activation is a feature map ``[B, C, H, W]`` (``--shape CxHxW``) or a vector
``[B, F]`` (``--shape F``); the SG is a :class:`~fastdni.nn.SyntheticGradient` over its ``prod(shape)`` features,
linear or an MLP with one hidden layer as wide (``--sg``), its output layer ``0.01 * randn`` (a trained SG, not the
zero one), Adam's moments small random values (mid-training), the same for every variant.

Variants (each on its own copy of the SG and Adam state, updated on every call):

- ``fused`` / ``fused_triton``: ``DNI(sg, optimizer=adam, backend=...)``: one ``sg_predict`` op, one
  ``sg_regression_`` op (regression, loss and Adam step); ``fused`` is ``backend="auto"`` (the C++ kernels on the
  CPU; on a GPU the CUDA C++ kernels where built, else Triton), ``fused_triton`` is ``backend="triton"`` on a GPU
  whose install also has the CUDA C++ ones;
- ``eager``: ``DNI(sg)`` on autograd, then ``adam.step()`` (``foreach=True``) and ``zero_grad``: what a user writes
  without the ops;
- ``compiled``: ``torch.compile`` of the same autograd step as a function (prediction, the regression loss,
  ``backward``, ``adam.step()``).

Each row is checked first (one step of each variant from the same state): the SG parameters' updates and the loss
of every variant against ``fused``'s, relative to the largest update (``CHECK_TOL``). ``--json``/``--markdown`` write
the rows. Times: the median over interleaved repetitions on the CPU (``benchmarks/dni_step.py``'s
``time_interleaved``), ``triton.testing.do_bench`` on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import dni_step  # noqa: E402
import fastdni.ops as ops  # noqa: E402
from fastdni.nn import DNI, SyntheticGradient  # noqa: E402

ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
BATCHES = (64, 256, 1024)
SHAPES = ("1024", "4096", "16x8x8", "64x8x8")  #: vectors [B, F] and feature maps [B, C, H, W]
SG_KINDS = ("linear", "mlp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
QUICK = dict(batch=(64,), shape=("1024", "16x8x8"), dtype=("fp32",))
#: Largest update error (relative to the largest update) and loss error (relative) of a variant against ``fused``.
CHECK_TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp64": 1e-9}


class Problem(NamedTuple):
    h: torch.Tensor  #: the activation ``[B, *shape]``, a leaf
    target: torch.Tensor  #: the gradient arriving for ``h``
    sg: SyntheticGradient
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]


class Variant(NamedTuple):
    name: str
    step: Callable[[], torch.Tensor]  #: one step; returns the SG loss
    sg: SyntheticGradient
    optimizer: torch.optim.Optimizer  #: the SG's


def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.split("x"))
    if len(dims) not in (1, 3) or min(dims) < 1:
        raise ValueError(f"--shape: expected F or CxHxW, got {text!r}")
    return dims


def make_problem(batch: int, shape: tuple[int, ...], sg_kind: str, dtype: torch.dtype, device: torch.device) -> Problem:
    """Seeded on the CPU (the same values on any device), then moved."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features = math.prod(shape)
    sg = SyntheticGradient(features, () if sg_kind == "linear" else (features,))
    with torch.no_grad():
        sg.layers[-1].weight.copy_(torch.randn(sg.layers[-1].weight.shape, generator=gen) * 0.01)
        sg.layers[-1].bias.copy_(torch.randn(sg.layers[-1].bias.shape, generator=gen) * 0.01)
    h = torch.randn(batch, *shape, generator=gen)
    target = torch.randn(batch, *shape, generator=gen) / batch  # dL/dh of a loss averaged over the batch
    params = list(sg.parameters())
    exp_avg = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    exp_avg_sq = [torch.rand(p.shape, generator=gen) * 1e-6 + 1e-6 for p in params]  # no near-zero moment
    move = lambda t: t.to(device, dtype)  # noqa: E731
    return Problem(move(h), move(target), sg.to(device, dtype), [move(t) for t in exp_avg], [move(t) for t in exp_avg_sq])


def _sg_and_adam(problem: Problem) -> tuple[SyntheticGradient, torch.optim.Adam]:
    """A private copy of the SG and an Adam over it, its state set to the problem's moments (step 0)."""
    sg = copy.deepcopy(problem.sg)
    opt = torch.optim.Adam(sg.parameters(), foreach=True, **ADAM)
    for p, m, v in zip(sg.parameters(), problem.exp_avg, problem.exp_avg_sq):
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    return sg, opt


def make_fused(problem: Problem, backend: str = "auto", name: str = "fused") -> Variant:
    sg, opt = _sg_and_adam(problem)
    dni = DNI(sg, optimizer=opt, backend=backend)
    reason = dni.fusion_blocker(problem.h)
    if reason is not None:
        raise RuntimeError(f"{name}: the DNI would not run fused here: {reason}")

    def step():
        dni(problem.h).backward(problem.target)
        return dni.last_sg_loss

    return Variant(name, step, sg, opt)


def make_eager(problem: Problem) -> Variant:
    sg, opt = _sg_and_adam(problem)
    dni = DNI(sg)

    def step():
        dni(problem.h).backward(problem.target)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return dni.last_sg_loss

    return Variant("eager", step, sg, opt)


def _autograd_step(sg: SyntheticGradient, opt: torch.optim.Optimizer, h: torch.Tensor, target: torch.Tensor):
    """DNI's autograd regression as one function: ``mean_b ||M(h_b) - s t_b||^2`` (``s = B``), backward, Adam."""
    batch = h.shape[0]
    error = sg(h) - batch * target
    loss = (error * error).sum() / batch
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def make_compiled(problem: Problem) -> Variant:
    sg, opt = _sg_and_adam(problem)
    compiled = torch.compile(_autograd_step, dynamic=False)
    return Variant("compiled", lambda: compiled(sg, opt, problem.h, problem.target), sg, opt)


def check_equal_step(problem: Problem, variants: dict[str, Variant], tol: float) -> dict:
    """One step of every variant (compiling ``compiled``): each one's largest SG update error and loss error
    against ``fused``'s, and whether both are within ``tol``."""
    start = [p.detach().clone() for p in problem.sg.parameters()]
    losses = {name: float(v.step()) for name, v in variants.items()}
    want = variants["fused"]
    out = {}
    for name, v in variants.items():
        update_err = max(
            float(((g.detach() - p0) - (w.detach() - p0)).abs().max() / (w.detach() - p0).abs().max().clamp_min(1e-30))
            for g, w, p0 in zip(v.sg.parameters(), want.sg.parameters(), start))
        loss_err = abs(losses[name] - losses["fused"]) / max(abs(losses["fused"]), 1e-30)
        out[name] = dict(update=update_err, loss=loss_err, ok=update_err <= tol and loss_err <= tol)
    return out


def time_variants(variants: dict[str, Variant], device: torch.device, reps: int) -> dict[str, float]:
    """Milliseconds per step: ``do_bench`` on CUDA, the median of interleaved repetitions on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: float(do_bench(v.step, warmup=25, rep=100)) for name, v in variants.items()}
    samples = dni_step.time_interleaved({name: v.step for name, v in variants.items()}, reps, 0.02, 8.0)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def build(problem: Problem, device: torch.device, skip: set[str], notes: list[str]) -> dict[str, Variant]:
    variants = {"fused": make_fused(problem)}
    if device.type == "cuda" and ops.HAS_CUDA_KERNELS and "fused_triton" not in skip:
        variants["fused_triton"] = make_fused(problem, "triton", "fused_triton")
    variants["eager"] = make_eager(problem)
    if "compiled" not in skip:
        try:
            variants["compiled"] = make_compiled(problem)
        except Exception as error:  # noqa: BLE001  e.g. no C++ compiler for Inductor
            notes.append(f"compiled: {type(error).__name__}: {error}")
    return variants


def run_row(batch: int, shape: str, sg: str, dtype: str, device: torch.device, opts: argparse.Namespace) -> dict:
    row = dict(batch=batch, shape=shape, sg=sg, dtype=dtype, notes=[])
    problem = make_problem(batch, parse_shape(shape), sg, DTYPES[dtype], device)
    variants = build(problem, device, set(opts.skip), row["notes"])
    try:
        row["check"] = check_equal_step(problem, variants, CHECK_TOL[dtype])
    except Exception as error:  # noqa: BLE001  compiled failed on its first call: drop it, check the rest
        if "compiled" not in variants:
            raise
        row["notes"].append(f"compiled: {type(error).__name__}: {str(error).splitlines()[0]}")
        del variants["compiled"]
        row["check"] = check_equal_step(problem, variants, CHECK_TOL[dtype])
    row["ms"] = time_variants(variants, device, opts.reps)
    fused = row["ms"]["fused"]
    row["ratios"] = {f"{name}/fused": t / fused for name, t in row["ms"].items() if name != "fused"}
    return row


COLUMNS = ("fused", "fused_triton", "eager", "compiled")


def format_row(row: dict) -> list[str]:
    ms, ratios = row["ms"], row["ratios"]
    cells = [str(row["batch"]), row["shape"], row["sg"], row["dtype"]]
    cells += [f"{ms[c]:.3f}" if c in ms else "-" for c in COLUMNS]
    cells += [f"{ratios[f'{c}/fused']:.2f}x" if f"{c}/fused" in ratios else "-" for c in ("eager", "compiled")]
    cells.append("ok" if all(c["ok"] for c in row["check"].values()) else "MISMATCH")
    return cells


HEADER = ["B", "shape", "SG", "dtype", *(f"{c} ms" for c in COLUMNS), "eager/fused", "compiled/fused", "check"]


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    notes = sorted({n for r in rows for n in r["notes"]})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 64, shapes 1024 and 16x8x8, fp32 (smoke test)")
    parser.add_argument("--batch", type=int, action="append", help="only this batch (repeatable)")
    parser.add_argument("--shape", action="append", help="only this activation shape, F or CxHxW (repeatable)")
    parser.add_argument("--sg", choices=SG_KINDS, action="append", help="only this SG kind (repeatable)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="only this dtype (repeatable)")
    parser.add_argument("--skip", choices=("compiled", "fused_triton"), action="append", default=[])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per variant on the CPU (default 7)")
    parser.add_argument("--threads", type=int, help="intra-op threads on the CPU (default: torch's)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    device = common.bench_device(opts, "dni_sg_step.py")
    if device is None:
        return 2
    default_dtypes = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    batches = opts.batch or (QUICK["batch"] if opts.quick else BATCHES)
    shapes = opts.shape or (QUICK["shape"] if opts.quick else SHAPES)
    dtypes = opts.dtype or (QUICK["dtype"] if opts.quick else default_dtypes)
    rows = []
    print(" | ".join(HEADER))
    for dtype, sg, shape, batch in itertools.product(dtypes, opts.sg or SG_KINDS, shapes, batches):
        row = run_row(batch, shape, sg, dtype, device, opts)
        rows.append(row)
        print(" | ".join(format_row(row)), flush=True)
    title = (f"DNI SG step on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    if opts.markdown:
        Path(opts.markdown).write_text(markdown(rows, f"# {title}"))
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(title=title, rows=rows), indent=1))
    return 0 if all(all(c["ok"] for c in r["check"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
