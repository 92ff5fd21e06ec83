"""Decoupled (cDNI) pipeline training, one stage per process, against backprop, GPipe and 1F1B.

    # one machine, 4 stages (one per process), all four modes in one run:
    torchrun --nproc-per-node 4 -m fastdni.experiments.pipeline --emulated-ms 20
    # many machines: the same command on every node, with a rendezvous endpoint on one of them:
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id dni1 \\
        -m fastdni.experiments.pipeline --emulated-ms 20

The model is the paper's FCN with BatchNorm (``--hidden-layers`` + a classifier), its blocks split
into as many contiguous stages as there are ranks. Every mode trains ``--steps`` batches of
``--micro-batches`` x ``--micro-batch-size`` examples: ``dni`` updates each stage per micro-batch from
its synthetic gradient (cDNI: the SG sees the labels); ``gpipe``/``1f1b`` run
``torch.distributed.pipelining``'s schedules and ``backprop`` one process, each stepping once per batch.
``--emulated-ms`` adds that much sleep per micro-batch to every stage's forward (and backward), so that
schedule throughput is compared at equal stage cost on machines with fewer cores than ranks.

Writes ``<out>/results.json``, ``table.md``, ``curves.png``; checkpoints of the dni mode in
``<out>/checkpoints`` (``--resume`` continues from the newest step that every stage saved).
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import DatasetError, load_mnist
from ..distributed import Data, EmulatedCost, Fault, Health, PeerFailure, PipelineConfig, StageRunner, WireError
from ..distributed import run_stage, split_stages, stage_bounds
from ..distributed.baselines import SCHEDULES, assemble, gather_state_dicts, train_backprop, train_schedule
from ..nn import DecoupledSequential
from ..train import CheckpointError
from ..train.loop import evaluate_error
from .models import block_output_shapes, fcn_blocks, parse_sizes, synthetic_gradients

MODES = ("dni",) + SCHEDULES + ("backprop",)
INPUT_FEATURES = 784


def synthetic_data(seed: int, train: int = 4096, test: int = 1024) -> Data:
    """A small, easily learnt task with MNIST's shapes (noisy copies of 10 random class centres), for tests."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, INPUT_FEATURES, generator=gen)
    y = torch.randint(0, 10, (train + test,), generator=gen)
    x = centres[y] + 2.0 * torch.randn(train + test, INPUT_FEATURES, generator=gen)
    return Data(x[:train], y[:train], x[train:], y[train:])


def load_data(source: str, seed: int) -> Data:
    if source == "synthetic":
        return synthetic_data(seed)
    mnist = load_mnist(None if source == "mnist" else source)
    return Data(mnist.train_images.reshape(-1, INPUT_FEATURES), mnist.train_labels,
                mnist.test_images.reshape(-1, INPUT_FEATURES), mnist.test_labels)


def build_blocks(args, num_stages: int) -> tuple[list[nn.Module], list[tuple[int, int]]]:
    """The FCN's blocks, the same on every rank and in every mode (seeded), and the stage split;
    the last block of each stage carries the stage's emulated cost."""
    torch.manual_seed(args.seed)
    blocks = fcn_blocks(args.hidden_layers, args.width, INPUT_FEATURES)
    bounds = stage_bounds(len(blocks), num_stages)
    seconds = args.emulated_ms / 1000.0
    for _, stop in bounds:
        blocks[stop - 1] = EmulatedCost(blocks[stop - 1], seconds, seconds)
    return blocks, bounds


def _adam(lr: float):
    return partial(torch.optim.Adam, lr=lr)


def run_dni(args, data: Optional[Data], health: Health, run_config: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks, bounds = build_blocks(args, world)
    sgs = synthetic_gradients(blocks, (INPUT_FEATURES,), args.sg_hidden, context_features=10 if args.context else 0)
    model = DecoupledSequential(blocks, sgs, optimizer=_adam(args.lr), sg_optimizer=_adam(args.sg_lr),
                                gradient_scale=args.micro_batch_size, sg_targets="bootstrap")  # what stages exchange
    stage = split_stages(model, world, max_staleness=args.max_staleness, use_context=args.context, bounds=bounds)[rank]
    first = stage.first
    input_shape = (INPUT_FEATURES,) if first == 0 else block_output_shapes(blocks, (INPUT_FEATURES,))[first - 1]
    config = PipelineConfig(
        steps=args.steps * args.micro_batches, micro_batch_size=args.micro_batch_size, seed=args.seed,
        queue_depth=args.queue_depth, timeout=args.timeout, eval_every=args.eval_every * args.micro_batches,
        checkpoint_dir=args.out / "checkpoints", checkpoint_every=args.checkpoint_every * args.micro_batches,
        resume=args.resume, fault=args.fault,
    )
    runner = StageRunner(stage, F.cross_entropy, config, input_spec=(torch.float32, tuple(input_shape)),
                         health=health, run_config=run_config)
    report = run_stage(runner, data if rank == 0 else None)
    reports: list = [None] * world
    dist.all_gather_object(reports, dataclasses.asdict(report))
    last = reports[-1]
    micro_batches_run = last["steps"]
    return {
        "mode": "dni" if not args.context else "cdni",
        "samples": micro_batches_run * args.micro_batch_size,
        "train_seconds": max(r["train_seconds"] for r in reports),
        "test_error": last["history"][-1]["test_error"] if last["history"] else float("nan"),
        "curve": [(h["step"] * args.micro_batch_size, h["train_seconds"], h["test_error"]) for h in last["history"]],
        "staleness_mean": [r["staleness_mean"] for r in reports[:-1]],
        "staleness_max": [r["staleness_max"] for r in reports[:-1]],
        "targets_applied": [r["targets_applied"] for r in reports[:-1]],
        "targets_dropped": [r["targets_dropped"] for r in reports[:-1]],
        "resumed_from": last["start_step"],
    }


def run_baseline(mode: str, args, data: Data) -> dict:
    """GPipe / 1F1B on all ranks, or backprop on rank 0 (the others wait)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks, bounds = build_blocks(args, world)
    batch = args.micro_batches * args.micro_batch_size
    curve: list = []
    common = dict(steps=args.steps, micro_batches=args.micro_batches, micro_batch_size=args.micro_batch_size,
                  seed=args.seed, loss_fn=F.cross_entropy)
    stages = [nn.Sequential(*blocks[a:b]) for a, b in bounds]

    def evaluate(step: int, seconds: float, model_of) -> None:
        if step % args.eval_every and step != args.steps:
            return
        model = model_of()
        if rank == 0:
            curve.append((step * batch, seconds, evaluate_error(model, data.test_x, data.test_y)))

    if mode == "backprop":
        seconds = 0.0
        if rank == 0:
            model = nn.Sequential(*stages)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            seconds = train_backprop(model, optimizer, data.train_x, data.train_y, **common,
                                     on_step=lambda step, s: evaluate(step, s, lambda: model))
        dist.barrier()
    else:
        a, _ = bounds[rank]
        module = stages[rank]
        optimizer = torch.optim.Adam(module.parameters(), lr=args.lr)
        in_shape = (INPUT_FEATURES,) if a == 0 else block_output_shapes(blocks, (INPUT_FEATURES,))[a - 1]
        example = torch.zeros(args.micro_batch_size, *in_shape)
        seconds = train_schedule(mode, module, rank, world, optimizer, data.train_x, data.train_y, **common,
                                 example_input=example,
                                 on_step=lambda step, s: evaluate(step, s, lambda: assemble(stages, gather_state_dicts(module))))
        everyone: list = [None] * world
        dist.all_gather_object(everyone, seconds)
        seconds = max(everyone)
    return {"mode": mode, "samples": args.steps * batch, "train_seconds": seconds,
            "test_error": curve[-1][2] if curve else float("nan"), "curve": curve}


def results_table(rows: Sequence[dict], *, emulated_ms: float, train_size: int) -> str:
    """Markdown: samples/s and its ratio to 1F1B, final test error, staleness of the SG targets."""
    base = next((r for r in rows if r["mode"] == "1f1b"), None)
    cost = f"emulated: {emulated_ms:g} ms forward + {emulated_ms:g} ms backward sleep per micro-batch per stage" \
        if emulated_ms else "real compute (no emulated cost)"
    lines = [f"stage cost: {cost}", "",
             "| mode | epochs | train s | samples/s | vs 1F1B | test error (%) | SG target staleness mean / max (per stage) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rate = r["samples"] / r["train_seconds"] if r["train_seconds"] else float("nan")
        ratio = f"{rate / (base['samples'] / base['train_seconds']):.2f}x" if base and base["train_seconds"] else "n/a"
        stale = " ".join(f"{m:.2f}/{x}" for m, x in zip(r.get("staleness_mean", ()), r.get("staleness_max", ()))) or "-"
        lines.append(f"| {r['mode']} | {r['samples'] / train_size:.2f} | {r['train_seconds']:.1f} | {rate:.0f} | {ratio} "
                     f"| {r['test_error']:.2f} | {stale} |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[dict], path: Path, *, train_size: int, title: str) -> None:
    """Test error against epochs and against training wall-clock, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for r in rows:
        if r["curve"]:
            samples, seconds, errors = zip(*r["curve"])
            axes[0].plot([s / train_size for s in samples], errors, marker=".", label=r["mode"])
            axes[1].plot(seconds, errors, marker=".", label=r["mode"])
    for ax, label in zip(axes, ("epochs", "training wall-clock (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fault(text: str) -> Fault:
    parts = text.split(":")
    try:
        return Fault(int(parts[0]), int(parts[1]), *parts[2:3])
    except (ValueError, IndexError) as err:
        raise argparse.ArgumentTypeError(f"expected RANK:MICRO_BATCH[:exit|hang], got {text!r} ({err})") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node K -m fastdni.experiments.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--data", default="mnist", help="'mnist' (../shared/datasets or $FASTDNI_DATA), a folder, or 'synthetic'")
    p.add_argument("--hidden-layers", type=int, default=3, help="FCN hidden layers; blocks = hidden layers + 1")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=234, help="batches per mode")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per batch")
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--emulated-ms", type=float, default=0.0, help="sleep per micro-batch per stage, forward and backward each")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the blocks")
    p.add_argument("--sg-lr", type=float, default=1e-3, help="Adam learning rate of the SG models")
    p.add_argument("--sg-hidden", type=parse_sizes, default=(), help="hidden sizes of the SG models (default: linear)")
    p.add_argument("--no-context", dest="context", action="store_false", help="plain DNI: SG models without the labels")
    p.add_argument("--max-staleness", type=int, default=8, help="micro-batches after which an SG target is dropped")
    p.add_argument("--queue-depth", type=int, default=2, help="messages in flight per direction before a sender waits")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds after which a silent rank counts as dead or hung")
    p.add_argument("--eval-every", type=int, default=0, help="batches between test evaluations (0: at the end only)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="batches between dni checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="dni: continue from the newest checkpoint all stages share")
    p.add_argument("--fault", type=_fault, default=None, help="drill: RANK:MICRO_BATCH[:exit|hang] kills or hangs a rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    args = p.parse_args(argv)
    for name in ("steps", "micro_batches", "micro_batch_size", "hidden_layers", "width", "max_staleness", "queue_depth"):
        if getattr(args, name) < (0 if name == "max_staleness" else 1):
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.timeout <= 0 or args.emulated_ms < 0:
        p.error("--timeout: expected > 0; --emulated-ms: expected >= 0")
    if args.eval_every == 0:
        args.eval_every = args.steps
    return args


def _exit_after_failure(health: Health, message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    # Linger for two heartbeat intervals so that every rank reads the abort record (this rank may
    # host the store), then exit at once: pending ops on a dead peer can block the process group's
    # destructor.
    time.sleep(2.5 * health.interval)
    os._exit(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack: for hangs
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=max(3600.0, 4 * args.timeout)))
    rank, world = dist.get_rank(), dist.get_world_size()
    health = Health(dist.distributed_c10d._get_default_store(), rank, world, timeout=args.timeout)
    try:
        data = load_data(args.data, args.seed)
        # What a checkpoint must match to be resumed: the model and the training, not how ranks talk or report.
        operational = ("modes", "resume", "fault", "out", "threads", "timeout", "queue_depth", "eval_every")
        run_config = {k: str(v) for k, v in vars(args).items() if k not in operational}
        rows = []
        for mode in args.modes:
            dist.barrier()
            health.restart_clocks()
            started = time.perf_counter()
            row = run_dni(args, data, health, run_config) if mode == "dni" else run_baseline(mode, args, data)
            if rank == 0:
                rate = row["samples"] / row["train_seconds"]
                print(f"{row['mode']}: {rate:.0f} samples/s, test error {row['test_error']:.2f}% "
                      f"({time.perf_counter() - started:.1f}s)", flush=True)
            rows.append(row)
        health.mark_done()
    except (PeerFailure, WireError, CheckpointError, DatasetError) as err:
        _exit_after_failure(health, f"rank {rank}: error: {err}")
    except BaseException as err:
        health.abort(f"rank {rank} failed: {type(err).__name__}: {err}")
        traceback.print_exc()
        _exit_after_failure(health, f"rank {rank}: error: {type(err).__name__}: {err}")
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        table = results_table(rows, emulated_ms=args.emulated_ms, train_size=len(data.train_x))
        (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "world_size": world, "rows": rows}, indent=2))
        (args.out / "table.md").write_text(table + "\n")
        plot_curves(rows, args.out / "curves.png", train_size=len(data.train_x),
                    title=f"{world} stages, {'emulated' if args.emulated_ms else 'real'} stage cost")
        print(table)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
