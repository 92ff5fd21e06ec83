"""Checkpoints written atomically: a crash mid-write leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was written for a different run."""


def save_checkpoint(path: Union[str, Path], state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"checkpoint: cannot read {path}: {err}") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint: {path} is not a fastdni training checkpoint")
    return state
