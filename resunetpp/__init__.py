"""resunetpp: a reference ResUNet++ and the toolkit that takes it to the edge.

The package's public face. Everything here is imported on first use, so ``import resunetpp`` (and
``resunetpp --help``) stays light::

    import resunetpp

    model = resunetpp.load("default")          # or any exported artifact: .onnx, .xml, .engine
    mask = model.predict("image.jpg")          # (H, W) uint8 at the image's size

    net = resunetpp.ResUNetPlusPlus()          # the network itself (PyTorch), returns logits

This module sits above every layer (it re-exports the engines' :func:`load`); the layers below
import their own modules, never this one (``resunetpp._version`` holds the version).
"""

from __future__ import annotations

import importlib
from typing import Any

from resunetpp._version import __version__

#: name -> the module that defines it.
_EXPORTS = {
    "load": "resunetpp.engines.api",
    "SegmentationModel": "resunetpp.engines.api",
    "ModelConfig": "resunetpp.model",
    "ResUNetPlusPlus": "resunetpp.model",
    "WithActivation": "resunetpp.model",
    "count_parameters": "resunetpp.model",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resunetpp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
