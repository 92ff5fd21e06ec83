"""Why unconditioned DNI fails on a model of one's own: variants of the interface and its SG model on the models of
``decouple_own_model.py``, each run printing the test error and, per decoupled block, the fraction of its output
units (channels for feature maps) that no test image activates (dead ReLUs). Results in docs/mnist.md.

    python scripts/dni_interface_probe.py cnn dni --at b3 --center          # batch mean removed from what is sent down
    python scripts/dni_interface_probe.py cnn dni --warm 200                # SG sent down only after 200 regressions
    python scripts/dni_interface_probe.py cnn dni --at b3 --sg mlp:1024     # SG model: MLP with one hidden layer
    python scripts/dni_interface_probe.py cnn dni --at b3 --sg lowrank:10   # SG model: linear of rank 10
    python scripts/dni_interface_probe.py cnn dni --at b3 --no-bias         # SG output layer without bias
    python scripts/dni_interface_probe.py cnn dni --at b3 --residual-noise  # last regression's residuals added to M(h)

Every flag of ``decouple_own_model.py`` applies (``--lr``, ``--sg-lr``, ``--freeze``, ``--epochs``, ...).
"""
import torch
from torch import Tensor, nn

from decouple_own_model import parser, run
from fastdni.data import load_mnist
from fastdni.nn import DNI, SyntheticGradient, synthetic_gradient_for
from fastdni.nn.decouple import default_sg_optimizer
from fastdni.nn.interface import _RegressOnArrivingGradient


class _KeepResidual(_RegressOnArrivingGradient):
    """The regression of ``DNI``, also keeping on the interface the residual ``s t - M`` of the batch and, per
    regression, how ``M`` compares with its target ``s t``: cosine, norm ratio ``|M| / |s t|`` and the share of
    ``|M|`` that is its batch mean (the part that is the same for every example)."""

    @staticmethod
    def backward(ctx, target: Tensor):
        (prediction,) = ctx.saved_tensors
        override = getattr(ctx.interface, "true_target", None)  # the alignment probe's --true-targets
        if override is not None:
            target, ctx.interface.true_target = override, None
        scaled, m = ctx.scale * target, prediction.detach()
        ctx.interface.residual = (scaled - m).detach()
        if ctx.interface.normalize_target:  # running mean square of the raw target: next scale makes it rms 1
            square = float(target.detach().pow(2).mean())
            old = getattr(ctx.interface, "target_square", None)
            ctx.interface.target_square = square if old is None else 0.99 * old + 0.01 * square
        norm = float(m.norm())
        ctx.interface.trace.append((
            float(torch.nn.functional.cosine_similarity(m.flatten(), scaled.flatten(), 0)),
            norm / max(float(scaled.norm()), 1e-30),
            float(m.mean(0).norm()) * m.shape[0] ** 0.5 / max(norm, 1e-30)))
        return _RegressOnArrivingGradient.backward(ctx, target)


class ProbeDNI(DNI):
    """``DNI`` with the variants of the probe: what is sent down is ``M(h)`` minus its batch mean (``center``),
    plus the last batch's regression residuals in a random order (``residual_noise``: gradients as noisy as the
    true ones), and nothing for the first ``warm`` regressions."""

    center = residual_noise = normalize_target = False
    warm = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace: list[tuple[float, float, float]] = []

    def forward(self, h: Tensor, context=None, *, retain_graph: bool = False) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return h
        self.calls = getattr(self, "calls", 0) + 1
        prediction = self.synthetic_gradient(*((h.detach(),) if context is None else (h.detach(), context)))
        sent, scale = prediction.detach(), self.scale_for(h)
        if self.normalize_target and getattr(self, "target_square", 0.0) > 0:
            scale = self.target_square ** -0.5  # M predicts the target in units of its running rms
        if self.center:
            sent = sent - sent.mean(0, keepdim=True)
        residual = getattr(self, "residual", None)
        if self.residual_noise and residual is not None and residual.shape == sent.shape:
            sent = sent + residual[torch.randperm(sent.shape[0])]
        if self.calls > self.warm:
            h.backward(sent / scale, retain_graph=retain_graph)
        return _KeepResidual.apply(h.detach(), prediction, self, scale)


class LowRankSyntheticGradient(nn.Module):
    """A linear SG model of rank ``rank`` over the flattened activation, its output layer zero-initialised."""

    def __init__(self, features: int, rank: int):
        super().__init__()
        self.down, self.up = nn.Linear(features, rank), nn.Linear(rank, features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.down(h.flatten(1))).view_as(h)


def sg_factory(kind: str, no_bias: bool):
    def build(h: Tensor, context_features: int) -> nn.Module:
        name, _, size = kind.partition(":")
        if name == "mlp":
            sg = SyntheticGradient(h[0].numel(), hidden=(int(size),), context_features=context_features)
        elif name == "lowrank":
            sg = LowRankSyntheticGradient(h[0].numel(), int(size))
        else:
            sg = synthetic_gradient_for(h, context_features)
        if no_bias:
            last = [m for m in sg.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
            last.bias.requires_grad_(False)
        return sg
    return build


@torch.no_grad()
def dead_fractions(net: nn.Module, blocks, images: Tensor) -> dict[str, float]:
    """Per block, the fraction of output units (channels of a feature map) that are <= 0 on every image."""
    out, z = {}, images
    for name, module in net.named_children():
        z = module(z)
        if name in blocks:
            per_unit = z.transpose(0, 1).flatten(1) if z.dim() == 4 else z.flatten(1).t()
            out[name] = round(float((per_unit.amax(1) <= 0).float().mean()), 2)
    return out


def main() -> None:
    p = parser()
    p.add_argument("--center", action="store_true")
    p.add_argument("--warm", type=int, default=0)
    p.add_argument("--residual-noise", action="store_true")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--normalize-target", action="store_true", help="M predicts t / running rms(t), not B t")
    p.add_argument("--sg", default="default", help="default | mlp:HIDDEN | lowrank:RANK")
    args = p.parse_args()
    ProbeDNI.center, ProbeDNI.warm, ProbeDNI.residual_noise = args.center, args.warm, args.residual_noise
    ProbeDNI.normalize_target = args.normalize_target
    # Only the trainable SG parameters (--no-bias freezes one); decouple's default optimizer unless --sg-lr.
    optimizer = default_sg_optimizer if args.sg_lr is None else lambda ps: torch.optim.Adam(ps, lr=args.sg_lr)
    trainable = lambda ps: optimizer([q for q in ps if q.requires_grad])
    net, sgs, _ = run(args, sg_factory=sg_factory(args.sg, args.no_bias), sg_optimizer=trainable,
                      interface=ProbeDNI)
    blocks = [n for n, _ in net.named_children() if n != "head"]
    dead = dead_fractions(net.eval(), blocks, load_mnist().test_images[:500])
    print(f"  variant: center={args.center} warm={args.warm} residual_noise={args.residual_noise} "
          f"no_bias={args.no_bias} normalize_target={args.normalize_target} sg={args.sg}; dead units {dead}")
    for name, interface in sgs.interfaces.items():
        for first, last in ((0, 100), (100, 600), (len(interface.trace) - 100, len(interface.trace))):
            rows = interface.trace[max(first, 0):last]
            cos, ratio, mean_share = (sum(r[i] for r in rows) / len(rows) for i in range(3))
            print(f"  {name} regressions {max(first, 0)}-{last}: cosine(M, s t) {cos:.3f}, |M|/|s t| {ratio:.3f}, "
                  f"batch-mean share of |M| {mean_share:.2f}")


if __name__ == "__main__":
    main()
