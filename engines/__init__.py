"""Inference engines: one interface over PyTorch, ONNX Runtime, OpenVINO and TensorRT.

Each engine opens an artifact written by :mod:`resunetpp.export` (PyTorch checkpoint, ONNX model,
OpenVINO IR, TensorRT engine), reads its metadata record (:mod:`resunetpp.artifact`) and
exposes the preprocessing, classes and activation stored there, so every backend sees the
same tensors and returns the same probabilities::

    from resunetpp import engines

    with engines.open("model.onnx") as engine:          # backend picked from the suffix
        x = engine.preprocessing.apply(image)[None]      # (1, C, H, W) float32
        probs = engine.infer(x)                          # (1, K, H, W) float32

Each backend is declared once, beside its engine class, in :mod:`~resunetpp.engines.registry`
(suffixes, runtime, install hint, devices, benchmark rows); everything here is derived from it,
so a new backend is one new ``engines/<name>_engine.py``. Heavy runtimes are imported only when
an engine of that backend is created, so ``from resunetpp import engines`` needs nothing beyond
torch and numpy. ``resunetpp infer`` and ``resunetpp evaluate`` run through here.
"""

from __future__ import annotations

if __name__ != "resunetpp.engines":  # the folder `engines/` installs as `resunetpp.engines`; never as a second, bare copy
    raise ImportError(f"import resunetpp.engines, not {__name__}: this folder is installed as resunetpp.engines "
                      "(pip install -e . or pip install resunetpp)")

import builtins
from pathlib import Path
from typing import Any

from resunetpp.engines import registry
from resunetpp.engines.base import (
    BackendUnavailableError,
    Engine,
    EngineError,
    EngineInputError,
    EngineOutputError,
    InputConstraints,
    NonFiniteOutputError,
)
from resunetpp.errors import InputFileError

__all__ = [
    "BACKENDS", "SUFFIX_BACKEND", "BackendUnavailableError", "Engine", "EngineError", "EngineInputError",
    "EngineOutputError", "InputConstraints", "NonFiniteOutputError", "available_backends", "backend_for",
    "artifact_suffix", "backends", "engine_class", "open",
]


def backends() -> tuple[str, ...]:
    """The registered backends' names (``torch``, ``onnxruntime``, ``openvino``, ``tensorrt`` ...)."""
    return registry.names()


def __getattr__(name: str) -> Any:
    """``BACKENDS`` (the backends' names), ``SUFFIX_BACKEND`` (the backend that runs each artifact
    suffix by default, ``backend="auto"``) and ``BACKEND_SUFFIXES`` (the suffixes each backend can
    open; OpenVINO also reads ONNX directly), computed from :mod:`~resunetpp.engines.registry`."""
    if name == "BACKENDS":
        return registry.names()
    if name == "SUFFIX_BACKEND":
        return registry.suffix_backends()
    if name == "BACKEND_SUFFIXES":
        return {b.name: b.suffixes for b in registry.backends()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_backends() -> dict[str, str | None]:
    """``{backend: None}`` when usable here, else ``{backend: why not}``; imports nothing heavy."""
    return {b.name: b.problem() for b in registry.backends()}


def artifact_suffix(path: str | Path) -> str:
    """The suffix that says what ``path`` holds: its own, or for a file being written
    atomically (:func:`resunetpp.atomic.atomic_path`: ``.model.onnx.k3j2.onnx.partial``) the one
    before ``.partial``, so a staged artifact can be opened and verified before it is renamed."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".partial":
        return suffixes[-2]
    return Path(path).suffix


def backend_for(path: str | Path) -> str:
    """The default backend of an artifact, from its suffix (:func:`artifact_suffix`)."""
    path = Path(path)
    suffix = artifact_suffix(path)
    suffixes = registry.suffix_backends()
    backend = suffixes.get(suffix.lower())
    if backend is None:
        known = ", ".join(suffixes)
        raise InputFileError(path, f"unsupported model file type {suffix or '(no suffix)'!r}; "
                                   f"expected one of {known}")
    return backend


def readable_model(path: Path) -> None:
    """Refuse a model file this process may not read with the reason (a file without read
    permission is not "No such file", whatever the runtime would say)."""
    try:
        with builtins.open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise InputFileError(path, "cannot read the model file (Permission denied)") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a folder; pass a model file (a checkpoint, .onnx, .xml or .engine)") from None
    except OSError as e:
        raise InputFileError(path, f"cannot read the model file ({e.strerror or e})") from None


def engine_class(backend: str) -> type[Engine]:
    """The engine class of ``backend`` (imports its module, not its runtime)."""
    return registry.get(backend).engine


def open(path_or_checkpoint: Any, backend: str = "auto", device: str | None = None,  # noqa: A001
         *, record: dict | None = None, **options: Any) -> Engine:
    """Open an artifact (or an in-memory :class:`~resunetpp.checkpoint.Checkpoint`) as an engine.

    ``backend="auto"`` picks it from the suffix: ``.safetensors/.pt/.pth`` -> torch, ``.onnx`` ->
    onnxruntime, ``.xml`` -> openvino, ``.engine/.plan`` -> tensorrt (each backend declares its
    suffixes: :mod:`~resunetpp.engines.registry`). ``device`` is the backend's (``cpu``,
    ``cuda[:N]``, ``auto`` ...); ``None`` means the backend's default (``cpu``, or ``cuda`` for
    TensorRT). ``record``, when given, is the artifact's metadata record, used instead of reading
    its sidecar: an artifact verified before it and its sidecar are written (a staging file
    ``*.partial`` is recognised by the suffix before ``.partial``: :func:`artifact_suffix`). The engine is created with
    its metadata read and its options checked; the runtime loads on ``load()``, on entering a
    ``with`` block, or on the first ``infer``.
    """
    from resunetpp.checkpoint import Checkpoint

    if isinstance(path_or_checkpoint, Checkpoint):
        runner = next(b for b in registry.backends() if b.opens_checkpoints)
        if backend not in ("auto", runner.name):
            raise EngineError(f"an in-memory checkpoint runs on the {runner.name} backend, not {backend!r}")
        if record is not None:
            raise EngineError("an in-memory checkpoint carries its own record; pass record= only with a path")
        return runner.engine.from_checkpoint(path_or_checkpoint, device=device or runner.default_device, **options)
    path = Path(path_or_checkpoint)
    if not path.exists():
        raise InputFileError(path, "model file not found")
    if path.is_dir():
        raise InputFileError(path, "is a folder; pass a model file (a checkpoint, .onnx, .xml or .engine)")
    chosen = registry.get(backend_for(path) if backend == "auto" else backend)
    if device is None:
        device = chosen.default_device
    if artifact_suffix(path).lower() not in chosen.suffixes:
        raise InputFileError(path, f"the {chosen.name} backend cannot run a {path.suffix or 'suffix-less'} file "
                                   f"(it runs {', '.join(chosen.suffixes)}); try --backend auto")
    problem = chosen.problem()
    if problem is not None:
        raise BackendUnavailableError(f"{path}: engine: {chosen.name} | unavailable: {problem}")
    readable_model(path)
    if record is not None:
        return chosen.engine(path, record, device=device, **options)
    return chosen.engine.from_path(path, device=device, **options)
