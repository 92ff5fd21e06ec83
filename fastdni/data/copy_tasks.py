"""Copy and repeat-copy (Graves et al., 2014), the DNI paper's recurrent tasks, generated from a seed.

Sequences are time-major, ``[T, B, channels]``, as ``torch.nn.LSTM`` takes them by default.

Copy, sequence length ``N``, ``bits``-bit vectors, ``T = 2N + 1``::

    input   x_1 .. x_N | delimiter | 0 .. 0          (bits + 1 channels; the delimiter is the last)
    target  0 .. 0     | 0         | x_1 .. x_N      (bits channels)
    mask    0 .. 0     | 0         | 1 .. 1          (the steps that are scored)

Repeat copy, also ``R`` repeats (uniform in ``1..max_repeats``), ``T = N + 1 + N R + 1``: the delimiter step
also carries ``R / max_repeats`` on an extra input channel, the target is ``x_1 .. x_N`` ``R`` times followed
by an end marker on an extra output channel.

The error is the cross-entropy of the scored steps in **bits per step** (summed over the output channels),
the unit of the paper's curriculum: :class:`Curriculum` lengthens ``N`` by one each time the average error
falls below 0.15 bits per step.
"""
from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int


class SequenceBatch(NamedTuple):
    inputs: Tensor  #: float ``[T, B, input_channels]``
    targets: Tensor  #: float 0/1 ``[T, B, output_channels]``
    mask: Tensor  #: bool ``[T, B]``, True where the step is scored


class CopyTask:
    """Batches of the copy task from a seeded generator; :meth:`state_dict` makes a run resumable."""

    def __init__(self, bits: int = 8, seed: int = 0):
        self.bits = check_int("bits", bits, 1)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def input_channels(self) -> int:
        return self.bits + 1

    @property
    def output_channels(self) -> int:
        return self.bits

    def _patterns(self, length: int, batch_size: int) -> Tensor:
        return torch.randint(0, 2, (length, batch_size, self.bits), generator=self.generator).float()

    def batch(self, batch_size: int, length: int) -> SequenceBatch:
        return self._layout(batch_size, length, repeats=1)

    def _layout(self, batch_size: int, length: int, repeats: int) -> SequenceBatch:
        """Pattern, delimiter, then the pattern ``repeats`` times as the target. The channels past
        ``bits`` beyond the delimiter (repeat count in, end marker out) exist only when the subclass
        declares them."""
        check_int("batch_size", batch_size, 1)
        n = check_int("length", length, 1)
        x = self._patterns(n, batch_size)
        end_marker = self.output_channels > self.bits
        steps = n + 1 + n * repeats + int(end_marker)
        inputs = torch.zeros(steps, batch_size, self.input_channels)
        inputs[:n, :, : self.bits] = x
        inputs[n, :, self.bits] = 1.0
        targets = torch.zeros(steps, batch_size, self.output_channels)
        targets[n + 1 : n + 1 + n * repeats, :, : self.bits] = x.repeat(repeats, 1, 1)
        if end_marker:
            inputs[n, :, self.bits + 1] = repeats / self.max_repeats
            targets[steps - 1, :, self.bits] = 1.0
        mask = torch.zeros(steps, batch_size, dtype=torch.bool)
        mask[n + 1 :] = True
        return SequenceBatch(inputs, targets, mask)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class RepeatCopyTask(CopyTask):
    """Repeat copy: the pattern ``R`` times (``R`` uniform in ``1..max_repeats``, one per batch), then an end marker."""

    def __init__(self, bits: int = 8, max_repeats: int = 4, seed: int = 0):
        super().__init__(bits, seed)
        self.max_repeats = check_int("max_repeats", max_repeats, 1)

    @property
    def input_channels(self) -> int:
        return self.bits + 2

    @property
    def output_channels(self) -> int:
        return self.bits + 1

    def batch(self, batch_size: int, length: int, repeats: Optional[int] = None) -> SequenceBatch:
        check_int("batch_size", batch_size, 1)  # before R is drawn: bad input leaves the generator as it was
        check_int("length", length, 1)
        if repeats is None:
            repeats = int(torch.randint(1, self.max_repeats + 1, (1,), generator=self.generator))
        elif not (isinstance(repeats, int) and 1 <= repeats <= self.max_repeats):
            raise ValueError(f"repeats: expected an int in 1..{self.max_repeats}, got {repeats!r}")
        return self._layout(batch_size, length, repeats)


def bits_per_step(logits: Tensor, batch: SequenceBatch) -> Tensor:
    """Mean over scored steps of the summed binary cross-entropy over output channels, in bits."""
    if logits.shape != batch.targets.shape:
        raise ValueError(f"logits: expected shape {tuple(batch.targets.shape)}, got {tuple(logits.shape)}")
    nats = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none").sum(-1)
    return nats[batch.mask].mean() / math.log(2.0)


class Curriculum:
    """The paper's curriculum: the sequence length grows by one each time the average error over the last
    ``window`` batches falls below ``threshold`` bits per step. :attr:`max_length_reached` is what the
    experiments report."""

    def __init__(self, start_length: int = 1, threshold: float = 0.15, window: int = 10):
        self.length = check_int("start_length", start_length, 1)
        self.window = check_int("window", window, 1)
        if not threshold > 0:
            raise ValueError(f"threshold: expected bits per step > 0, got {threshold!r}")
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=window)
        self.max_length_reached = 0  #: the longest length solved so far (0 before the first)

    def update(self, error_bits_per_step: float) -> bool:
        """Record one batch's error at the current length; returns True when the length grew."""
        error = float(error_bits_per_step)
        if not math.isfinite(error) or error < 0:
            raise ValueError(f"error_bits_per_step: expected a finite value >= 0, got {error_bits_per_step!r}")
        self.recent.append(error)
        if len(self.recent) == self.window and sum(self.recent) / self.window < self.threshold:
            self.max_length_reached = self.length
            self.length += 1
            self.recent.clear()
            return True
        return False

    def state_dict(self) -> dict:
        return {"length": self.length, "max_length_reached": self.max_length_reached, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.length, self.max_length_reached = state["length"], state["max_length_reached"]
        self.recent = deque(state["recent"], maxlen=self.window)
