"""Squeeze-and-excitation channel gating.

J. Hu, L. Shen, G. Sun, "Squeeze-and-Excitation Networks", CVPR 2018.
ResUNet++ (Jha et al., ISM 2019) applies it after every residual unit with reduction 8.

::

    x ──┬──────────────────────────────────────────(*)──> y
        └─ avgpool ─ fc(C→C/r) ─ ReLU ─ fc(C/r→C) ─ σ ─┘
"""

from __future__ import annotations

import torch
from torch import nn

from resunetpp.blocks._checks import positive_int


class SqueezeExcitation(nn.Module):
    """Gate each channel of ``x`` by a sigmoid of its globally pooled response."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        positive_int("channels", channels)
        positive_int("reduction", reduction)
        if channels // reduction < 1:
            raise ValueError(
                f"channels // reduction must be >= 1, got channels={channels}, reduction={reduction}"
            )
        self.channels = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        # Bias-free linear layers, as in the authors' code (keeps the official parameter count).
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(self.pool(x).flatten(1))
        return x * w[:, :, None, None]
