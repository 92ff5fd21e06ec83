"""Synthetic-gradient models: predict dL/dh from h (and, for cDNI, a context such as the label)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_context, check_context_presence, check_int, check_tensor
from ..reference import SGParams, context_term, sg_predict


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"{name}: expected positive ints, got {sizes!r}")
    return sizes


class SyntheticGradient(nn.Module):
    """An SG model over a feature vector: linear (``hidden=()``) or an MLP with ReLU hidden layers.

    ``h`` may have any shape ``[B, *feature_shape]`` with ``prod(feature_shape) == features``;
    the prediction has the shape of ``h``. With ``context_features > 0`` the model is conditioned
    (cDNI) on a context passed to :meth:`forward`: integer class labels ``[B]`` (a row gather,
    equal to a one-hot input) or float features ``[B, context_features]``. The output layer,
    weight and bias (and the context weight of a linear SG), starts at zero, as in the paper.
    The math is :func:`fastdni.reference.sg_predict`.
    """

    def __init__(self, features: int, hidden: Sequence[int] = (), context_features: int = 0):
        super().__init__()
        (features,) = _check_sizes("features", (features,))
        hidden = _check_sizes("hidden", hidden)
        check_int("context_features", context_features, 0)
        self.features, self.hidden, self.context_features = features, hidden, context_features
        sizes = (features, *hidden, features)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.context_weight = nn.Parameter(torch.empty(sizes[1], context_features)) if context_features else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        if self.context_weight is not None:
            if len(self.layers) == 1:
                nn.init.zeros_(self.context_weight)
            else:
                bound = 1.0 / math.sqrt(self.features + self.context_features)
                nn.init.uniform_(self.context_weight, -bound, bound)

    def reference_params(self) -> SGParams:
        """The parameters (aliased, not copied) in the layout of the reference and the fused ops."""
        return SGParams(
            tuple(layer.weight for layer in self.layers),
            tuple(layer.bias for layer in self.layers),
            self.context_weight,
        )

    def forward(self, h: Tensor, context: Optional[Tensor] = None) -> Tensor:
        check_tensor("h", h, like=self.layers[0].weight)
        if h.dim() < 2 or math.prod(h.shape[1:]) != self.features:
            raise ValueError(f"h: expected shape [B, *features] with {self.features} features, got {tuple(h.shape)}")
        return sg_predict(h.reshape(h.shape[0], -1), self.reference_params(), context).view_as(h)

    def extra_repr(self) -> str:
        return f"features={self.features}, hidden={self.hidden}, context_features={self.context_features}"


class ConvSyntheticGradient(nn.Module):
    """An SG model over a feature map ``[B, C, H, W]``: "same"-padded convolutions with ReLU between.

    As in the paper's CNN experiments the spatial size is kept, so the prediction has the shape
    of ``h``. A cDNI context adds a learned term to the first convolution's output (``ctx(c)`` of
    :func:`fastdni.reference.context_term`): with ``context_map=(H, W)`` a full map ``[C', H, W]`` per
    context (what a label contributes to the true gradient of a map read by a dense layer, ``W^T e_y``,
    varies with the position), else a per-channel bias broadcast over H and W. The last convolution
    starts at zero.
    """

    def __init__(self, channels: int, hidden_channels: Sequence[int] = (), kernel_size: int = 5, context_features: int = 0,
                 context_map: Optional[Sequence[int]] = None):
        super().__init__()
        (channels,) = _check_sizes("channels", (channels,))
        hidden_channels = _check_sizes("hidden_channels", hidden_channels)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int >= 1 (keeps the spatial size), got {kernel_size!r}")
        check_int("context_features", context_features, 0)
        self.channels, self.context_features = channels, context_features
        sizes = (channels, *hidden_channels, channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, kernel_size, padding=kernel_size // 2) for i, o in zip(sizes[:-1], sizes[1:])
        )
        if context_map is not None:
            context_map = _check_sizes("context_map", context_map)
            if len(context_map) != 2:
                raise ValueError(f"context_map: expected the map's (H, W), got {context_map!r}")
        self.context_map = context_map
        # One row per channel of the first conv's output, or per (channel, y, x) with a context map.
        rows = sizes[1] * (math.prod(context_map) if context_map else 1)
        self.context_weight = nn.Parameter(torch.zeros(rows, context_features)) if context_features else None
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)
        if self.context_weight is not None and len(self.convs) > 1:
            nn.init.uniform_(self.context_weight, -context_features ** -0.5, context_features ** -0.5)

    def forward(self, h: Tensor, context: Optional[Tensor] = None) -> Tensor:
        check_tensor("h", h, ndim=4, like=self.convs[0].weight)
        if h.shape[1] != self.channels or (self.context_map and tuple(h.shape[2:]) != self.context_map):
            where = f" and maps of {self.context_map}" if self.context_map else ""
            raise ValueError(f"h: expected {self.channels} channels{where}, got shape {tuple(h.shape)}")
        check_context_presence(context, self.context_weight is not None)
        z = h
        for i, conv in enumerate(self.convs):
            z = conv(z)
            if i == 0 and context is not None:
                check_context(context, batch=h.shape[0], features=self.context_features, like=h)
                term = context_term(context, self.context_weight)
                z = z + (term.view_as(z) if self.context_map else term[:, :, None, None])
            if i < len(self.convs) - 1:
                z = F.relu(z)
        return z
