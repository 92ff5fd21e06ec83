"""The whole training step of the copy-task LSTM with DNI at the truncation boundary: fused SG ops against autograd
and torch.compile, as a user writes the model with the library.

Usage::

    python benchmarks/bench_copy_lstm_step.py --threads 1                       # H 128 T 3, H 128 T 5, H 256 T 3
    python benchmarks/bench_copy_lstm_step.py --threads 1 --markdown docs/benchmarks/copy_lstm_step_cpu.md
    python benchmarks/bench_copy_lstm_step.py --quick                           # H 128 T 3, no torch.compile
    python benchmarks/bench_copy_lstm_step.py --hidden 128 --truncation 3 --batch-size 32 --device cuda

The model (``fastdni.experiments.recurrent``'s copy task, per run): ``nn.LSTM(9, H)`` + ``nn.Linear(H, 8)`` readout,
Adam lr 1e-3 on both, and a :class:`~fastdni.nn.TruncationDNI` with a linear
:class:`~fastdni.nn.SyntheticGradient` over the LSTM state ``(h, c)`` (``2 H`` features), ``gradient_scale = B``,
``sg_scale = bootstrap = 1`` (the copy defaults: one backward pass), its Adam lr 1e-2. The data are the windows of
:class:`fastdni.data.copy_streams.CopyStreams` (32 streams, ``N = 4``, the state carried across windows as in
``benchmarks/bench_recurrent_runs.py``; the loss is ``masked_bce``). One step is one truncated-BPTT window of ``T``
steps: ``begin_segment`` (cut the state; SG prediction at the start state), LSTM forward, readout, loss,
``end_segment`` (SG prediction at the end state; one backward from the loss plus ``M(s_end) / B``, in which the SG at
the start state is regressed onto the gradient that arrives there), the optimizer steps, ``zero_grad``.

Variants (each its own copy of the same initial model, run on the same windows, its state carried from step to step):

- ``fused``: ``TruncationDNI(..., optimizer=sg_adam)``: the SG prediction is ``fastdni.ops.sg_predict`` and the
  regression with the SG's Adam step one ``fastdni.ops.sg_regression_`` (the C++ kernels where built, ``backend="auto"``);
  the caller steps only the core's Adam;
- ``eager``: ``TruncationDNI(...)`` without optimizer: the SG on autograd, then ``sg_adam.step()`` (what a user writes
  without the ops);
- ``compiled``: ``torch.compile`` (Inductor, ``dynamic=False``) of ``eager``'s step function; Dynamo splits it at its
  graph breaks (listed per row by ``torch._dynamo.explain``) and compiles the pieces between; it is warmed up (past
  its recompiles) before anything is measured;
- ``bptt``: a reference, not a DNI variant: the same step without the SG (the state only cut). What every DNI variant
  does besides the SG, i.e. the part the fused SG ops cannot touch (Amdahl).

Per row, the check first: ``--check-steps`` windows of ``eager`` and ``compiled`` against ``fused`` from the same
initial model, in float64 (default dtype float64 meanwhile; where the fused ops have fp64 kernels, i.e. the CPU):
every parameter's largest difference relative to the largest change of that parameter since the start, within
``FP64_TOL``. Then the same windows in fp32 (the warm-up of the timed variants, and torch.compile's compile):
``eager`` within ``CHECK_TOL``; ``compiled`` is reported, not held to it (its Adam's bias correction comes from a
float32 step tensor: ``check_fp64``). ``--no-fp64-check`` skips the fp64 part. Times: medians of interleaved blocks
(``dni_step.py``'s ``time_interleaved``: round-robin, the order rotating; ``do_bench`` on CUDA). Memory (CPU): the
peak bytes a step holds allocated on the c10 CPU allocator above what was live before it (``common.peak_alloc_bytes``'s
measure, from ``torch.profiler(profile_memory=True)``; ``tracemalloc`` sees none of torch's allocations, which bypass
Python's allocator), the largest of three steps; ``alloc``, the sum of all the step's allocations (the churn).
FLOPs: the GEMMs by hand (``gemm_flops``). ``--pieces`` adds the phases of a step (``step_phases``) and the SG side's
pieces alone (``sg_pieces``): where the time goes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
import dni_step  # noqa: E402
from fastdni.data.copy_streams import CopyStreams  # noqa: E402
from fastdni.experiments.recurrent_runs import masked_bce  # noqa: E402
from fastdni.nn import SyntheticGradient, TruncationDNI  # noqa: E402

CORE_LR, SG_LR = 1e-3, 1e-2  #: fastdni.experiments.recurrent's copy defaults
ROWS = ((128, 3), (128, 5), (256, 3))  #: (hidden, T)
QUICK = ((128, 3),)
COPY_LENGTH = 4
CHECK_TOL = 1e-3  #: fp32: largest parameter difference / largest parameter change, after --check-steps windows
FP64_TOL = 1e-9
COLUMNS = ("fused", "eager", "compiled", "bptt")


class Model:
    """One copy of the copy-task model and its optimizers; ``kind`` in ``fused``, ``eager``, ``bptt``."""

    def __init__(self, kind: str, hidden: int, batch: int, channels: tuple[int, int], dtype: torch.dtype,
                 device: torch.device):
        torch.manual_seed(0)  # the same initial parameters for every kind
        self.lstm = nn.LSTM(channels[0], hidden).to(device, dtype)
        self.readout = nn.Linear(hidden, channels[1]).to(device, dtype)
        sg = SyntheticGradient(2 * hidden).to(device, dtype)
        self.core_opt = torch.optim.Adam([*self.lstm.parameters(), *self.readout.parameters()], lr=CORE_LR)
        self.boundary: Optional[TruncationDNI] = None
        self.sg_opt: Optional[torch.optim.Optimizer] = None
        if kind == "fused":
            self.boundary = TruncationDNI(sg, batch_dim=1, gradient_scale=batch,
                                          optimizer=torch.optim.Adam(sg.parameters(), lr=SG_LR))
        elif kind == "eager":
            self.boundary = TruncationDNI(sg, batch_dim=1, gradient_scale=batch)
            self.sg_opt = torch.optim.Adam(self.boundary.parameters(), lr=SG_LR)
        self.sg = sg if self.boundary is not None else None
        zeros = torch.zeros(1, batch, hidden, device=device, dtype=dtype)
        self.state = (zeros, zeros.clone())

    def parameters(self) -> list[torch.Tensor]:
        sg = list(self.sg.parameters()) if self.sg is not None else []
        return [*self.lstm.parameters(), *self.readout.parameters(), *sg]


def make_step(m: Model) -> Callable:
    """The training step on one window, as a user writes it with the library (the function ``compiled`` compiles)."""
    if m.boundary is None:
        def bptt_step(inputs, targets, mask):
            out, state = m.lstm(inputs, m.state)
            loss = masked_bce(m.readout(out)[:, None], targets, mask)[0]
            loss.backward()
            m.core_opt.step()
            m.core_opt.zero_grad(set_to_none=True)
            m.state = tuple(s.detach() for s in state)
            return loss.detach()
        return bptt_step

    def step(inputs, targets, mask):
        state = m.boundary.begin_segment(m.state)
        out, state = m.lstm(inputs, state)
        loss = masked_bce(m.readout(out)[:, None], targets, mask)[0]
        m.boundary.end_segment(loss, state)
        m.core_opt.step()
        m.core_opt.zero_grad(set_to_none=True)
        if m.sg_opt is not None:  # eager: the SG's own Adam (fused: stepped inside sg_regression_)
            m.sg_opt.step()
            m.sg_opt.zero_grad(set_to_none=True)
        m.state = tuple(s.detach() for s in state)
        return loss.detach()
    return step


class Runner:
    """A variant: its model, its step function, and a cursor over the shared windows."""

    def __init__(self, model: Model, fn: Callable, windows: list):
        self.model, self.fn, self.windows, self.i = model, fn, windows, 0

    def __call__(self):
        w = self.windows[self.i % len(self.windows)]
        self.i += 1
        return self.fn(*w)


def make_windows(hidden: int, truncation: int, batch: int, count: int, dtype: torch.dtype, device: torch.device):
    streams = CopyStreams(1, batch, seed=0)
    streams.set_lengths(torch.full((1,), COPY_LENGTH))
    out = []
    for _ in range(count):
        w = streams.window(truncation)  # [T, 1, B, *]: one run
        out.append((w.inputs[:, 0].contiguous().to(device, dtype), w.targets.to(device, dtype), w.mask.to(device)))
    return out, (streams.input_channels, streams.output_channels)


def graph_breaks(fn: Callable, args) -> tuple[int, list[str]]:
    """``torch._dynamo.explain`` of one call (it runs the step once): the graph count and the distinct break reasons,
    each with the user frame it happened in."""
    explained = torch._dynamo.explain(fn)(*args)
    reasons = []
    for b in explained.break_reasons:
        frame = next((f for f in reversed(b.user_stack) if "/torch/" not in f.filename), None)
        where = f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else "torch"
        text = f"{where}: {b.reason.splitlines()[0]}"
        if text not in reasons:
            reasons.append(text)
    torch._dynamo.reset()
    return explained.graph_count, reasons


def max_rel_diff(got: Model, want: Model, start: list[torch.Tensor]) -> float:
    return max(float((g.detach() - w.detach()).abs().max() / (w.detach() - p0).abs().max().clamp_min(1e-30))
               for g, w, p0 in zip(got.parameters(), want.parameters(), start))


def check_fp64(hidden: int, truncation: int, batch: int, steps: int, device: torch.device, compiled: bool) -> dict:
    """``eager`` (and ``compiled``) against ``fused`` in float64 after ``steps`` windows: the largest relative parameter
    difference of each. The default dtype is float64 meanwhile, so that Adam's ``step`` tensors are too: compiled, Adam
    computes its bias corrections ``1 - beta^t`` from that tensor (eager, from a Python float), and from a float32 one
    ``1 - 0.999^1`` is off by 1.3e-5, a relative difference of 6.6e-6 in every parameter's first update."""
    windows, channels = make_windows(hidden, truncation, batch, steps, torch.float64, device)
    probe = TruncationDNI(SyntheticGradient(2 * hidden).to(device, torch.float64),
                          optimizer=lambda p: torch.optim.Adam(p, lr=SG_LR))
    if probe.fusion_blocker(torch.zeros(batch, 2 * hidden, dtype=torch.float64, device=device)) is not None:
        return {}  # no fused fp64 kernels here (e.g. Triton on CUDA): the fp32 check alone
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kinds = ("fused", "eager", "compiled") if compiled else ("fused", "eager")
        models = {k: Model("eager" if k == "compiled" else k, hidden, batch, channels, torch.float64, device) for k in kinds}
        start = [p.detach().clone() for p in models["fused"].parameters()]
        for k, m in models.items():
            fn = make_step(m)
            if k == "compiled":
                torch._dynamo.reset()
                fn = torch.compile(fn, dynamic=False)
            for w in windows:
                fn(*w)
    finally:
        torch.set_default_dtype(dtype)
        torch._dynamo.reset()
    return {f"{k} fp64": max_rel_diff(models[k], models["fused"], start) for k in kinds[1:]}


def alloc_bytes(fn: Callable[[], object]) -> tuple[Optional[int], Optional[int]]:
    """``(peak, total)`` bytes of one call on the c10 CPU allocator: the peak it holds allocated at once above what was
    live before it (``common.peak_alloc_bytes``'s measure) and the sum of all its allocations (the churn), from the
    allocation records of ``torch.profiler(profile_memory=True)``. Both None without memory records."""
    from torch.profiler import ProfilerActivity, profile

    with common._quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # the profiler's internals moved
        return None, None
    if not records:
        return None, None
    live = peak = total = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
        total += max(nbytes, 0)
    return peak, total


def gemm_flops(hidden: int, truncation: int, batch: int, channels: tuple[int, int]) -> dict[str, int]:
    """The step's GEMM FLOPs (``2 m n k`` each), by hand: ``FlopCounterMode`` does not see inside ATen's
    ``mkldnn_rnn_layer`` (the LSTM's CPU kernel). ``core``: the LSTM's forward (``[x, h] [W_ih, W_hh]^T`` per step), its
    backward (``dh`` and ``dW_ih``, ``dW_hh``; the inputs need no gradient) and the readout's three GEMMs per step;
    ``sg``: the SG's two predictions (start and end state) and its weight gradient, ``2 B F^2`` each, ``F = 2 H``."""
    (i, o), h, t, b = channels, hidden, truncation, batch
    lstm = t * (2 * b * (i + h) * 4 * h + 2 * b * 4 * h * h + 2 * b * 4 * h * (i + h))
    return dict(core=lstm + t * 3 * 2 * b * h * o, sg=3 * 2 * b * (2 * h) ** 2)


def run_row(hidden: int, truncation: int, opts: argparse.Namespace, device: torch.device) -> dict:
    row = dict(hidden=hidden, T=truncation, batch=opts.batch_size, notes=[])
    torch._dynamo.reset()
    windows, channels = make_windows(hidden, truncation, opts.batch_size, opts.windows, torch.float32, device)
    compiled = "compiled" not in opts.skip
    kinds = ["fused", "eager", "bptt"] + (["compiled"] if compiled else [])
    models = {k: Model("eager" if k == "compiled" else k, hidden, opts.batch_size, channels, torch.float32, device)
              for k in kinds}
    blocker = models["fused"].boundary.fusion_blocker(torch.zeros(opts.batch_size, 2 * hidden, device=device))
    if blocker is not None:
        raise RuntimeError(f"fused: TruncationDNI would not run the fused ops here: {blocker}")
    row["check"] = check_fp64(hidden, truncation, opts.batch_size, opts.check_steps, device, compiled) \
        if opts.fp64_check else {}
    runners = {k: Runner(m, make_step(m), windows) for k, m in models.items()}
    if compiled:
        probe = Model("eager", hidden, opts.batch_size, channels, torch.float32, device)
        row["graphs"], row["breaks"] = graph_breaks(make_step(probe), windows[0])
        runners["compiled"].fn = torch.compile(runners["compiled"].fn, dynamic=False)
    # Warm-up and the fp32 check: every variant the same windows from the same initial model.
    start = [p.detach().clone() for p in models["fused"].parameters()]
    for k, r in runners.items():
        t0 = time.perf_counter()
        for _ in range(opts.check_steps):
            r()
        if k == "compiled":
            row["compile_s"] = time.perf_counter() - t0
    row["check"].update({f"{k} fp32": max_rel_diff(models[k], models["fused"], start)
                         for k in ("eager", "compiled") if k in models})
    # fp32: compiled's Adam bias corrections come from float32 step tensors (check_fp64), so only eager is held to it.
    row["ok"] = all(v <= (FP64_TOL if k.endswith("fp64") else CHECK_TOL) for k, v in row["check"].items()
                    if k != "compiled fp32")
    if device.type == "cuda":
        from triton.testing import do_bench

        row["ms"] = {k: float(do_bench(r, warmup=25, rep=200)) for k, r in runners.items()}
        row["memory"], row["alloc"] = {}, {}
    else:
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        samples = dni_step.time_interleaved(runners, opts.reps, opts.min_block, opts.budget)
        row["recompiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        row["ms"] = {k: statistics.median(s) * 1e3 for k, s in samples.items()}
        row["reps"] = min(len(s) for s in samples.values())
        row["spread"] = max((statistics.quantiles(s, n=4)[2] - statistics.quantiles(s, n=4)[0]) / statistics.median(s)
                            for s in samples.values()) if row["reps"] >= 2 else 0.0
        mem = {k: [alloc_bytes(r) for _ in range(3)] for k, r in runners.items()}
        row["memory"] = {k: max((p for p, _ in m if p is not None), default=None) for k, m in mem.items()}
        row["alloc"] = {k: max((a for _, a in m if a is not None), default=None) for k, m in mem.items()}
    row["ratios"] = {k: row["ms"][k] / row["ms"]["fused"] for k in row["ms"]}
    row["flops"] = gemm_flops(hidden, truncation, opts.batch_size, channels)
    return row


def sg_pieces(hidden: int, batch: int, rounds: int = 40, calls: int = 20) -> dict[str, float]:
    """Microseconds (p25 of ``rounds`` interleaved blocks of ``calls`` calls) of the pieces of the SG side of one step,
    on a ``[B, 2H]`` state: what the fused path runs (two predictions, the regression with the Adam step, the checks
    ``TruncationDNI`` makes per call) against the same work on autograd, and the bare GEMM under each (``2 B F^2``)."""
    import fastdni.ops as ops
    from fastdni.nn.interface import _watch_divergence

    features = 2 * hidden
    gen = torch.Generator().manual_seed(0)
    flat, target = torch.randn(batch, features, generator=gen), torch.randn(batch, features, generator=gen) / batch
    sg, eager_sg = SyntheticGradient(features), SyntheticGradient(features)
    for m in (sg, eager_sg):
        with torch.no_grad():
            m.layers[-1].weight.copy_(0.01 * torch.randn(features, features, generator=gen))
    boundary = TruncationDNI(sg, batch_dim=1, gradient_scale=batch, optimizer=torch.optim.Adam(sg.parameters(), lr=SG_LR))
    eager_opt = torch.optim.Adam(eager_sg.parameters(), lr=SG_LR)
    params = sg.reference_params()
    ordered = ops.ordered_params(params)
    weight, out = params.weights[0].detach(), torch.empty(batch, features)
    assert boundary.fusion_blocker(flat) is None  # as the boundary does before a prediction: keeps its verdict
    predicted = boundary._predict_fused(flat, None)
    name, hyper, state = ops.fused_optimizer_args(boundary.optimizer, ordered)
    sums = (torch.tensor(1.0), torch.tensor(2.0))

    def raw_predict():
        with torch.no_grad():
            torch.ops.fastdni.sg_predict(flat, list(params.weights), list(params.biases), None, None)

    def raw_regression():
        torch.ops.fastdni.sg_regression_(flat, [], predicted.prediction, target, list(params.weights), list(params.biases),
                                         None, None, list(state), name, [float(v) for v in hyper], float(batch), 1.0)

    def fused_regression():
        ops.fused_step(boundary.optimizer, ordered, ops.sg_regression_, predicted, target, params,
                       target_scale=float(batch), backend=boundary.backend)

    def kept_plan_regression():  # what the boundary's backward runs: the kept verdict checked, then the direct op
        boundary._fused_regression(predicted, target, None, float(batch))

    def public_predict():
        with torch.no_grad():
            ops.sg_predict(flat, params, backend=boundary.backend)

    def eager_regression():  # the autograd path's work for the same regression: forward, loss, backward, Adam
        error = eager_sg(flat) - batch * target
        (error * error).sum().div(batch).backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)

    def eager_predict():
        with torch.no_grad():
            eager_sg(flat)

    fns = {
        "GEMM [B, F] x [F, F] (torch.mm, out=)": lambda: torch.mm(flat, weight.t(), out=out),
        "fused: sg_predict, raw torch.ops.fastdni op": raw_predict,
        "fused: ops.sg_predict (the checked public wrapper)": public_predict,
        "fused: TruncationDNI._predict_fused (kept plan: the op below autograd)": lambda: boundary._predict_fused(flat, None),
        "fused: sg_regression_ + Adam, raw op": raw_regression,
        "fused: ops.fused_step(sg_regression_) (checks, args, advance)": fused_regression,
        "fused: TruncationDNI._fused_regression (verdict checked, raw op, args, advance)": kept_plan_regression,
        "fused: fusion_blocker, kept verdict (twice per step)": lambda: boundary.fusion_blocker(flat),
        "both: _watch_divergence (once per step)": lambda: _watch_divergence(boundary, *sums),
        "eager: SyntheticGradient forward, no_grad": eager_predict,
        "eager: forward + loss + backward + Adam step + zero_grad": eager_regression,
    }
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[k].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.quantiles(v, n=4)[0] for k, v in samples.items()}


PHASES = ("begin_segment", "LSTM + readout + loss", "end_segment / backward", "core Adam + zero_grad",
          "SG Adam + zero_grad")


def step_phases(hidden: int, truncation: int, batch: int, device: torch.device, steps: int = 300) -> dict[str, list[float]]:
    """Microseconds per phase of ``fused``, ``eager`` and ``bptt`` steps (p25 over ``steps`` steps, the variants
    interleaved step by step), after 30 warm-up windows: where the SG side's time goes inside the whole step."""
    windows, channels = make_windows(hidden, truncation, batch, 64, torch.float32, device)
    models = {k: Model(k, hidden, batch, channels, torch.float32, device) for k in ("fused", "eager", "bptt")}
    for m in models.values():
        fn = make_step(m)
        for w in windows[:30]:
            fn(*w)

    def timed(m: Model, inputs, targets, mask) -> list[float]:
        t = [time.perf_counter()]
        state = m.boundary.begin_segment(m.state) if m.boundary is not None else m.state
        t.append(time.perf_counter())
        out, state = m.lstm(inputs, state)
        loss = masked_bce(m.readout(out)[:, None], targets, mask)[0]
        t.append(time.perf_counter())
        if m.boundary is not None:
            m.boundary.end_segment(loss, state)
        else:
            loss.backward()
        t.append(time.perf_counter())
        m.core_opt.step()
        m.core_opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if m.sg_opt is not None:
            m.sg_opt.step()
            m.sg_opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        m.state = tuple(s.detach() for s in state)
        return [(b - a) * 1e6 for a, b in zip(t, t[1:])]

    samples: dict[str, list[list[float]]] = {k: [] for k in models}
    for i in range(steps):
        for k, m in models.items():
            samples[k].append(timed(m, *windows[i % len(windows)]))
    return {k: [statistics.quantiles(col, n=4)[0] for col in zip(*v)] for k, v in samples.items()}


HEADER = ["H", "T", "B", *(f"{c} ms" for c in COLUMNS), "eager/fused", "compiled/fused", "bptt/fused",
          "SG share eager", "SG share fused", *(f"peak {c}" for c in COLUMNS), *(f"alloc {c}" for c in COLUMNS),
          "MFLOP core + SG", "spread", "check"]


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}M"


def format_row(row: dict) -> list[str]:
    ms, ratios = row["ms"], row["ratios"]
    cells = [str(row["hidden"]), str(row["T"]), str(row["batch"])]
    cells += [f"{ms[c]:.3f}" if c in ms else "-" for c in COLUMNS]
    cells += [f"{ratios[c]:.2f}x" if c in ratios else "-" for c in ("eager", "compiled", "bptt")]
    # The time the SG side takes: the step less the same step without the SG (bptt).
    cells += [f"{(ms[c] - ms['bptt']) / ms[c]:.0%}" for c in ("eager", "fused")]
    cells += [_mb(row["memory"].get(c)) for c in COLUMNS] + [_mb(row["alloc"].get(c)) for c in COLUMNS]
    flops = row["flops"]
    cells.append(f"{flops['core'] / 1e6:.1f} + {flops['sg'] / 1e6:.1f} ({flops['sg'] / (flops['core'] + flops['sg']):.0%})")
    cells.append(f"{row.get('spread', 0):.0%}")
    checks = ", ".join(f"{k} {v:.1e}" for k, v in row["check"].items())
    cells.append(("ok: " if row["ok"] else "MISMATCH: ") + checks)
    return cells


def markdown(rows: list[dict], title: str, pieces: Optional[dict] = None) -> str:
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    compiled = [r for r in rows if "breaks" in r]
    for r in compiled:
        lines += ["", f"H {r['hidden']} T {r['T']}: `compiled` runs as {r['graphs']} graphs "
                      f"({len(r['breaks'])} distinct graph-break sites; compile + warm-up {r['compile_s']:.1f} s, "
                      f"{r.get('recompiled', 0)} graphs compiled during timing)"
                      + (", breaks as above" if r is not compiled[0] and r["breaks"] == compiled[0]["breaks"] else ":")]
        if r is compiled[0] or r["breaks"] != compiled[0]["breaks"]:
            lines += [""] + [f"- {b}" for b in r["breaks"]]
    if any("phases" in r for r in rows):
        lines += ["", "Phases of a step, us (p25 over 300 steps, fused / eager / bptt interleaved step by step):", "",
                  "| H | T | variant | " + " | ".join(PHASES) + " | sum |", "|" + "---|" * 3 + "---:|" * (len(PHASES) + 1)]
        for r in rows:
            for k, v in r.get("phases", {}).items():
                lines.append(f"| {r['hidden']} | {r['T']} | {k} | " + " | ".join(f"{x:.0f}" for x in v) + f" | {sum(v):.0f} |")
    for hidden, p in (pieces or {}).items():
        lines += ["", f"SG side pieces at H {hidden} (F = {2 * hidden}), B {rows[0]['batch']}, us per call (p25 of "
                      f"interleaved blocks):", "", "| piece | us |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in p.items()]
    notes = sorted({n for r in rows for n in r["notes"]})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="H 128, T 3 only, no torch.compile (smoke test)")
    p.add_argument("--hidden", type=int, action="append", help="only this hidden size (repeatable; with --truncation)")
    p.add_argument("--truncation", "-T", type=int, action="append", help="only this T (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip", choices=("compiled",), action="append", default=[])
    p.add_argument("--windows", type=int, default=64, help="distinct copy-task windows, cycled (default 64)")
    p.add_argument("--check-steps", type=int, default=20, help="warm-up and check windows (default 20)")
    p.add_argument("--no-fp64-check", dest="fp64_check", action="store_false")
    p.add_argument("--reps", type=int, default=15, help="timed blocks per variant, interleaved (default 15)")
    p.add_argument("--min-block", type=float, default=0.05, help="seconds per timed block (default 0.05)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timing per row, at most (default 30)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--pieces", action="store_true",
                   help="also time the phases of a step (step_phases) per row and the SG side's pieces (sg_pieces)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.skip = [*opts.skip, "compiled"]
    return opts


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    device = common.bench_device(opts, "bench_copy_lstm_step.py")
    if device is None:
        return 2
    if opts.hidden or opts.truncation:
        grid = list(itertools.product(opts.hidden or (128,), opts.truncation or (3,)))
    else:
        grid = list(QUICK if opts.quick else ROWS)
    rows = []
    print(" | ".join(HEADER), flush=True)
    for hidden, truncation in grid:
        rows.append(run_row(hidden, truncation, opts, device))
        print(" | ".join(format_row(rows[-1])), flush=True)
    pieces = {}
    if opts.pieces and device.type == "cpu":  # host timers: CPU only
        for hidden in sorted({h for h, _ in grid}):
            pieces[hidden] = sg_pieces(hidden, opts.batch_size)
        for r in rows:
            r["phases"] = step_phases(r["hidden"], r["T"], opts.batch_size, device)
    title = (f"# Copy-task LSTM + TruncationDNI training step on "
             f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} ({torch.get_num_threads()} threads), "
             f"torch {torch.__version__}")
    text = markdown(rows, title, pieces)
    print("\n" + text, end="")
    if opts.markdown:
        Path(opts.markdown).write_text(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(title=title, rows=rows, pieces=pieces), indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
