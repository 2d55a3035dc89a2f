"""ResUNet++ (Jha et al., IEEE ISM 2019), built exactly as the authors' code builds it.

D. Jha, P. H. Smedsrud, M. A. Riegler, D. Johansen, T. de Lange, P. Halvorsen, H. D. Johansen,
"ResUNet++: An Advanced Architecture for Medical Image Segmentation", IEEE ISM 2019.

::

    image ─ stem(f0) ─────────────────────────────────────────────── c1 ─┐
             └ res(f1,s2) ───────────────────────────────────── c2 ─┐    │
                 └ res(f2,s2) ─────────────────────────── c3 ─┐     │    │
                     └ res(f3,s2) ─ ASPP(bridge) ─ b ─ dec1(c3,b) ─ dec2(c2,·) ─ dec3(c1,·)
                                                                                   │
                                   logits ─ conv1x1(classes) ─ ASPP(f0) ───────────┘

    dec(g, x) = res( concat( up2( attention(g, x) ), g ) )

The default configuration (filters 16-32-64-128, bridge 256, one class, RGB) has exactly
4,062,993 trainable parameters, like the official port. The module returns *logits*; the
declared output activation (sigmoid for one class, softmax over classes otherwise) is applied
by :meth:`ResUNetPlusPlus.probabilities` and by :class:`WithActivation`, the wrapper every
exported artifact is made from, so all backends apply the same head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from resunetpp.blocks import ASPP, AttentionBlock, ResidualBlock, StemBlock
from resunetpp.blocks._checks import positive_int, tracing  # noqa: F401
from resunetpp.model_config import (  # noqa: F401 - re-exported: the torch-free half of the model
    ARCHITECTURES,
    MAX_CLASSES,
    MAX_INPUT_SIZE,
    MAX_WIDTH,
    SIZE_MULTIPLE,
    ModelConfig,
    input_size_problem,
    model_config_problem,
)


class DecoderStage(nn.Module):
    """Attention on (skip, decoder), nearest 2x upsampling, concat with the skip, residual unit."""

    def __init__(self, skip_channels: int, decoder_channels: int, out_channels: int,
                 se_reduction: int = 8, gate: str | None = None) -> None:
        super().__init__()
        self.attention = AttentionBlock(skip_channels, decoder_channels, gate=gate)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.block = ResidualBlock(decoder_channels + skip_channels, out_channels, stride=1,
                                   se_reduction=se_reduction)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = self.up(self.attention(skip, x))
        return self.block(torch.cat([a, skip], dim=1))


class ResUNetPlusPlus(nn.Module):
    """ResUNet++ returning logits of shape ``(N, num_classes, H, W)`` for input ``(N, C, H, W)``.

    ``H`` and ``W`` must be multiples of 8 (:data:`SIZE_MULTIPLE`); the preprocessing in
    :mod:`resunetpp.preprocess` resizes or pads any image to such a size.
    """

    def __init__(self, config: ModelConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif overrides:
            raise ValueError("pass either a ModelConfig or keyword overrides, not both")
        self.config = config
        f0, f1, f2, f3 = config.filters
        r = config.se_reduction
        gate = ARCHITECTURES[config.architecture]
        self.stem = StemBlock(config.in_channels, f0, stride=1, se_reduction=r)
        self.encoder1 = ResidualBlock(f0, f1, stride=2, se_reduction=r)
        self.encoder2 = ResidualBlock(f1, f2, stride=2, se_reduction=r)
        self.encoder3 = ResidualBlock(f2, f3, stride=2, se_reduction=r)
        self.bridge = ASPP(f3, config.bridge, config.aspp_rates)
        self.decoder1 = DecoderStage(f2, config.bridge, f3, r, gate)
        self.decoder2 = DecoderStage(f1, f3, f2, r, gate)
        self.decoder3 = DecoderStage(f0, f2, f1, r, gate)
        self.head_aspp = ASPP(f1, f0, config.aspp_rates)
        self.head = nn.Conv2d(f0, config.num_classes, kernel_size=1)

    @property
    def activation(self) -> str:
        return self.config.activation

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"input must be (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == 0 or w == 0:
            raise ValueError(
                f"input height and width must be positive multiples of {SIZE_MULTIPLE}, got {h}x{w}; "
                "resize or pad with resunetpp.preprocess"
            )

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All intermediate maps by name (used by range analysis and regularisers)."""
        c1 = self.stem(x)
        c2 = self.encoder1(c1)
        c3 = self.encoder2(c2)
        c4 = self.encoder3(c3)
        b = self.bridge(c4)
        d1 = self.decoder1(c3, b)
        d2 = self.decoder2(c2, d1)
        d3 = self.decoder3(c1, d2)
        h = self.head_aspp(d3)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "bridge": b, "d1": d1, "d2": d2,
                "d3": d3, "head_aspp": h, "logits": self.head(h)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not tracing():
            self.check_input(x)
        c1 = self.stem(x)
        c2 = self.encoder1(c1)
        c3 = self.encoder2(c2)
        b = self.bridge(self.encoder3(c3))
        d = self.decoder1(c3, b)
        d = self.decoder2(c2, d)
        d = self.decoder3(c1, d)
        return self.head(self.head_aspp(d))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(self(x), self.activation)


def apply_activation(logits: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")


class WithActivation(nn.Module):
    """``model`` followed by its declared output activation: what every artifact computes."""

    def __init__(self, model: ResUNetPlusPlus) -> None:
        super().__init__()
        self.model = model
        self.activation = model.activation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return apply_activation(self.model(images), self.activation)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Weights from the authors' official PyTorch port (DebeshJha/ResUNetPlusPlus,
# ``resunet++_pytorch.py``): modules c1..c4, b1, d1..d3 (a1 attention, r1 residual), aspp, output.
# --------------------------------------------------------------------------------------------
_OFFICIAL_PREFIXES: list[tuple[str, str]] = [
    (r"^c1\.c1\.", "stem.body."), (r"^c1\.c2\.", "stem.shortcut."), (r"^c1\.attn\.net\.", "stem.se.fc."),
]
for _i, _name in ((2, "encoder1"), (3, "encoder2"), (4, "encoder3")):
    _OFFICIAL_PREFIXES += [(rf"^c{_i}\.c1\.", f"{_name}.body."), (rf"^c{_i}\.c2\.", f"{_name}.shortcut."),
                           (rf"^c{_i}\.attn\.net\.", f"{_name}.se.fc.")]
for _src, _dst in (("b1", "bridge"), ("aspp", "head_aspp")):
    _OFFICIAL_PREFIXES += [(rf"^{_src}\.c{k + 1}\.", f"{_dst}.branches.{k}.") for k in range(4)]
    _OFFICIAL_PREFIXES += [(rf"^{_src}\.c5\.", f"{_dst}.project.")]
for _i in (1, 2, 3):
    _OFFICIAL_PREFIXES += [
        (rf"^d{_i}\.a1\.g_conv\.", f"decoder{_i}.attention.skip_conv."),
        (rf"^d{_i}\.a1\.x_conv\.", f"decoder{_i}.attention.x_conv."),
        (rf"^d{_i}\.a1\.gc_conv\.", f"decoder{_i}.attention.out_conv."),
        (rf"^d{_i}\.r1\.c1\.", f"decoder{_i}.block.body."),
        (rf"^d{_i}\.r1\.c2\.", f"decoder{_i}.block.shortcut."),
        (rf"^d{_i}\.r1\.attn\.net\.", f"decoder{_i}.block.se.fc."),
    ]
_OFFICIAL_PREFIXES.append((r"^output\.", "head."))
_OFFICIAL_RE = [(re.compile(a), b) for a, b in _OFFICIAL_PREFIXES]


def is_official_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True for the official port's naming, also when saved from ``nn.DataParallel`` (``module.``)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    return any(k.startswith("c1.c1.") for k in keys) and any(k.startswith("output.") for k in keys)


def map_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the official port's keys to this module's keys; unknown keys raise ``KeyError``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, repl in _OFFICIAL_RE:
            if pattern.match(key):
                out[pattern.sub(repl, key, count=1)] = value
                break
        else:
            raise KeyError(f"key {key!r} is not part of the official ResUNet++ port")
    return out
