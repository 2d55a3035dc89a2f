"""The registry of export formats and precisions; each format is declared where it is implemented.

A format module ``export/<name>_format.py`` declares itself with :func:`register_format`::

    FORMAT = register_format(ExportFormat(
        name="onnx", description="ONNX graphs, verified on ONNX Runtime's CPU provider",
        files={"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8_qdq.onnx"},
        backend="onnxruntime", build=build, order=0))

On first access the registry imports every ``resunetpp.export.*_format`` module (:mod:`pkgutil`),
so a new format needs its module and nothing else: ``resunetpp export --format``, the targets,
the step order, the artifact names and the report all come from here. :func:`export_formats`
lists the formats (what the CLI derives its choices from), :func:`export_precisions` the
precisions, each with a one-line description.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from resunetpp.export.verify import FP16_MIN_DICE, FP32_MAX_ABS_ERROR, INT8_MIN_DICE

if TYPE_CHECKING:
    from resunetpp.export.options import ExportOptions

#: The export in progress a step gets (:class:`resunetpp.export.context.ExportRun`; not imported here: the
#: context reads this registry).
ExportRun = Any


@dataclass(frozen=True)
class Precision:
    """A numeric precision an artifact is built in."""

    name: str
    description: str
    #: Built from calibration images and judged on held-out ones (``--calib``, ``--eval``).
    needs_calibration: bool = False


_PRECISIONS = (
    Precision("fp32", f"32-bit float, the reference: within {FP32_MAX_ABS_ERROR:g} of PyTorch's probabilities"),
    Precision("fp16", f"16-bit float weights and activations, overflow-prone nodes kept FP32; Dice vs FP32 >= "
                      f"{FP16_MIN_DICE:g}"),
    Precision("int8", f"8-bit integer, calibrated on --calib images, judged on held-out ones; Dice vs FP32 >= "
                      f"{INT8_MIN_DICE:g}", needs_calibration=True),
)
#: Every precision's name, in build order.
PRECISIONS = tuple(p.name for p in _PRECISIONS)


def _buildable() -> str | None:
    return None


@dataclass(frozen=True)
class ExportFormat:
    """One export format: what it builds, where each artifact goes, what verifies it, how it is built."""

    name: str
    description: str
    #: The artifact of each precision it builds, relative to ``--out`` (in build order).
    files: Mapping[str, str]
    #: The :mod:`resunetpp.engines` backend that verifies (and runs) its artifacts.
    backend: str
    #: ``build(run, precisions)``: build, verify and write the artifacts of ``precisions``.
    build: Callable[[ExportRun, list[str]], None] = field(repr=False)
    #: Formats run in this order (ONNX first: the others are built from its graphs).
    order: int = 100
    #: Engine options of the verification (OpenVINO: the f32 precision hint).
    verify_options: Mapping[str, Any] = field(default_factory=dict)
    #: Suffixes of the files written beside an artifact under its stem (OpenVINO's ``.bin``).
    companions: tuple[str, ...] = ()
    #: ``None`` when this machine can build the format, else why not (checked once per export).
    availability: Callable[[], str | None] = field(default=_buildable, repr=False)
    #: ``skip(options, precision)``: why these options leave ``precision`` out, or ``None``.
    skip: Callable[[ExportOptions, str], str | None] | None = field(default=None, repr=False)
    #: ``skipped(run, precisions)``: called with the precisions of this format the export skipped.
    skipped: Callable[[ExportRun, list[str]], None] | None = field(default=None, repr=False)
    #: Built when ``--format`` is not given; ``False``: only on request (packagings such as Triton's).
    default: bool = True

    def __hash__(self) -> int:
        return hash(self.name)

    def __post_init__(self) -> None:
        unknown = [p for p in self.files if p not in PRECISIONS]
        if not self.name or not self.files or unknown:
            raise ValueError(f"export format {self.name!r}: needs a name and artifacts of known precisions "
                             f"({', '.join(PRECISIONS)}), got {list(self.files)}")
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "verify_options", MappingProxyType(dict(self.verify_options)))

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions it builds, in :data:`PRECISIONS` order."""
        return tuple(p for p in PRECISIONS if p in self.files)

    def artifact_name(self, precision: str) -> str:
        """The artifact's path relative to ``--out``."""
        if precision not in self.files:
            raise KeyError(f"the {self.name} format builds no {precision} artifact "
                           f"(it builds {', '.join(self.precisions)})")
        return self.files[precision]

    def artifact_files(self, path: Path) -> list[Path]:
        """An artifact written at ``path`` and the files beside it (sidecar not included)."""
        return [path, *(path.with_suffix(s) for s in self.companions)]

    def unavailable(self) -> str | None:
        """Why this machine cannot build the format, or ``None``."""
        return self.availability()


_REGISTRY: dict[str, ExportFormat] = {}
_discovered = False


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to the registry (a format module calls it once, at import); returns it."""
    known = _REGISTRY.get(fmt.name)
    if known is not None and known != fmt:
        raise ValueError(f"export format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def _registry() -> dict[str, ExportFormat]:
    """The registry, after importing every ``resunetpp.export.*_format`` module once."""
    global _discovered
    if not _discovered:
        import resunetpp.export as package

        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_format"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        _discovered = True
    return _REGISTRY


def export_formats() -> tuple[ExportFormat, ...]:
    """Every registered format, in build order."""
    return tuple(sorted(_registry().values(), key=lambda f: (f.order, f.name)))


def export_precisions() -> tuple[Precision, ...]:
    """Every precision, in build order, with its one-line description."""
    return _PRECISIONS


def declared_names() -> tuple[str, ...]:
    """The format names the ``<name>_format.py`` modules declare, read from the module names without
    importing them (they import torch and the runtimes): what ``--help`` lists. A test keeps it
    equal to the registry (:func:`format_names`), which the command itself checks against."""
    import resunetpp.export as package

    return tuple(sorted(m.name[: -len("_format")] for m in pkgutil.iter_modules(package.__path__)
                        if m.name.endswith("_format")))


def format_names() -> tuple[str, ...]:
    return tuple(f.name for f in export_formats())


def get_format(name: str) -> ExportFormat:
    """The format called ``name``; :class:`KeyError` naming the known ones otherwise."""
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown export format {name!r} (known: {', '.join(format_names())})")
    return registry[name]


def get_precision(name: str) -> Precision:
    for p in _PRECISIONS:
        if p.name == name:
            return p
    raise KeyError(f"unknown precision {name!r} (known: {', '.join(PRECISIONS)})")


def artifact_name(fmt: str, precision: str) -> str:
    """Relative path of an artifact inside ``--out``."""
    return get_format(fmt).artifact_name(precision)


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # computed on access: the registry fills on first use
        return format_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMATS", "PRECISIONS", "ExportFormat", "Precision", "artifact_name", "export_formats",
           "export_precisions", "format_names", "get_format", "get_precision", "register_format"]
