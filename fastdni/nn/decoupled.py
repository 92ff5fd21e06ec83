"""A stack of blocks trained with a synthetic gradient after every block, or with backprop."""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .interface import DNI, has_trainable_params
from .recurrent import Alignment, alignment_of

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFunction = Callable[[Tensor, Tensor], Tensor]
MODES = ("dni", "backprop")
#: What each SG model is regressed onto: the gradient pushed back through the block above it with that block's
#: synthetic gradient ("bootstrap", the paper's every-layer DNI), or the true gradient of the loss ("true").
SG_TARGETS = ("bootstrap", "true")


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class StepResult(NamedTuple):
    loss: Tensor  #: the task loss (detached)
    output: Tensor  #: the last block's output (detached)
    sg_losses: tuple[Optional[Tensor], ...]  #: each interface's SG regression loss, bottom first


class DecoupledTrainer(nn.Module):
    """What the decoupled containers share: one optimizer per block (``optimizers``) and per SG model
    (``sg_optimizers``, ``None`` where there is nothing to train), saved and restored together."""

    optimizers: list[Optional[torch.optim.Optimizer]]
    sg_optimizers: list[Optional[torch.optim.Optimizer]]

    def optimizer_state_dict(self) -> dict:
        """The state of every block's and SG model's optimizer, for checkpoints."""
        return {
            "blocks": [None if o is None else o.state_dict() for o in self.optimizers],
            "synthetic_gradients": [None if o is None else o.state_dict() for o in self.sg_optimizers],
        }

    def load_optimizer_state_dict(self, state: dict) -> None:
        for key, optimizers in (("blocks", self.optimizers), ("synthetic_gradients", self.sg_optimizers)):
            saved = state.get(key)
            if saved is None or len(saved) != len(optimizers):
                raise ValueError(f"state: expected {len(optimizers)} optimizer states under {key!r}")
            for opt, opt_state in zip(optimizers, saved):
                if opt is not None:
                    opt.load_state_dict(opt_state)


    #: whether the container has SG models, i.e. can run in mode "dni"
    has_synthetic_gradients = True

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = check_mode(mode, self.has_synthetic_gradients)

    def train_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor] = None) -> StepResult:
        """One training step on a batch; every optimizer steps once."""
        self.train()
        if self.mode == "dni":
            return self._dni_step(x, target, loss_fn, context)
        output = self(x)
        loss = loss_fn(output, target)
        loss.backward()
        for opt in self.optimizers:
            step_optimizer(opt)
        return StepResult(loss.detach(), output.detach(), ())

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        raise NotImplementedError


def check_mode(mode: str, has_synthetic_gradients: bool) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "dni" and not has_synthetic_gradients:
        raise ValueError("mode: 'dni' needs synthetic_gradients")
    return mode


class DecoupledSequential(DecoupledTrainer):
    """``blocks[0] -> SG -> blocks[1] -> SG -> ... -> blocks[-1]``, each block with its own optimizer.

    In ``mode="dni"``, :meth:`train_step` runs block ``i``, feeds it the synthetic gradient of
    the SG model after it and steps its optimizer *before* block ``i + 1`` runs. Each SG model
    is regressed onto the gradient that then comes back through the block above it: the true
    gradient of the loss for the top SG, bootstrapped targets (the next SG's prediction pushed
    back through its block) below. cDNI: SG models built with ``context_features`` and a
    ``context`` (e.g. the labels) passed to :meth:`train_step`. ``mode="backprop"`` trains the
    same blocks with ordinary backprop, for comparison; the SG models are then left alone.

    Args:
        blocks: any ``nn.Module`` s (Linear/BN/ReLU, conv blocks, ...), applied in order.
        synthetic_gradients: one SG model per interface, i.e. after every block but the last
            (whose output goes to the loss). ``None`` means plain backprop only.
        optimizer: builds the optimizer of one block from its parameters (default Adam, lr 1e-3).
        sg_optimizer: the same for each SG model (default: ``optimizer``).
        head_optimizer: the same for the last block (default: ``optimizer``). It alone learns from the true
            gradient in ``mode="dni"``, so it can take the rate backprop would, where the blocks under
            unconditioned synthetic gradients want a lower one (docs/mnist.md).
        mode: ``"dni"`` or ``"backprop"``.
        sg_loss_weight: weight of the SG regression loss.
        gradient_scale: the SG models predict ``gradient_scale * dL/dh`` (see :class:`DNI`);
            the batch size suits a loss averaged over the batch.
        sg_targets: ``"bootstrap"``: below the top, each SG model is regressed onto the synthetic
            gradient of the SG above pushed back through the block between them, as in the paper's every-layer
            DNI. ``"true"`` (default): every SG model is regressed onto the true gradient ``dL/dh`` at its interface (what
            the paper's SG learns "when the true gradient arrives"): the loss's gradient is pushed down through
            every block (its input gradient only), while each block's parameters still learn from its own SG's
            prediction alone. Bootstrapping compounds each SG's error with the errors of those above it, and the
            bottom SGs of a deep stack learn little from it (docs/mnist.md); the true targets cost one more
            input-gradient product per block and need the whole forward before the first SG regression. All
            optimizers step at the end of the step (the same updates: no block's forward depends on another
            block's update within a step).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        synthetic_gradients: Optional[Sequence[nn.Module]] = None,
        *,
        optimizer: OptimizerFactory = default_optimizer,
        sg_optimizer: Optional[OptimizerFactory] = None,
        head_optimizer: Optional[OptimizerFactory] = None,
        mode: str = "dni",
        sg_loss_weight: float = 1.0,
        gradient_scale: float = 1.0,
        sg_targets: str = "true",
    ):
        super().__init__()
        if sg_targets not in SG_TARGETS:
            raise ValueError(f"sg_targets: expected one of {SG_TARGETS}, got {sg_targets!r}")
        self.sg_targets = sg_targets
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ValueError("blocks: expected a non-empty sequence of nn.Module")
        self.blocks = nn.ModuleList(blocks)
        if synthetic_gradients is not None:
            synthetic_gradients = list(synthetic_gradients)
            if len(synthetic_gradients) != len(blocks) - 1:
                raise ValueError(
                    f"synthetic_gradients: expected one SG model per block but the last "
                    f"({len(blocks) - 1}), got {len(synthetic_gradients)}"
                )
            self.interfaces = nn.ModuleList(
                DNI(sg, loss_weight=sg_loss_weight, gradient_scale=gradient_scale) for sg in synthetic_gradients
            )
        else:
            self.interfaces = None
        self.mode = mode
        self.optimizers = block_optimizers(self.blocks, optimizer, head_optimizer)
        sg_optimizer = sg_optimizer or optimizer
        self.sg_optimizers = [
            sg_optimizer(i.parameters()) if has_trainable_params(i) else None for i in (self.interfaces or ())
        ]

    @property
    def has_synthetic_gradients(self) -> bool:
        return self.interfaces is not None

    def forward(self, x: Tensor) -> Tensor:
        """Plain composition of the blocks (inference, or a backprop forward)."""
        for block in self.blocks:
            x = block(x)
        return x

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        if self.sg_targets == "true":
            return self._true_target_pass(x, target, loss_fn, context)
        return self._decoupled_pass(x, target, loss_fn, context, self._update)

    def _true_target_pass(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        """``sg_targets="true"``: every block runs on a detached copy of its input (its own graph), the loss's
        gradient is carried down block by block as an input gradient only, and at each interface, top first, the
        interface sends its prediction into its block's parameters and is regressed onto the carried gradient."""
        for interface in self.interfaces:
            interface.last_sg_loss = None
        inputs, outputs, h = [], [], x
        for i, block in enumerate(self.blocks):
            h = h.detach().requires_grad_(i > 0)
            inputs.append(h)
            h = block(h)
            outputs.append(h)
        loss = loss_fn(outputs[-1], target)
        loss.backward()  # the head's own graph only (its input is a leaf): its parameters' .grad and dL/dh there
        true = inputs[-1].grad
        for i in reversed(range(len(self.interfaces))):
            below = None
            if i > 0:  # carried on before the interface's own backward frees block i's graph
                below = torch.autograd.grad(outputs[i], inputs[i], true, retain_graph=True)[0]
            wired = self.interfaces[i](outputs[i], context)  # block i's parameters get M / s
            if wired.requires_grad:
                wired.backward(true)  # the SG's regression onto the true gradient
            true = below
        for i, out in enumerate(outputs):  # block i and SG i - 1, as in the bootstrapped pass (variants override it)
            self._update(i, out.detach())
        sg_losses = tuple(i.last_sg_loss for i in self.interfaces)
        return StepResult(loss.detach(), outputs[-1].detach(), sg_losses)

    def sg_alignment(self, x: Tensor, target: Tensor, loss_fn: LossFunction,
                     context: Optional[Tensor] = None) -> list[Alignment]:
        """Per interface, bottom first: how well its synthetic gradient ``M(h) / s`` agrees with the true
        gradient ``dL/dh`` of the whole stack on this batch, by full backprop (training-mode forward).

        A diagnostic for between steps: nothing is stepped or accumulated (no ``.grad`` is touched) and the
        buffers (BatchNorm running statistics) are left as they were. Below the top interface the SG models
        are regressed onto bootstrapped targets, so this, not their regression loss, says what the blocks
        under them actually follow."""
        if self.interfaces is None:
            raise ValueError("sg_alignment: the model has no synthetic gradients")
        outputs, true = self.true_gradients(x, target, loss_fn)
        result = []
        with torch.no_grad():
            for interface, out, grad in zip(self.interfaces, outputs, true):
                args = (out,) if context is None else (out, context)
                synthetic = interface.synthetic_gradient(*args) / interface.scale_for(out)
                result.append(alignment_of(synthetic, grad))
        return result

    def true_gradients(self, x: Tensor, target: Tensor, loss_fn: LossFunction) -> tuple[list[Tensor], list[Tensor]]:
        """Each block's output but the last and ``dL/dh`` there, both detached, by full backprop through the
        current blocks (training-mode forward). Nothing is stepped or accumulated and the buffers (BatchNorm
        running statistics) are left as they were."""
        buffers = [(b, b.detach().clone()) for b in self.buffers()]
        was_training = self.training
        self.train()
        try:
            with torch.enable_grad():
                outputs, h = [], x
                for block in self.blocks:
                    h = block(h)
                    outputs.append(h)
                true = torch.autograd.grad(loss_fn(h, target), outputs[:-1], allow_unused=True)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            self.train(was_training)
        return ([out.detach() for out in outputs[:-1]],
                [torch.zeros_like(out) if grad is None else grad for out, grad in zip(outputs, true)])

    def _update(self, i: int, output: Tensor) -> None:
        """Called after block ``i``'s backward: step block ``i`` and SG ``i - 1`` (whose target that
        backward produced). Variants (e.g. layers updated at random rates) override this."""
        step_optimizer(self.optimizers[i])
        if i > 0:
            step_optimizer(self.sg_optimizers[i - 1])

    def _decoupled_pass(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor],
                        update: Callable[[int, Tensor], None]) -> StepResult:
        for interface in self.interfaces:
            interface.last_sg_loss = None
        h = x
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            out = block(h)
            if i < last:
                # Backward of the SG into block i, and (through h) the bootstrapped target of SG i-1.
                h = self.interfaces[i](out, context)
            else:
                loss = loss_fn(out, target)
                loss.backward()  # the true gradient: block i's and the top SG's target
            update(i, out.detach())
        sg_losses = tuple(i.last_sg_loss for i in self.interfaces)
        return StepResult(loss.detach(), out.detach(), sg_losses)


def block_optimizers(blocks: Sequence[nn.Module], optimizer: OptimizerFactory,
                     head_optimizer: Optional[OptimizerFactory] = None) -> list[Optional[torch.optim.Optimizer]]:
    """One optimizer per block with trainable parameters (``None`` for the others); the last block's from
    ``head_optimizer`` when given."""
    factories = [optimizer] * (len(blocks) - 1) + [head_optimizer or optimizer]
    return [make(b.parameters()) if has_trainable_params(b) else None for make, b in zip(factories, blocks)]


def step_optimizer(optimizer: Optional[torch.optim.Optimizer]) -> None:
    """``step()`` then ``zero_grad``, for a block that may have no optimizer."""
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
