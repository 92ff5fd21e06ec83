"""Synthetic gradients at the truncation boundaries of truncated BPTT (the paper's recurrent DNI).

Truncated BPTT cuts a long sequence into segments and backpropagates within each. With DNI the
state ``s`` that leaves a segment is given a synthetic gradient ``M(s) ~ dL_future/ds`` that flows back
into the segment together with its own loss, so the segment learns from what lies beyond its window.
``M`` is regressed onto the gradient that actually reaches ``s`` when the next segment is trained:
that segment's true gradient plus its own synthetic gradient pushed back through it (bootstrapping).

    boundary = TruncationDNI(SyntheticGradient(2 * hidden))   # over the LSTM state (h, c)
    state = initial_state
    for inputs, targets in segments:
        state = boundary.begin_segment(state)                  # cut here; regress M at this boundary
        outputs, state = core(inputs, state)
        boundary.end_segment(loss_fn(outputs, targets), state) # one backward: loss + M(state) into it
        optimizer.step(); sg_optimizer.step()                  # then zero both

States are a tensor or a tuple of tensors (``(h, c)`` of ``nn.LSTMCell``: batch on dim 0; of
``nn.LSTM``: ``[layers, B, H]``, pass ``batch_dim=1``); ``M`` sees them flattened to ``[B, features]``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .._checks import check_positive
from .interface import _RegressOnArrivingGradient, has_trainable_params

State = Union[Tensor, tuple[Tensor, ...]]


def flatten_state(state: State, batch_dim: int = 0) -> Tensor:
    """``[B, features]``: every state tensor with its batch dim moved first, flattened, concatenated."""
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(f"state: expected a tensor or a non-empty tuple of tensors, got {type(state).__name__}")
    batch = {p.shape[batch_dim] if -p.dim() <= batch_dim < p.dim() else None for p in parts}
    if None in batch:
        raise ValueError(f"state: batch_dim={batch_dim} is out of range for shapes {[tuple(p.shape) for p in parts]}")
    if len(batch) != 1:
        raise ValueError(f"state: tensors disagree on the batch size along dim {batch_dim}: {[tuple(p.shape) for p in parts]}")
    (b,) = batch
    return torch.cat([p.movedim(batch_dim, 0).reshape(b, -1) for p in parts], dim=1)


def unflatten_state(flat: Tensor, like: State, batch_dim: int = 0) -> State:
    """The inverse of :func:`flatten_state`, shaped like ``like``."""
    parts = (like,) if isinstance(like, Tensor) else tuple(like)
    out, start = [], 0
    for p in parts:
        moved = p.movedim(batch_dim, 0).shape
        size = p.numel() // p.shape[batch_dim]
        out.append(flat[:, start : start + size].reshape(moved).movedim(0, batch_dim))
        start += size
    return out[0] if isinstance(like, Tensor) else tuple(out)


class TruncationDNI(nn.Module):
    """A DNI at the boundaries between truncated-BPTT segments (see the module docstring).

    ``synthetic_gradient`` maps ``[B, features]`` to ``[B, features]`` (e.g. a linear
    :class:`~fastdni.nn.SyntheticGradient`, as in the paper). It predicts ``gradient_scale * dL/ds``;
    the segment receives ``M / gradient_scale``. :attr:`last_sg_loss` is the regression loss of the last
    boundary whose target arrived. The SG parameters are stepped by the caller's optimizer.
    """

    def __init__(
        self, synthetic_gradient: nn.Module, *, batch_dim: int = 0, loss_weight: float = 1.0, gradient_scale: float = 1.0
    ):
        super().__init__()
        self.synthetic_gradient = synthetic_gradient
        self.batch_dim = batch_dim
        self.loss_weight = check_positive("loss_weight", float(loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        self.last_sg_loss: Optional[Tensor] = None

    def _predict(self, flat: Tensor) -> Tensor:
        prediction = self.synthetic_gradient(flat)
        if prediction.shape != flat.shape:
            raise ValueError(
                f"synthetic_gradient: returned shape {tuple(prediction.shape)} for a flattened state of shape "
                f"{tuple(flat.shape)}"
            )
        return prediction

    def begin_segment(self, state: State) -> State:
        """The state to start the next segment from: cut from the graph of the previous segment, and
        wired so that the gradient reaching it trains ``M`` at this boundary (with the current parameters)."""
        if not (self.training and torch.is_grad_enabled()):
            return state
        flat = flatten_state(state, self.batch_dim).detach()
        if has_trainable_params(self.synthetic_gradient):
            flat = _RegressOnArrivingGradient.apply(flat, self._predict(flat), self)
        else:  # nothing to train (e.g. an oracle SG): just cut the graph
            flat = flat.requires_grad_()
        return unflatten_state(flat, state, self.batch_dim)

    def end_segment(self, loss: Optional[Tensor], state: State) -> Tensor:
        """Backpropagate ``loss`` and the synthetic gradient ``M(state) / gradient_scale`` through the segment
        in one pass; returns the synthetic gradient given to ``state`` (flattened, detached)."""
        flat = flatten_state(state, self.batch_dim)
        with torch.no_grad():
            synthetic = self._predict(flat.detach()) / self.gradient_scale
        tensors, grads = [flat], [synthetic]
        if loss is not None:
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"loss: expected a scalar tensor or None, got {loss!r}")
            tensors.append(loss)
            grads.append(None)
        if flat.requires_grad:
            torch.autograd.backward(tensors, grads)
        elif loss is not None and loss.requires_grad:
            loss.backward()
        return synthetic

    def extra_repr(self) -> str:
        return f"batch_dim={self.batch_dim}, loss_weight={self.loss_weight}, gradient_scale={self.gradient_scale}"
