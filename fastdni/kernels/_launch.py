"""Counting the GPU kernel launches of the Triton path, so launch counts can be checked without a GPU.

Every launcher in ``fastdni/kernels/`` calls :func:`record_launch` once per kernel it launches (a Triton kernel, or
a torch op that launches one, such as the ``torch.zeros`` of a loss accumulator). Under
:func:`launch_counter` those calls are counted; otherwise ``record_launch`` is a no-op.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

__all__ = ["LaunchCount", "launch_counter", "record_launch"]


@dataclass
class LaunchCount:
    by_name: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


_active: Optional[LaunchCount] = None


def record_launch(name: str) -> None:
    if _active is not None:
        _active.by_name[name] += 1


@contextlib.contextmanager
def launch_counter() -> Iterator[LaunchCount]:
    """``with launch_counter() as count: ...`` then ``count.total`` / ``count.by_name``."""
    global _active
    outer, _active = _active, LaunchCount()
    try:
        yield _active
    finally:
        _active = outer
