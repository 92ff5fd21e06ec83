"""The cost of one truncated-BPTT window of the recurrent experiments, per run: R runs as R separate loops of
``nn.LSTM`` + :class:`fastdni.nn.TruncationDNI` + ``torch.optim.Adam`` (what a user writes with the library's
module) against R runs stacked in one :class:`~fastdni.experiments.recurrent_runs.RunGroup` (one batched GEMM
per step for all of them). Both variants are timed interleaved in one process, on the same copy-task windows,
with the same math (``tests/experiments/test_recurrent_runs.py`` checks it in fp64); the ratio is the budget gain.

    python benchmarks/bench_recurrent_runs.py [--runs 9] [--truncation 3] [--hidden 128] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fastdni.data.copy_streams import CopyStreams
from fastdni.experiments.recurrent_runs import RunGroup, masked_bce
from fastdni.nn import SyntheticGradient, TruncationDNI


def separate_runs(runs: int, hidden: int, batch: int, streams: CopyStreams, sg_scale: float, bootstrap: float):
    """R per-run models with TruncationDNI; returns a function training one window of every run."""
    models = []
    for seed in range(runs):
        torch.manual_seed(seed)
        lstm, readout = nn.LSTM(streams.input_channels, hidden), nn.Linear(hidden, streams.output_channels)
        boundary = TruncationDNI(SyntheticGradient(2 * hidden), batch_dim=1, gradient_scale=batch, sg_scale=sg_scale,
                                 bootstrap=bootstrap)
        optimizers = [torch.optim.Adam([*lstm.parameters(), *readout.parameters()], lr=1e-3),
                      torch.optim.Adam(boundary.parameters(), lr=1e-2)]
        models.append([lstm, readout, boundary, optimizers, (torch.zeros(1, batch, hidden),) * 2])

    def window(w) -> None:
        for r, m in enumerate(models):
            lstm, readout, boundary, optimizers, state = m
            state = boundary.begin_segment(state)
            out, state = lstm(w.inputs[:, r], state)
            loss = masked_bce(readout(out)[:, None], w.targets[:, r, None], w.mask[:, r, None])[0]
            boundary.end_segment(loss, state)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            m[4] = tuple(s.detach() for s in state)
    return window


def stacked_runs(runs: int, hidden: int, batch: int, streams: CopyStreams, sg_scale: float, bootstrap: float):
    group = RunGroup(["dni"] * runs, list(range(runs)), streams.input_channels, hidden, streams.output_channels,
                     sg_scale=sg_scale, bootstrap=bootstrap)
    optimizers = [torch.optim.Adam(group.core_parameters(), lr=1e-3), torch.optim.Adam(group.sg_parameters(), lr=1e-2)]
    state = [group.initial_state(batch)]

    def window(w) -> None:
        _, state[0], _ = group.train_window(w.inputs, lambda lg: masked_bce(lg, w.targets, w.mask), state[0])
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return window


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--truncation", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--windows", type=int, default=40, help="windows per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per variant (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    streams = CopyStreams(a.runs, a.batch_size, seed=0)
    streams.set_lengths(torch.full((a.runs,), 4))
    data = [streams.window(a.truncation) for _ in range(a.windows)]
    rows = []
    for sg_scale, bootstrap in ((1.0, 1.0), (0.1, 1.0)):  # without and with the second, state-only backward pass
        variants = {name: make(a.runs, a.hidden, a.batch_size, streams, sg_scale, bootstrap)
                    for name, make in (("separate", separate_runs), ("stacked", stacked_runs))}
        times = {name: [] for name in variants}
        for name, fn in variants.items():  # warm-up
            for w in data[:5]:
                fn(w)
        for _ in range(a.repeats):
            for name, fn in variants.items():
                began = time.perf_counter()
                for w in data:
                    fn(w)
                times[name].append((time.perf_counter() - began) / (a.windows * a.runs) * 1e3)
        sep, stk = statistics.median(times["separate"]), statistics.median(times["stacked"])
        rows.append((sg_scale, bootstrap, sep, min(times["separate"]), stk, min(times["stacked"]), sep / stk))
    print(f"R={a.runs} runs, T={a.truncation}, hidden {a.hidden}, {a.batch_size} streams, {a.threads} thread(s); "
          f"ms per window per run, median (min) of {a.repeats} blocks of {a.windows} windows")
    print("| sg_scale | bootstrap | separate TruncationDNI loops | stacked RunGroup | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for sg_scale, bootstrap, sep, sep_min, stk, stk_min, ratio in rows:
        print(f"| {sg_scale:g} | {bootstrap:g} | {sep:.3f} ({sep_min:.3f}) | {stk:.3f} ({stk_min:.3f}) | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
