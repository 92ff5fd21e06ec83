"""Copy and repeat copy as continuous streams: the form in which a truncated-BPTT LSTM sees them.

Each of ``runs x streams`` streams is an endless succession of episodes (the layouts of
:mod:`fastdni.data.copy_tasks`); the state is never reset between them, so the core must learn where one
episode ends, and truncation windows fall at every phase of an episode. Every run has its own curriculum
length ``N`` (one entry of :attr:`CopyStreams.lengths`); an episode takes the length of its run when it
starts, so a longer ``N`` enters each stream at that stream's next episode. Streams start at random phases
(a random number of blank, unscored steps), so the windows of a run are not aligned with its episodes.

:meth:`CopyStreams.window` returns the next ``steps`` steps of every stream; :meth:`CopyStreams.fork` is an
independent copy, used to look ahead (the SG alignment diagnostic) without consuming the stream.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int


_STREAM_STATE = ("lengths", "n", "repeats", "position", "pattern")  # with the generator: all a stream's state


class StreamWindow(NamedTuple):
    inputs: Tensor  #: float ``[steps, runs, streams, input_channels]``
    targets: Tensor  #: float 0/1 ``[steps, runs, streams, output_channels]``
    mask: Tensor  #: bool ``[steps, runs, streams]``: the scored steps
    current: Tensor  #: bool ``[steps, runs, streams]``: scored steps of episodes at the run's current length
    starts: Tensor  #: bool ``[steps, runs, streams]``: the first step of an episode (where an episodic core resets)


class CopyStreams:
    """Endless copy (``max_repeats=0``) or repeat-copy (``max_repeats >= 1``: ``R`` uniform in 1..max_repeats
    per episode) streams of ``bits``-bit patterns, for ``runs`` independent runs of ``streams`` streams each."""

    def __init__(self, runs: int, streams: int, *, bits: int = 8, max_repeats: int = 0, max_length: int = 128,
                 seed: int = 0, max_offset: int = 8):
        self.runs, self.streams = check_int("runs", runs, 1), check_int("streams", streams, 1)
        self.bits = check_int("bits", bits, 1)
        self.max_repeats = check_int("max_repeats", max_repeats, 0)
        self.max_length = check_int("max_length", max_length, 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.ones(runs, dtype=torch.long)  #: the curriculum's N of each run
        shape = (runs, streams)
        self.n = torch.ones(shape, dtype=torch.long)  # N of each stream's episode
        self.repeats = torch.ones(shape, dtype=torch.long)
        # A blank lead-in of random length: the position starts negative and nothing is scored until 0.
        self.position = -torch.randint(0, check_int("max_offset", max_offset, 0) + 1, shape, generator=self.generator)
        self.pattern = torch.zeros(runs, streams, max_length, bits)
        self._new_episodes(torch.ones(shape, dtype=torch.bool))

    @property
    def repeat_copy(self) -> bool:
        return self.max_repeats > 0

    @property
    def input_channels(self) -> int:
        return self.bits + (2 if self.repeat_copy else 1)

    @property
    def output_channels(self) -> int:
        return self.bits + (1 if self.repeat_copy else 0)

    def episode_steps(self, n: Tensor, repeats: Tensor) -> Tensor:
        """Steps of an episode: ``2N + 1`` (copy) or ``N + 1 + N R + 1`` (repeat copy)."""
        return n + 1 + n * repeats + (1 if self.repeat_copy else 0)

    def set_lengths(self, lengths: Tensor) -> None:
        if lengths.shape != (self.runs,) or int(lengths.min()) < 1 or int(lengths.max()) > self.max_length:
            raise ValueError(f"lengths: expected {self.runs} ints in 1..{self.max_length}, got {lengths.tolist()}")
        self.lengths = lengths.clone()

    def _new_episodes(self, start: Tensor) -> None:
        """Begin a new episode (at the run's current length) in the streams where ``start`` is True."""
        n = self.lengths[:, None].expand_as(self.n)
        self.n = torch.where(start, n, self.n)
        if self.repeat_copy:
            r = torch.randint(1, self.max_repeats + 1, self.n.shape, generator=self.generator)
            self.repeats = torch.where(start, r, self.repeats)
        rows = start.nonzero(as_tuple=True)
        if rows[0].numel():
            shape = (rows[0].numel(), self.max_length, self.bits)
            self.pattern[rows] = torch.randint(0, 2, shape, generator=self.generator).to(self.pattern.dtype)
        self.position = torch.where(start & (self.position >= 0), torch.zeros_like(self.position), self.position)

    def window(self, steps: int) -> StreamWindow:
        """The next ``steps`` steps of every stream."""
        check_int("steps", steps, 1)
        inputs = torch.zeros(steps, self.runs, self.streams, self.input_channels)
        targets = torch.zeros(steps, self.runs, self.streams, self.output_channels)
        mask = torch.zeros(steps, self.runs, self.streams, dtype=torch.bool)
        current, starts = torch.zeros_like(mask), torch.zeros_like(mask)
        for t in range(steps):
            pos, n = self.position, self.n
            starts[t] = pos == 0
            total = self.episode_steps(n, self.repeats)
            reading = (pos >= 0) & (pos < n)
            index = torch.where(reading, pos, (pos - n - 1).clamp(min=0) % n)
            vector = self.pattern.gather(2, index[..., None, None].expand(-1, -1, 1, self.bits)).squeeze(2)
            inputs[t, ..., : self.bits] = vector * reading[..., None]
            inputs[t, ..., self.bits] = (pos == n).float()
            scored = (pos > n) & (pos < total)
            if self.repeat_copy:
                inputs[t, ..., self.bits + 1] = (pos == n) * self.repeats / self.max_repeats
                writing = scored & (pos < total - 1)
                targets[t, ..., : self.bits] = vector * writing[..., None]
                targets[t, ..., self.bits] = (pos == total - 1).float()
            else:
                targets[t] = vector * scored[..., None]
            mask[t] = scored
            current[t] = scored & (n == self.lengths[:, None])
            self.position = pos + 1
            self._new_episodes(self.position >= total)
        return StreamWindow(inputs, targets, mask, current, starts)

    def fork(self) -> "CopyStreams":
        """An independent copy: the same future, consumed without touching this stream."""
        twin = copy.copy(self)
        twin.generator = torch.Generator()
        twin.load_state_dict(self.state_dict())
        return twin

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), **{k: getattr(self, k).clone() for k in _STREAM_STATE}}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        for k in _STREAM_STATE:
            setattr(self, k, state[k].clone())


class StreamCurriculum:
    """The paper's curriculum for every run of a stream: run ``r``'s length grows by one each time its average
    error over the scored steps of its last ``window`` batches of episodes at its current length (``window *
    streams * N`` scored steps, the paper's 10 batches) is below ``threshold``. The error unit is bits per
    output bit (``per="bit"``) or bits per step, summed over the output bits (``per="step"``)."""

    def __init__(self, runs: int, streams: int, channels: int, *, threshold: float = 0.15, per: str = "bit",
                 window: int = 10):
        if per not in ("bit", "step"):
            raise ValueError(f"per: expected 'bit' or 'step', got {per!r}")
        if not threshold > 0:
            raise ValueError(f"threshold: expected bits > 0, got {threshold!r}")
        self.streams, self.threshold, self.per = streams, float(threshold), per
        self.divisor = float(check_int("channels", channels, 1)) if per == "bit" else 1.0
        self.window = check_int("window", window, 1)
        self.lengths = torch.ones(runs, dtype=torch.long)
        self.max_length_reached = torch.zeros(runs, dtype=torch.long)  #: the longest length each run solved
        self.error_sum = torch.zeros(runs, dtype=torch.float64)
        self.scored = torch.zeros(runs, dtype=torch.float64)
        self.last_error = torch.full((runs,), float("nan"), dtype=torch.float64)  #: the last completed block's

    def update(self, bits: Tensor, current: Tensor) -> bool:
        """Record a window: ``bits`` ``[T, R, B]`` the error of each step (bits, summed over the ``channels``),
        ``current`` ``[T, R, B]`` the scored steps at the run's current length. True when a length grew."""
        self.error_sum += (bits.double() / self.divisor * current).sum((0, 2))
        self.scored += current.sum((0, 2)).double()
        full = self.scored >= self.window * self.streams * self.lengths
        if not bool(full.any()):
            return False
        average = self.error_sum / self.scored.clamp(min=1)
        self.last_error = torch.where(full, average, self.last_error)
        solved = full & (average < self.threshold)
        self.max_length_reached = torch.where(solved, self.lengths, self.max_length_reached)
        self.lengths = self.lengths + solved.long()
        self.error_sum[full], self.scored[full] = 0.0, 0.0
        return bool(solved.any())

    def state_dict(self) -> dict:
        return {k: getattr(self, k).clone() for k in ("lengths", "max_length_reached", "error_sum", "scored", "last_error")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone())
