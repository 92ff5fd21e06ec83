"""The paper's asynchronous MNIST experiments, in one process: layers updated at independent random
rates, and the complete unlock (forward and update), against backprop and cDNI.

    python -m fastdni.experiments.unlocked                 # 5 epochs of each mode, FCN with BatchNorm
    python -m fastdni.experiments.unlocked --modes backprop complete-unlock --steps 2340

Modes: ``backprop``; ``cdni`` (update unlocked, SGs see the labels); ``random-rates``: cDNI in which
block ``i`` (and the SG on its output) is updated at each step with its own probability ``p_i``,
drawn once from U(``--min-rate``, 1); ``complete-unlock``: cDNI plus a synthetic-input model per
block (an MLP of the image) so no block waits for the forward of the blocks below.
Writes ``<out>/<mode>.csv``, ``results.json``, ``test_error.png`` and prints a results table.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn import DecoupledSequential, ForwardUnlockedSequential, RandomRateSequential
from ..train import train
from .cli import mnist_main, require_positive
from .models import fcn_blocks, synthetic_gradients
from .report import plot_curves, results_table

MODES = ("backprop", "cdni", "random-rates", "complete-unlock")
INPUT_FEATURES = 784


def update_rates(num_blocks: int, min_rate: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return [round(min_rate + (1.0 - min_rate) * float(u), 3) for u in torch.rand(num_blocks, generator=gen)]


def build_model(mode: str, args) -> DecoupledSequential:
    torch.manual_seed(args.seed)
    blocks = fcn_blocks(args.hidden_layers, args.width, INPUT_FEATURES)
    common = dict(optimizer=partial(torch.optim.Adam, lr=args.lr), sg_optimizer=partial(torch.optim.Adam, lr=args.sg_lr),
                  gradient_scale=args.batch_size, sg_targets="bootstrap")  # the paper's protocol, as docs/ measured it
    if mode == "backprop":
        return DecoupledSequential(blocks, mode="backprop", **common)
    sgs = synthetic_gradients(blocks, (INPUT_FEATURES,), (), context_features=10)
    if mode == "cdni":
        return DecoupledSequential(blocks, sgs, **common)
    if mode == "random-rates":
        rates = update_rates(len(blocks), args.min_rate, args.seed)
        return RandomRateSequential(blocks, sgs, update_probabilities=rates, seed=args.seed, **common)
    inputs = [nn.Sequential(nn.Linear(INPUT_FEATURES, args.input_hidden), nn.ReLU(), nn.Linear(args.input_hidden, args.width))
              for _ in blocks[1:]]
    return ForwardUnlockedSequential(blocks, sgs, inputs, **common)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastdni.experiments.unlocked", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--hidden-layers", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--input-hidden", type=int, default=512, help="hidden units of each synthetic-input model")
    p.add_argument("--min-rate", type=float, default=0.2, help="random-rates: each block's update probability is U(min, 1)")
    p.add_argument("--steps", type=int, default=1170, help="training steps per mode (234 = 1 epoch)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sg-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=234)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/unlocked"))
    args = p.parse_args(argv)
    if not 0.0 < args.min_rate <= 1.0:
        p.error(f"--min-rate: expected a probability in (0, 1], got {args.min_rate}")
    require_positive(p, args, ("steps", "batch_size", "eval_every", "hidden_layers", "width", "input_hidden"))
    return args


@mnist_main(parse_args)
def main(args: argparse.Namespace, data) -> int:
    flat = lambda images: images.reshape(-1, INPUT_FEATURES)
    rows = []
    for mode in args.modes:
        model = build_model(mode, args)
        result = train(model, (flat(data.train_images), data.train_labels), (flat(data.test_images), data.test_labels),
                       steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                       use_context=mode != "backprop", log_path=args.out / f"{mode}.csv", lr_schedule="cosine",
                       desc=mode, progress=False)
        row = {"mode": mode, "steps": args.steps, "test_error": result.history[-1]["test_error"],
               "ms_per_step": 1000.0 * result.train_seconds / args.steps,
               "curve": [(h["step"], h["test_error"]) for h in result.history]}
        if isinstance(model, RandomRateSequential):
            row["update_probabilities"] = list(model.update_probabilities)
            row["updates_per_block"] = model.update_counts
        rows.append(row)
        print(f"{mode}: test error {row['test_error']:.2f}% after {args.steps} steps", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    plot_curves(rows, args.out / "test_error.png", title="MNIST FCN-BN: asynchronous variants")
    print(results_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
