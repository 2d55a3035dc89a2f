"""Residual units of ResUNet++.

K. He, X. Zhang, S. Ren, J. Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
(pre-activation), as used by Z. Zhang et al., "Road Extraction by Deep Residual U-Net" (2018)
and D. Jha et al., "ResUNet++: An Advanced Architecture for Medical Image Segmentation",
IEEE ISM 2019.

Stem (first unit, no pre-activation on the raw image)::

    x ─┬─ conv3x3(s) ─ BN ─ ReLU ─ conv3x3 ─┐
       └─ conv1x1(s) ─ BN ──────────────────(+)─ SE ─> y

Residual block (pre-activation)::

    x ─┬─ BN ─ ReLU ─ conv3x3(s) ─ BN ─ ReLU ─ conv3x3 ─┐
       └─ conv1x1(s) ─ BN ──────────────────────────────(+)─ SE ─> y
"""

from __future__ import annotations

import torch
from torch import nn

from resunetpp.blocks._checks import positive_int
from resunetpp.blocks.se import SqueezeExcitation


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, padding=0),
        nn.BatchNorm2d(out_channels),
    )


def _check(in_channels: int, out_channels: int, stride: int, se_reduction: int) -> None:
    positive_int("in_channels", in_channels)
    positive_int("out_channels", out_channels)
    positive_int("se_reduction", se_reduction)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")


class StemBlock(nn.Module):
    """First unit: conv-BN-ReLU-conv plus a projected shortcut, then squeeze-excitation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, se_reduction: int = 8) -> None:
        super().__init__()
        _check(in_channels, out_channels, stride, se_reduction)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.se = SqueezeExcitation(out_channels, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.body(x) + self.shortcut(x))


class ResidualBlock(nn.Module):
    """Pre-activation residual unit with a projected shortcut and squeeze-excitation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, se_reduction: int = 8) -> None:
        super().__init__()
        _check(in_channels, out_channels, stride, se_reduction)
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.se = SqueezeExcitation(out_channels, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.body(x) + self.shortcut(x))
