"""MNIST from the canonical gzipped IDX files, checked before use."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .paths import DatasetError, resolve_dataset_dir, verified_file

FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
MEAN, STD = 0.1307, 0.3081  # of the training pixels in [0, 1]


class MNIST(NamedTuple):
    train_images: Tensor  #: float32 [60000, 1, 28, 28], standardised
    train_labels: Tensor  #: int64 [60000]
    test_images: Tensor  #: float32 [10000, 1, 28, 28]
    test_labels: Tensor  #: int64 [10000]


def _read_idx(path: Path, magic: int, count: int, item_shape: tuple[int, ...]) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 * (2 + len(item_shape))
    dims = np.frombuffer(raw[:header], dtype=">u4").tolist()
    if dims[:2] != [magic, count] or dims[2:] != list(item_shape):
        raise DatasetError(f"{path}: IDX header {dims}, expected magic {magic}, {count} items of {item_shape}")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != count * int(np.prod(item_shape, dtype=np.int64)):
        raise DatasetError(f"{path}: {data.size} bytes of data, expected {count} items of {item_shape}")
    return data.reshape(count, *item_shape)


def load_mnist(root: Optional[Union[str, Path]] = None) -> MNIST:
    """Load MNIST from ``root`` (a datasets folder holding ``mnist/``, or the ``mnist`` folder itself).

    Every file is checked against its SHA-256 and IDX header; a missing or corrupt file raises
    :class:`DatasetError` naming it.
    """
    folder = resolve_dataset_dir("mnist", root)
    paths = {key: verified_file(folder, name, digest) for key, (name, digest) in FILES.items()}
    tensors = {}
    for split, count in (("train", 60000), ("test", 10000)):
        images = _read_idx(paths[f"{split}_images"], 2051, count, (28, 28))
        labels = _read_idx(paths[f"{split}_labels"], 2049, count, ())
        if labels.max() > 9:
            raise DatasetError(f"{paths[f'{split}_labels']}: labels must be 0-9, found {int(labels.max())}")
        x = torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD)
        tensors[f"{split}_images"] = x.unsqueeze(1)
        tensors[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return MNIST(**tensors)
