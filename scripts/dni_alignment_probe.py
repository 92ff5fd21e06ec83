"""Where DNI's synthetic gradients point, layer by layer, on the MNIST experiments' models (FCN with BatchNorm, CNN).

Trains one mode of ``python -m fastdni.experiments.mnist`` (its models, demo rates, cosine schedule) and prints, per
interface and per fifth of the run: the cosine of the SG's prediction ``M`` with its regression target ``s t`` (the
true gradient for the top SG, bootstrapped ones below), its norm ratio and the share of ``|M|`` that is the batch
mean; and, every ``--every`` steps, the cosine of ``M / s`` with the true gradient of the whole network
(:meth:`fastdni.nn.DecoupledSequential.sg_alignment`): what the block below actually follows. Results in
docs/mnist.md.

    python scripts/dni_alignment_probe.py                                  # fcn-bn dni, 5 epochs
    python scripts/dni_alignment_probe.py --block-lrs 0 0 1e-4             # blocks 1, 2 frozen: what block 3 adds
    python scripts/dni_alignment_probe.py --bottom-linear                  # a linear SG after block 1
    python scripts/dni_alignment_probe.py --block-lrs 1e-3 1e-3 1e-3 --trust 0.9   # lr times the SGs' cosines
    python scripts/dni_alignment_probe.py --model cnn --mode cdni --steps 702 --eval-every 117
    python scripts/dni_alignment_probe.py --true-targets                   # every SG regressed on the true dL/dh
"""
import argparse
import dataclasses

import torch

from dni_interface_probe import ProbeDNI
from fastdni.data import load_mnist
from fastdni.experiments import mnist
from fastdni.nn import SyntheticGradient
from fastdni.train import train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("fcn-bn", "cnn"), default="fcn-bn")
    p.add_argument("--mode", choices=("dni", "cdni"), default="dni")
    p.add_argument("--steps", type=int, default=1170, help="training steps (default 1170: 5 epochs)")
    p.add_argument("--eval-every", type=int, default=234)
    p.add_argument("--every", type=int, default=25, help="steps between true-gradient alignments")
    p.add_argument("--sg-lr", type=float, help="the SG models' Adam rate (default: the demo's)")
    p.add_argument("--head-lr", type=float, help="the classifier's Adam rate (default: the demo's)")
    p.add_argument("--block-lrs", type=float, nargs="+", help="one Adam rate per block under an SG (default: the demo's)")
    p.add_argument("--sg-hidden", type=mnist.parse_sizes, help="the SG models' hidden sizes (default: the demo's)")
    p.add_argument("--bottom-linear", action="store_true", help="a linear SG model after the first block")
    p.add_argument("--sg-eps", type=float, default=1e-8, help="the SG optimizers' Adam eps")
    p.add_argument("--trust", type=float, default=0.0,
                   help="> 0: each block's rate times the product of the running cosines (this decay) of the SGs "
                        "at and above it with their targets")
    p.add_argument("--true-targets", action="store_true",
                   help="regress every SG onto the true gradient at its interface (a full backprop per step, "
                        "nothing stepped by it) instead of the bootstrapped target")
    return p


def build(args):
    # The probe swaps DecoupledSequential's interfaces: the autograd model (fcn-bn runs on the fused ops by default).
    cli = ["--model", args.model, "--modes", args.mode, "--backend", "autograd"]
    if args.sg_hidden is not None:
        cli += [f"--{args.mode}-sg-hidden", ",".join(map(str, args.sg_hidden)) or "linear"]
    config = mnist.config_for(mnist.parse_args(cli), args.mode)
    config = dataclasses.replace(config, steps=args.steps, sg_lr=args.sg_lr or config.sg_lr,
                                 head_lr=args.head_lr or config.head_lr)
    model = mnist.build_model(config)
    for i, old in enumerate(model.interfaces):  # the same SG models, behind an interface that keeps a trace
        sg = SyntheticGradient(old.synthetic_gradient.features) if args.bottom_linear and i == 0 else old.synthetic_gradient
        model.interfaces[i] = ProbeDNI(sg, loss_weight=old.loss_weight, gradient_scale=old.gradient_scale)
        model.sg_optimizers[i] = torch.optim.Adam(sg.parameters(), lr=config.sg_lr, eps=args.sg_eps)
    if args.block_lrs:
        if len(args.block_lrs) != len(model.interfaces):
            raise SystemExit(f"--block-lrs: expected {len(model.interfaces)} rates, got {len(args.block_lrs)}")
        for optimizer, lr in zip(model.optimizers, args.block_lrs):
            for group in optimizer.param_groups:
                group["lr"] = lr
    return config, model


def instrument(model, args, true_alignment: list) -> None:
    """Wrap ``train_step``: the true-gradient alignment every ``--every`` steps, and the trust-scaled rates."""
    plain, running, calls = model.train_step, {}, [0]

    def train_step(x, y, loss_fn, context=None):
        if calls[0] % args.every == 0:
            true_alignment.append([a.cosine for a in model.sg_alignment(x, y, loss_fn, context)])
        calls[0] += 1
        if args.true_targets:
            for interface, grad in zip(model.interfaces, model.true_gradients(x, y, loss_fn)[1]):
                interface.true_target = grad
        if args.trust:  # the loop has just set every rate from its schedule; scale the blocks' ones
            product = 1.0
            for i in reversed(range(len(model.interfaces))):
                trace = model.interfaces[i].trace
                if trace:
                    running[i] = args.trust * running.get(i, 0.0) + (1 - args.trust) * max(trace[-1][0], 0.0)
                product *= running.get(i, 0.0)
                for group in model.optimizers[i].param_groups:
                    group["lr"] *= product
        return plain(x, y, loss_fn, context)

    model.train_step = train_step


def fifths(rows: list) -> list:
    t = torch.tensor(rows, dtype=torch.float64)
    n = len(rows)
    return [t[i * n // 5:(i + 1) * n // 5].nanmean(0).tolist() for i in range(5)]


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(1)
    config, model = build(args)
    true_alignment: list = []
    instrument(model, args, true_alignment)
    data = load_mnist()
    shape = (-1, 1, 28, 28) if args.model == "cnn" else (-1, 784)
    result = train(model, (data.train_images.reshape(shape), data.train_labels),
                   (data.test_images.reshape(shape), data.test_labels), steps=args.steps,
                   batch_size=config.batch_size, seed=config.seed, eval_every=args.eval_every,
                   use_context=args.mode == "cdni", lr_schedule=config.lr_schedule, progress=False)
    print(f"{args.model} {args.mode} {vars(args)}")
    for i, interface in enumerate(model.interfaces):
        rows = [[round(v, 3) for v in r] for r in fifths(interface.trace)]
        print(f"SG {i}: per fifth, cosine(M, s t) / |M| : |s t| / batch-mean share of |M|: {rows}")
    for i, row in enumerate(zip(*fifths(true_alignment))):
        print(f"SG {i}: per fifth, cosine(M / s, true dL/dh) (nan: M = 0): {[round(v, 3) for v in row]}")
    print("test error per evaluation (%):", [round(h["test_error"], 2) for h in result.history], flush=True)


if __name__ == "__main__":
    main()
