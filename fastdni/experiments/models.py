"""The paper's MNIST models as block lists, and the SG models that go between the blocks."""
from __future__ import annotations

import argparse
from typing import Sequence

import torch
from torch import nn

from ..nn import ConvSyntheticGradient, SyntheticGradient

NUM_CLASSES = 10


def fcn_blocks(hidden_layers: int = 3, width: int = 256, in_features: int = 784, batch_norm: bool = True) -> list[nn.Module]:
    """The paper's FCN: ``hidden_layers`` x (Linear -> BatchNorm -> ReLU), then a linear classifier (``batch_norm=False``:
    Linear -> ReLU)."""
    if hidden_layers < 1 or width < 1:
        raise ValueError(f"hidden_layers/width: expected >= 1, got {hidden_layers}, {width}")
    sizes = [in_features] + [width] * hidden_layers
    blocks: list[nn.Module] = [
        nn.Sequential(nn.Linear(i, o), *([nn.BatchNorm1d(o)] if batch_norm else []), nn.ReLU())
        for i, o in zip(sizes[:-1], sizes[1:])
    ]
    return blocks + [nn.Linear(width, NUM_CLASSES)]


def cnn_blocks(channels: Sequence[int] = (32, 64), in_channels: int = 1, image_size: int = 28) -> list[nn.Module]:
    """A small CNN: per entry of ``channels`` a block Conv5x5 -> BatchNorm -> ReLU -> MaxPool2,
    then a linear classifier on the flattened map."""
    if not channels:
        raise ValueError("channels: expected at least one conv block")
    blocks: list[nn.Module] = []
    for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
        blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)))
        image_size //= 2
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * image_size * image_size, NUM_CLASSES)))
    return blocks


@torch.no_grad()
def block_output_shapes(blocks: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-example output shape of every block, from a dummy forward in eval mode."""
    x = torch.zeros(2, *input_shape)
    shapes = []
    for block in blocks:
        was_training = block.training
        x = block.eval()(x)
        block.train(was_training)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def synthetic_gradients(
    blocks: Sequence[nn.Module], input_shape: Sequence[int], hidden: Sequence[int], context_features: int = 0
) -> list[nn.Module]:
    """One SG model after every block but the last: dense over vectors, convolutional over feature maps."""
    models: list[nn.Module] = []
    for shape in block_output_shapes(blocks, input_shape)[:-1]:
        if len(shape) == 3:
            models.append(ConvSyntheticGradient(shape[0], hidden, kernel_size=5, context_features=context_features,
                                                context_map=shape[1:]))
        else:
            models.append(SyntheticGradient(shape[0], hidden, context_features=context_features))
    return models


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"1024,1024"`` -> ``(1024, 1024)``; ``"linear"``/``"none"``/``""`` -> ``()`` (an argparse type for SG sizes)."""
    if text.strip().lower() in ("", "none", "linear"):
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints such as 1024,1024 or 'linear', got {text!r}"
        ) from None
