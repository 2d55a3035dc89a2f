"""The engine interface every backend shares (Polygraphy-style: the base owns the public API).

An :class:`Engine` is opened on one artifact and its metadata record
(:mod:`resunetpp.artifact`). It takes float32 ``(N, C, H, W)`` batches, already normalised by
:attr:`Engine.preprocessing`, and returns float32 ``(N, K, H, W)`` probabilities (the model's
activation is part of every artifact). The base class checks inputs and outputs, so every
backend refuses the same bad batches with the same message::

    model.onnx: engine: onnxruntime | input (1, 3, 250, 256) float32 | expected (N, 3, H, W) float32 with H, W multiples of 8

(every :class:`EngineError` an engine's public methods raise starts with the artifact's path),
and a batch whose output holds NaN or Inf raises :class:`NonFiniteOutputError` instead of
returning it. Subclasses implement only ``_load_impl``, ``_infer_impl`` and ``_close_impl``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from resunetpp.artifact import check_record
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.model_config import SIZE_MULTIPLE
from resunetpp.preprocess import Preprocessing

Shape4 = tuple[int, int, int, int]


class EngineError(ResUNetError):
    """A backend that cannot open, run or answer correctly."""


class BackendUnavailableError(EngineError):
    """The backend's runtime (or the requested device) is not available on this machine."""


class EngineInputError(EngineError, ValueError):
    """A batch the engine cannot take: wrong rank, channels, dtype or size."""


class EngineOutputError(EngineError):
    """A backend answered with the wrong shape."""


class NonFiniteOutputError(EngineError, FloatingPointError):
    """A backend answered with NaN or Inf (overflow in reduced precision, a broken artifact)."""


#: A runtime's compute precision names (OpenVINO's ``INFERENCE_PRECISION_HINT`` type names) as artifact precisions.
_COMPUTE_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "fp32": "fp32", "fp16": "fp16"}


def precision_that_ran(described: dict) -> str:
    """The precision an engine really computes in, from :meth:`Engine.describe`: the artifact's,
    or, when the runtime was told otherwise (``-O precision=bf16`` on an FP32 OpenVINO IR), e.g.
    ``"bf16 (fp32 artifact)"``; for INT8 the precision of its float layers when that is not fp32."""
    artifact = str(described.get("precision", "?"))
    compute = _COMPUTE_PRECISION.get(str(described.get("precision_hint")).lower())
    if compute is None or compute == artifact:
        return artifact
    if artifact == "int8":
        return f"int8 (float layers {compute})" if compute != "fp32" else artifact
    return f"{compute} ({artifact} artifact)"


def engine_line(described: dict) -> str:
    """``openvino on CPU (bf16 (fp32 artifact))``: which backend, device and precision ran."""
    return f"{described.get('backend', '?')} on {described.get('device', '?')} ({precision_that_ran(described)})"


def name_file(error: EngineError, path: str | Path) -> EngineError:
    """``error`` with its message starting with ``path`` (``model.onnx: engine: onnxruntime | ...``),
    unless it names it already; the same object (type and traceback kept)."""
    text = str(error)
    if not text.startswith(str(path)):
        error.args = (f"{path}: {text}",)
    return error


def _names_file(method: Callable) -> Callable:
    """Wrap an :class:`Engine` method so the :class:`EngineError` it raises starts with the file."""
    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except EngineError as e:
            where = getattr(self, "path", None) or (args[0] if method.__name__ == "__init__" and args else None)
            if where is None:
                raise
            raise name_file(e, where)

    wrapper.__names_file__ = True  # type: ignore[attr-defined]
    return wrapper


#: Engine methods whose errors name the artifact (in every subclass that defines them, too).
FILE_NAMING_METHODS = ("__init__", "load", "infer", "predict", "runtime_call", "check_input", "check_output",
                       "infer_async_many", "optimal_requests", "kernels")


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass(frozen=True)
class InputConstraints:
    """What ``images`` accepts: channels, an optional fixed batch/size, optional profile bounds."""

    channels: int
    batch: int | None = None  # a static export's batch size
    size: tuple[int, int] | None = None  # a static export's (H, W)
    multiple: int = SIZE_MULTIPLE
    min_shape: Shape4 | None = None  # optimization-profile bounds (TensorRT), inclusive
    max_shape: Shape4 | None = None

    @property
    def max_batch(self) -> int | None:
        """Largest batch one call takes (fixed batch, or the profile's maximum)."""
        if self.batch is not None:
            return self.batch
        return self.max_shape[0] if self.max_shape else None

    def describe(self) -> str:
        n = str(self.batch) if self.batch is not None else "N"
        if self.size is not None:
            text = f"({n}, {self.channels}, {self.size[0]}, {self.size[1]}) float32"
        else:
            text = f"({n}, {self.channels}, H, W) float32 with H, W multiples of {self.multiple}"
        if self.min_shape and self.max_shape:
            text += f" within {_fmt_shape(self.min_shape)} .. {_fmt_shape(self.max_shape)}"
        return text

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != 4 or shape[1] != self.channels or min(shape) <= 0:
            return False
        n, _, h, w = shape
        if self.batch is not None and n != self.batch:
            return False
        if self.size is not None and (h, w) != tuple(self.size):
            return False
        if h % self.multiple or w % self.multiple:
            return False
        if self.min_shape and any(s < lo for s, lo in zip(shape, self.min_shape)):
            return False
        if self.max_shape and any(s > hi for s, hi in zip(shape, self.max_shape)):
            return False
        return True

    @classmethod
    def from_record(cls, record: dict, channels: int) -> "InputConstraints":
        """Fixed batch / size from the record's ``artifact.input_shape`` (ints are static dims)."""
        shape = (record.get("artifact") or {}).get("input_shape") or []
        if len(shape) != 4:
            return cls(channels)
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        size = (shape[2], shape[3]) if all(isinstance(s, int) and s > 0 for s in shape[2:]) else None
        return cls(channels, batch, size)


def _record_value(record: dict, key: str, where: Path) -> Any:
    if key not in record:
        raise InputFileError(where, f"metadata record has no {key!r} (not written by resunetpp export?)")
    return record[key]


class Engine:
    """One artifact on one backend. Use as a context manager, or ``load()`` then ``close()``.

    ``path`` is the artifact, ``record`` its metadata (sidecar / checkpoint record), ``device``
    the backend's device and ``options`` the backend's options (see each subclass).
    """

    backend: ClassVar[str] = "base"
    #: Options the backend understands; anything else is refused when the engine is created.
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every :class:`EngineError` of the public methods starts with the artifact's path
        (``model.onnx: engine: onnxruntime | input ...``), in subclasses as in the base."""
        super().__init_subclass__(**kwargs)
        for name in FILE_NAMING_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "__names_file__", False):
                setattr(cls, name, _names_file(method))

    def __init__(self, path: str | Path, record: dict, *, device: str = "cpu", **options: Any) -> None:
        self.path = Path(path)
        self.device = device
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            known = ", ".join(self.option_names) or "none"
            raise EngineError(f"engine: {self.backend} | unknown option(s) {', '.join(unknown)} | "
                              f"known: {known}")
        self.options = options
        where = self.path
        self._record = check_record(record, where)  # every field typed and in range (read_record checked a file's)
        try:
            self._preprocessing = Preprocessing.from_dict(_record_value(record, "preprocessing", where))
        except (TypeError, ValueError) as e:
            raise InputFileError(where, f"metadata 'preprocessing' is invalid ({e})") from None
        model = record.get("model") or {}
        names = record.get("class_names")
        self._num_classes = int(model.get("num_classes") or (len(names) if names else 1))
        self._class_names = list(names) if names else [f"class{i}" for i in range(self._num_classes)]
        if len(self._class_names) != self._num_classes:
            raise InputFileError(where, f"metadata names {len(self._class_names)} classes for a "
                                        f"{self._num_classes}-class model")
        self._activation = str(record.get("activation") or ("sigmoid" if self._num_classes == 1 else "softmax"))
        self._constraints = InputConstraints.from_record(record, self._preprocessing.channels)
        self._loaded = False

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "cpu", **options: Any) -> "Engine":
        """An engine on the artifact ``path``, its record read from the sidecar (or ONNX metadata)."""
        from resunetpp.artifact import read_record

        return cls(path, read_record(path), device=device, **options)

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The backend's name (``torch``, ``onnxruntime``, ``openvino``, ``tensorrt``)."""
        return self.backend

    @property
    def precision(self) -> str:
        """The artifact's numeric precision (``fp32``, ``fp16``, ``int8`` ...)."""
        return str((self._record.get("artifact") or {}).get("precision", "fp32"))

    @property
    def record(self) -> dict:
        """The artifact's metadata record (a copy is not made: do not modify)."""
        return self._record

    @property
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def input_shape_constraints(self) -> InputConstraints:
        return self._constraints

    @property
    def loaded(self) -> bool:
        return self._loaded

    def describe(self) -> dict:
        """Backend, device, precision and backend details (providers, hints ...) for reports."""
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "file": str(self.path), **self._details()}

    # ---- lifecycle ----------------------------------------------------------------------------
    def load(self) -> "Engine":
        """Create the runtime objects (idempotent); returns ``self``."""
        if not self._loaded:
            self._load_impl()
            self._loaded = True
        return self

    def close(self) -> None:
        """Release the runtime objects (idempotent); ``load()`` may be called again."""
        if self._loaded:
            self._loaded = False
            self._close_impl()

    def __enter__(self) -> "Engine":
        return self.load()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path.name} on {self.device} ({self.precision})>"

    # ---- inference ------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` float32 -> ``(N, K, H, W)`` float32 probabilities (loads on first use)."""
        self.load()  # a backend refines the constraints from the loaded graph (static dims, profile)
        self.check_input(batch)
        out = self._infer_impl(batch)
        return self.check_output(out, batch.shape)

    def runtime_call(self) -> Callable[[np.ndarray], Any]:
        """The backend's own inference call on the loaded engine (loads it): the runtime's call with
        none of :meth:`infer`'s checks and conversions, for measuring what they cost (``resunetpp
        bench``'s ``overhead_pct``). The default is the ``_infer_impl`` hook itself."""
        self.load()
        return self._runtime_call_impl() or self._infer_impl

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`infer` for any batch size: split to the engine's largest batch, pad a fixed one."""
        self.load()
        limit = self._constraints.max_batch
        n = int(batch.shape[0]) if getattr(batch, "ndim", 0) == 4 else 0
        if limit is None or n == 0 or (n == limit if self._constraints.batch else n <= limit):
            return self.infer(batch)
        outs = []
        for start in range(0, n, limit):
            chunk = batch[start:start + limit]
            k = chunk.shape[0]
            if self._constraints.batch is not None and k < limit:
                pad = np.repeat(chunk[-1:], limit - k, axis=0)
                chunk = np.concatenate([chunk, pad])
            outs.append(self.infer(chunk)[:k])
        return np.concatenate(outs)

    def check_input(self, batch: np.ndarray) -> None:
        """Raise :class:`EngineInputError` unless ``batch`` fits :attr:`input_shape_constraints`."""
        if not isinstance(batch, np.ndarray):
            raise EngineInputError(f"engine: {self.name} | input {type(batch).__name__} | expected a numpy "
                                   f"array {self._constraints.describe()}")
        if batch.dtype != np.float32 or not self._constraints.accepts(batch.shape):
            raise EngineInputError(f"engine: {self.name} | input {_fmt_shape(batch.shape)} {batch.dtype} | "
                                   f"expected {self._constraints.describe()}")

    def check_output(self, out: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
        """Float32 ``out`` of shape ``(N, K, H, W)``; :class:`NonFiniteOutputError` on NaN/Inf."""
        n, _, h, w = input_shape
        expected = (n, self._num_classes, h, w)
        out = np.asarray(out)
        if out.shape != expected:
            raise EngineOutputError(f"engine: {self.name} | output {_fmt_shape(out.shape)} for input "
                                    f"{_fmt_shape(input_shape)} | expected {_fmt_shape(expected)} ({self.path.name})")
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        finite = np.isfinite(out)
        if not finite.all():
            bad = int(out.size - np.count_nonzero(finite))
            images = sorted({int(i) for i in np.nonzero(~finite.reshape(n, -1).all(axis=1))[0]})
            raise NonFiniteOutputError(
                f"engine: {self.name} | output has {bad} NaN/Inf value(s) of {out.size} in batch image(s) "
                f"{images} | expected finite probabilities ({self.precision} artifact {self.path.name})")
        return out

    def _refine_constraints(self, dims: list | tuple, *, min_shape: Shape4 | None = None,
                            max_shape: Shape4 | None = None) -> None:
        """Adopt the static dimensions of the loaded graph's input (ints; anything else is dynamic)."""
        c = self._constraints
        dims = list(dims)
        if len(dims) != 4:
            raise EngineError(f"engine: {self.name} | graph input has shape {dims} | expected 4 dimensions (N, C, H, W)")
        static = [d if isinstance(d, int) and d > 0 else None for d in dims]
        if static[1] is not None and static[1] != c.channels:
            raise EngineError(f"engine: {self.name} | graph input has {static[1]} channels | the metadata's "
                              f"preprocessing gives {c.channels} ({self.path.name})")
        batch = static[0] if static[0] is not None else c.batch
        size = (static[2], static[3]) if static[2] is not None and static[3] is not None else c.size
        pre = self._preprocessing
        if size is not None and pre.mode == "resize" and tuple(size) != tuple(pre.size):
            raise EngineError(f"engine: {self.name} | graph input is {size[0]}x{size[1]} | the metadata's "
                              f"preprocessing resizes to {pre.size[0]}x{pre.size[1]} ({self.path.name})")
        self._constraints = InputConstraints(c.channels, batch, size, c.multiple, min_shape or c.min_shape,
                                             max_shape or c.max_shape)

    # ---- backend hooks ------------------------------------------------------------------------
    def _load_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _close_impl(self) -> None:
        raise NotImplementedError

    def _runtime_call_impl(self) -> Callable[[np.ndarray], Any] | None:
        """The runtime's bare call for :meth:`runtime_call`; ``None``: use ``_infer_impl``."""
        return None

    def _details(self) -> dict:
        return {}


for _name in FILE_NAMING_METHODS:  # the base's own methods (subclasses are wrapped by __init_subclass__)
    if _name in Engine.__dict__:
        setattr(Engine, _name, _names_file(Engine.__dict__[_name]))
del _name
