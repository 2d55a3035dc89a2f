"""Inference engines: one interface over PyTorch, ONNX Runtime, OpenVINO and TensorRT.

Each engine opens an artifact written by :mod:`export` (PyTorch checkpoint, ONNX model,
OpenVINO IR, TensorRT engine), reads its metadata record (:mod:`resunetpp.artifact`) and
exposes the preprocessing, classes and activation stored there, so every backend sees the
same tensors and returns the same probabilities::

    from resunetpp import engines

    with engines.open("model.onnx") as engine:          # backend picked from the suffix
        x = engine.preprocessing.apply(image)[None]      # (1, C, H, W) float32
        probs = engine.infer(x)                          # (1, K, H, W) float32

Heavy runtimes are imported only when an engine of that backend is created, so
``import engines`` needs nothing beyond torch and numpy. ``resunetpp infer`` and
``resunetpp evaluate`` run through here.
"""



from __future__ import annotations

if __name__ != "resunetpp.engines":  # the folder `engines/` installs as `resunetpp.engines`; never as a second, bare copy
    raise ImportError(f"import resunetpp.engines, not {__name__}: this folder is installed as resunetpp.engines "
                      "(pip install -e . or pip install resunetpp)")

import importlib
import importlib.util
from pathlib import Path
from typing import Any

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
    "engine_class", "open",
]

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")

#: The backend that runs each artifact suffix by default (``backend="auto"``).
SUFFIX_BACKEND = {
    ".safetensors": "torch", ".pt": "torch", ".pth": "torch",
    ".onnx": "onnxruntime",
    ".xml": "openvino",
    ".engine": "tensorrt", ".plan": "tensorrt",
}

#: Suffixes each backend can open (OpenVINO also reads ONNX directly).
BACKEND_SUFFIXES = {
    "torch": (".safetensors", ".pt", ".pth"),
    "onnxruntime": (".onnx",),
    "openvino": (".xml", ".onnx"),
    "tensorrt": (".engine", ".plan"),
}

_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
_ENGINE_MODULES = {"torch": "torch_engine", "onnxruntime": "onnxrt_engine", "openvino": "openvino_engine",
                   "tensorrt": "tensorrt_engine"}
_CLASSES = {"torch": "TorchEngine", "onnxruntime": "OnnxRuntimeEngine", "openvino": "OpenVINOEngine",
            "tensorrt": "TensorRTEngine"}
_INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu)",
    "openvino": "pip install openvino",
    "tensorrt": "pip install tensorrt cuda-python; needs an NVIDIA GPU and driver",
    "torch": "pip install torch",
}


def available_backends() -> dict[str, str | None]:
    """``{backend: None}`` when usable here, else ``{backend: why not}``; imports nothing heavy."""
    result: dict[str, str | None] = {}
    for name, module in _MODULES.items():
        if importlib.util.find_spec(module) is None:
            result[name] = f"{module} is not installed ({_INSTALL_HINTS[name]})"
        else:
            result[name] = None
    if result["tensorrt"] is None:
        result["tensorrt"] = _cuda_problem()
    return result


def _cuda_problem() -> str | None:
    """Why no CUDA device can run TensorRT here, or ``None``."""
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install cuda-python)"
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
    except Exception as e:  # noqa: BLE001 - a missing driver raises various errors
        return f"CUDA runtime unusable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA device (TensorRT engines run only on NVIDIA GPUs)"
    return None


def backend_for(path: str | Path) -> str:
    """The default backend of an artifact, from its suffix."""
    path = Path(path)
    backend = SUFFIX_BACKEND.get(path.suffix.lower())
    if backend is None:
        known = ", ".join(SUFFIX_BACKEND)
        raise InputFileError(path, f"unsupported model file type {path.suffix or '(no suffix)'!r}; "
                                   f"expected one of {known}")
    return backend


def engine_class(backend: str) -> type[Engine]:
    """The engine class of ``backend`` (imports its module, not its runtime)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(f"resunetpp.engines.{_ENGINE_MODULES[backend]}")
    return getattr(module, _CLASSES[backend])


def open(path_or_checkpoint: Any, backend: str = "auto", device: str | None = None,  # noqa: A001
         record: dict | None = None, **options: Any) -> Engine:
    """Open an artifact (or an in-memory :class:`~resunetpp.checkpoint.Checkpoint`) as an engine.

    ``backend="auto"`` picks it from the suffix: ``.safetensors/.pt/.pth`` -> torch, ``.onnx`` ->
    onnxruntime, ``.xml`` -> openvino, ``.engine/.plan`` -> tensorrt. ``device`` is the
    backend's (``cpu``, ``cuda[:N]``, ``auto`` ...); ``None`` means ``cpu``, or ``cuda`` for
    TensorRT. The engine is created with its metadata read and its options checked; the runtime
    loads on ``load()``, on entering a ``with`` block, or on the first ``infer``.

    ``record`` is the artifact's metadata record, used instead of reading its sidecar (or its
    embedded ONNX metadata): an artifact being verified before it is written has no sidecar yet.
    """
    from resunetpp.checkpoint import Checkpoint

    if isinstance(path_or_checkpoint, Checkpoint):
        if backend not in ("auto", "torch"):
            raise EngineError(f"an in-memory checkpoint runs on the torch backend, not {backend!r}")
        if record is not None:
            raise EngineError("an in-memory checkpoint carries its own record; pass record= only with a path")
        return engine_class("torch").from_checkpoint(path_or_checkpoint, device=device or "cpu", **options)
    path = Path(path_or_checkpoint)
    if not path.exists():
        raise InputFileError(path, "model file not found")
    if path.is_dir():
        raise InputFileError(path, "is a folder; pass a model file (a checkpoint, .onnx, .xml or .engine)")
    chosen = backend_for(path) if backend == "auto" else backend
    cls = engine_class(chosen)
    if device is None:
        device = "cuda" if chosen == "tensorrt" else "cpu"
    if path.suffix.lower() not in BACKEND_SUFFIXES[chosen]:
        raise InputFileError(path, f"the {chosen} backend cannot run a {path.suffix or 'suffix-less'} file "
                                   f"(it runs {', '.join(BACKEND_SUFFIXES[chosen])}); try --backend auto")
    problem = available_backends()[chosen] if chosen != "torch" else None
    if problem is not None:
        raise BackendUnavailableError(f"engine: {chosen} | unavailable: {problem}")
    if record is not None:
        return cls(path, record, device=device, **options)
    return cls.from_path(path, device=device, **options)
