"""The paper's asynchronous variants of a decoupled stack, run in one process: layers updated at
independent random rates, and the complete unlock (synthetic inputs as well as synthetic gradients)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .decoupled import DecoupledSequential, LossFunction, StepResult, step_optimizer
from .interface import has_trainable_params


class RandomRateSequential(DecoupledSequential):
    """A :class:`DecoupledSequential` in which, at every step, block ``i`` and the SG model on its
    output are updated only with probability ``update_probabilities[i]``, independently of the other
    blocks: with synthetic gradients no block needs another to have stepped (the paper's layers
    updated at random rates). Every block still runs its forward, so those above get their inputs.
    """

    def __init__(self, blocks: Sequence[nn.Module], synthetic_gradients: Sequence[nn.Module], *,
                 update_probabilities: Sequence[float], seed: int = 0, **kwargs):
        super().__init__(blocks, synthetic_gradients, **kwargs)
        probabilities = tuple(float(p) for p in update_probabilities)
        if len(probabilities) != len(self.blocks) or not all(0.0 < p <= 1.0 for p in probabilities):
            raise ValueError(f"update_probabilities: expected {len(self.blocks)} values in (0, 1], got {probabilities}")
        self.update_probabilities = probabilities
        self._generator = torch.Generator().manual_seed(seed)
        self._mask: list[bool] = [True] * len(self.blocks)
        self.update_counts = [0] * len(self.blocks)  #: updates each block received

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        draws = torch.rand(len(self.blocks), generator=self._generator).tolist()
        self._mask = [d < p for d, p in zip(draws, self.update_probabilities)]
        return super()._dni_step(x, target, loss_fn, context)

    def _update(self, i: int, output: Tensor) -> None:
        _step_or_discard(self.optimizers[i], self.blocks[i], self._mask[i])
        self.update_counts[i] += int(self._mask[i])
        if i > 0:
            _step_or_discard(self.sg_optimizers[i - 1], self.interfaces[i - 1], self._mask[i - 1])


def _step_or_discard(optimizer: Optional[torch.optim.Optimizer], module: nn.Module, update: bool) -> None:
    if update:
        step_optimizer(optimizer)
    else:
        module.zero_grad(set_to_none=True)


class ForwardUnlockedSequential(DecoupledSequential):
    """The complete unlock: every block but the first trains on a *synthetic input* predicted from the
    data, ``I_i(x)``, and on its synthetic gradient, so no block waits for another's forward or backward.

    One :meth:`train_step` emulates what the unlocked blocks do concurrently:

    1. block ``i`` runs on ``I_i(x)`` (block 0 on ``x``), receives ``M_i`` of its output (the true
       loss gradient at the top) and steps;
    2. the real forward then arrives: each block's true output is the regression target of the
       synthetic-input model above it, and each SG model is regressed onto the gradient pushed back
       through the block above it (as in :class:`DecoupledSequential`; the blocks themselves are not
       stepped again).

    ``synthetic_inputs[i - 1]`` maps the network input to block ``i``'s input. :meth:`forward`
    (evaluation) is the real network on real inputs.
    """

    def __init__(self, blocks: Sequence[nn.Module], synthetic_gradients: Sequence[nn.Module],
                 synthetic_inputs: Sequence[nn.Module], *, input_optimizer=None, **kwargs):
        # Its SG models learn from the real forward's pushed-back gradients (step 2): bootstrapped targets.
        if kwargs.setdefault("sg_targets", "bootstrap") != "bootstrap":
            raise ValueError(f"sg_targets: ForwardUnlockedSequential regresses onto bootstrapped targets only, "
                             f"got {kwargs['sg_targets']!r}")
        super().__init__(blocks, synthetic_gradients, **kwargs)
        synthetic_inputs = list(synthetic_inputs)
        if len(synthetic_inputs) != len(self.blocks) - 1:
            raise ValueError(f"synthetic_inputs: expected one per block but the first ({len(self.blocks) - 1}), "
                             f"got {len(synthetic_inputs)}")
        self.synthetic_inputs = nn.ModuleList(synthetic_inputs)
        factory = input_optimizer or kwargs.get("optimizer") or torch.optim.Adam
        self.input_optimizers = [factory(m.parameters()) if has_trainable_params(m) else None for m in self.synthetic_inputs]
        self.input_losses: list[Optional[Tensor]] = [None] * len(self.synthetic_inputs)

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        last = len(self.blocks) - 1
        predicted_inputs = [m(x) for m in self.synthetic_inputs]
        for i, block in enumerate(self.blocks):
            out = block(x if i == 0 else predicted_inputs[i - 1].detach())
            if i < last:
                interface = self.interfaces[i]
                sg = interface.synthetic_gradient(out.detach(), context) if context is not None \
                    else interface.synthetic_gradient(out.detach())
                out.backward(sg.detach() / interface.scale_for(out))
            else:
                loss_fn(out, target).backward()
            step_optimizer(self.optimizers[i])
        real_outputs: list[Tensor] = []
        result = self._decoupled_pass(x, target, loss_fn, context, lambda i, out: self._regress(i, out, real_outputs))
        for i, (prediction, opt) in enumerate(zip(predicted_inputs, self.input_optimizers)):
            loss = nn.functional.mse_loss(prediction, real_outputs[i])
            loss.backward()
            step_optimizer(opt)
            self.input_losses[i] = loss.detach()
        return result

    def _regress(self, i: int, output: Tensor, real_outputs: list) -> None:
        """Real pass, after block ``i``'s backward: keep its output, step SG ``i - 1`` only."""
        real_outputs.append(output)
        self.blocks[i].zero_grad(set_to_none=True)  # the blocks trained on synthetic inputs already
        if i > 0:
            step_optimizer(self.sg_optimizers[i - 1])
