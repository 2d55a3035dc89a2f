"""Floating-point operations per module: what keeping a part of the network in float costs.

Counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one forward pass (convolutions
and matrix products, 2 per multiply-add; element-wise ops are not counted -- on ResUNet++ they
are well under 1% of the work). ``own`` FLOPs are a module's minus its children's, so summing
``own`` over any set of disjoint module paths never counts a convolution twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlopCount:
    total: int
    #: module path (``decoder1.attention.out_conv.2``) -> FLOPs of the module itself, children excluded
    own: dict[str, int]

    def under(self, prefix: str) -> int:
        """FLOPs of the module ``prefix`` and everything below it (``""``: the whole model)."""
        return sum(f for name, f in self.own.items()
                   if not prefix or name == prefix or name.startswith(prefix + "."))

    def share(self, prefixes: Iterable[str]) -> float:
        """Fraction of the total in the modules under any of ``prefixes`` (each counted once)."""
        prefixes = tuple(prefixes)
        if not self.total:
            return 0.0
        hit = sum(f for name, f in self.own.items()
                  if any(name == p or name.startswith(p + ".") for p in prefixes))
        return hit / self.total

    def groups(self, depth: int) -> dict[str, int]:
        """FLOPs per module path cut to ``depth`` parts (the groups of ``resunetpp.export.onnx_format.module_groups``)."""
        out: dict[str, int] = {}
        for name, f in self.own.items():
            if f:
                key = ".".join(name.split(".")[:depth]) if name else "<output>"
                out[key] = out.get(key, 0) + f
        return out


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> FlopCount:
    """FLOPs of ``model`` on one ``(C, H, W)`` input, in total and per module."""
    from torch.utils.flop_counter import FlopCounterMode

    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    root = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *input_shape), dtype=torch.float32))
    finally:
        model.train(was_training)
    # FlopCounterMode keys modules as "<RootClass>.<path>" (and "Global" for the whole pass)
    inclusive = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    paths = {name: name[len(root) + 1:] for name in inclusive if name.startswith(root + ".")}
    # own = inclusive minus the nearest counted descendants (containers such as an
    # nn.ModuleList never run forward, so a module's nearest counted ancestor may skip levels)
    own = {path: inclusive[key] for key, path in paths.items()}
    for path in paths.values():
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:cut])
            if parent in own:
                own[parent] -= inclusive[f"{root}.{path}"]
                break
    own = {path: int(f) for path, f in own.items()}
    total = int(counter.get_total_flops())
    unattributed = total - sum(own.values())
    if unattributed:  # ops run directly in the root module's forward
        own[""] = unattributed
    return FlopCount(total, own)
