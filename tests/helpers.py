"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""
import torch
from torch import nn


def randomise_(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Every parameter random (a fresh SG predicts zero, which would hide most mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module


class SmallNet(nn.Module):
    """A user's own model for decouple: a conv block, a pooled vector block, a head (input [B, 1, 6, 6])."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 8), nn.Tanh())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.fc(self.conv(x)))
