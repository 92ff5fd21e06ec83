"""Character-level Penn Treebank (Mikolov's ``ptb.char.*.txt``), checked before use.

In those files every character, newline included, is followed by one space and ``_`` marks a word
boundary, so the character stream is every other character of the file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .paths import DatasetError, resolve_dataset_dir, verified_file

CHAR_FILES = {
    "train": ("ptb.char.train.txt", "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9"),
    "valid": ("ptb.char.valid.txt", "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8"),
    "test": ("ptb.char.test.txt", "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe"),
}


class PTBChars(NamedTuple):
    train: Tensor  #: int64 character ids ``[n_train]``
    valid: Tensor
    test: Tensor
    vocab: tuple[str, ...]  #: id -> character, sorted, built from the training split


def _characters(path: Path) -> str:
    """The character stream of a verified file (its SHA-256 guarantees the one-space separators)."""
    return path.read_text(encoding="utf-8")[0::2]


def load_ptb_chars(root: Optional[Union[str, Path]] = None) -> PTBChars:
    """Load the three splits as id tensors over the training vocabulary (50 symbols).

    ``root`` is a datasets folder holding ``ptb/`` or the ``ptb`` folder itself. Every file is
    checked against its SHA-256; a missing or corrupt one raises :class:`DatasetError` naming it.
    """
    folder = resolve_dataset_dir("ptb", root)
    text = {split: _characters(verified_file(folder, name, digest)) for split, (name, digest) in CHAR_FILES.items()}
    vocab = tuple(sorted(set(text["train"])))
    index = {c: i for i, c in enumerate(vocab)}
    ids = {}
    for split, chars in text.items():
        unknown = set(chars) - index.keys()
        if unknown:
            raise DatasetError(f"{CHAR_FILES[split][0]}: characters {sorted(unknown)} are not in the training vocabulary")
        ids[split] = torch.tensor([index[c] for c in chars], dtype=torch.int64)
    return PTBChars(ids["train"], ids["valid"], ids["test"], vocab)


def bits_per_character(mean_cross_entropy_nats: float) -> float:
    """BPC from a mean cross-entropy in nats per character."""
    return mean_cross_entropy_nats / math.log(2.0)
