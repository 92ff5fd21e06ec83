"""The cost of one truncated-BPTT window of the recurrent experiments, per run: R runs as R separate loops of
``nn.LSTM`` + :class:`fastdni.nn.TruncationDNI` + ``torch.optim.Adam`` (what a user writes with the library's
module) against R runs stacked in one :class:`~fastdni.experiments.recurrent_runs.RunGroup` (one batched GEMM
per step for all of them), each with the SG on autograd + ``torch.optim.Adam`` and on the fused ops
(``TruncationDNI(optimizer=...)``, ``RunGroup.use_fused_sg``: the regression and the SG's Adam step in one op; the
experiments' default). All four are timed interleaved in one process, on the same copy-task windows, with the same
math (``tests/experiments/test_recurrent_runs.py`` checks it in fp64); the ratios are the budget gains.

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


def separate_runs(runs: int, hidden: int, batch: int, streams: CopyStreams, sg_scale: float, bootstrap: float,
                  fused: bool):
    """R per-run models with TruncationDNI; returns a function training one window of every run."""
    models = []
    for seed in range(runs):
        torch.manual_seed(seed)
        lstm, readout = nn.LSTM(streams.input_channels, hidden), nn.Linear(hidden, streams.output_channels)
        sg = SyntheticGradient(2 * hidden)
        sg_adam = torch.optim.Adam(sg.parameters(), lr=1e-2)
        boundary = TruncationDNI(sg, batch_dim=1, gradient_scale=batch, sg_scale=sg_scale, bootstrap=bootstrap,
                                 optimizer=sg_adam if fused else None)
        optimizers = [torch.optim.Adam([*lstm.parameters(), *readout.parameters()], lr=1e-3)] + ([] if fused else [sg_adam])
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


def stacked_runs(runs: int, hidden: int, batch: int, streams: CopyStreams, sg_scale: float, bootstrap: float,
                 fused: bool):
    group = RunGroup(["dni"] * runs, list(range(runs)), streams.input_channels, hidden, streams.output_channels,
                     sg_scale=sg_scale, bootstrap=bootstrap)
    optimizers = [torch.optim.Adam(group.core_parameters(), lr=1e-3), torch.optim.Adam(group.sg_parameters(), lr=1e-2)]
    if fused:
        reason = group.use_fused_sg(optimizers[1])
        if reason is not None:
            raise RuntimeError(f"stacked fused: RunGroup would not run the fused ops here: {reason}")
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
        variants = {name: make(a.runs, a.hidden, a.batch_size, streams, sg_scale, bootstrap, fused)
                    for name, make, fused in VARIANTS}
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
        rows.append((sg_scale, bootstrap, {name: (statistics.median(t), min(t)) for name, t in times.items()}))
    print(f"R={a.runs} runs, T={a.truncation}, hidden {a.hidden}, {a.batch_size} streams, {a.threads} thread(s); "
          f"ms per window per run, median (min) of {a.repeats} blocks of {a.windows} windows")
    names = [name for name, _, _ in VARIANTS]
    print(f"| sg_scale | bootstrap | {' | '.join(names)} | stacked fused vs separate | fused vs autograd SG, stacked |")
    print("|---:|---:|" + "---:|" * (len(names) + 2))
    for sg_scale, bootstrap, ms in rows:
        cells = " | ".join(f"{ms[n][0]:.3f} ({ms[n][1]:.3f})" for n in names)
        print(f"| {sg_scale:g} | {bootstrap:g} | {cells} | {ms['separate'][0] / ms['stacked fused'][0]:.2f}x | "
              f"{ms['stacked'][0] / ms['stacked fused'][0]:.2f}x |")


# (name, builder, SG on the fused ops)
VARIANTS = (("separate", separate_runs, False), ("separate fused", separate_runs, True),
            ("stacked", stacked_runs, False), ("stacked fused", stacked_runs, True))


if __name__ == "__main__":
    main()
