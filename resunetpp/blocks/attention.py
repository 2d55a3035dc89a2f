"""The decoder attention block of ResUNet++.

D. Jha et al., "ResUNet++: An Advanced Architecture for Medical Image Segmentation",
IEEE ISM 2019, after O. Oktay et al., "Attention U-Net", MIDL 2018. Unlike Attention U-Net,
the authors' code has *no sigmoid*: the block multiplies two unbounded feature maps. That is
faithful to the paper and harmless in FP32 (the next block starts with BatchNorm), but it is
the reason activations can span orders of magnitude, which matters for INT8 and FP16
deployment (see ``benchmarks/INT8.md``).

::

    g (skip, H x W, Cg) ── BN ─ ReLU ─ conv3x3 ─ maxpool2 ─┐
                                                           (+)─ BN ─ ReLU ─ conv3x3 ─(*)─> y
    x (decoder, H/2 x W/2, Cx) ─┬─ BN ─ ReLU ─ conv3x3 ─────┘                        │
                                └──────────────────────────────────────────────────────┘

``y`` has ``x``'s shape. Pass ``gate="sigmoid"`` for the opt-in bounded variant (a sigmoid
before the product); the default ``gate=None`` is the authors' block.
"""

from __future__ import annotations

import torch
from torch import nn

from resunetpp.blocks._checks import positive_int, tracing

GATES = (None, "sigmoid")


class AttentionBlock(nn.Module):
    """Weight decoder features ``x`` by a map computed from the skip ``g`` and ``x`` itself."""

    def __init__(self, skip_channels: int, decoder_channels: int, gate: str | None = None) -> None:
        super().__init__()
        positive_int("skip_channels", skip_channels)
        positive_int("decoder_channels", decoder_channels)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        c = decoder_channels
        self.gate = gate
        self.skip_conv = nn.Sequential(
            nn.BatchNorm2d(skip_channels),
            nn.ReLU(),
            nn.Conv2d(skip_channels, c, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
        )
        self.x_conv = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )
        self.out_conv = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not tracing() and (g.shape[-2] != 2 * x.shape[-2] or g.shape[-1] != 2 * x.shape[-1]):
            raise ValueError(
                f"skip g must be exactly twice the size of x, got g {tuple(g.shape[-2:])} "
                f"and x {tuple(x.shape[-2:])}"
            )
        a = self.out_conv(self.skip_conv(g) + self.x_conv(x))
        if self.gate == "sigmoid":
            a = torch.sigmoid(a)
        return a * x
