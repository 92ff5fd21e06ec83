"""What the MNIST command lines share: argument checks and loading the data with a clear error."""
from __future__ import annotations

import argparse
import sys
from typing import Iterable

import torch

from ..data import DatasetError, load_mnist


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """``parser.error`` naming the first of ``args.<names>`` below 1 (as ``--flag-name``)."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")


def prepare_mnist_run(args: argparse.Namespace):
    """Apply ``args.threads``, load MNIST from ``args.data`` and create ``args.out``; the dataset, or None after
    printing the error (missing or corrupt files) to stderr."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_mnist(args.data)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    return data
