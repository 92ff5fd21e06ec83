"""What the MNIST command lines share: argument checks and loading the data with a clear error."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..data import DatasetError, load_mnist


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """``parser.error`` naming the first of ``args.<names>`` below 1 (as ``--flag-name``)."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")


def mnist_main(parse_args: Callable[[Optional[Sequence[str]]], argparse.Namespace]):
    """Decorator for an MNIST experiment's entry point: ``body(args, data)`` becomes ``main(argv) -> int``, which
    parses ``argv``, loads the data (:func:`prepare_mnist_run`) and returns 2 if that failed, else the body's code."""
    def decorate(body: Callable[[argparse.Namespace, object], int]) -> Callable[[Optional[Sequence[str]]], int]:
        @functools.wraps(body)
        def main(argv: Optional[Sequence[str]] = None) -> int:
            args = parse_args(argv)
            data = prepare_mnist_run(args)
            return 2 if data is None else body(args, data)
        return main
    return decorate


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
