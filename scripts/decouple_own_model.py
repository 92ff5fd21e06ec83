"""Models of one's own, written from the README alone, decoupled with ``fastdni.nn.decouple``'s defaults: the test of
the library's defaults on models that no experiment of ours uses (results in docs/mnist.md).

    python scripts/decouple_own_model.py mixer dni                 # MLP-Mixer over 7x7 patches, DNI after every block
    python scripts/decouple_own_model.py cnn cdni --at b1 b2       # the small CNN, cDNI after b1 and b2 only
    python scripts/decouple_own_model.py mixer backprop --epochs 3

MNIST, batch 64, Adam 1e-3 on the model (``--lr``), seed 0, last evaluation on the 10k test images. The SG models and
their optimizers are ``decouple``'s defaults unless ``--sg-lr`` is given. ``--freeze`` keeps named blocks at their
initial weights (a baseline: what a block is worth untrained).
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastdni.data import load_mnist
from fastdni.nn import decouple


def small_cnn() -> nn.Sequential:
    net = nn.Sequential()
    net.add_module("b1", nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    net.add_module("b2", nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    net.add_module("b3", nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU()))
    net.add_module("head", nn.Linear(128, 10))
    return net


class Patches(nn.Module):
    """[B, 1, 28, 28] -> [B, 16, 49]: the 16 non-overlapping 7x7 patches as tokens."""

    def forward(self, x):
        return x.reshape(-1, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(-1, 16, 49)


class MixerBlock(nn.Module):
    """Token mixing, then channel mixing, each a pre-LayerNorm MLP with GELU on a residual stream [B, tokens, dim]."""

    def __init__(self, tokens: int, dim: int, expansion: int = 2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, tokens * expansion), nn.GELU(), nn.Linear(tokens * expansion, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, dim * expansion), nn.GELU(), nn.Linear(dim * expansion, dim))

    def forward(self, x):
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


def mixer(dim: int = 64, depth: int = 3) -> nn.Sequential:
    net = nn.Sequential()
    net.add_module("embed", nn.Sequential(Patches(), nn.Linear(49, dim)))
    for i in range(depth):
        net.add_module(f"m{i + 1}", MixerBlock(16, dim))
    net.add_module("head", nn.Sequential(nn.LayerNorm(dim), MeanTokens(), nn.Linear(dim, 10)))
    return net


MODELS = {"cnn": (small_cnn, ["b1", "b2", "b3"]), "mixer": (mixer, ["m1", "m2", "m3"])}


def train(net: nn.Module, sgs, opt: torch.optim.Optimizer, data, epochs: int, seed: int, batch: int = 64) -> None:
    """Minibatch Adam on cross-entropy; ``sgs`` (a :class:`fastdni.nn.Decoupled` or None) gets the labels as context
    and steps its SG optimizers after the model's."""
    for epoch in range(epochs):
        order = torch.randperm(60000, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, 60000 - batch + 1, batch):
            x, y = data.train_images[order[i:i + batch]], data.train_labels[order[i:i + batch]]
            if sgs is not None:
                sgs.context = y
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            if sgs is not None:
                sgs.step()


@torch.no_grad()
def test_error(net: nn.Module, data) -> float:
    """Test error (%) on the 10k test images, the model in eval mode (left in train mode after)."""
    net.eval()
    wrong = sum(int((net(data.test_images[i:i + 1000]).argmax(1) != data.test_labels[i:i + 1000]).sum())
                for i in range(0, 10000, 1000))
    net.train()
    return wrong / 100


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("mode", choices=["backprop", "dni", "cdni"])
    p.add_argument("--at", nargs="+", help="blocks to decouple (default: every block below the head)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="the model's learning rate")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="the model's optimizer (sgd: with momentum 0.9)")
    p.add_argument("--sg-lr", type=float, help="the SG models' Adam learning rate (default: decouple's)")
    p.add_argument("--freeze", nargs="*", default=[], help="blocks kept at their initial weights")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args, **decouple_kwargs) -> tuple[nn.Module, object, float]:
    """Build, decouple (``decouple_kwargs`` override the defaults), train and evaluate; print one result line."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    build, blocks = MODELS[args.model]
    net = build()
    if args.sg_lr is not None:
        decouple_kwargs.setdefault("sg_optimizer", lambda ps: torch.optim.Adam(ps, lr=args.sg_lr))
    sgs = None if args.mode == "backprop" else decouple(
        net, at=args.at or blocks, context_features=10 if args.mode == "cdni" else 0, **decouple_kwargs)
    trained = [q for name, q in net.named_parameters() if name.split(".")[0] not in args.freeze]
    data, start = load_mnist(), time.time()
    opt = (torch.optim.Adam(trained, lr=args.lr) if args.optimizer == "adam"
           else torch.optim.SGD(trained, lr=args.lr, momentum=0.9))
    train(net, sgs, opt, data, args.epochs, args.seed)
    error = test_error(net, data)
    at = "" if sgs is None else f" at {args.at or blocks}"
    print(f"{args.model} {args.mode}{at} {args.optimizer} lr={args.lr} sg_lr={args.sg_lr or 'default'} freeze={args.freeze}: "
          f"test error {error:.2f}% after {args.epochs} epoch(s), {time.time() - start:.0f} s", flush=True)
    return net, sgs, error


if __name__ == "__main__":
    run(parser().parse_args())
