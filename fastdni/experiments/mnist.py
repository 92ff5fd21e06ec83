"""MNIST with backprop, DNI and cDNI on the paper's FCN or a small CNN.

    python -m fastdni.experiments.mnist                  # the demo: bp vs dni vs cdni, the FCN with BatchNorm
    python -m fastdni.experiments.mnist --paper          # the paper's schedule (Adam 3e-5, 500k steps)
    python -m fastdni.experiments.mnist --model cnn --modes dni --steps 2000
    python -m fastdni.experiments.mnist --backend reference    # the same run on the pure-PyTorch oracle
    python -m fastdni.experiments.mnist --model fcn-bn --backend autograd   # fcn-bn on autograd, for comparison

Models: ``fcn-bn`` (default) is the paper's FCN with BatchNorm, hidden layers Linear -> BatchNorm -> ReLU, and
``fcn`` the same without BatchNorm, Linear -> ReLU; each layer step of both runs on the fused ops
(:class:`fastdni.nn.DecoupledMLP`, ``--backend``), or on autograd with ``--backend autograd``
(:class:`fastdni.nn.DecoupledSequential` over the same layers: the same training, tests/nn/test_nn_fused_bn.py).
``cnn``, a small CNN, runs each conv block's step on the fused ops (:class:`fastdni.nn.DecoupledCNN`: the convolution
as the layer GEMM over the unfolded input, BatchNorm2d over its channels-last rows), or on autograd with
``--backend autograd`` (:class:`fastdni.nn.DecoupledSequential` over ``cnn_blocks``: the same training,
tests/nn/test_fused_cnn.py).

Writes ``<out>/<mode>.csv`` (learning curve), ``<mode>.pt`` (checkpoint, see ``--resume``),
``results.json``, ``test_error.png``, and prints a results table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..nn import DecoupledCNN, DecoupledMLP, DecoupledSequential
from ..nn.decoupled import SG_TARGETS
from ..nn.fused_cnn import WEIGHT_GRADS
from ..ops import BACKENDS as OP_BACKENDS
from ..train import CheckpointError, train
from .cli import mnist_main, require_positive
from .models import NUM_CLASSES, cnn_blocks, fcn_blocks, parse_sizes, synthetic_gradients
from .report import plot_curves, results_table

MODES = ("backprop", "dni", "cdni")
MODE_ALIASES = {"bp": "backprop"}
PAPER = dict(lr=3e-5, sg_lr=3e-5, steps=500_000, eval_every=5_000, lr_schedule="constant")
DEMO = dict(steps=4680, eval_every=234, lr_schedule="cosine")
PAPER_BATCH = 256
# The CNN's demo takes 4 times as many steps per epoch: its SG-trained blocks close on backprop with the number of
# updates, not of examples (docs/mnist.md, "The CNN at batch 64"), and a step of 64 costs a quarter of one of 256.
DEMO_BATCH = {"cnn": 64}
# Adam learning rates of the demo per mode, from sweeps (docs/mnist.md): at 5 epochs for the models with
# BatchNorm, at 20 epochs for the fused fcn. DNI's blocks need a smaller rate: without the label its synthetic
# gradients are noisy, and Adam turns noise into full steps. Without BatchNorm the SG models want a higher rate.
# The classifier (head) learns from the true gradient in every mode: under DNI with BatchNorm it keeps backprop's
# rate (20 epochs: 4.07% against 4.49%); without BatchNorm that was no better (8.86% against 8.75%).
DEMO_LR_BN = {"backprop": dict(lr=1e-3, sg_lr=1e-3), "dni": dict(lr=1e-4, sg_lr=1e-3, head_lr=1e-3),
              "cdni": dict(lr=1e-3, sg_lr=1e-3)}
DEMO_LR = {
    "fcn": {"backprop": dict(lr=1e-3, sg_lr=1e-3), "dni": dict(lr=1e-4, sg_lr=1e-3),
            "cdni": dict(lr=1e-3, sg_lr=3e-3)},
    # With true SG targets a linear DNI SG trains the FCN-BN as well as the paper's 2x1024 MLP at a fraction of its
    # cost (20 epochs: 2.15% at block rate 3e-4 against 2.20% for the MLP; docs/mnist.md), its blocks at 3e-4.
    "fcn-bn": {**DEMO_LR_BN, "dni": dict(lr=3e-4, sg_lr=1e-3, head_lr=1e-3)},
    # The CNN runs at batch 64 (DEMO_BATCH). There cDNI's blocks take backprop's rate (5 epochs, seed 0: 0.91% at
    # 1e-3 against 0.99 / 1.05 / 1.09% at 5e-4 / 2e-4 / 1e-4; backprop 0.67%; at batch 256 they needed 1e-4), and its
    # SG (a 5x5 conv over 64 channels) 1e-4: seeds 0-2 0.86 / 0.88 / 0.81% against 0.91 / 0.99 / 1.05% at 3e-4
    # (decouple's fan-in rule, the better rate at batch 256) and 1.27% (seed 2) at 1e-3. docs/mnist.md.
    "cnn": {**DEMO_LR_BN, "cdni": dict(lr=1e-3, sg_lr=1e-4, head_lr=1e-3)},
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run; a checkpoint only resumes a run with the same config."""

    mode: str
    steps: int
    lr: float  #: Adam learning rate of the blocks
    sg_lr: float  #: Adam learning rate of the SG models
    lr_schedule: str
    head_lr: Optional[float] = None  #: Adam learning rate of the classifier (None: ``lr``)
    model: str = "fcn"
    backend: str = "auto"  #: fused-op backend of the models, or "autograd" (DecoupledSequential)
    hidden_layers: int = 3
    width: int = 256
    cnn_channels: tuple[int, ...] = (32, 64)
    sg_hidden: tuple[int, ...] = ()
    batch_size: int = PAPER_BATCH
    gradient_scale: Optional[float] = None  #: SG models predict this times dL/dh; None: the batch size
    seed: int = 0
    #: what the SG models are regressed onto (DecoupledSequential's ``sg_targets``); None: the model's default,
    #: "true", or "bootstrap" for the cnn (its fused DecoupledCNN's; both measured equal on it, docs/mnist.md)
    sg_targets: Optional[str] = None
    #: cnn on the fused ops: each conv's weight gradient from ATen ("aten") or the fused GEMM ("gemm"); DecoupledCNN
    conv_weight_grad: str = "aten"


MODELS = ("fcn", "fcn-bn", "cnn")
#: ``--backend``: a fused-op backend (``fastdni.ops.BACKENDS``) or ``autograd`` (the blocks on DecoupledSequential).
BACKENDS = (*OP_BACKENDS, "autograd")


def build_model(config: RunConfig) -> Union[DecoupledMLP, DecoupledCNN, DecoupledSequential]:
    torch.manual_seed(config.seed)
    optimizers = dict(optimizer=partial(torch.optim.Adam, lr=config.lr), sg_optimizer=partial(torch.optim.Adam, lr=config.sg_lr),
                      head_optimizer=partial(torch.optim.Adam, lr=config.head_lr or config.lr))
    mode = "backprop" if config.mode == "backprop" else "dni"
    # The loss is a batch mean: by default SG models predict per-example gradients.
    gradient_scale = config.gradient_scale or config.batch_size
    context = 10 if config.mode == "cdni" else 0
    batch_norm = config.model == "fcn-bn"
    sg_targets = config.sg_targets or ("bootstrap" if config.model == "cnn" else "true")
    if config.model != "cnn" and config.backend != "autograd":
        # The same initialisation as fcn_blocks + synthetic_gradients below (Linears in order, then the SG models).
        return DecoupledMLP(784, (config.width,) * config.hidden_layers, NUM_CLASSES, sg_hidden=config.sg_hidden,
                            context_features=context, mode=mode, gradient_scale=gradient_scale, backend=config.backend,
                            batch_norm=batch_norm, sg_targets=sg_targets, **optimizers)
    if config.backend != "autograd":
        if sg_targets != "bootstrap":
            raise ValueError(f"sg_targets={sg_targets!r}: the fused CNN (DecoupledCNN) regresses its SG models onto "
                             "bootstrapped targets only; use --backend autograd")
        # The same initialisation as cnn_blocks + synthetic_gradients below (conv blocks, classifier, SG models).
        return DecoupledCNN(1, config.cnn_channels, 28, NUM_CLASSES, sg_hidden=config.sg_hidden, context_features=context,
                            mode=mode, gradient_scale=gradient_scale, backend=config.backend,
                            weight_grad=config.conv_weight_grad, **optimizers)
    if config.model != "cnn":
        blocks, input_shape = fcn_blocks(config.hidden_layers, config.width, batch_norm=batch_norm), (784,)
    else:
        blocks, input_shape = cnn_blocks(config.cnn_channels), (1, 28, 28)
    sgs = None
    if config.mode != "backprop":
        sgs = synthetic_gradients(blocks, input_shape, config.sg_hidden, context_features=context)
    return DecoupledSequential(blocks, sgs, mode=mode, gradient_scale=gradient_scale, sg_targets=sg_targets,
                               **optimizers)


def run(config: RunConfig, data, out: Path, *, eval_every: int, checkpoint_every: int, resume: bool, progress: bool) -> dict:
    """Train one configuration; returns its summary row."""
    model = build_model(config)
    shape = (-1, 1, 28, 28) if config.model == "cnn" else (-1, 784)
    result = train(
        model,
        (data.train_images.reshape(shape), data.train_labels),
        (data.test_images.reshape(shape), data.test_labels),
        steps=config.steps,
        batch_size=config.batch_size,
        seed=config.seed,
        eval_every=eval_every,
        use_context=config.mode == "cdni",
        log_path=out / f"{config.mode}.csv",
        checkpoint_path=out / f"{config.mode}.pt",
        checkpoint_every=checkpoint_every,
        resume=resume,
        run_config=dataclasses.asdict(config),
        lr_schedule=config.lr_schedule,
        desc=config.mode,
        progress=progress,
    )
    last = result.history[-1] if result.history else {}
    return {
        "mode": config.mode,
        "steps": config.steps,
        "test_error": last.get("test_error", float("nan")),
        "train_loss": last.get("train_loss", float("nan")),
        "ms_per_step": 1000.0 * result.train_seconds / max(config.steps, 1),
        "curve": [(h["step"], h["test_error"]) for h in result.history],
        "config": dataclasses.asdict(config),
    }


def _mode(text: str) -> str:
    mode = MODE_ALIASES.get(text, text)
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected one of {MODES + tuple(MODE_ALIASES)}, got {text!r}")
    return mode


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastdni.experiments.mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", type=_mode, default=list(MODES), help="backprop (bp), dni, cdni")
    p.add_argument("--model", choices=MODELS, default="fcn-bn",
                   help="fcn-bn: the paper's FCN, Linear+BatchNorm+ReLU layers (default); fcn: without BatchNorm; cnn: two "
                        "conv blocks (all on the fused ops)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="fused-op backend of the models (auto: the compiled kernels where built, else reference), "
                        "or autograd: the same layers on DecoupledSequential")
    p.add_argument("--hidden-layers", type=int, default=3, help="FCN hidden layers (paper: 3-6)")
    p.add_argument("--width", type=int, default=256, help="FCN hidden units (paper: 256)")
    p.add_argument("--cnn-channels", type=parse_sizes, default=(32, 64), help="CNN conv block channels")
    p.add_argument("--dni-sg-hidden", type=parse_sizes, default=None,
                   help="hidden sizes of the DNI SG model (default: 1024,1024 for fcn as in the paper, linear for fcn-bn, "
                        "64 for cnn)")
    p.add_argument("--cdni-sg-hidden", type=parse_sizes, default=(), help="hidden sizes of the cDNI SG model (default: linear)")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode (default 4680: 20 epochs at batch 256, 5 for the cnn at 64)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (default: per model, DEMO_BATCH; 256 as in the paper otherwise and with --paper)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate of the blocks, all modes (default: per model and mode, DEMO_LR)")
    p.add_argument("--sg-lr", type=float, default=None, help="Adam learning rate of the SG models (default: per model and mode, DEMO_LR)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="Adam learning rate of the classifier (default: per model and mode, DEMO_LR; else --lr)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="learning-rate schedule of every optimizer (default cosine decay to 0; --paper: constant)")
    p.add_argument("--gradient-scale", type=float, default=None,
                   help="SG models predict this times dL/dh (default: the batch size, i.e. per-example gradients)")
    p.add_argument("--sg-targets", choices=SG_TARGETS, default=None,
                   help="what each SG model is regressed onto: bootstrap (the SG above pushed back through the block, "
                        "the paper's) or true (the true dL/dh at its interface); default true, cnn: bootstrap (the fused "
                        "CNN's; both measured equal on it, docs/mnist.md)")
    p.add_argument("--conv-weight-grad", choices=WEIGHT_GRADS, default="aten",
                   help="cnn on the fused ops: each conv's weight gradient from ATen's convolution_backward (default; "
                        "faster on CPUs measured, docs/performance.md) or the fused GEMM over the unfolded input (gemm)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations (default 234 = 1 epoch)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's schedule: Adam lr 3e-5 for blocks and SGs, 500k steps (explicit flags still win)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="datasets folder (holding mnist/) or the mnist folder")
    p.add_argument("--out", type=Path, default=Path("runs/mnist"), help="output folder (default runs/mnist)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue each mode from its checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    defaults = PAPER if args.paper else DEMO
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size is None:
        args.batch_size = PAPER_BATCH if args.paper else DEMO_BATCH.get(args.model, PAPER_BATCH)
    if args.dni_sg_hidden is None:
        args.dni_sg_hidden = {"cnn": (64,), "fcn-bn": ()}.get(args.model, (1024, 1024))
    require_positive(p, args, ("steps", "batch_size", "eval_every", "hidden_layers", "width"))
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every: expected >= 0, got {args.checkpoint_every}")
    return args


def config_for(args: argparse.Namespace, mode: str) -> RunConfig:
    """The run of ``mode`` that the parsed command line ``args`` asks for (per-mode defaults filled in)."""
    return RunConfig(
        mode=mode, model=args.model, backend=args.backend, hidden_layers=args.hidden_layers, width=args.width,
        cnn_channels=tuple(args.cnn_channels),
        sg_hidden=tuple(args.cdni_sg_hidden if mode == "cdni" else args.dni_sg_hidden if mode == "dni" else ()),
        steps=args.steps, batch_size=args.batch_size,
        lr=args.lr or DEMO_LR[args.model][mode]["lr"], sg_lr=args.sg_lr or DEMO_LR[args.model][mode]["sg_lr"],
        head_lr=args.head_lr or (None if args.lr else DEMO_LR[args.model][mode].get("head_lr")),
        lr_schedule=args.lr_schedule, gradient_scale=args.gradient_scale, seed=args.seed, sg_targets=args.sg_targets,
        conv_weight_grad=args.conv_weight_grad,
    )


@mnist_main(parse_args)
def main(args: argparse.Namespace, data) -> int:
    rows = []
    for mode in dict.fromkeys(args.modes):
        config = config_for(args, mode)
        try:
            rows.append(run(config, data, args.out, eval_every=args.eval_every,
                            checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.no_progress))
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{mode}: test error {rows[-1]['test_error']:.2f}% after {config.steps} steps", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    plot_curves(rows, args.out / "test_error.png", title=f"MNIST {args.model.upper()}")
    print(results_table(rows))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'test_error.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
