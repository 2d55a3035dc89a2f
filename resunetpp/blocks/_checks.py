"""Argument checks shared by the blocks: each raises ``ValueError`` naming the constraint."""

from __future__ import annotations

import torch

from resunetpp.model_config import positive_int  # noqa: F401 - shared with ModelConfig


def tracing() -> bool:
    """True while torch.export / ONNX export / torch.compile traces the module.

    Shape checks that raise on bad input are skipped then: the exported graph declares its
    accepted shapes itself, and data-dependent Python branches would specialise it.
    """
    return bool(torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())
