"""Decouple an existing model in one call: a DNI after each chosen submodule, SG models picked from the shape
of what those submodules output, and their optimizers.

    model = MyNet()
    sgs = decouple(model, at=["block1", "block2"])           # DNI (no label); context_features=10: cDNI
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in batches:
        sgs.context = y                                      # cDNI only: the label the SG models see
        loss = F.cross_entropy(model(x), y)                  # each block's part below steps on M(h) at once
        loss.backward()                                      # ... and each SG is regressed on what arrives
        optimizer.step(); optimizer.zero_grad(); sgs.step()  # sgs.step(): the SG models' optimizers

The model's own code is untouched: a forward hook on each chosen submodule passes its output through a
:class:`~fastdni.nn.DNI`. The SG models are built at the first training forward (their shape is the output's):
a linear :class:`~fastdni.nn.SyntheticGradient` over vectors (any ``[B, *]`` that is not a feature map) and a
one-convolution :class:`~fastdni.nn.ConvSyntheticGradient` (3x3, "same") over feature maps ``[B, C, H, W]``,
zero-initialised (they predict 0 until they learn), on the output's device and dtype. Each interface is given its
SG's optimizer, so a :class:`~fastdni.nn.SyntheticGradient` is predicted, regressed and stepped by the fused ops
(:class:`~fastdni.nn.DNI`); the others train by autograd and are stepped by :meth:`Decoupled.step`.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_int
from .decoupled import SG_TARGETS
from .interface import DNI
from .synthetic_gradient import ConvSyntheticGradient, SyntheticGradient

SGOptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class _Level(NamedTuple):
    """One interface of the forward in flight (``sg_targets="true"``)."""
    interface: DNI
    h: Tensor  #: the chosen submodule's output, its graph below kept
    z: Tensor  #: the leaf handed on to the rest of the model in its place
    wired: Tensor  #: the interface's output: a backward of ``t`` through it regresses the SG onto ``t``


#: decouple's SG learning rate for SG models of up to this many inputs; above, it shrinks as 1 / sqrt(fan-in).
SG_LR, SG_LR_FAN_IN = 1e-3, 128


def default_sg_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at ``1e-3 * min(1, sqrt(128 / fan_in))``, ``fan_in`` the inputs of the SG's widest unit (features of a
    linear SG, ``channels * k * k`` of a conv SG; a label weight's fan-in is ignored unless wider). Adam moves every weight by about its rate per
    step whatever the gradient's size, so an output summing ``fan_in`` of them moves by about ``rate * sqrt(fan_in)``
    (signs at random): 1e-3 was the best SG rate of our MNIST sweeps at 128-256 inputs, and at 1024 inputs it
    overshot (``|M|`` up to 6.8x its target's) where 3e-4 trained the mixer's DNI within 1.6 pp of backprop
    (docs/mnist.md)."""
    params = list(params)
    # The widest unit, not the first weight registered: a conditioned SG registers its label weight (fan-in =
    # the context's 10 features) before its first layer, which gave every cDNI SG the full 1e-3.
    fan_in = max((p[0].numel() for p in params if p.dim() >= 2), default=1)
    return torch.optim.Adam(params, lr=SG_LR * min(1.0, (SG_LR_FAN_IN / fan_in) ** 0.5))


def synthetic_gradient_for(h: Tensor, context_features: int = 0) -> nn.Module:
    """The default SG model for an activation shaped like ``h``: a 3x3 convolution over a feature map
    ``[B, C, H, W]``, else linear over the flattened features; on ``h``'s device and dtype."""
    if h.dim() < 2:
        raise ValueError(f"h: expected a batch of activations [B, *features], got shape {tuple(h.shape)}")
    if h.dim() == 4:
        sg: nn.Module = ConvSyntheticGradient(h.shape[1], (), kernel_size=3, context_features=context_features,
                                              context_map=tuple(h.shape[2:]))
    else:
        sg = SyntheticGradient(h[0].numel(), context_features=context_features)
    return sg.to(device=h.device, dtype=h.dtype)


class Decoupled(nn.Module):
    """What :func:`decouple` returns: one :class:`DNI` per chosen submodule (in :attr:`interfaces`, keyed by
    the submodule's name with dots as ``__``), their SG optimizers, and the hooks. Its ``state_dict`` holds
    the SG models. :attr:`context` is handed to every SG model (cDNI): set it before each forward."""

    def __init__(self, model: nn.Module, names: Sequence[str], *, context_features: int,
                 sg_optimizer: SGOptimizerFactory, sg_factory: Callable[[Tensor, int], nn.Module],
                 interface: Callable[[nn.Module], DNI], sg_targets: str = "true"):
        super().__init__()
        if sg_targets not in SG_TARGETS:
            raise ValueError(f"sg_targets: expected one of {SG_TARGETS}, got {sg_targets!r}")
        self.sg_targets = sg_targets
        self._chain: list[_Level] = []  # the interfaces of the forward in flight, bottom first
        self._busy = False  # a synthetic push or the true chain is running: leaf hooks ignore what they see
        self.context_features = check_int("context_features", context_features, 0)
        self.sg_optimizer, self.sg_factory, self.interface = sg_optimizer, sg_factory, interface
        self.interfaces = nn.ModuleDict()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.context: Optional[Tensor] = None
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown or not names:
            raise ValueError(f"at: expected names of submodules of the model, got {list(names)!r}"
                             + (f" ({unknown} not among them)" if unknown else ""))
        self._hooks = [modules[n].register_forward_hook(self._hook(n)) for n in dict.fromkeys(names)]

    def _hook(self, name: str):
        key = name.replace(".", "__")

        def hook(module: nn.Module, args, output):
            if not (module.training and torch.is_grad_enabled()):
                return output
            if not isinstance(output, Tensor):
                raise TypeError(f"at: {name!r} returned {type(output).__name__}; DNI needs a tensor output")
            if key not in self.interfaces:
                sg = self.sg_factory(output.detach(), self.context_features)
                interface = self.interface(sg)
                if interface.optimizer is None:  # handed to the interface: it steps the SG in the fused op where it can
                    interface.optimizer = self.sg_optimizer(sg.parameters())
                self.interfaces[key] = interface
                self.optimizers[key] = interface.optimizer
            if self.context_features and self.context is None:
                raise ValueError(f"context: the SG models are conditioned ({self.context_features} features): "
                                 f"set .context (e.g. the labels) before the forward")
            context = self.context if self.context_features else None
            if self.sg_targets == "bootstrap":
                return self.interfaces[key](output, context)
            return self._carry_true_gradient(self.interfaces[key], output, context)
        return hook

    def _carry_true_gradient(self, interface: DNI, output: Tensor, context: Optional[Tensor]) -> Tensor:
        """``sg_targets="true"``: the interface sends ``M / s`` into the part below and keeps its graph; the rest of
        the model gets a leaf whose gradient, the true one when it arrives, is regressed onto and carried down."""
        if any(level.interface is interface for level in self._chain):
            self._chain = []  # a new forward before the last one's backward: start over
        self._busy = True
        try:
            wired = interface(output, context, retain_graph=True)
        finally:
            self._busy = False
        below = self._chain[-1].z if self._chain else None
        if below is not None:
            below.grad = None  # what the synthetic push left on the leaf below: not a gradient anyone uses
        z = output.detach().requires_grad_()
        level = len(self._chain)
        z.register_hook(lambda grad: self._regress_down(level, grad))
        self._chain.append(_Level(interface, output, z, wired))
        return z

    def _regress_down(self, level: int, grad: Tensor) -> None:
        """The true gradient reached the leaf of ``level``: regress that SG onto it, push it through the part below
        (input gradient only: no parameter is touched) to the next leaf, and so on to the bottom."""
        if self._busy or level >= len(self._chain):
            return
        self._busy = True
        try:
            for i in reversed(range(level + 1)):
                current = self._chain[i]
                below = None
                if i > 0 and current.h.requires_grad:
                    (below,) = torch.autograd.grad(current.h, self._chain[i - 1].z, grad, allow_unused=True)
                if current.wired.requires_grad:
                    torch.autograd.backward(current.wired, grad)
                if below is None:
                    break
                grad = below
        finally:
            self._chain, self._busy = [], False

    def step(self) -> None:
        """Step every SG model's optimizer on the regression gradients of the last backward; zero them. An
        interface whose last call ran fused has stepped its SG in the regression op already: it is not stepped again."""
        for key, optimizer in self.optimizers.items():
            if not self.interfaces[key].fused:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sg_losses(self) -> dict[str, Optional[float]]:
        """The last regression loss of each SG model (None before its first)."""
        return {k: None if d.last_sg_loss is None else float(d.last_sg_loss) for k, d in self.interfaces.items()}

    def remove(self) -> None:
        """Detach from the model: its forward is plain again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def decouple(model: nn.Module, at: Sequence[str], *, context_features: int = 0,
             sg_optimizer: SGOptimizerFactory = default_sg_optimizer,
             sg_factory: Callable[[Tensor, int], nn.Module] = synthetic_gradient_for,
             interface: Callable[[nn.Module], DNI] = DNI, sg_targets: str = "true") -> Decoupled:
    """Put a :class:`DNI` after each submodule of ``model`` named in ``at`` (names as in
    ``model.named_modules()``). ``context_features > 0``: cDNI, the SG models see ``Decoupled.context``
    (integer labels ``[B]`` or float features ``[B, context_features]``). ``sg_factory(h, context_features)``
    builds an SG model for an activation like ``h`` (default :func:`synthetic_gradient_for`);
    ``sg_optimizer(params)`` its optimizer (default Adam 1e-3), handed to the interface (which steps the SG in the
    fused op where it can) unless the interface has one already; ``interface(sg)`` the interface around it
    (default :class:`DNI`; e.g. ``functools.partial(DNI, loss_weight=0.5)``).

    ``sg_targets``: what each SG is regressed onto. ``"true"`` (default): the true gradient at its interface. When
    ``loss.backward()`` reaches the top interface, its gradient is regressed onto and carried down through each part
    between two interfaces as an input gradient only (no parameter gets it: each part still learns from its own SG
    alone), so every SG learns the gradient a full backprop would give; the parts' graphs are kept until then, as
    backprop keeps them. It needs the chosen submodules in a chain: each one's output reaches the loss only through
    the next chosen one. ``"bootstrap"``: each SG is regressed onto what arrives at its interface (the paper's
    every-layer DNI: below the top, the next SG's prediction pushed back through the part between), and every graph
    below an interface is freed at once. docs/mnist.md compares them."""
    if isinstance(at, str):
        at = [at]
    return Decoupled(model, list(at), context_features=context_features, sg_optimizer=sg_optimizer,
                     sg_factory=sg_factory, interface=interface, sg_targets=sg_targets)
