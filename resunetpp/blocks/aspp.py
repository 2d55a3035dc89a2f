"""Atrous spatial pyramid pooling, in the form ResUNet++ uses.

L.-C. Chen, G. Papandreou, F. Schroff, H. Adam, "Rethinking Atrous Convolution for Semantic
Image Segmentation" (DeepLabv3), arXiv:1706.05587, 2017. ResUNet++ (Jha et al., ISM 2019) sums
the branches instead of concatenating them and has no image-pooling branch::

        ┌─ conv3x3 d=1  ─ BN ─┐
    x ──┼─ conv3x3 d=6  ─ BN ─┤
        ├─ conv3x3 d=12 ─ BN ─(+)─ conv1x1 ─> y
        └─ conv3x3 d=18 ─ BN ─┘
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from resunetpp.blocks._checks import positive_int


class ASPP(nn.Module):
    """Parallel dilated 3x3 convolutions, summed, then a 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("out_channels", out_channels)
        if len(rates) == 0:
            raise ValueError("rates must hold at least one dilation rate")
        for r in rates:
            positive_int("each dilation rate", r)
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=3, dilation=r, padding=r),
                nn.BatchNorm2d(out_channels),
            )
            for r in self.rates
        )
        self.project = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return self.project(y)
