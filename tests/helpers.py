"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""
import torch
from torch import nn


def randomise_(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Every parameter random (a fresh SG predicts zero, which would hide most mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module
