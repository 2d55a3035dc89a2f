"""Argument checks shared by the blocks: each raises ``ValueError`` naming the constraint."""

from __future__ import annotations

import torch


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def tracing() -> bool:
    """True while torch.export / ONNX export / torch.compile traces the module.

    Shape checks that raise on bad input are skipped then: the exported graph declares its
    accepted shapes itself, and data-dependent Python branches would specialise it.
    """
    return bool(torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())
